"""Shared by the pretrain tests: the CLI arguments of a tiny run (the data: conftest's `shapes_root`)."""

from __future__ import annotations

from pathlib import Path


def pretrain_args(root: Path, out: Path, *extra: str) -> list[str]:
    """`milan pretrain` on the shapes config, shrunk to 4 steps of 8 images in the main process."""
    return [
        "pretrain", "--config", "pretrain_shapes", f"data.path={root}", f"run.out_dir={out}",
        "data.num_workers=0", "optim.batch_size=8", "optim.steps=4", "optim.warmup_steps=1",
        "run.log_every=1", "run.tensorboard=false", "model.decoder_depth=1", "monitor.every=0", *extra,
    ]
