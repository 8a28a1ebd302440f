"""`milan pretrain model.init=PATH`: a new run from published weights (encoder and, where it fits, decoder)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

import milan.recipes.pretrain as pretrain
from _pretrain_cli import pretrain_args
from milan.errors import WeightsError
from milan.io.weights import init_model
from milan.model import MaskedAutoencoder, build_model
from milan.tools.cli import main as cli
from milan.train.checkpoint import latest_checkpoint

TEACHER_DIM = 128  # builtin:shapes
SHAPES = dict(target_dim=TEACHER_DIM, decoder_depth=1)  # what pretrain_args builds (128 wide, 4 heads)


def _losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def authors_layout(model: MaskedAutoencoder) -> dict[str, torch.Tensor]:
    """Our prompting model's weights in the MILAN authors' `model` keys, mapped by hand from their
    `models_milan.py`: encoder keys as timm's, `decoder_*` names, and each block's attention split
    into `attn.q` (the first D rows of our qkv) and `attn.kv` (the k rows, then the v rows)."""
    out = {k.removeprefix("encoder."): v.clone() for k, v in model.state_dict().items() if k.startswith("encoder.")}
    dec = {k.removeprefix("decoder."): v.clone() for k, v in model.state_dict().items() if k.startswith("decoder.")}
    width = dec["embed.weight"].shape[0]
    top = {"embed": "decoder_embed", "norm": "decoder_norm", "head": "decoder_pred"}
    for key, value in dec.items():
        first, _, rest = key.partition(".")
        if key in ("mask_token", "pos_embed"):
            out["mask_token" if key == "mask_token" else "decoder_pos_embed"] = value
        elif first in top:
            out[f"{top[first]}.{rest}"] = value
        elif ".attn.qkv." in key:
            out[f"decoder_{key}".replace(".qkv.", ".q.")] = value[:width]
            out[f"decoder_{key}".replace(".qkv.", ".kv.")] = value[width:]
        else:  # blocks.N.norm1 / norm2 / attn.proj / mlp.fc1 / mlp.fc2: the same names
            out[f"decoder_{key}"] = value
    return out


def _authors_file(path: Path) -> MaskedAutoencoder:
    torch.manual_seed(7)
    model = build_model("milan_vit_shapes_patch8", **SHAPES)
    with torch.no_grad():  # away from the default init, so that a decoder left fresh would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    args = argparse.Namespace(model="mae_vit_shapes", use_clip=True, attn_mask=True, change_decoder=True, blr=1.5e-4)
    torch.save({"model": authors_layout(model), "optimizer": {"state": {}, "param_groups": []}, "epoch": 399,
                "scaler": {"scale": 65536.0}, "args": args}, path)
    return model


def test_first_step_loss_equals_the_same_weights_loaded_by_hand(shapes_root: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """model.init from an authors'-layout file: step 1's loss is the loss of the same weights put into
    our model directly (so encoder and decoder were both mapped), and training goes on from there."""
    ref = _authors_file(tmp_path / "checkpoint-399.pth")
    init_run = tmp_path / "init"
    cli(pretrain_args(shapes_root, init_run, f"model.init={tmp_path / 'checkpoint-399.pth'}", "optim.steps=12",
                      "optim.warmup_steps=2"))
    losses = _losses(init_run)
    found = latest_checkpoint(init_run)
    assert found is not None and found[1]["step"] == 12  # a new run: counted from step 0

    build = pretrain.build_step

    def by_hand(*args, **kwargs):
        step = build(*args, **kwargs)
        step.model.load_state_dict(ref.state_dict())
        return step

    monkeypatch.setattr(pretrain, "build_step", by_hand)
    cli(pretrain_args(shapes_root, tmp_path / "by_hand", "optim.steps=1"))
    monkeypatch.setattr(pretrain, "build_step", build)
    cli(pretrain_args(shapes_root, tmp_path / "fresh", "optim.steps=1"))
    first, by_hand_loss, fresh = losses[0], _losses(tmp_path / "by_hand")[0], _losses(tmp_path / "fresh")[0]
    print(f"step-1 loss: model.init {first:.6f}, by hand {by_hand_loss:.6f}, fresh init {fresh:.6f}")
    assert first == pytest.approx(by_hand_loss, abs=1e-6)
    assert abs(first - fresh) > 1e-3  # the control: the init is not the default one
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.02, losses  # training continues


def test_a_decoder_that_does_not_fit_is_refused_by_name(tmp_path: Path) -> None:
    ref = _authors_file(tmp_path / "ckpt.pth")
    other = build_model("milan_vit_shapes_patch8", target_dim=TEACHER_DIM, decoder="mae", decoder_depth=1)
    with pytest.raises(WeightsError, match=r"prompting decoder but this run's model.decoder=mae.*init_decoder=false"):
        init_model(other, tmp_path / "ckpt.pth")
    wide = build_model("milan_vit_shapes_patch8", target_dim=TEACHER_DIM, decoder_depth=2)
    with pytest.raises(WeightsError, match=r"missing decoder\.blocks\.1\..*init_decoder=false"):
        init_model(wide, tmp_path / "ckpt.pth")
    teacher = build_model("milan_vit_shapes_patch8", target_dim=64, decoder_depth=1)
    with pytest.raises(WeightsError, match=r"predicts 128-d targets, this run's 64-d"):
        init_model(teacher, tmp_path / "ckpt.pth")
    # init_decoder=false: the encoder only, the decoder stays as built
    fresh = teacher.decoder.state_dict()
    said = init_model(teacher, tmp_path / "ckpt.pth", init_decoder=False)
    assert "decoder freshly initialised (model.init_decoder=false" in said
    assert all(torch.equal(v, fresh[k]) for k, v in teacher.decoder.state_dict().items())
    assert torch.equal(teacher.encoder.blocks[0].attn.qkv.weight, ref.encoder.blocks[0].attn.qkv.weight)


def test_an_encoder_only_file_leaves_the_decoder_fresh(tmp_path: Path) -> None:
    ref = build_model("milan_vit_shapes_patch8", **SHAPES)
    torch.save({"model": {k.removeprefix("encoder."): v for k, v in ref.state_dict().items()
                          if k.startswith("encoder.")}}, tmp_path / "enc.pth")
    model = build_model("milan_vit_shapes_patch8", **SHAPES)
    assert "decoder freshly initialised (the file has none)" in init_model(model, tmp_path / "enc.pth")
    assert torch.equal(model.encoder.cls_token, ref.encoder.cls_token)
