"""Learning-rate schedules as pure functions of the optimizer step."""

from __future__ import annotations

import logging
import math

__all__ = ["warmup_cosine", "warmup_poly", "scaled_lr", "fit_warmup"]


def scaled_lr(base_lr: float, effective_batch: int) -> float:
    """The linear scaling rule of MAE/MILAN (A.1): lr = base_lr × batch / 256."""
    return base_lr * effective_batch / 256


def warmup_cosine(step: int, *, total: int, warmup: int, peak: float, final: float = 0.0) -> float:
    """Linear warmup from 0 to `peak` over `warmup` steps, then cosine to `final` at `total`."""
    if step < warmup:
        return peak * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_poly(step: int, *, total: int, warmup: int, peak: float, power: float = 1.0, final: float = 0.0) -> float:
    """Poly decay from `peak` at step 0 to `final` at `total`, times a linear warmup over `warmup` steps.

    lr = (final + (peak − final)·(1 − step/total)^power) · min(1, step/warmup): mmcv's poly schedule
    with linear warmup, used by the ADE20K UperNet recipes (A.1: 1500 warmup of 160k iterations).
    """
    progress = min(1.0, max(0, step) / max(1, total))
    lr = final + (peak - final) * (1.0 - progress) ** power
    if step < warmup:
        lr *= step / warmup
    return lr


def fit_warmup(warmup: int, total: int, *, key: str, log: logging.Logger | None = None) -> int:
    """The warm-up a run of `total` steps can use: `warmup` when it is at most half the run; else 10%
    of the run (A.1's 40 of 400 epochs), with one warning naming `key`. A recipe's warm-up in epochs
    kept for a short run (e.g. `optim.steps=8` with 40 warm-up epochs of 880 steps) would otherwise
    never let the lr near its peak, and nothing would say so."""
    if warmup * 2 <= total:
        return warmup
    fitted = max(1, math.ceil(total / 10)) if total > 1 else 0
    if log is not None:
        log.warning("%s gives a warm-up of %d steps, more than half of this run's %d: warming up over %d steps "
                    "instead (10%% of the run), so the lr reaches its peak; set %s to at most %d steps' worth to "
                    "choose it", key, warmup, total, fitted, key, total // 2)
    return fitted
