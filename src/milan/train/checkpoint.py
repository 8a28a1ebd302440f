"""Self-describing, atomically written checkpoints, and finding the newest good one.

A checkpoint is one `torch.save` file holding plain tensors and Python builtins (so it loads with
`weights_only=True`): model, optimizer, scaler, step/epoch position, RNG states, resolved config
and package version. It is written to `name.tmp`, fsynced, then renamed, so a crash leaves either
the old file or the new one, never half of one. `latest_checkpoint` also survives a file that was
truncated some other way: it falls back to the previous checkpoint with a warning.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from milan import __version__
from milan.errors import CheckpointError
from milan.io.checkpoint_files import checkpoint_step, step_checkpoints
from milan.io.safe_load import read_torch_file

__all__ = ["CheckpointRecord", "check_resumable", "save_checkpoint", "load_checkpoint", "latest_checkpoint",
           "prune_checkpoints", "state_mismatch", "checkpoint_step", "step_checkpoints", "CheckpointError"]


@dataclass(frozen=True)
class CheckpointRecord:
    """What every recipe's checkpoint says about itself, beside its payload (weights, optimizer, ...).

    Attributes:
        kind: the recipe that wrote it (pretrain, finetune, linprobe, segment, detect).
        step: optimizer steps done.
        config: the resolved config (`to_dict`).
        identity: what a resume must match (model name and variant, encoder shape, classes, ...).
        epoch: epochs done (fractional for mid-epoch checkpoints), if the recipe counts them.
        world_size: processes that wrote it (RNG states are per rank).
        rng: every rank's RNG states (`milan.train.run.rng_state`), in rank order.
    """

    kind: str
    step: int
    config: dict[str, Any]
    identity: dict[str, Any]
    epoch: float | None = None
    world_size: int = 1
    rng: list[dict[str, Any]] | None = None

    def state(self, **payload: Any) -> dict[str, Any]:
        """The checkpoint dict: this record's fields at the top level, `version`, then `payload`."""
        return {**asdict(self), "version": __version__, **payload}


def check_resumable(path: str | Path, state: dict[str, Any], *, kind: str, identity: dict[str, Any],
                    expected: dict[str, torch.Tensor], weights_key: str = "model",
                    needs: tuple[str, ...] = ("optimizer",), fix: str) -> None:
    """Refuse, with one line that ends in `fix`, a checkpoint this run cannot continue.

    Checks in order: it is a `kind` checkpoint with `weights_key`, `step` and every key in `needs`;
    its recorded identity equals `identity` (checkpoints that predate the record skip this); its
    weights have exactly `expected`'s keys and shapes.
    """
    found = state.get("kind", kind if "identity" not in state else None)  # older pretrain files had no kind
    missing = [k for k in (weights_key, "step", *needs) if k not in state]
    if found != kind or missing:
        what = f"kind {found!r}" if found != kind else f"no {', '.join(missing)}"
        raise CheckpointError(f"{path} is not a resumable {kind} checkpoint ({what}). {fix}")
    saved = state.get("identity")
    if saved is not None and saved != identity:
        def show(d: dict[str, Any]) -> str:
            return ", ".join(f"{k} {_brief(v)}" for k, v in d.items())

        raise CheckpointError(f"{path} is a checkpoint of another model ({show(saved)}; this run: {show(identity)}). "
                              f"{fix}")
    problem = state_mismatch(expected, state[weights_key])
    if problem:
        raise CheckpointError(f"{path} does not fit this model ({problem}). {fix}")


def _brief(value: Any) -> str:
    if isinstance(value, dict):  # an encoder shape: the fields that tell models apart
        keys = ("embed_dim", "depth", "patch_size", "img_size")
        return "/".join(str(value[k]) for k in keys if k in value) or str(value)
    return str(value)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write `state` to `path` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # disk full, quota, permissions (torch reports some as RuntimeError)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # never leave a partial file behind
        raise CheckpointError(
            f"could not write checkpoint {path}: {err}. The previous checkpoint is intact; fix the cause "
            f"(a full disk or quota: free space in {path.parent} or point run.out_dir elsewhere) and rerun "
            "to resume from it"
        ) from err
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (`weights_only=True`: no arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (give a checkpoint file written by milan, e.g. "
                              "run.resume=runs/x/checkpoint-1000.pt, or run.resume=auto / none)")
    # Truncated, junk, pickled objects, a TorchScript archive...: one message naming what it is.
    return read_torch_file(path, subject="checkpoint", error=CheckpointError, map_location=map_location,
                           expected="a checkpoint written by milan (checkpoint-<step>.pt or checkpoint-last.pt)",
                           fix="Resume from another checkpoint (run.resume=PATH), from the newest readable one "
                               "in the run folder (run.resume=auto), or start over (run.resume=none)")


def latest_checkpoint(run_dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
    """Newest readable checkpoint in `run_dir` (skipping unreadable ones with a warning), or None."""
    for path in reversed(step_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as err:
            warnings.warn(f"skipping unreadable checkpoint ({err}); falling back to an older one", stacklevel=2)
    return None


def prune_checkpoints(run_dir: str | Path, *, keep_last: int, keep_every: int = 0) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints; keep every `keep_every`-th step as milestone."""
    paths = step_checkpoints(run_dir)
    doomed = paths[:-keep_last] if keep_last > 0 else []
    removed = []
    for path in doomed:
        if keep_every and checkpoint_step(path) % keep_every == 0:
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def state_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str | None:
    """None if `found` has exactly `expected`'s keys and shapes; else a short description of the first problems."""
    shapes = [k for k, v in found.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    keys = sorted(set(expected) ^ set(found))
    if not shapes and not keys:
        return None
    return f"{len(shapes)} shape mismatches, {len(keys)} missing/unexpected keys, e.g. {(shapes or keys)[0]}"
