"""Counting a step's FLOPs with `FlopCounterMode`, attention included (see `milan.tools.bench`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["countable_attention", "count_flops"]


@contextlib.contextmanager
def countable_attention() -> Iterator[None]:
    """Attention as plain bmm's, which FlopCounterMode counts (see the module docstring)."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def count_flops(fn: Callable[[], Any]) -> tuple[int, FlopCounterMode, Any]:
    with countable_attention(), FlopCounterMode(display=False) as counter:
        result = fn()
    return counter.get_total_flops(), counter, result
