"""Weight files are told apart by their bytes, and each unreadable kind gets its own message.

Junk, real pickled objects, truncated zips / pickles / safetensors, HTML pages and Git LFS pointers
each say what the file is and what to do; torch's own advice (`weights_only=False`) never reaches
the user, and nothing in a file is ever run.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from _evil import Evil
from milan.errors import CheckpointError, UserError, WeightsError
from milan.io.safe_load import file_kind, load_weights, read_torch_file
from milan.io.weights import encoder_state_dict
from milan.train.checkpoint import load_checkpoint


def _write(kind: str, path: Path, marker: Path) -> None:
    """A file of `kind` at `path`."""
    if kind == "junk":
        path.write_bytes(bytes(range(7, 200)))
    elif kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "pickled_object":
        torch.save({"w": torch.zeros(3), "payload": Evil(str(marker))}, path)
    elif kind == "pickled_object_legacy":
        torch.save({"payload": Evil(str(marker))}, path, _use_new_zipfile_serialization=False)
    elif kind == "raw_pickle":
        path.write_bytes(pickle.dumps(Evil(str(marker))))
    elif kind == "whole_module":
        torch.save(torch.nn.Linear(2, 2), path)
    elif kind in ("truncated_zip", "truncated_legacy"):
        torch.save({"w": torch.zeros(256)}, path, _use_new_zipfile_serialization=kind == "truncated_zip")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated_safetensors":
        save_file({"w": torch.zeros(256)}, str(path))
        path.write_bytes(path.read_bytes()[:-100])
    elif kind == "html":
        path.write_text("<!DOCTYPE html>\n<html><head><title>Model page</title></head></html>\n")
    elif kind == "lfs_pointer":
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 599\n")
    else:
        raise AssertionError(kind)


# kind -> what the message must say (what the file is, and the fix)
CASES = {
    "junk": r"is not a weights file \(it starts with b'\\x07\\x08.*'\): expected (a torch state dict or "
            r"checkpoint .*\.safetensors.*TorchScript|a milan checkpoint|a checkpoint written by milan)",
    "text": r"is not a weights file \(it starts with b'this is not a ch'\)",
    "empty": r"is empty \(0 bytes\).*again",
    "pickled_object": r"holds pickled Python objects \((io|builtins)\.open\).*arbitrary code.*refused.*"
                      r"state_dict\(\)",
    "pickled_object_legacy": r"holds pickled Python objects \((io|builtins)\.open\).*refused",
    "raw_pickle": r"holds pickled Python objects \((io|builtins)\.open\).*refused",
    "whole_module": r"holds pickled Python objects \(torch\.nn\.modules\.linear\.Linear\).*"
                    r"torch\.save\(model\.state_dict\(\)",
    "truncated_zip": r"is a truncated or damaged zip archive .*stopped early.*again",
    "truncated_legacy": r"is truncated \(\d+ bytes, cut off before its end\).*again",
    "truncated_safetensors": r"is not a valid safetensors file .*cut off.*again",
    "html": r"is an HTML page, not a weights file.*huggingface-cli download",
    "lfs_pointer": r"is a Git LFS pointer, not the weights.*git lfs pull",
}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", list(CASES))
def test_each_unreadable_file_says_what_it_is(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    suffix = ".safetensors" if kind == "truncated_safetensors" else ".pt"
    path = tmp_path / f"{kind}{suffix}"
    _write(kind, path, marker)
    readers = [
        (lambda: load_weights(path), WeightsError),  # teachers
        (lambda: encoder_state_dict(path), WeightsError),  # fine-tuning / evaluation weights
        (lambda: load_checkpoint(path), CheckpointError),  # resume
    ]
    for read, error in readers:
        with pytest.raises(error, match=CASES[kind]) as info:
            read()
        message = str(info.value)
        assert str(path) in message and "\n" not in message, message
        assert "weights_only" not in message and "Re-running" not in message, message
        assert not marker.exists()  # nothing in the file ran


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_junk_is_not_called_unsafe_and_pickles_are(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _write("junk", tmp_path / "junk.pt", marker)
    _write("raw_pickle", tmp_path / "evil.pt", marker)
    with pytest.raises(WeightsError) as junk:
        load_weights(tmp_path / "junk.pt")
    with pytest.raises(WeightsError) as evil:
        load_weights(tmp_path / "evil.pt")
    assert "pickled" not in str(junk.value) and "arbitrary code" not in str(junk.value)
    assert "arbitrary code" in str(evil.value)


def test_format_is_told_from_the_bytes_not_the_name(tmp_path: Path) -> None:
    state = {"w": torch.arange(4.0)}
    save_file(state, str(tmp_path / "model.bin"))  # a safetensors file under another name
    torch.save(state, tmp_path / "model.safetensors")  # and a torch.save file named .safetensors
    assert file_kind(tmp_path / "model.bin") == "safetensors"
    assert file_kind(tmp_path / "model.safetensors") == "torch_zip"
    for name in ("model.bin", "model.safetensors"):
        loaded, activation = load_weights(tmp_path / name)
        assert torch.equal(loaded["w"], state["w"]) and activation is None


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_torchscript_archive_is_not_a_checkpoint(tmp_path: Path) -> None:
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "scripted.pt")
    with pytest.raises(CheckpointError, match=r"is a TorchScript archive .*not a checkpoint written by milan.*"
                                              r"run\.resume=auto"):
        load_checkpoint(tmp_path / "scripted.pt")


def test_read_torch_file_uses_the_callers_words(tmp_path: Path) -> None:
    (tmp_path / "x.pt").write_bytes(b"\x00" * 40)
    with pytest.raises(UserError, match=r"^my file .*x\.pt is not a weights file .*: expected something "
                                        r"good\. Do this$"):
        read_torch_file(tmp_path / "x.pt", subject="my file", expected="something good", fix="Do this")


_TRACED_QUICK = '''class {name}(Module):
  training : bool
  def forward(self: __torch__.clip.model.___torch_mangle_9.{name},
    argument_1: Tensor) -> Tensor:
    _0 = torch.sigmoid(torch.mul(argument_1, CONSTANTS.c1))
    return torch.mul(argument_1, _0)
'''
_SCRIPTED_QUICK = '''class QuickGELU(Module):
  def forward(self: __torch__.open_clip.transformer.QuickGELU,
    x: Tensor) -> Tensor:
    _1 = torch.mul(x, torch.sigmoid(torch.mul(x, {alpha})))
    return _1
'''
_GELU = '''class GELU(Module):
  approximate : Final[str] = "{approximate}"
  def forward(self: __torch__.torch.nn.modules.activation.GELU,
    input: Tensor) -> Tensor:
    return torch.gelu(input{arg})
'''


@pytest.mark.parametrize(("source", "constants", "name", "expected"), [
    (_TRACED_QUICK.format(name="QuickGELU"), [torch.tensor(0), torch.tensor(1.702, dtype=torch.float64)],
     "QuickGELU", "quick_gelu"),
    (_TRACED_QUICK.format(name="Act"), [torch.tensor(0), torch.tensor(1.702, dtype=torch.float64)], "Act",
     "quick_gelu"),  # the code decides, not the name
    (_TRACED_QUICK.format(name="Act"), [torch.tensor(0), torch.tensor(1.0)], "Act", "unknown"),  # x * sigmoid(x)
    (_TRACED_QUICK.format(name="QuickGELU"), None, "QuickGELU", "quick_gelu"),  # constant unreadable, name says
    (_TRACED_QUICK.format(name="Act"), None, "Act", "unknown"),
    (_SCRIPTED_QUICK.format(alpha="1.702"), None, "QuickGELU", "quick_gelu"),
    (_SCRIPTED_QUICK.format(alpha="1."), None, "QuickGELU", "unknown"),
    (_GELU.format(approximate="none", arg=""), None, "GELU", "gelu"),
    (_GELU.format(approximate="tanh", arg=', approximate="tanh"'), None, "GELU", "gelu_tanh"),
    (None, None, "QuickGELU", "unknown"),  # no code in the archive
])
def test_activation_is_read_from_torchscript_code(source, constants, name, expected) -> None:
    from milan.io.safe_load import _activation_of

    assert _activation_of(source, constants, name) == expected


def test_encoder_weights_follow_the_bytes_too(tmp_path: Path) -> None:
    # A torch.save file named .safetensors (and the reverse) reads as what it is.
    from milan.encoder import ENCODER_PRESETS, MaskedViTEncoder

    state = MaskedViTEncoder.from_config(ENCODER_PRESETS["vit_shapes_patch8"]).state_dict()
    torch.save({"model": state}, tmp_path / "enc.safetensors")
    save_file(state, str(tmp_path / "enc.pt"))
    for name in ("enc.safetensors", "enc.pt"):
        loaded, _ = encoder_state_dict(tmp_path / name)
        assert torch.equal(loaded["cls_token"], state["cls_token"]), name


def test_a_training_scripts_namespace_loads_and_nothing_else_gets_through(tmp_path: Path) -> None:
    """MAE's, the MILAN authors' and SLIP's checkpoints keep their `args` as an argparse.Namespace:
    allowed by name. The same file with any other object beside it is still refused unrun."""
    args = argparse.Namespace(model="mae_vit_base_patch16", blr=1.5e-4, input_size=224, mask_ratio=0.75)
    good = tmp_path / "checkpoint-399.pth"
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 399, "args": args}, good)
    state = read_torch_file(good, subject="checkpoint", expected="a checkpoint")
    assert isinstance(state["args"], argparse.Namespace) and state["args"].blr == 1.5e-4
    assert torch.equal(state["model"]["w"], torch.ones(2))

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": args, "payload": Evil(str(marker))}, evil)
    with pytest.raises(WeightsError, match=r"pickled Python objects \((io|builtins)\.open\)") as err:
        read_torch_file(evil, subject="checkpoint", expected="a checkpoint")
    assert "Namespace" not in str(err.value)
    assert not marker.exists()
