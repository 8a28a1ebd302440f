"""Rank-0 logging: a JSONL metrics file, TensorBoard scalars when installed, W&B / MLflow
(`milan.train.trackers`), a progress bar."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from milan.train.config import to_dict
from milan.train.trackers import Tracker, open_trackers, resolve_loggers

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
    by the run that crashed, and about to be redone — from metrics.jsonl and from the TensorBoard
    event files themselves (not only hidden by TensorBoard's purge), so the resumed log reads as one
    uninterrupted run in every reader. A training run that starts from scratch in a folder an earlier
    attempt left records in (killed before its first checkpoint, or `run.resume=none`) passes
    `resume_from=-1`: nothing of that attempt is kept.

    `config` (a training recipe's config): its `run.loggers` choose the sinks (`tensorboard` then
    follows them) and the W&B / MLflow runs get it as parameters; a resumed run continues the same
    tracker runs (`milan.train.trackers`: which steps they take).
    """

    def __init__(self, run_dir: str | Path, *, active: bool = True, tensorboard: bool = True,
                 resume_from: int | None = None, config: Any = None) -> None:
        self.active = active
        self.file = None
        self.tb = None
        self.trackers: list[Tracker] = []
        if not active:
            return
        if config is not None:
            sinks = resolve_loggers(config.run)
            tensorboard = "tensorboard" in sinks
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        if resume_from is not None and path.is_file():
            _truncate_records(path, resume_from)
        self.file = path.open("a")
        if tensorboard:
            try:
                # lazy: tensorboard is the optional `log` extra
                from torch.utils.tensorboard import SummaryWriter

                if resume_from is not None and (run_dir / "tb").is_dir():
                    _truncate_tensorboard(run_dir / "tb", resume_from)
                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:  # tensorboard is an optional extra
                self.tb = None
        if config is not None:
            self.trackers = open_trackers(run_dir, sinks, config=to_dict(config), resume_from=resume_from,
                                          project=getattr(config.run, "project", None))

    def log(self, step: int, **metrics: Any) -> None:
        if not self.active:
            return
        now = time.time()
        record = {"step": step, "time": round(now, 3), **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, int | float):
                    self.tb.add_scalar(key, value, step)
        for tracker in self.trackers:
            tracker.log(step, metrics, wall_time=now)

    def close(self) -> None:
        """Close every sink. Called in a `finally`: the exception that ends the run, if any, marks the
        tracker runs failed (MLflow: KILLED for an interruption the run resumes from)."""
        error = sys.exc_info()[1]
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        for tracker in self.trackers:
            tracker.close(error=error)
        self.trackers = []


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


def _truncate_tensorboard(tb_dir: Path, last_step: int) -> None:
    """Drop the scalar events of steps > last_step from every event file in `tb_dir` (atomic rewrite
    of each file that changes; a record torn by the crash ends the file)."""
    # lazy: tensorboard is the optional `log` extra
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        records = list(RawEventFileLoader(str(path)).Load())
        events = [Event.FromString(r) for r in records]
        kept = [r for r, e in zip(records, events) if not (e.HasField("summary") and e.step > last_step)]
        if len(kept) == len(records):
            continue
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as f:
            writer = RecordWriter(f)
            for record in kept:
                writer.write(record)
            writer.flush()
        tmp.replace(path)


def progress(total: int, *, initial: int = 0, desc: str = "", active: bool = True, unit: str = "step"):
    """A tqdm bar (step/total, rate, ETA) on rank 0; a silent stand-in elsewhere."""
    return tqdm(total=total, initial=initial, desc=desc, disable=not active, unit=unit,
                dynamic_ncols=True, smoothing=0.1)
