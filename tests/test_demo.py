"""A shortened `milan demo` end to end: table, report and figures."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from milan.tools.cli import main


def test_short_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    main(["demo", "--out", str(out), "--data", str(tmp_path / "shapes"), "--steps", "3",
          "--data-size", "192", "--val-size", "64", "--probe-train", "128", "--batch-size", "32",
          "--baseline"])
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"MILAN", "MAE (pixels)", "random init", "teacher (builtin:shapes)"}
    for row in results.values():
        assert all(0.0 <= v <= 1.0 for v in row.values()) and "linear shape" in row and "knn colour" in row
    report = (out / "report.md").read_text()
    assert "| MILAN |" in report and "masks_semantic_vs_random.png" in report
    for name in ("masks_semantic_vs_random.png", "teacher_attention.png", "tsne_shape.png", "training_curves.png"):
        with Image.open(out / name) as img:
            assert img.size[0] > 300 and img.size[1] > 200
    assert (out / "milan_vit_shapes_patch8" / "config.yaml").is_file()


def test_demo_features_see_the_images_the_datasets_give(shapes_root: Path) -> None:
    """Decoding once to uint8 and normalising per batch gives exactly ToTensor + Normalize's input."""
    import torch
    from torchvision import transforms as T

    from milan.data.shapes import ShapesDataset
    from milan.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from milan.tools.demo import _decode, _features

    ds = ShapesDataset(shapes_root, "val", transform=T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]))
    expected = torch.stack([ds[i][0] for i in range(len(ds))]).flatten(1)
    images = _decode(shapes_root, "val", len(ds))
    assert images.dtype == torch.uint8 and images.shape == (len(ds), 3, 64, 64)
    assert torch.equal(_features(lambda x: x.flatten(1), images, batch_size=5), expected)
