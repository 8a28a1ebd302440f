"""Semantic segmentation metrics from a confusion matrix: mIoU, per-class IoU/accuracy, aAcc.

    metric = SegMetric(num_classes=150)           # ignore_index=255
    metric.update(pred, target)                   # [B, H, W] class ids, any device
    metric.all_reduce()                           # sum the matrix over processes (no-op alone)
    metric.compute()                              # {"mIoU", "mAcc", "aAcc", "IoU", "Acc", ...}

Conventions (those of mmseg's `mean_iou`, used by the MAE/BEiT ADE20K numbers): pixels whose
target is `ignore_index` are skipped; a class's IoU is TP / (TP + FP + FN) and is NaN when the
class appears neither in the target nor in the prediction (union 0); mIoU is the mean over the
non-NaN classes. A class predicted but absent from the target counts with IoU 0. aAcc is the
fraction of labelled pixels predicted right; mAcc the mean per-class recall over classes present
in the target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from milan.errors import DataError

__all__ = ["confusion_matrix", "segmentation_scores", "SegMetric"]


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, *, ignore_index: int = 255) -> Tensor:
    """`[C, C]` int64 counts, rows = target class, columns = predicted class.

    Args:
        pred: predicted class ids, any shape.
        target: target class ids, same shape; `ignore_index` pixels are skipped.
        num_classes: C. Targets outside [0, C) other than `ignore_index` are an error (a wrong
            `num_classes` or a label map that needs `reduce_zero_label`).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        bad = int(target.max()) if int(target.max()) >= num_classes else int(target.min())
        raise DataError(f"target holds class {bad}, outside [0, {num_classes}) and not ignore_index="
                        f"{ignore_index}; check num_classes / reduce_zero_label")
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= num_classes):
        raise ValueError(f"pred holds a class outside [0, {num_classes})")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _nanmean(values: Tensor) -> float:
    values = values[~torch.isnan(values)]
    return float(values.mean()) if values.numel() else math.nan


def segmentation_scores(conf: Tensor, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """mIoU, mAcc, aAcc and per-class IoU / accuracy (NaN → None in the lists) of a confusion matrix."""
    conf = conf.double()
    tp = conf.diag()
    gt, predicted = conf.sum(1), conf.sum(0)
    union = gt + predicted - tp
    nan = torch.full_like(tp, math.nan)
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
    total = float(conf.sum())

    def plain(t: Tensor) -> list[float | None]:
        return [None if math.isnan(v) else v for v in t.tolist()]

    out: dict[str, Any] = {
        "mIoU": _nanmean(iou), "mAcc": _nanmean(acc), "aAcc": float(tp.sum()) / total if total else math.nan,
        "IoU": plain(iou), "Acc": plain(acc), "pixels": int(total),
    }
    if class_names is not None:
        if len(class_names) != conf.shape[0]:
            raise ValueError(f"{len(class_names)} class names for {conf.shape[0]} classes")
        out["classes"] = list(class_names)
    return out


class SegMetric:
    """Accumulates a confusion matrix over batches (and processes); see the module docstring."""

    def __init__(self, num_classes: int, *, ignore_index: int = 255, device: torch.device | str = "cpu") -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)

    def update(self, pred: Tensor, target: Tensor) -> None:
        self.conf += confusion_matrix(pred.to(self.conf.device), target.to(self.conf.device), self.num_classes,
                                      ignore_index=self.ignore_index)

    def all_reduce(self) -> None:
        """Sum the matrix over the process group (each rank evaluated its own share)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.conf)

    def compute(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        return segmentation_scores(self.conf, class_names)
