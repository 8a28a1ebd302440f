"""The little we need from torch.distributed: set-up from torchrun's env, rank checks, reductions.

Everything else in milan is rank-agnostic; only rank 0 logs and saves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "is_main", "barrier", "all_reduce_mean", "all_gather_object", "cleanup"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/LOCAL_RANK), else run alone.

    NCCL on GPU, gloo on CPU. `device` is 'auto', 'cpu' or 'cuda'.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda was asked for but no GPU is visible; use device=cpu")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        # Rank 0 alone evaluates (finetune's val set, kNN, the probe) while the others wait in a
        # collective: allow that much longer than NCCL's 10-minute default before calling it a hang.
        timeout = timedelta(minutes=float(os.environ.get("MILAN_DIST_TIMEOUT_MIN", 120)))
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", store=_store(timeout),
                                rank=rank, world_size=world, timeout=timeout)
    return DistInfo(rank, world, local, dev)


def _store(timeout: timedelta) -> dist.Store:
    """torchrun's store, with the keys of this restart round apart from the previous rounds'.

    Under `torchrun --max-restarts N` every round's workers share the agent's one TCPStore, and
    the default process group writes the same keys each round (each rank's address under
    "default_pg/..."). A restarted worker that reads a key before its new peer has rewritten it
    gets the dead round's address and fails in `init_process_group` ("Gloo connectFullMesh failed
    ... Connection refused" to a port of the previous round; seen with torch 2.14 on CPU, where it
    depends on which worker starts first). Prefixing the keys with the restart count
    (TORCHELASTIC_RESTART_COUNT) gives each round a clean namespace.
    """
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    return dist.PrefixStore(f"milan/round_{restart}", store) if restart else store


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (a copy; the input is untouched)."""
    if not dist.is_initialized():
        return value.clone()
    out = value.clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def all_reduce_max(value: torch.Tensor) -> torch.Tensor:
    """Maximum of a tensor over ranks (a copy; the input is untouched)."""
    out = value.clone()
    if dist.is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (one element when not distributed)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
