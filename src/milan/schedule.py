"""Learning-rate schedules as pure functions of the optimizer step."""

from __future__ import annotations

import math

__all__ = ["warmup_cosine", "scaled_lr"]


def scaled_lr(base_lr: float, effective_batch: int) -> float:
    """The linear scaling rule of MAE/MILAN (A.1): lr = base_lr × batch / 256."""
    return base_lr * effective_batch / 256


def warmup_cosine(step: int, *, total: int, warmup: int, peak: float, final: float = 0.0) -> float:
    """Linear warmup from 0 to `peak` over `warmup` steps, then cosine to `final` at `total`."""
    if step < warmup:
        return peak * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
