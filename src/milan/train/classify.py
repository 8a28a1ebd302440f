"""What the classification recipes share: the timm ViT classifier, its layer-decay AdamW, top-1/top-5
over a loader, a label lookup wrapper and timm's RandAugment posterize fix.

    model = build_classifier(EncoderConfig(...), num_classes, drop_path=0.1)
    optimizer = build_optimizer(model, lr, weight_decay=0.05, layer_decay=0.65)
    result = evaluate(model, val_loader, device)  # {"top1", "top5", "loss", "count"}

Used by `milan finetune` (training) and `milan eval` (evaluating what finetune wrote).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.data.auto_augment import RandAugment
from timm.models import VisionTransformer
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader, Dataset

from milan.encoder import EncoderConfig
from milan.io.weights import timm_kwargs
from milan.train import distributed as distr
from milan.train.log import progress
from milan.train.probe import topk_accuracy

__all__ = ["build_classifier", "build_optimizer", "evaluate", "Relabel", "PosterizeLevel", "keep_posterize_bits"]


def build_classifier(config: EncoderConfig, num_classes: int, *, drop_path: float = 0.0,
                     global_pool: str = "avg") -> torch.nn.Module:
    """timm `VisionTransformer` of this encoder shape with a `num_classes` head.

    Args:
        global_pool: "avg" (mean of patch tokens + fc_norm, MAE finetuning) or "token" (CLS after
            the final norm, as classifiers finetuned elsewhere may be).
    """
    return VisionTransformer(**timm_kwargs(config), num_classes=num_classes, global_pool=global_pool,
                             drop_path_rate=drop_path)


def build_optimizer(model: torch.nn.Module, lr: float, *, weight_decay: float, layer_decay: float,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """AdamW with layer-wise lr decay (timm's): group["lr_scale"] = layer_decay^(depth + 1 − layer),
    layer 0 = patch embedding, CLS token and position embedding, layer i = block i, depth + 1 = the
    head and fc_norm; no weight decay on 1-D parameters and tokens. `milan.train.run.set_lr` applies
    the scales."""
    return create_optimizer_v2(model, "adamw", lr=lr, weight_decay=weight_decay, layer_decay=layer_decay,
                               betas=betas)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device, *,
             class_index: torch.Tensor | None = None, amp_dtype: torch.dtype | None = None,
             desc: str = "eval") -> dict[str, float]:
    """Top-1/top-5 and mean CE of `model` over `loader`, in eval mode (the mode it had is put back).

    Args:
        class_index: restrict the logits to these output classes (e.g. the 200 ImageNet-R
            classes among the 1000); targets index into it.
        amp_dtype: autocast dtype (None: fp32).
    """
    was_training = model.training
    model.eval()
    hits1 = hits5 = loss = 0.0
    count = 0
    bar = progress(len(loader), desc=desc, unit="batch", active=distr.is_main())
    for images, targets in loader:
        bar.update(1)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images.to(device)).float()  # [B, C]
        if class_index is not None:
            logits = logits[:, class_index.to(device)]  # [B, C_subset]
        targets = torch.as_tensor(targets).to(device)
        top1, top5 = topk_accuracy(logits, targets)
        n = len(targets)
        hits1, hits5, count = hits1 + top1 * n, hits5 + top5 * n, count + n
        loss += float(F.cross_entropy(logits, targets, reduction="sum"))
    bar.close()
    model.train(was_training)
    return {"top1": hits1 / count, "top5": hits5 / count, "loss": loss / count, "count": count}


class Relabel(Dataset):
    """A dataset with its labels passed through a lookup table (val classes onto train's, folder
    classes onto a model's outputs)."""

    def __init__(self, dataset: Dataset, lut: torch.Tensor) -> None:
        self.dataset, self.lut = dataset, lut

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.dataset[index]
        return image, int(self.lut[label])


class PosterizeLevel:
    """timm's PosterizeIncreasing level with at least 1 bit kept.

    At the top magnitude (reached by mstd noise ~2% of the time at m9) timm asks Pillow to keep
    0 bits, which Pillow >= 10 rejects with a ValueError mid-epoch; older Pillow returned black.
    A module-level class so DataLoader workers can pickle the transform.
    """

    def __init__(self, level_fn: Any) -> None:
        self.level_fn = level_fn

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[int]:
        return (max(1, self.level_fn(*args, **kwargs)[0]),)


def keep_posterize_bits(transform: Any) -> None:
    """Patch, in place, every RandAugment in `transform` (a timm `Compose`) with `PosterizeLevel`."""
    for t in getattr(transform, "transforms", []):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name == "PosterizeIncreasing" and not isinstance(op.level_fn, PosterizeLevel):
                    op.level_fn = PosterizeLevel(op.level_fn)
