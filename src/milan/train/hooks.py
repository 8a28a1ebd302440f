"""The loop's small hooks that every recipe may use: bad-file bookkeeping, periodic evaluation and
preemption.
Recovery (rollback, skip, retry, fault injection) is `milan.train.recover.RecoveryHook`."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from milan.data.reading import BAD_IMAGES_FILE, BadFiles
from milan.errors import ConfigError
from milan.train import distributed as distr
from milan.train.loop import Hook, Loop

__all__ = ["BadFilesHook", "Periodic", "Preemption"]

_log = logging.getLogger("milan")

#: The file in a run folder that asks a running command to stop as if preempted.
STOP_FILE = "PREEMPT"


class BadFilesHook(Hook):
    """The run's registry of unreadable files: shared by every rank at check points, then the same
    threshold decision on every rank (one line, no traceback); counted in the log; kept in every
    checkpoint (`bad_files`: this run's, `bad_files_all`: with the kNN monitor's) so a resumed run
    logs the same counts and warns about none again; `bad_images.txt` written at checkpoints and at
    the end.

    Args:
        bad_files: the run's registry.
        seen: loop → the distinct files read so far (the threshold's denominator).
    """

    def __init__(self, bad_files: BadFiles, *, seen: Callable[[Loop], int]) -> None:
        self.bad_files, self.seen = bad_files, seen

    def on_start(self, loop: Loop) -> None:
        old = self.bad_files.folder / BAD_IMAGES_FILE if self.bad_files.folder is not None else None
        if not loop.resumed and old is not None and old.is_file():
            old.unlink()  # a fresh start in a used folder: not an earlier attempt's list

    def on_check(self, loop: Loop) -> None:
        self.bad_files.sync(loop.device)
        self.bad_files.check(seen=self.seen(loop))

    def on_log(self, loop: Loop, record: dict[str, Any]) -> None:
        record["bad_images"] = len(self.bad_files)

    def on_checkpoint(self, loop: Loop, path: Path) -> None:
        if loop.info.is_main:
            self.bad_files.write()

    def on_end(self, loop: Loop) -> None:
        if loop.info.is_main:
            self.bad_files.write()

    def state_dict(self, loop: Loop, ranks: list[Any]) -> dict[str, Any]:
        return {"bad_files": dict(self.bad_files.bad), "bad_files_all": self.bad_files.all_bad()}

    def load_state_dict(self, loop: Loop, checkpoint: dict[str, Any]) -> None:
        self.bad_files.bad.update(checkpoint.get("bad_files") or {})  # counted: bad_images continues exactly
        self.bad_files.elsewhere.update(checkpoint.get("bad_files_all") or {})  # listed, not warned again


class Periodic(Hook):
    """Calls `fn(loop)` every `every` optimizer steps and after the last one (a kNN monitor, an
    evaluation), after that step's checks and log, before its checkpoint.

    Args:
        fn: what to run (rank-local unless it does the same collectives on every rank).
        every: steps between calls (0: only after the last step).
        at_epoch_end: also after the last step of every epoch.
        check: make those steps check points (no evaluation of a bad step). Only for a hook that
            every rank has: a check point is a collective.
    """

    def __init__(self, fn: Callable[[Loop], None], *, every: int = 0, at_epoch_end: bool = False,
                 check: bool = False) -> None:
        self.fn, self.every, self.at_epoch_end, self.check = fn, every, at_epoch_end, check

    def _due(self, loop: Loop, step: int) -> bool:
        return (bool(self.every) and step % self.every == 0) or step == loop.last_step or (
            self.at_epoch_end and step % loop.data.steps_per_epoch == 0)

    def wants_check(self, loop: Loop, step: int) -> bool:
        return self.check and self._due(loop, step)

    def on_step_end(self, loop: Loop) -> None:
        if self._due(loop, loop.step):
            self.fn(loop)


class Preemption(Hook):
    """Stop cleanly on a preemption: a signal (SIGTERM from a spot instance or `scancel`, SIGUSR1
    from SLURM's `--signal`) or a `PREEMPT` file in the run folder (what the SLURM script touches, as
    torchrun's agent does not forward SIGUSR1). The process finishes its current step; the ranks
    agree at a check point (alone: that very step; under torchrun: every `every` steps, one
    all-reduce); the loop then writes the checkpoint of that step and raises `Preempted`, and the
    command exits with status 75. A second signal while it saves changes nothing (the handler only
    records it; the save is atomic anyway). The previous handlers are put back at the end.

    Args:
        signals: signal names ("SIGTERM", "SIGUSR1", ...); empty: signals are left alone.
        stop_file: the file whose existence requests a stop (removed once the checkpoint is written).
        every: steps between the agreements when several processes run.
    """

    def __init__(self, signals: list[str], *, stop_file: Path, every: int = 10) -> None:
        self.names, self.stop_file, self.every = list(signals), Path(stop_file), every
        self.received: tuple[str, float] | None = None  # (what, when: time.monotonic())
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = (name, time.monotonic())
            _log.warning("received %s: finishing the current step, then a checkpoint and exit", name)
        else:
            _log.warning("received %s again: still finishing the step / writing the checkpoint", name)

    def on_start(self, loop: Loop) -> None:
        if loop.info.is_main and self.stop_file.is_file():  # an old request, already honoured or stale
            self.stop_file.unlink()
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (the stop file still works)
        for name in self.names:
            try:
                signum = signal.Signals[name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"]
            except KeyError:
                raise ConfigError(f"run.preempt_signals: unknown signal {name!r} (e.g. SIGTERM, SIGUSR1)") from None
            self._previous[signum] = signal.signal(signum, self._handle)

    def _requested(self, loop: Loop) -> bool:
        if self.received is None and loop.info.is_main and self.stop_file.is_file():
            self.received = (f"{self.stop_file.name} file", time.monotonic())
            _log.warning("found %s: finishing the current step, then a checkpoint and exit", self.stop_file)
        return self.received is not None

    @classmethod
    def of_run(cls, run: Any, run_dir: Path) -> Preemption:
        """From a recipe's `run` section (`preempt_signals`, `preempt_every`)."""
        return cls(run.preempt_signals, stop_file=Path(run_dir) / STOP_FILE, every=run.preempt_every)

    def wants_check(self, loop: Loop, step: int) -> bool:
        if loop.info.world_size > 1:  # the same steps on every rank
            return step % self.every == 0
        return self._requested(loop)  # alone: a flag and a stat, no sync

    def on_check(self, loop: Loop) -> None:
        local = self._requested(loop)
        agreed = local
        if loop.info.world_size > 1:
            flag = torch.tensor(float(local), device=loop.device)
            agreed = bool(distr.all_reduce_max(flag) > 0)
        if agreed:
            what = self.received[0] if self.received else "another process's preemption request"
            loop.request_stop(f"preempted ({what})")

    def on_checkpoint(self, loop: Loop, path: Path) -> None:
        if loop.stopping is not None and loop.info.is_main:
            if self.stop_file.is_file():
                self.stop_file.unlink()  # honoured: a requeued run must not stop at once
            if self.received is not None:
                _log.warning("checkpoint %s written %.1f s after the preemption request", path,
                             time.monotonic() - self.received[1])

    def on_end(self, loop: Loop) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
