"""Datasets for pretraining and evaluation: ImageFolder trees and the built-in shapes set."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
from torch.utils.data import Dataset

from milan.errors import ConfigError, DataNotFound

__all__ = ["build_dataset", "DATASET_KINDS", "DataNotFound"]

DATASET_KINDS = ("imagefolder", "shapes")  # webdataset streams: milan.data.wds


def build_dataset(
    kind: str,
    path: str | Path | None,
    *,
    split: str = "train",
    transform: Callable | None = None,
    min_size: int = 1,
    label: str = "shape",
    exif_transpose: bool = True,
    log: bool = True,
) -> Dataset:
    """Open a dataset by kind.

    Args:
        kind: 'imagefolder' (`path/<class>/<image>`; for split 'val' the folder `path` itself,
            or `path/val` when `path/train` and `path/val` exist) or 'shapes' (the built-in set;
            `path` defaults to the cache folder, generated on first use).
        path: where the data lives.
        split: 'train' or 'val'.
        transform: applied to each RGB PIL image.
        min_size: ImageFolder images with a shorter side are treated as bad.
        label: for shapes, which label to return (shape, colour, position, count, shape_colour).
        exif_transpose: apply each image's EXIF Orientation (ImageFolder; `data.exif_transpose`).
        log: log the ImageFolder's start line ("426 images in 5 classes; ignored 3 files: ...")
            on rank 0.

    Bad files are only found when read: wrap the dataset for a DataLoader with
    `milan.data.reading.Samples` (pretraining) or `milan.data.reading.Checked` (elsewhere).
    """
    if kind == "imagefolder":
        from milan.data.folder import ImageFolderDataset

        if not path:
            raise ConfigError("data.path is required for data.kind=imagefolder (a folder of images)")
        root = Path(path).expanduser()
        if (root / split).is_dir():
            root = root / split
        dataset = ImageFolderDataset(root, transform, min_size=min_size, exif_transpose=exif_transpose)
        if log and _is_main():
            # the `milan` logger, which each command sets up (milan.train.log.get_logger)
            logging.getLogger("milan").info("%s: %s", root, dataset.describe())
        return dataset
    if kind == "shapes":
        from milan.data.shapes import ShapesDataset, default_shapes_root, generate_shapes

        root = Path(path).expanduser() if path else default_shapes_root()
        if not (root / "meta.json").is_file() and not path:
            generate_shapes(root)
        return ShapesDataset(root, split=split, transform=transform, label=label)
    raise ConfigError(f"unknown data.kind {kind!r}; choose one of: {', '.join(DATASET_KINDS)}")


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
