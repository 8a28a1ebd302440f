"""Timing, the matmul peak (MFU's denominator), peak memory and what machine ran: `milan bench`'s measures."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import milan

__all__ = ["Clock", "matmul_peak", "reset_peak_memory", "peak_memory_mib", "MEMORY_LABELS", "cpu_model", "machine_info"]


class Clock:
    """Marks on the host clock (CPU) or CUDA events on the current stream (read after a sync)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def spans_ms(self) -> list[float]:
        """Milliseconds between consecutive marks."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes: Sequence[int], repeats: int) -> dict[str, Any]:
    """Best FLOP/s over `repeats` `n × n` matmuls for each n in `sizes`: the denominator of MFU.

    Several sizes, because a CPU's BLAS can run one size well below its best (on our 2-core
    machine 2048² reached less than ViT-B's own GEMMs did); the largest rate found is the peak.
    """
    per_size = {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(2 if device.type == "cuda" else 1):
            a @ b
        times = []
        for _ in range(repeats):
            clock = Clock(device)
            clock.mark()
            a @ b
            clock.mark()
            times.append(clock.spans_ms()[0])
        per_size[n] = 2 * n**3 / (min(times) / 1e3)
        del a, b
    n = max(per_size, key=per_size.__getitem__)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "repeats": repeats,
            "flops_per_s": per_size[n], "per_size": {str(k): v for k, v in per_size.items()}}


def reset_peak_memory(device: torch.device) -> str:
    """Start a new peak; returns how the peak is measured."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda_max_memory_allocated"
    with contextlib.suppress(OSError, AttributeError):  # glibc: give freed heap back to the OS
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return "cpu_peak_rss_vmhwm"
    except OSError:
        return "cpu_max_rss_process"


def peak_memory_mib(device: torch.device, kind: str) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if kind == "cpu_peak_rss_vmhwm":
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


MEMORY_LABELS = {
    "cuda_max_memory_allocated": "CUDA max_memory_allocated (reset before each variant)",
    "cpu_peak_rss_vmhwm": "CPU process peak RSS (VmHWM, reset before each variant; includes "
                          "Python, libraries and everything resident: an upper bound)",
    "cpu_max_rss_process": "CPU process max RSS (ru_maxrss: peak of the whole process so far, "
                           "not per variant)",
}


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "milan": milan.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
    }
    if hasattr(os, "getloadavg"):  # other jobs on a shared machine skew CPU timings: say so
        info["load_average_at_start"] = list(os.getloadavg())  # 1, 5, 15 min
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["allow_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        info["device_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    return info
