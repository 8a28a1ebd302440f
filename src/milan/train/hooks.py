"""The loop's small hooks that every recipe may use: bad-file bookkeeping and periodic evaluation.
Recovery (rollback, skip, retry, fault injection) is `milan.train.recover.RecoveryHook`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from milan.data.reading import BadFiles
from milan.train.loop import Hook, Loop

__all__ = ["BadFilesHook", "Periodic"]


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
