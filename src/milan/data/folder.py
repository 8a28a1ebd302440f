"""Image folders that survive real-world files, and sample-level determinism for exact resume.

`ImageFolderDataset` reads an ImageFolder tree (`root/<class>/<image>`) or a flat folder of
images. Every image is converted to RGB (CMYK, grayscale, palette and alpha images included);
corrupt, truncated or too-small files raise `BadImage`.

`Samples` wraps any dataset for training: it seeds the augmentation of sample i in epoch e from
(seed, epoch, i) alone, so a resumed run sees exactly the crops of an uninterrupted one whatever
the worker count; and it replaces a bad image by the next good one, returning a flag so the loop
can count bad images and stop when too many are bad. A folder that cannot be used (missing, no
images, nothing but bad images) raises `milan.errors.DataError`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from milan.data import DataNotFound
from milan.errors import DataError

_log = logging.getLogger("milan")

__all__ = ["BadImage", "ImageFolderDataset", "Samples", "UnreadableImages", "load_rgb", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class BadImage(Exception):
    """An image that cannot be used (corrupt, truncated, too small)."""


class UnreadableImages(DataError, RuntimeError):
    """Too many bad images in a row: the data path (or shard list) holds no usable images.

    A `DataError` (the `milan` command prints it as one line); still a `RuntimeError`, as before.
    """


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """16-bit grayscale → 8-bit by scaling 0..65535 to 0..255 (PIL's convert("L") would clip)."""
    values = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")


def load_rgb(source: str | Path | BinaryIO, *, min_size: int = 1, name: str | None = None,
             draft: Callable[[Image.Image], Any] | None = None) -> Image.Image:
    """Open an image file (path or binary stream) as RGB, fully decoded.

    `draft`, if given, is called with the opened image before it is decoded (its `size` is the
    stored one); it may call `img.draft(...)` to decode a JPEG at 1/2, 1/4 or 1/8 size
    (`milan.data.fast`). `min_size` applies to the stored size.
    Raises `BadImage` with the reason, prefixed by `name` (default: the path), otherwise.
    """
    name = name or str(source)
    try:
        with Image.open(source) as img:
            stored = img.size
            if draft is not None:
                draft(img)
            img.load()
            if img.mode in ("P", "LA", "RGBA", "PA") or "transparency" in img.info:
                img = img.convert("RGBA")  # palette/alpha: resolve transparency first
            elif img.mode.startswith("I"):  # 16-bit grayscale ("I;16*", or "I" from PNG/TIFF)
                img = _sixteen_bit_to_l(img)
            rgb = img.convert("RGB")
    except Image.DecompressionBombError as err:
        raise BadImage(f"{name}: {err} (resize it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust "
                       "the file)") from err
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise BadImage(f"{name}: {err}") from err
    if min(stored) < min_size:
        raise BadImage(f"{name}: {stored[0]}x{stored[1]} is smaller than min_size={min_size}")
    return rgb


class ImageFolderDataset(Dataset):
    """`root/<class>/*.jpg` (labels from folder names) or `root/*.jpg` (label -1).

    Args:
        root: the folder.
        transform: applied to the RGB PIL image.
        min_size: images whose short side is below this are bad.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None, *, min_size: int = 1) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataNotFound(f"data path not found: {root} (expected an ImageFolder: root/<class>/<image>)")
        self.root, self.transform, self.min_size = root, transform, min_size
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.classes = classes
        self.samples: list[tuple[Path, int]] = []
        if classes:
            for label, name in enumerate(classes):
                files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
                self.samples += [(p, label) for p in files]
        else:
            files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            self.samples = [(p, -1) for p in files]
        if not self.samples:
            raise DataNotFound(
                f"no images found under {root} (extensions: {', '.join(IMAGE_EXTENSIONS)})"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        decode = getattr(self.transform, "decode", None)  # a transform that reads the file itself (milan.data.fast)
        if decode is not None:
            return decode(path, name=str(path), min_size=self.min_size), label
        img = load_rgb(path, min_size=self.min_size)
        return (self.transform(img) if self.transform else img), label


class Samples(Dataset):
    """Training view of a dataset: per-sample seeded augmentation and bad-image replacement.

    `__getitem__(i)` returns `(image, label, bad)` where `bad` counts the bad images skipped to
    produce it. Call `set_epoch` before each epoch (the loader's workers see it through the
    sampler, which passes `(epoch, index)` pairs).
    """

    def __init__(self, dataset: Dataset, *, seed: int, max_tries: int = 16) -> None:
        self.dataset, self.seed, self.max_tries = dataset, seed, max_tries

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, int, int]:
        epoch, index = key
        reason = None
        for bad in range(self.max_tries):
            i = (index + bad) % len(self.dataset)
            # Global RNGs are per worker process; seeding them here makes the crop of (epoch, i)
            # independent of which worker (or the main process) draws it.
            seed = hash((self.seed, epoch, i)) & 0x7FFF_FFFF
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                image, label = self.dataset[i]
                return image, label, bad
            except BadImage as err:
                reason = err
                _log.warning("skipping bad image %s", err)
        raise UnreadableImages(
            f"{self.max_tries} consecutive unreadable or too small images from index {index} "
            f"(last: {reason}); check that the data path holds readable images"
        )
