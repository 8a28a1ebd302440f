"""Figures (headless matplotlib): masks as the encoder sees them, and teacher attention maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from milan.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from milan.masking import Mask

__all__ = ["to_display", "masked_view", "plot_masks", "plot_attention"]


def to_display(images: Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """Normalised `[B, 3, H, W]` → uint8 `[B, H, W, 3]`."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    x = (images.detach().float().cpu() * s + m).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def masked_view(image: np.ndarray, hidden: np.ndarray, patch_size: int, *, dim: float = 0.25) -> np.ndarray:
    """Dim the masked patches of one `[H, W, 3]` uint8 image; `hidden` is `[N]` bool (row-major)."""
    grid = image.shape[0] // patch_size
    cells = np.kron(hidden.reshape(grid, grid), np.ones((patch_size, patch_size), dtype=bool))
    out = image.astype(np.float32)
    out[cells] *= dim
    return out.round().astype(np.uint8)


def _figure(rows: int, cols: int, scale: float = 1.6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(cols * scale, rows * scale), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def _save(fig, path: str | Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_masks(images: Tensor, cls_attn: Tensor, semantic: Mask, random: Mask, patch_size: int,
               path: str | Path, *, title: str = "") -> Path:
    """Rows: image | teacher CLS attention | semantic-aware mask | random mask (kept patches bright)."""
    pics = to_display(images)
    grid = int(round(cls_attn.shape[1] ** 0.5))
    fig, axes = _figure(len(pics), 4)
    heads = ["image", "teacher CLS attention", "semantic-aware mask", "random mask"]
    sem, rnd = semantic.is_masked().cpu().numpy(), random.is_masked().cpu().numpy()
    for i, pic in enumerate(pics):
        axes[i, 0].imshow(pic)
        im = axes[i, 1].imshow(cls_attn[i].reshape(grid, grid).float().cpu().numpy(), cmap="viridis")
        fig.colorbar(im, ax=axes[i, 1], fraction=0.046, pad=0.04)
        axes[i, 2].imshow(masked_view(pic, sem[i], patch_size))
        axes[i, 3].imshow(masked_view(pic, rnd[i], patch_size))
    for ax, head in zip(axes[0], heads):
        ax.set_title(head, fontsize=8)
    return _save(fig, path, title)


def plot_attention(images: Tensor, cls_attn: Tensor, path: str | Path, *, title: str = "", cols: int = 6) -> Path:
    """Image with the last-layer CLS attention overlaid (upsampled, nearest), one panel each."""
    pics = to_display(images)
    grid = int(round(cls_attn.shape[1] ** 0.5))
    rows = (len(pics) + cols - 1) // cols
    fig, axes = _figure(rows, cols)
    for ax in axes.flat[len(pics):]:
        ax.axis("off")
    for ax, pic, attn in zip(axes.flat, pics, cls_attn.float().cpu()):
        heat = attn.reshape(grid, grid).numpy()
        ax.imshow(pic)
        ax.imshow(heat, cmap="inferno", alpha=0.55, extent=(0, pic.shape[1], pic.shape[0], 0),
                  interpolation="nearest")
    return _save(fig, path, title)
