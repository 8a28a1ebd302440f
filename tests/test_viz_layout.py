"""Figures a user can read: titles inside the figure, legends off the data, one colour per class,
and a truthful label for where the images came from."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from milan.masking import RandomMasking
from milan.tools import viz, viz_cli


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list:
    """The figures viz saves, kept open after `savefig` (their final layout, with a renderer)."""
    import matplotlib.pyplot as plt

    kept: list = []
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig))
    return kept


def _inside(inner, outer, slack: float = 0.5) -> bool:
    return (inner.x0 >= outer.x0 - slack and inner.y0 >= outer.y0 - slack and inner.x1 <= outer.x1 + slack
            and inner.y1 <= outer.y1 + slack)


LONG = ("run-with-a-rather-long-name/checkpoint-000200.pt — clip target, prompting decoder, semantic masking, "
        "mask ratio 0.75; teacher openclip:ViT-B-16; data imagefolder /home/someone/Pictures/holiday-photos-2024 "
        "(held out as val, data.val_fraction=0.2; the checkpoint pretrained on this folder)")


def test_masks_title_stays_inside_the_figure_and_above_the_panels(tmp_path: Path, figures: list) -> None:
    mask = RandomMasking(0.75)(2, 16, generator=torch.Generator().manual_seed(0))
    viz.plot_mask_loss(torch.rand(2, 3, 32, 32), mask, mask, torch.rand(2, 16), 8, tmp_path / "m.png", title=LONG)
    (fig,) = figures
    renderer = fig.canvas.get_renderer()
    title = fig._suptitle
    assert "".join(title.get_text().split()) == "".join(LONG.split())  # every word is drawn (wrapped, not cut)
    box = title.get_window_extent(renderer)
    assert _inside(box, fig.bbox), (box, fig.bbox)
    for ax in fig.axes:  # nor over the column heads or the images
        assert not box.overlaps(ax.get_tightbbox(renderer)), ax.get_title()


def test_tsne_title_and_panels_do_not_collide(tmp_path: Path, figures: list) -> None:
    coords = np.random.default_rng(0).normal(size=(30, 2))
    viz.plot_tsne({"teacher": (coords, np.arange(30) % 3), "student": (coords, np.arange(30) % 3)},
                  tmp_path / "t.png", title=LONG)
    (fig,) = figures
    renderer = fig.canvas.get_renderer()
    box = fig._suptitle.get_window_extent(renderer)
    assert _inside(box, fig.bbox)
    assert not any(box.overlaps(ax.get_tightbbox(renderer)) for ax in fig.axes)


def test_curves_legend_is_off_every_panel(tmp_path: Path, figures: list) -> None:
    runs = {f"run{i} (teacher builtin:shapes, data imagefolder /data/photos)":
            [{"step": s, "loss": 2.0 - 0.1 * s + i, "lr": 1e-4 * min(s, 5), "img_per_s": 40.0 + s}
             for s in range(1, 20)] for i in range(3)}
    viz.plot_curves(runs, tmp_path / "c.png", title="training curves")
    (fig,) = figures
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    assert len(legend.get_texts()) == 3 and _inside(box, fig.bbox)
    for ax in fig.axes:  # neither the curves nor the axis labels and ticks
        assert not box.overlaps(ax.get_tightbbox(renderer)), ax.get_title()
    assert not any(ax.get_legend() for ax in fig.axes)


def _lab(rgb: tuple[float, float, float]) -> np.ndarray:
    """sRGB in [0, 1] → CIELAB (D65)."""
    c = np.asarray(rgb, dtype=float)
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ c
    f = np.cbrt(np.maximum(xyz / np.array([0.95047, 1.0, 1.08883]), 0.008856 ** 3))
    f = np.where(xyz / np.array([0.95047, 1.0, 1.08883]) > 0.008856, f,
                 7.787 * xyz / np.array([0.95047, 1.0, 1.08883]) + 16 / 116)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def test_class_colours_are_told_apart() -> None:
    """Every pair ΔE ≥ 25 up to 10 classes, ≥ 10 up to 20; and a few classes get a hue each (the
    old tab20 order gave classes 0 and 1 the same blue, one light and one dark: hue 1° apart)."""
    for n in range(2, 21):
        lab = [_lab(c) for c in viz.class_colours(n)]
        least = min(np.linalg.norm(a - b) for i, a in enumerate(lab) for b in lab[i + 1:])
        assert least >= (25 if n <= 10 else 10), (n, least)
    for n in range(2, 6):
        hues = [np.degrees(np.arctan2(b, a)) % 360 for _, a, b in map(_lab, viz.class_colours(n))]
        gaps = [min(abs(h - g), 360 - abs(h - g)) for i, h in enumerate(hues) for g in hues[i + 1:]]
        assert min(gaps) >= 20, (n, hues)
    assert len(set(viz.class_colours(40))) == 40


def test_tsne_draws_each_class_in_its_own_colour_in_every_panel(tmp_path: Path, figures: list) -> None:
    coords = np.random.default_rng(0).normal(size=(12, 2))
    labels = np.arange(12) % 3
    viz.plot_tsne({"a": (coords, labels), "b": (coords[:8], labels[:8])}, tmp_path / "t.png")
    (fig,) = figures
    colours = [[tuple(np.round(col.get_facecolor()[0][:3], 4)) for col in ax.collections] for ax in fig.axes]
    assert colours[0] == colours[1] and len(set(colours[0])) == 3


# --- the split label -------------------------------------------------------------------------------


def _args(**kw) -> argparse.Namespace:
    base = dict(data="imagefolder", data_path=None, split="val", val_fraction=0.2)
    return argparse.Namespace(**{**base, **kw})


def _photos(root: Path, n: int = 5) -> Path:
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (40, 40), (50 * i, 100, 150)).save(root / name / f"{i}.png")
    return root


def test_viz_labels_say_which_images_they_draw(tmp_path: Path) -> None:
    photos = _photos(tmp_path / "photos")
    pretrained_here = {"data": {"kind": "imagefolder", "path": str(photos)}}
    args = _args()
    data = viz_cli._dataset(args, 32, pretrained_here)
    assert len(data) == 2 and "(val)" not in args.data_used  # one image of each class held out
    assert args.data_used == (f"imagefolder {photos} (held out as val, data.val_fraction=0.2; "
                              "the checkpoint pretrained on this folder)")
    args = _args(split="train", data_path=str(photos))
    assert len(viz_cli._dataset(args, 32)) == 8
    assert args.data_used == f"imagefolder {photos} (train, without the part held out as val)"
    # a real val folder is called val, and pretraining on train/ did not see it
    _photos(tmp_path / "data" / "train")
    _photos(tmp_path / "data" / "val", 2)
    args = _args()
    assert len(viz_cli._dataset(args, 32, {"data": {"kind": "imagefolder", "path": str(tmp_path / "data")}})) == 4
    assert args.data_used == f"imagefolder {tmp_path / 'data' / 'val'} (val)"
