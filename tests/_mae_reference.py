"""MAE's pixel objective written out as in its `models_mae.py` (`patchify`, `forward_loss` with
`norm_pix_loss=True`), the reference that tests compare milan's pixel loss against."""

from __future__ import annotations

import torch


def mae_patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """MAE's models_mae.patchify: `[B, 3, H, W]` → `[B, N, p·p·3]`."""
    n, c, h, w = imgs.shape
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def mae_pixel_loss(imgs: torch.Tensor, pred: torch.Tensor, mask_flags: torch.Tensor, p: int) -> torch.Tensor:
    """MAE's forward_loss with norm_pix_loss=True; pred: `[B, N, p·p·3]` (no CLS); mask_flags:
    `[B, N]`, 1 where removed."""
    target = mae_patchify(imgs, p)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)
    return (loss * mask_flags).sum() / mask_flags.sum()
