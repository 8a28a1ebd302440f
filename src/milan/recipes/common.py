"""What every training recipe does first: processes, run folder, seed, precision; and where to resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from milan import distributed as distr
from milan.checkpoint import load_checkpoint
from milan.config import save_config

__all__ = ["start_run", "find_resume_last", "rng_state", "restore_rng"]


def start_run(cfg: Any) -> tuple[distr.DistInfo, Path, torch.dtype | None]:
    """Join the process group, create `cfg.run.out_dir` with its config.yaml (rank 0), seed this rank.

    Returns (process info, run folder, autocast dtype: bf16 for `run.precision` bf16 or auto on
    CUDA, None for fp32).
    """
    info = distr.init_distributed(cfg.run.device)
    run_dir = Path(cfg.run.out_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.run.seed + info.rank)
    precision = cfg.run.precision
    if precision == "auto":
        precision = "bf16" if info.device.type == "cuda" else "fp32"
    return info, run_dir, torch.bfloat16 if precision == "bf16" else None


def find_resume_last(resume: str, run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """`run.resume` of a recipe that keeps one `checkpoint-last.pt`: auto (it, if present), none, or a path."""
    if resume == "none":
        return None
    path = run_dir / "checkpoint-last.pt" if resume == "auto" else Path(resume)
    if resume == "auto" and not path.is_file():
        return None
    return path, load_checkpoint(path)


def rng_state() -> dict[str, Any]:
    """This process's global torch (and CUDA) RNG state, for a checkpoint (gather it over ranks)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(states: list[dict[str, Any]] | None, info: distr.DistInfo) -> None:
    """Put back this rank's RNG state from a checkpoint's gathered list (skipped if the world size changed)."""
    states = states or []
    if len(states) != info.world_size:
        return
    torch.set_rng_state(states[info.rank]["torch"])
    if "cuda" in states[info.rank] and info.device.type == "cuda":
        torch.cuda.set_rng_state(states[info.rank]["cuda"])
