"""Activation checkpointing (`model.grad_checkpointing`): the same losses and gradients as without, bit for
bit on CPU (the recomputation runs the very same kernels on the same inputs, and the non-reentrant
checkpoint replays the RNG, so drop path draws the same masks), and it really keeps fewer tensors for
backward (counted with `torch.autograd.graph.saved_tensors_hooks`, unique storages)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint
from torch import nn

from _pretrain_cli import pretrain_args
from milan.dense.backbone import ViTPyramid
from milan.encoder import MaskedViTEncoder
from milan.masking import random_masking
from milan.model import build_model
from milan.tools.cli import main as cli
from milan.train.checkpoint import latest_checkpoint


def _saved_bytes(run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """`run()`'s output and the bytes autograd keeps for its backward (unique storages)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return out, sum(storages.values())


def _loss_grads_saved(module: nn.Module, run: Callable[[], torch.Tensor], *, seed: int = 3):
    torch.manual_seed(seed)  # drop path draws from the global RNG
    module.zero_grad(set_to_none=True)
    loss, saved = _saved_bytes(run)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}, saved


def _assert_same_and_fewer(module: nn.Module, run: Callable[[], torch.Tensor], set_ckpt: Callable[[bool], None],
                           *, at_most: float) -> None:
    set_ckpt(False)
    loss, grads, plain = _loss_grads_saved(module, run)
    set_ckpt(True)
    loss_ck, grads_ck, checkpointed = _loss_grads_saved(module, run)
    assert torch.equal(loss, loss_ck)
    assert grads.keys() == grads_ck.keys() and len(grads) == sum(1 for p in module.parameters() if p.requires_grad)
    for name in grads:
        assert torch.equal(grads[name], grads_ck[name]), name
    assert checkpointed < at_most * plain, (checkpointed, plain)


@pytest.mark.parametrize("decoder", ["prompting", "mae"])
def test_pretrain_model_same_gradients_fewer_saved_tensors(decoder: str) -> None:
    model = build_model("milan_vit_shapes_patch8", target_dim=32, decoder=decoder, decoder_depth=2, decoder_dim=64,
                        decoder_heads=2, drop_path_rate=0.2).train()
    images, targets = torch.randn(2, 3, 64, 64), torch.randn(2, 65, 32)
    mask = random_masking(2, 64, 0.75, generator=torch.Generator().manual_seed(0))
    _assert_same_and_fewer(model, lambda: model(images, mask, targets).loss, model.set_grad_checkpointing,
                           at_most=0.2)
    assert model.encoder.grad_checkpointing and model.decoder.grad_checkpointing


def test_decoder_alone_is_checkpointed() -> None:
    """The decoder's own switch works (not only through the encoder's)."""
    model = build_model("milan_vit_shapes_patch8", target_dim=32, decoder_depth=4, decoder_dim=64, decoder_heads=2)
    images, targets = torch.randn(2, 3, 64, 64), torch.randn(2, 65, 32)
    mask = random_masking(2, 64, 0.75, generator=torch.Generator().manual_seed(0))
    _assert_same_and_fewer(model, lambda: model(images, mask, targets).loss, model.decoder.set_grad_checkpointing,
                           at_most=0.9)


def test_finetune_classifier_same_gradients_fewer_saved_tensors() -> None:
    from milan.encoder import ENCODER_PRESETS
    from milan.train.classify import build_classifier

    model = build_classifier(ENCODER_PRESETS["vit_shapes_patch8"], 5, drop_path=0.2).train()
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])
    _assert_same_and_fewer(model, lambda: nn.functional.cross_entropy(model(images), labels),
                           model.set_grad_checkpointing, at_most=0.2)


@pytest.mark.parametrize("mode", ["intermediate", "simple"])
def test_dense_pyramid_same_gradients_fewer_saved_tensors(mode: str) -> None:
    encoder = MaskedViTEncoder(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=2, drop_path_rate=0.2)
    pyramid = ViTPyramid(encoder, mode=mode, out_channels=16).train()
    images = torch.randn(2, 3, 64, 64)
    # the necks' activations are not checkpointed; the blocks' are
    _assert_same_and_fewer(pyramid, lambda: sum(f.square().mean() for f in pyramid(images).values()),
                           encoder.set_grad_checkpointing, at_most=0.6)


def _count_checkpoints(monkeypatch: pytest.MonkeyPatch, *, with_grad_only: bool = True) -> list[int]:
    """Calls of torch's checkpoint (`with_grad_only`: while autograd records; timm's classifier also goes
    through it under no_grad, in evaluation, where it only runs the blocks)."""
    calls: list[int] = []
    original = torch.utils.checkpoint.checkpoint

    def spy(*args, **kwargs):
        assert kwargs.get("use_reentrant") is False
        if torch.is_grad_enabled() or not with_grad_only:
            calls.append(1)
        return original(*args, **kwargs)
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    return calls


def test_no_checkpointing_without_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluation (no_grad) runs the plain blocks: nothing to recompute."""
    model = build_model("milan_vit_shapes_patch8", target_dim=32, decoder_depth=1, decoder_dim=64, decoder_heads=2)
    model.set_grad_checkpointing(True)
    calls = _count_checkpoints(monkeypatch, with_grad_only=False)
    mask = random_masking(2, 64, 0.75, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64), mask, torch.randn(2, 65, 32))
    assert calls == []
    model(torch.randn(2, 3, 64, 64), mask, torch.randn(2, 65, 32))
    assert len(calls) == 6 + 1  # 6 encoder blocks, 1 decoder block


# --- the recipes: the key reaches the model, and the run is the same -----------------------------------


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_pretrain_recipe_same_run_with_grad_checkpointing(shapes_root: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    args = ("optim.steps=3", "model.decoder_depth=2")
    cli(pretrain_args(shapes_root, tmp_path / "plain", *args))
    calls = _count_checkpoints(monkeypatch)
    cli(pretrain_args(shapes_root, tmp_path / "ckpt", *args, "model.grad_checkpointing=true"))
    assert len(calls) == 3 * (6 + 2)  # every step: 6 encoder blocks + 2 decoder blocks
    assert _losses(tmp_path / "plain") == _losses(tmp_path / "ckpt")
    a, b = latest_checkpoint(tmp_path / "plain")[1]["model"], latest_checkpoint(tmp_path / "ckpt")[1]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_recipe_same_run_with_grad_checkpointing(shapes_root: Path, random_pretrain_checkpoint: Path,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def args(out: Path, *extra: str) -> list[str]:
        return ["finetune", f"model.weights={random_pretrain_checkpoint}", "data.kind=shapes", f"data.path={shapes_root}",
                "data.img_size=32", "data.num_workers=0", "model.drop_path=0.1", "optim.batch_size=16",
                "optim.epochs=1", "optim.warmup_epochs=0", "optim.lr=1e-3", f"run.out_dir={out}", "run.device=cpu",
                "run.tensorboard=false", "run.log_every=1", *extra]
    cli(args(tmp_path / "plain"))
    calls = _count_checkpoints(monkeypatch)
    cli(args(tmp_path / "ckpt", "model.grad_checkpointing=true"))
    assert len(calls) == 4 * 6  # 4 steps of 16 (64 images), 6 blocks each
    assert _losses(tmp_path / "plain") == _losses(tmp_path / "ckpt")
    a = torch.load(tmp_path / "plain" / "checkpoint-last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "ckpt" / "checkpoint-last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
