"""Figures (headless matplotlib): masks, attention maps, per-patch losses, t-SNE and curves.

The pure pieces (`masked_view`, `per_patch_feature_loss`, `per_patch_pixel_loss`,
`student_cls_attention`, `tsne_embed`, `read_metrics`) are tested on their own; the `plot_*`
functions only lay them out. `milan viz` (`milan.tools.viz_cli`) wires them to checkpoints and data.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from milan.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from milan.masking import Mask
from milan.teacher import cls_attention

__all__ = [
    "to_display",
    "masked_view",
    "plot_masks",
    "plot_attention",
    "student_cls_attention",
    "plot_mask_loss",
    "plot_attention_columns",
    "tsne_embed",
    "plot_tsne",
    "class_colours",
    "read_metrics",
    "plot_curves",
    "CURVE_METRICS",
]

#: Figure width in inches at `DPI`: ≈ 1200 px, readable in a README.
WIDTH, DPI = 11.0, 110


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
    """Square cells of `scale` inches (the demo's figures)."""
    return _grid_figure(rows, cols, width=cols * scale)


def _wrap_title(fig, title: str, fontsize: float) -> str:
    """`title` wrapped to the figure's width (an average glyph is ≈ 0.55 em wide), so that a long
    title (checkpoint, teacher and data path) stays inside the figure instead of running off both ends."""
    chars = max(20, int(fig.get_figwidth() * 72 / (0.55 * fontsize)) - 4)
    return textwrap.fill(title, chars, break_long_words=True, break_on_hyphens=False)


def _save(fig, path: str | Path, title: str, *, dpi: int = 110, fontsize: int = 9, bottom: float = 0.0) -> Path:
    """Title (wrapped to the figure), layout and PNG; `bottom` inches are left free (a figure legend)."""
    # lazy: pyplot after choosing the headless Agg backend, and only when a figure is drawn
    import matplotlib.pyplot as plt

    if title:
        text = _wrap_title(fig, title, fontsize)
        fig.suptitle(text, fontsize=fontsize)
        # room at the top for every line of the title: tight_layout lays out the axes only
        lines = text.count("\n") + 1
        top = 1 - (lines * fontsize * 1.35 + 6) / 72 / fig.get_figheight()
    else:
        top = 1.0
    fig.tight_layout(rect=(0, bottom / fig.get_figheight(), 1, top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
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


# --- student attention (Figure 3) --------------------------------------------------------------


@torch.no_grad()
def student_cls_attention(encoder: torch.nn.Module, images: Tensor) -> Tensor:
    """Last-block CLS attention of a `MaskedViTEncoder` over all patches: `[B, 3, H, W]` → `[B, N]`.

    The same definition as the teacher's `cls_attn` (`milan.teacher.cls_attention`: softmax of the
    CLS query row over all 1+N keys, head-averaged, patch columns), from the last timm `Block`'s
    own `qkv` weights (its fused attention never materialises the map).
    """
    x = encoder.embed(images)  # [B, 1+N, D]
    for block in encoder.blocks[:-1]:
        x = block(x)
    last = encoder.blocks[-1]
    attn = last.attn
    h = last.norm1(x)
    batch, tokens, _ = h.shape
    qkv = attn.qkv(h).reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)  # [3, B, H, L, d]
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return cls_attention(q[:, :, :1], k, scale=attn.scale)  # [B, N]


# --- layout -------------------------------------------------------------------------------------


def _grid_figure(rows: int, cols: int, *, width: float = WIDTH):
    # lazy: pyplot after choosing the headless Agg backend, and only when a figure is drawn
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after matplotlib.use("Agg")

    cell = width / cols
    fig, axes = plt.subplots(rows, cols, figsize=(width, cell * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def _save_fixed(fig, path: str | Path, title: str, *, bottom: float = 0.0) -> Path:
    """Save at `DPI` with the figure's own size, so the PNG is `WIDTH × DPI` pixels wide."""
    return _save(fig, path, title, dpi=DPI, fontsize=11, bottom=bottom)


def _heads(axes, heads: list[str], width: int = 30) -> None:
    """Column titles, wrapped to `width` characters so long checkpoint names don't collide."""
    for ax, head in zip(axes, heads):
        ax.set_title(textwrap.fill(head, width), fontsize=9)


def _grid(values: Tensor | np.ndarray) -> np.ndarray:
    arr = values.float().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values, dtype=np.float32)
    side = int(round(arr.shape[-1] ** 0.5))
    return arr.reshape(side, side)


def plot_mask_loss(images: Tensor, semantic: Mask, random: Mask, loss: Tensor, patch_size: int,
                   path: str | Path, *, title: str = "", loss_label: str = "per-patch loss") -> Path:
    """Figure 4. Rows: image | semantic-aware mask | random mask | per-patch loss (heat map + colour bar).

    Kept patches keep their pixels, masked ones are dimmed; NaN loss cells (not scored) are blank.
    """
    pics = to_display(images)
    fig, axes = _grid_figure(len(pics), 4)
    sem, rnd = semantic.is_masked().cpu().numpy(), random.is_masked().cpu().numpy()
    vmin, vmax = loss_range(loss)  # one colour scale for every row, so rows compare
    for i, pic in enumerate(pics):
        axes[i, 0].imshow(pic)
        axes[i, 1].imshow(masked_view(pic, sem[i], patch_size))
        axes[i, 2].imshow(masked_view(pic, rnd[i], patch_size))
        im = axes[i, 3].imshow(_grid(loss[i]), cmap="magma", interpolation="nearest", vmin=vmin, vmax=vmax)
        fig.colorbar(im, ax=axes[i, 3], fraction=0.046, pad=0.04)
    _heads(axes[0], ["image", "semantic-aware mask (kept bright)", "random mask (kept bright)", loss_label])
    return _save_fixed(fig, path, title)


def loss_range(loss: Tensor) -> tuple[float, float]:
    """(min, max) of the scored (finite) cells of a per-patch loss map; (0, 1) if none is scored."""
    finite = loss[torch.isfinite(loss)]
    if finite.numel() == 0:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    return low, max(high, low + 1e-12)


def plot_attention_columns(images: Tensor, maps: dict[str, Tensor], path: str | Path, *,
                           title: str = "") -> Path:
    """Figure 3. Columns: image, then one CLS-attention overlay per source (`name → [B, N]`)."""
    pics = to_display(images)
    cols = 1 + len(maps)
    fig, axes = _grid_figure(len(pics), cols, width=min(WIDTH, max(9.2, 2.6 * cols + 1.0)))
    for i, pic in enumerate(pics):
        axes[i, 0].imshow(pic)
        for j, attn in enumerate(maps.values(), start=1):
            axes[i, j].imshow(pic)
            im = axes[i, j].imshow(_grid(attn[i]), cmap="inferno", alpha=0.6, interpolation="nearest",
                                   extent=(0, pic.shape[1], pic.shape[0], 0))
            fig.colorbar(im, ax=axes[i, j], fraction=0.046, pad=0.04)
    _heads(axes[0], ["image", *maps], width=24)
    return _save_fixed(fig, path, title)


# --- t-SNE (Figure 2) ---------------------------------------------------------------------------


def tsne_embed(features: Tensor | np.ndarray, *, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """2-D t-SNE of `[M, D]` features (sklearn, fixed `random_state`; PCA init) → `[M, 2]`."""
    # lazy: scikit-learn is the optional `viz` extra
    from sklearn.manifold import TSNE

    x = features.float().cpu().numpy() if isinstance(features, Tensor) else np.asarray(features, np.float32)
    perplexity = min(perplexity, max(1.0, (len(x) - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def class_colours(n: int) -> list[tuple[float, float, float]]:
    """`n` colours for class scatters, as far apart as the count allows.

    Up to 10: tab10 (ten hues). Up to 20: then tab20's light shades of those hues (not tab20 in
    order, whose neighbours are one hue twice: class 0 and 1 came out in nearly the same blue).
    More: evenly spaced on the turbo colour map (all distinct, less easily told apart).
    """
    # lazy: matplotlib only when a figure is drawn
    import matplotlib

    if n <= 10:
        return [matplotlib.colormaps["tab10"](i)[:3] for i in range(n)]
    if n <= 20:
        light = matplotlib.colormaps["tab20"]
        return class_colours(10) + [light(2 * i + 1)[:3] for i in range(n - 10)]
    turbo = matplotlib.colormaps["turbo"]
    return [turbo(x)[:3] for x in np.linspace(0.05, 0.95, n)]


def plot_tsne(panels: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, *, title: str = "",
              classes: list[str] | None = None) -> Path:
    """One scatter per source (`name → (coords [M, 2], labels [M])`), coloured by class."""
    # lazy: pyplot after choosing the headless Agg backend, and only when a figure is drawn
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after matplotlib.use("Agg")

    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(WIDTH, WIDTH / n + 0.9), squeeze=False)
    present = np.unique(np.concatenate([np.asarray(labels) for _, labels in panels.values()]))
    colour = dict(zip(present.tolist(), class_colours(len(present))))  # one colour per class in every panel
    for ax, (name, (coords, labels)) in zip(axes[0], panels.items()):
        labels = np.asarray(labels)
        for c in np.unique(labels):
            sel = labels == c
            name_c = classes[c] if classes is not None and c < len(classes) else str(c)
            ax.scatter(coords[sel, 0], coords[sel, 1], s=8, color=colour[int(c)], label=name_c)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, names = axes[0, 0].get_legend_handles_labels()
    if len(names) <= 20:
        fig.legend(handles, names, loc="lower center", ncol=min(10, len(names)), fontsize=7, markerscale=2,
                   frameon=False)
        fig.subplots_adjust(bottom=0.15)
    if title:
        text = _wrap_title(fig, title, 11)
        fig.suptitle(text, fontsize=11)
        lines = text.count("\n") + 1
        # the title's lines, then the panel titles (9 pt) between it and the panels
        fig.subplots_adjust(top=1 - (lines * 11 * 1.35 + 6 + 9 * 1.8) / 72 / fig.get_figheight())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


# --- training curves ----------------------------------------------------------------------------

#: metrics.jsonl key → panel title.
CURVE_METRICS = {"loss": "loss", "lr": "learning rate", "img_per_s": "throughput (img/s)",
                 "knn_acc": "kNN accuracy"}
ACCURACY_METRICS = ("knn_acc",)  # fractions: plotted on [0, 1]


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The JSON lines of `run_dir/metrics.jsonl` (or a path to the file itself); blank lines skipped."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl at {path}; pass a run folder written by `milan pretrain`")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(runs: dict[str, list[dict]], path: str | Path, *, title: str = "") -> Path:
    """One panel per metric in `CURVE_METRICS` that some run has, one line per run (x = step)."""
    # lazy: pyplot after choosing the headless Agg backend, and only when a figure is drawn
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after matplotlib.use("Agg")

    present = [k for k in CURVE_METRICS if any(k in r for recs in runs.values() for r in recs)]
    if not present:
        raise ValueError(f"no run has any of {list(CURVE_METRICS)} in its metrics.jsonl")
    legend_height = 0.2 * len(runs) + 0.15  # inches below the panels: one line per run
    fig, axes = plt.subplots(1, len(present), figsize=(WIDTH, 3.4 + legend_height), squeeze=False)
    for ax, key in zip(axes[0], present):
        for name, recs in runs.items():
            pts = [(r["step"], r[key]) for r in recs if key in r and "step" in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=name, marker="o" if len(pts) < 20 else None, markersize=3)
        ax.set_title(CURVE_METRICS[key], fontsize=9)
        if key in ACCURACY_METRICS:  # an accuracy: its whole range, never past 1
            ax.set_ylim(0.0, 1.0)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    # one legend for all panels, below them: inside a panel it covered the curves (the loss axis)
    handles = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), [textwrap.shorten(n, 160, placeholder=" …") for n in handles],
               loc="lower center", ncol=1, fontsize=7, frameon=False, borderaxespad=0.2)
    return _save_fixed(fig, path, title, bottom=legend_height)
