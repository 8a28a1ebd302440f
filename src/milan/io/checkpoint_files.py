"""Checkpoint files in a run folder, by name: `checkpoint-<step>.pt`.

Here, below `milan.train`, because reading weights (`milan.io.weights`: a run folder stands for its
newest checkpoint) needs the naming too; `milan.train.checkpoint` writes, prunes and resumes from
these files.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["checkpoint_step", "step_checkpoints"]

_STEP_FILE = re.compile(r"^checkpoint-(\d+)\.pt$")


def checkpoint_step(path: str | Path) -> int | None:
    """The step in a `checkpoint-<step>.pt` name, None for other names."""
    m = _STEP_FILE.match(Path(path).name)
    return int(m.group(1)) if m else None


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """`checkpoint-<step>.pt` files in `run_dir`, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted((p for p in run_dir.iterdir() if checkpoint_step(p) is not None), key=checkpoint_step)
