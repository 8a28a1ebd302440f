"""Gradient accumulation (`optim.accum_steps`) in every training recipe: 4 micro-batches of 2 images give
the run that batches of 8 give (the logged losses and gradient norms, and the weights after a few
optimizer steps), up to the order of float sums.

Why not bit for bit: a micro-batch's loss is a mean over its 2 images, the loop divides it by 4 and
autograd adds the 4 gradients, where batch 8 takes one mean over 8; the sums run in another order
(float32 rounding, ~1e-7 relative per step), and AdamW's first steps (update ≈ lr·sign(grad)) can turn a
rounding difference in a near-zero gradient into a difference of up to ~lr in that weight (the key
bias of attention has a zero gradient in exact arithmetic, so it is left out of the mean). Hence the
tolerances: losses and gradient norms rtol 1e-4; weights within lr/10 anywhere and lr/1000 on average
per tensor (seen: ~1e-6 and ~1e-9 at lr 1e-3; a real bug — the loss not divided by accum_steps, a micro-batch skipped or
repeated, steps counted per micro-batch — moves the logged loss or gradient norm by whole factors, or
every weight by ~lr).

What legitimately differs with micro-batches is switched off in each test, with the reason there:
random per-sample draws (drop path, dropout, mixup/cutmix pairs) that come from the global RNG and
interleave differently; BatchNorm statistics over 2 images instead of 8; losses normalised over the
batch's labelled pixels / sampled anchors and RoIs. The data itself is the same: every recipe's
sampler orders the epoch by (seed, epoch) and seeds each sample's augmentation by its index (or, in
finetune, draws the augmentations in sample order from the global RNG, which the model's forward then
leaves untouched), so micro-batch m holds images 2m, 2m+1 of the batch of 8.
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from _pretrain_cli import pretrain_args
from milan.tools.cli import main as cli
from milan.train.checkpoint import latest_checkpoint, load_checkpoint

LR = 1e-3
STEPS = 3


def _records(run: Path) -> list[dict[str, Any]]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _assert_same_run(batch8: Path, accum4: Path, *, model_key: str = "model", lr: float = LR,
                     fields: tuple[str, ...] = ("loss", "grad_norm")) -> None:
    a, b = _records(batch8), _records(accum4)
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) >= STEPS
    for field in fields:
        torch.testing.assert_close(torch.tensor([r[field] for r in b]), torch.tensor([r[field] for r in a]),
                                   rtol=1e-4, atol=1e-6, msg=field)
    wa = _model(batch8, model_key)
    wb = _model(accum4, model_key)
    assert wa.keys() == wb.keys()
    for key, value in wa.items():
        if not value.is_floating_point():
            continue
        diff = (value - wb[key]).abs()
        if key.endswith("attn.qkv.bias"):  # its key third has a zero gradient (softmax ignores a shift shared
            diff = torch.cat([diff[:len(diff) // 3], diff[-len(diff) // 3:]])  # by all keys): AdamW moves it on noise
        assert diff.max() <= 0.1 * lr, (key, diff.max())
        assert diff.mean() <= 1e-3 * lr, (key, diff.mean())
    # the runs did train (the comparison is not between two untouched initialisations)
    first = _records(batch8)[0]["loss"]
    assert first != _records(batch8)[-1]["loss"]


def _model(run: Path, key: str) -> dict[str, torch.Tensor]:
    found = latest_checkpoint(run)
    state = found[1] if found is not None else load_checkpoint(run / "checkpoint-last.pt")
    return state[key]


def test_mask_noise_is_the_same_however_the_step_is_split() -> None:
    """The masks of pretraining: image i of a step's global batch gets the same noise row whether the step
    runs as 1 × 8 images on 1 process, 4 micro-batches × 2, or 2 processes × 2 micro-batches × 2."""
    from milan.recipes.pretrain import mask_noise

    whole = mask_noise(7, 5, 0, (8, 16))
    accum = torch.cat([mask_noise(7, 5, m, (2, 16), accum_steps=4) for m in range(4)])
    assert torch.equal(accum, whole)
    # 2 ranks: rank r's micro-batch m holds global images m·B·W + r + W·b (the sampler's order[r::W])
    world = torch.empty(8, 16)
    for rank in range(2):
        for m in range(2):
            rows = mask_noise(7, 5, m, (2, 16), rank=rank, world_size=2, accum_steps=2)
            world[[m * 4 + rank + 2 * b for b in range(2)]] = rows
    assert torch.equal(world, whole)
    assert not torch.equal(mask_noise(7, 6, 0, (8, 16)), whole)  # another step, other masks


def test_pretrain_accum_4x2_equals_batch_8(shapes_root: Path, tmp_path: Path) -> None:
    """Nothing to switch off: the student has LayerNorm only, no dropout or drop path, the teacher runs in
    eval mode, eq. 1 is a mean over images, and the masks come from `mask_noise` per image."""
    common = (f"optim.steps={STEPS}", "model.decoder_depth=1")
    cli(pretrain_args(shapes_root, tmp_path / "b8", *common))  # optim.batch_size=8
    cli(pretrain_args(shapes_root, tmp_path / "a4", *common, "optim.batch_size=2", "optim.accum_steps=4"))
    _assert_same_run(tmp_path / "b8", tmp_path / "a4")


def test_finetune_accum_4x2_equals_batch_8(shapes_root: Path, random_pretrain_checkpoint: Path,
                                           tmp_path: Path) -> None:
    """Mixup/cutmix off (they pair images within a batch: 2 images pair differently than 8) and drop path
    off (its per-sample draws come from the global RNG, where the next micro-batch's RandAugment and
    random erasing draw too, so the draws interleave differently). RandAugment, random erasing, random
    crops, flips and label smoothing stay on."""
    def args(out: Path, *extra: str) -> list[str]:
        return ["finetune", f"model.weights={random_pretrain_checkpoint}", "data.kind=shapes",
                f"data.path={shapes_root}", "data.img_size=32", "data.num_workers=0", "model.drop_path=0",
                "mixup.mixup=0", "mixup.cutmix=0", "optim.epochs=1", "optim.warmup_epochs=0", f"optim.lr={LR}",
                f"run.out_dir={out}", "run.device=cpu", "run.tensorboard=false", "run.log_every=1", *extra]
    cli(args(tmp_path / "b8", "optim.batch_size=8"))
    cli(args(tmp_path / "a4", "optim.batch_size=2", "optim.accum_steps=4"))
    _assert_same_run(tmp_path / "b8", tmp_path / "a4")


def _frozen_batchnorm(build: Any) -> Any:
    """`build_segmenter` whose BatchNorm layers stay in eval mode (running statistics, a per-image map)."""
    def wrapped(*args: Any, **kwargs: Any) -> nn.Module:
        model = build(*args, **kwargs)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train = types.MethodType(lambda self, mode=True: nn.Module.train(self, False), module)
                module.eval()
        return model
    return wrapped


def test_segment_accum_4x2_equals_batch_8(shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not equal as the recipe trains: the UperNet and FCN heads' BatchNorm normalise with the statistics
    of the micro-batch (2 images, or 2 per GPU as in A.1's 8 × 2) where batch 8 uses 8 images' — so
    accumulation is not a bigger batch for BatchNorm, as in mmseg. Tested with the BatchNorm layers in
    eval mode (running statistics: a per-image map), dropout and drop path off (global-RNG draws per
    micro-batch), and crops that never need padding (`data.ratio_range=[1, 2]`): the pixel loss is a
    mean over the micro-batch's labelled pixels, equal to the batch's when every pixel is labelled."""
    import milan.recipes.segment as segment

    monkeypatch.setattr(segment, "build_segmenter", _frozen_batchnorm(segment.build_segmenter))

    def args(out: Path, *extra: str) -> list[str]:
        return ["segment", "--config", "segment_shapes", f"data.path={shapes_root}", f"run.out_dir={out}",
                "model.channels=16", "model.aux_channels=16", "model.dropout=0", "model.drop_path=0",
                "data.ratio_range=[1.0,2.0]", f"optim.iters={STEPS}", "optim.warmup_iters=1", f"optim.lr={LR}",
                "data.val_limit=4", "data.num_workers=0", "run.eval_every=0", "run.log_every=1", *extra]
    cli(args(tmp_path / "b8", "optim.batch_size=8"))
    cli(args(tmp_path / "a4", "optim.batch_size=2", "optim.accum_steps=4"))
    _assert_same_run(tmp_path / "b8", tmp_path / "a4", fields=("loss", "seg_loss", "grad_norm"))


class _OneImage(torch.utils.data.Dataset):
    """Every index is image 0 (with its boxes and masks)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[0]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["dataset"], name)


def test_detect_accum_4x2_equals_batch_8(shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not equal on real data, by torchvision's design: the RPN and RoI losses are means over the anchors
    and RoIs sampled in the whole (micro-)batch, and the mask loss a mean over its positive RoIs, whose
    counts differ from image to image; the samplers draw from the global RNG per micro-batch. What holds
    and is tested: with every training image the same (so each micro-batch has the batch's counts),
    sampling that takes every anchor and RoI (its random order then only changes float sums) and drop
    path off, 4 × 2 trains as 8. This checks the recipe's side of accumulation (the loss scaling, steps
    per epoch, the iteration schedule, the log), not the order of the images in the micro-batches
    (the pretrain, finetune and segment tests do, through the same loop and sampler)."""
    import milan.recipes.detect as detect

    build = detect.build_datasets

    def one_image(data: Any) -> Any:
        train, *rest = build(data)
        return (_OneImage(train), *rest)
    monkeypatch.setattr(detect, "build_datasets", one_image)

    def args(out: Path, *extra: str) -> list[str]:
        return ["detect", "--config", "detect_shapes", f"data.path={shapes_root}", f"run.out_dir={out}",
                "data.num_workers=0", "data.hflip=0", "model.drop_path=0", "model.rpn_batch_size_per_image=100000",
                "model.box_batch_size_per_image=100000", "optim.epochs=1", f"run.max_steps={STEPS}",
                "optim.warmup_iters=2", f"optim.lr={LR}", "run.eval_every_epochs=100", "data.val_limit=2",
                "run.log_every=1", *extra]
    cli(args(tmp_path / "b8", "optim.batch_size=8"))
    cli(args(tmp_path / "a4", "optim.batch_size=2", "optim.accum_steps=4"))
    _assert_same_run(tmp_path / "b8", tmp_path / "a4")
