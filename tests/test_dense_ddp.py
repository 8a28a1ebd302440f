"""`milan segment` / `milan detect` under torchrun: two CPU (gloo) processes train, evaluate and checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from milan.data.shapes import generate_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("ddp") / "shapes", num_train=32, num_val=8, progress=False)


def _torchrun(args: list[str], cwd: Path, port: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
         "-m", "milan", *args, "run.device=cpu", "data.num_workers=0", "run.tensorboard=false"],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_segment_two_processes(shapes: Path, tmp_path: Path) -> None:
    out = tmp_path / "seg"
    _torchrun(["segment", "--config", "segment_shapes", f"data.path={shapes}", f"run.out_dir={out}",
               "model.channels=16", "model.aux_channels=16", "optim.iters=2", "optim.warmup_iters=1",
               "optim.batch_size=4", "data.val_limit=8", "run.eval_every=0"], tmp_path, 29541)
    results = json.loads((out / "results.json").read_text())
    assert results["step"] == 2 and 0.0 <= results["last"]["mIoU"] <= 1.0
    assert torch.load(out / "checkpoint-last.pt", weights_only=True)["step"] == 2


@pytest.mark.slow
def test_detect_two_processes(shapes: Path, tmp_path: Path) -> None:
    out = tmp_path / "det"
    _torchrun(["detect", "--config", "detect_shapes", f"data.path={shapes}", f"run.out_dir={out}",
               "optim.batch_size=4", "optim.warmup_iters=1", "run.max_steps=2", "data.val_limit=4",
               "data.eval_batch_size=2"], tmp_path, 29542)
    results = json.loads((out / "results.json").read_text())
    assert results["step"] == 2 and 0.0 <= results["last"]["box_AP"] <= 1.0
