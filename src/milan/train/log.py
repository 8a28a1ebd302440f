"""Rank-0 logging: a JSONL metrics file, TensorBoard scalars when installed, a progress bar."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger", "get_logger", "progress"]


def get_logger(name: str = "milan") -> logging.Logger:
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


class MetricsLogger:
    """Appends one JSON object per call to `run_dir/metrics.jsonl` (and TensorBoard if available).

    Inactive (all calls no-ops) on ranks other than 0. `resume_from=step` (a run resumed from the
    checkpoint of that step) first drops the records of later steps — written after that checkpoint
    by the run that crashed, and about to be redone — from metrics.jsonl and TensorBoard, so the
    resumed log reads as one uninterrupted run.
    """

    def __init__(self, run_dir: str | Path, *, active: bool = True, tensorboard: bool = True,
                 resume_from: int | None = None) -> None:
        self.active = active
        self.file = None
        self.tb = None
        if not active:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        if resume_from is not None and path.is_file():
            _truncate_records(path, resume_from)
        self.file = path.open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = None if resume_from is None else resume_from + 1  # drops events at steps ≥ purge
                self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=purge)
            except ImportError:  # tensorboard is an optional extra
                self.tb = None

    def log(self, step: int, **metrics: Any) -> None:
        if not self.active:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, int | float):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _truncate_records(path: Path, last_step: int) -> None:
    """Keep the records of steps ≤ last_step (and drop a torn last line); atomic rewrite."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the crash
        if record.get("step", 0) <= last_step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    tmp.replace(path)


def progress(total: int, *, initial: int = 0, desc: str = "", active: bool = True, unit: str = "step"):
    """A tqdm bar (step/total, rate, ETA) on rank 0; a silent stand-in elsewhere."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not active, unit=unit,
                dynamic_ncols=True, smoothing=0.1)
