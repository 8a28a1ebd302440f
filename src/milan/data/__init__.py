"""Datasets for pretraining and evaluation: ImageFolder trees and the built-in shapes set."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
from torch.utils.data import Dataset

from milan.data.folder import ImageFolderDataset
from milan.data.shapes import ShapesDataset, default_shapes_root, generate_shapes
from milan.errors import ConfigError, DataNotFound

__all__ = ["build_dataset", "DATASET_KINDS", "DataNotFound", "loader_workers", "usable_cpus"]

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
        root = Path(path).expanduser() if path else default_shapes_root()
        if not (root / "meta.json").is_file() and not path:
            generate_shapes(root)
        return ShapesDataset(root, split=split, transform=transform, label=label)
    raise ConfigError(f"unknown data.kind {kind!r}; choose one of: {', '.join(DATASET_KINDS)}")


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a container's or a job's share, not the
    machine's count), as torch's DataLoader counts them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


_capped: set[tuple[int, int]] = set()


def loader_workers(requested: int, *, key: str = "data.num_workers") -> int:
    """`requested` DataLoader workers, at most the CPUs this process may use (`usable_cpus`).

    The configs ask for 8–16 workers, sized for a GPU node; on a laptop or a 2-core job more workers
    than CPUs only add processes (and torch warns on every loader). Logged once per process and value.
    """
    cpus = usable_cpus()
    if requested <= cpus:
        return requested
    if (requested, cpus) not in _capped and _is_main():
        _capped.add((requested, cpus))
        logging.getLogger("milan").info("%s=%d capped at %d: this process may use %d CPU%s", key, requested, cpus,
                                        cpus, "" if cpus == 1 else "s")
    return cpus


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
