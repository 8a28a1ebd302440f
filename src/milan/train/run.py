"""What every recipe shares: start (processes, run folder, seed, precision), resume, RNG state,
lr setting and value checks. The training loop itself is `milan.train.loop`; nothing here knows
which recipe it serves."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from milan.errors import ConfigError
from milan.train import distributed as distr
from milan.train.checkpoint import CheckpointError, load_checkpoint
from milan.train.config import save_config
from milan.train.trackers import check_loggers

__all__ = ["RunStart", "start_run", "discard_failed_starts", "resolve_precision", "AMP_DTYPES", "check_values", "seed_all",
           "find_resume_last", "agree_on_checkpoint", "rng_state", "restore_rng", "set_lr",
           "grad_norm", "CPU_BF16_ENV", "cpu_has_native_bf16"]

#: run.precision → autocast dtype (None: plain fp32).
AMP_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


class RunStart(NamedTuple):
    info: distr.DistInfo  # rank, world size, device
    run_dir: Path
    amp_dtype: torch.dtype | None  # autocast dtype of run.precision; None for fp32
    precision: str  # run.precision resolved: bf16 | fp16 | fp32


#: Set to 1 to allow bf16 on CPU anyway (after measuring it faster with `milan bench speed`).
CPU_BF16_ENV = "MILAN_CPU_BF16"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls in hardware (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device, *, key: str = "run.precision") -> str:
    """`auto` → bf16 on CUDA, fp32 elsewhere; an explicit bf16 on CPU is refused.

    bf16 autocast on CPU is a trap: on a 2-core AMD EPYC (no native bf16) the shapes preset's
    student step ran ≈ 19× slower than in fp32, and a ViT-B step with its teacher did not finish 4
    steps in 11 minutes; on a 2-core Xeon with AMX it was no faster than fp32 (0.92×). `auto` never
    picks it; asking for it raises a `ConfigError` naming `key` unless the environment sets
    MILAN_CPU_BF16=1 (for a CPU where `milan bench speed --precision bf16` measured it faster).
    """
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type == "cpu" and os.environ.get(CPU_BF16_ENV, "") not in ("1", "true", "yes"):
        native = ("this CPU has native bf16 (AVX512-BF16/AMX), yet bf16 was no faster than fp32 on such a CPU "
                  "(0.92× for the shapes preset's step)" if cpu_has_native_bf16() else
                  "this CPU has no native bf16, and bf16 autocast was ≈ 19× slower than fp32 on such a CPU "
                  "(the shapes preset's step)")
        raise ConfigError(
            f"{key}=bf16 on CPU: fp32 is faster here ({native}); use {key}=fp32 (or auto, which picks fp32 on "
            f"CPU). To run bf16 on CPU anyway, measure it with `MILAN_CPU_BF16=1 milan bench speed --device cpu "
            f"--precision bf16` and set {CPU_BF16_ENV}=1"
        )
    return precision


def start_run(cfg: Any, *, write_config: bool = True, seed_per_rank: bool = True) -> RunStart:
    """Join the process group, create `cfg.run.out_dir` with its config.yaml (rank 0), seed this rank.

    Args:
        cfg: a recipe config with a `run` section (`out_dir`, `device`, optionally `seed` and
            `precision`).
        write_config: False leaves config.yaml to the recipe (e.g. after a resume check, so that a
            refused resume leaves the folder as it was).
        seed_per_rank: seed rank r with `seed + r` (different augmentation per process); False
            seeds every rank alike (pretrain, whose randomness is indexed by sample and step).
    """
    check_loggers(cfg.run)  # a tracker that is not installed: one line, before anything starts
    info = distr.init_distributed(cfg.run.device)
    run_dir = Path(cfg.run.out_dir)
    if info.is_main:
        if not run_dir.exists():
            _CREATED.append(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if write_config:
            save_config(cfg, run_dir / "config.yaml")
    seed = getattr(cfg.run, "seed", 0)
    seed_all(seed + info.rank if seed_per_rank else seed)
    precision = resolve_precision(getattr(cfg.run, "precision", "fp32"), info.device)
    return RunStart(info, run_dir, AMP_DTYPES[precision], precision)


_CREATED: list[Path] = []  # run folders `start_run` created in this process


def discard_failed_starts() -> list[Path]:
    """Remove the run folders this process created that hold nothing of value: only config.yaml,
    empty files and TensorBoard files without a scalar. The `milan` command calls it when a command
    fails, so a refused start leaves no empty run folder behind. Returns the removed folders."""
    removed = []
    while _CREATED:
        run_dir = _CREATED.pop()
        if run_dir.is_dir() and all(_worthless(f) for f in run_dir.rglob("*") if f.is_file()):
            shutil.rmtree(run_dir, ignore_errors=True)
            removed.append(run_dir)
    return removed


def _worthless(path: Path) -> bool:
    if path.name == "config.yaml" or path.stat().st_size == 0:
        return True
    if path.name.startswith("events.out.tfevents."):
        try:
            # lazy: tensorboard is the optional `log` extra
            from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

            return not any(e.HasField("summary") for e in EventFileLoader(str(path)).Load())
        except Exception:  # unreadable: keep it
            return False
    return False


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr, times its `lr_scale` (layer-wise decay groups carry one)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def grad_norm(parameters: Any) -> torch.Tensor:
    """The total 2-norm of the parameters' gradients, as a device scalar (no host sync, no change to
    the gradients: cheaper than `clip_grad_norm_(max_norm=inf)`, which would also rescale them by 1).
    Call it where `clip_grad_norm_` would be called: after `scaler.unscale_`."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0)


def seed_all(seed: int) -> None:
    """Seed torch, numpy's global RNG and Python's `random` (timm's mixup draws from numpy, RandAugment
    and random erasing from `random`, in the main process when data.num_workers=0)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def find_resume_last(resume: str, run_dir: Path, name: str = "checkpoint-last.pt", *,
                     info: distr.DistInfo | None = None) -> tuple[Path, dict[str, Any]] | None:
    """`run.resume` of a recipe that keeps one last checkpoint (`name`): auto (it, if present), none, or a
    path. With `info` (every rank calls it), rank 0 decides and all ranks load that file."""
    if resume == "none":
        return None
    path = run_dir / name if resume == "auto" else Path(resume)

    def choose() -> tuple[Path, dict[str, Any]] | None:
        return None if resume == "auto" and not path.is_file() else (path, load_checkpoint(path))

    return choose() if info is None else agree_on_checkpoint(choose, info)


def agree_on_checkpoint(choose: Callable[[], tuple[Path, dict[str, Any]] | None],
                        info: distr.DistInfo) -> tuple[Path, dict[str, Any]] | None:
    """Rank 0 runs `choose` (→ (path, state) or None); every other rank loads the same file. A rank
    that cannot read it fails the resume on every rank, so none is left waiting in a collective."""
    found: tuple[Path, dict[str, Any]] | None = None
    error = None
    if info.is_main:
        try:
            found = choose()
        except CheckpointError as err:
            error = str(err)
    chosen = distr.all_gather_object((str(found[0]) if found else None, error))[0]
    path, error = chosen
    if path is not None and not info.is_main:
        try:
            found = (Path(path), load_checkpoint(path))
        except CheckpointError as err:
            error = f"rank {info.rank}: {err}"
    errors = [e for e in distr.all_gather_object(error) if e]
    if errors:  # rank 0 names the file's problem; only another rank failing means it cannot see the folder
        elsewhere = errors[0].startswith("rank ")
        raise CheckpointError(f"cannot resume: {errors[0].rstrip('.')}" + (
            ". Every node must see the run folder (shared storage), or start over with run.resume=none"
            if elsewhere else ""))
    return found


def rng_state() -> dict[str, Any]:
    """This process's global torch (and CUDA), numpy and Python `random` RNG states, for a checkpoint
    (gather it over ranks). Plain tensors and builtins only: it loads with `weights_only=True`."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "random": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(states: list[dict[str, Any]] | None, info: distr.DistInfo) -> None:
    """Put back this rank's RNG state from a checkpoint's gathered list (skipped if the world size changed)."""
    states = states or []
    if len(states) != info.world_size:
        return
    state = states[info.rank]
    torch.set_rng_state(state["torch"])
    if "cuda" in state and info.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:  # checkpoints written before numpy/random were saved lack these
        saved = state["numpy"]
        np.random.set_state((saved["kind"], saved["keys"].numpy().astype(np.uint32), saved["pos"],
                             saved["has_gauss"], saved["gauss"]))
    if "random" in state:
        saved = state["random"]
        random.setstate((saved["version"], tuple(saved["state"]), saved["gauss_next"]))


def check_values(*, at_least_one: dict[str, int | None], non_negative: dict[str, int | None] | None = None) -> None:
    """Values the type check lets through but a run cannot use, refused with one line naming the key
    (None means "not set" and passes)."""
    for key, value in at_least_one.items():
        if value is not None and value < 1:
            raise ConfigError(f"{key}={value} must be at least 1")
    for key, value in (non_negative or {}).items():
        if value is not None and value < 0:
            raise ConfigError(f"{key}={value} must not be negative")
