"""Reconstruction losses: MILAN's feature loss (eq. 1) and MAE's pixel loss (the baseline; the mean of
`pixel_errors`, taken by `milan.model.PixelObjective`, which keeps the errors for per-patch losses)."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from milan.masking import gather_tokens

__all__ = ["feature_loss", "patchify", "pixel_targets", "pixel_errors"]


def feature_loss(pred: Tensor, target: Tensor, *, reduction: Literal["mean", "none"] = "mean") -> Tensor:
    """Eq. 1: mean over tokens of ‖p/‖p‖ − t/‖t‖‖², i.e. 2 − 2·cos(p, t).

    Args:
        pred: `[B, T, D]` predicted features (MILAN: all 1+N tokens, CLS included).
        target: `[B, T, D]` teacher features for the same tokens.
        reduction: "mean" (eq. 1) or "none" (the per-token terms, `[B, T]`, whose mean is eq. 1).

    Returns:
        Scalar averaged uniformly over batch and tokens, or `[B, T]`; computed in fp32.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    p = F.normalize(pred.float(), dim=-1)
    t = F.normalize(target.float(), dim=-1)
    per_token = (p - t).pow(2).sum(dim=-1)  # [B, T]
    return per_token.mean() if reduction == "mean" else per_token


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """`[B, C, H, W]` → `[B, N, p·p·C]`, patches in row-major order, pixels (p, p, C) inside."""
    batch, channels, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image {height}x{width} is not divisible into {patch_size}px patches")
    gh, gw = height // patch_size, width // patch_size
    x = images.reshape(batch, channels, gh, patch_size, gw, patch_size)
    x = x.permute(0, 2, 4, 3, 5, 1)  # [B, gh, gw, p, p, C]
    return x.reshape(batch, gh * gw, patch_size * patch_size * channels)


def pixel_targets(images: Tensor, patch_size: int, *, norm_pix: bool = True) -> Tensor:
    """MAE's targets: `[B, C, H, W]` → patches `[B, N, p·p·C]`, each normalised to zero mean and
    unit variance when `norm_pix` (MAE's default); computed in fp32."""
    target = patchify(images.float(), patch_size)  # [B, N, P]
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    return target


def pixel_errors(
    pred: Tensor, images: Tensor, masked: Tensor, *, patch_size: int, norm_pix: bool = True
) -> tuple[Tensor, Tensor]:
    """Squared errors of the masked patches' pixels: (`[B, M, p·p·C]`, the targets `[B, M, p·p·C]`).

    Args:
        pred: `[B, N, p·p·C]` predicted pixels in patch order (CLS excluded).
        images: `[B, C, H, W]` the input images.
        masked: `[B, M]` indices of masked patches.
        patch_size: p.
        norm_pix: normalise each target patch (`pixel_targets`).
    """
    target_m = gather_tokens(pixel_targets(images, patch_size, norm_pix=norm_pix), masked)  # [B, M, P]
    pred_m = gather_tokens(pred.float(), masked)  # [B, M, P]
    return (pred_m - target_m).pow(2), target_m

