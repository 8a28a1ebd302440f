"""Image folders that survive real-world files.

`ImageFolderDataset` reads an ImageFolder tree (`root/<class>/<image>`) or a flat folder of
images. Every image is converted to RGB (CMYK, grayscale, palette and alpha images included);
corrupt, truncated or too-small files raise `BadImage`, for `milan.data.reading` to skip (its
`Samples` wraps a dataset for pretraining: per-sample seeded crops, bad images replaced). A
folder that cannot be used (missing, no images, nothing but bad images) raises
`milan.errors.DataError`.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from milan.errors import DataError, DataNotFound

_log = logging.getLogger("milan")

__all__ = ["BadImage", "ImageFolderDataset", "UnreadableImages", "load_rgb", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class BadImage(Exception):
    """An image that cannot be used (corrupt, truncated, too small).

    `name` is the file (or shard member) and `reason` what is wrong with it; `str()` is both.
    """

    def __init__(self, message: str, *, name: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.name, self.reason = name, reason if reason is not None else message


class UnreadableImages(DataError, RuntimeError):
    """Too many bad images in a row: the data path (or shard list) holds no usable images.

    A `DataError` (the `milan` command prints it as one line); still a `RuntimeError`, as before.
    """


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """16-bit grayscale → 8-bit by scaling 0..65535 to 0..255 (PIL's convert("L") would clip)."""
    values = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")


def _bad(name: str, reason: str) -> BadImage:
    return BadImage(f"{name}: {reason}", name=name, reason=reason)


def draft_request(stored: tuple[int, int], factor: float) -> tuple[int, int] | None:
    """For PIL's `Image.draft`: the request that makes libjpeg decode at 1/a of `stored` (width,
    height), a the largest of 8, 4, 2 not above `factor`; None when `factor` < 2. (PIL takes the
    largest 1/2^k with `stored // request` ≥ 2^k: asking for `stored // a` gives exactly a.)"""
    a = next((a for a in (8, 4, 2) if a <= factor), None)
    if a is None:
        return None
    return max(1, stored[0] // a), max(1, stored[1] // a)


def load_rgb(source: str | Path | BinaryIO, *, min_size: int = 1, name: str | None = None,
             draft: Callable[[Image.Image], Any] | None = None, exif_transpose: bool = True,
             notes: list[tuple[str, str]] | None = None) -> Image.Image:
    """Open an image file (path or binary stream) as RGB, fully decoded.

    `draft`, if given, is called with the opened image before it is decoded (its `size` is the
    stored one); it may call `img.draft(...)` to decode a JPEG at 1/2, 1/4 or 1/8 size
    (`milan.data.fast`). `min_size` applies to the stored size.
    Multi-frame files (GIF, multipage TIFF) give their first frame. With `exif_transpose` the EXIF
    Orientation tag is applied (a phone photo taken in portrait comes out upright).
    PIL's `DecompressionBombWarning` (an image over `PIL.Image.MAX_IMAGE_PIXELS` but under twice
    that) becomes a note `(name, message)` appended to `notes`, or a log warning when `notes` is None.

    Raises `BadImage` with the reason, prefixed by `name` (default: the path), otherwise.
    """
    name = name or str(source)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                stored = img.size
                if draft is not None:
                    draft(img)
                img.load()
                if exif_transpose:
                    img = _upright(img)
                if img.mode in ("P", "LA", "RGBA", "PA") or "transparency" in img.info:
                    img = img.convert("RGBA")  # palette/alpha: resolve transparency first
                elif img.mode.startswith("I"):  # 16-bit grayscale ("I;16*", or "I" from PNG/TIFF)
                    img = _sixteen_bit_to_l(img)
                rgb = img.convert("RGB")
    except Image.DecompressionBombError as err:
        raise _bad(name, f"{err} (resize it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file)") from err
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError) as err:
        raise _bad(name, str(err) or type(err).__name__) from err
    for warning in caught:
        if issubclass(warning.category, Image.DecompressionBombWarning):
            note = (name, f"{stored[0]}x{stored[1]} = {stored[0] * stored[1]} pixels is over PIL's "
                          f"decompression-bomb limit of {Image.MAX_IMAGE_PIXELS}; read anyway (it is not over "
                          "twice the limit), but consider resizing it")
            if notes is None:
                _log.warning("%s: %s", *note)
            else:
                notes.append(note)
    if min(stored) < min_size:
        raise _bad(name, f"{stored[0]}x{stored[1]} is smaller than min_size={min_size}")
    return rgb


def _upright(img: Image.Image) -> Image.Image:
    """`ImageOps.exif_transpose`, ignoring EXIF blocks too broken to read (the pixels are fine)."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - any malformed EXIF: keep the image as stored
        return img
    if orientation in (None, 1):
        return img
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001
        return img


# Never images: operating-system and tool droppings (ignored, and listed as such).
_SYSTEM_FILES = {"thumbs.db", "desktop.ini", "ehthumbs.db", ".ds_store", "icon\r"}
_SYSTEM_DIRS = {"__macosx", "@eadir", "$recycle.bin", "system volume information"}


def _hidden(rel: Path) -> bool:
    """A hidden or system file or folder (`.DS_Store`, `._x.jpg`, `Thumbs.db`, `__MACOSX/`)."""
    return any(part.startswith(".") or part.lower() in _SYSTEM_DIRS for part in rel.parts[:-1]) or \
        rel.name.startswith(".") or rel.name.lower() in _SYSTEM_FILES or rel.name.lower() in _SYSTEM_DIRS


class ImageFolderDataset(Dataset):
    """`root/<class>/**/*.jpg` (labels from folder names) or `root/*.jpg` (label -1).

    Files are images by extension (any case; `IMAGE_EXTENSIONS`). Everything else is *ignored* and
    listed in `ignored` (relative paths): other extensions, hidden and system files (`.DS_Store`,
    `Thumbs.db`, `._*`, `__MACOSX/`), and loose files beside the class folders. `describe()` is the
    one-line account the commands log at start.

    Args:
        root: the folder.
        transform: applied to the RGB PIL image.
        min_size: images whose short side is below this are bad.
        exif_transpose: apply the EXIF Orientation tag (see `load_rgb`).
    """

    def __init__(self, root: str | Path, transform: Callable | None = None, *, min_size: int = 1,
                 exif_transpose: bool = True) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataNotFound(f"data path not found: {root} (expected an ImageFolder: root/<class>/<image>)")
        self.root, self.transform, self.min_size = root, transform, min_size
        self.exif_transpose = exif_transpose
        entries = sorted(root.iterdir())
        classes = [p.name for p in entries if p.is_dir() and not _hidden(Path(p.name))]
        self.classes = classes
        self.samples: list[tuple[Path, int]] = []
        self.ignored: list[str] = []

        def take(path: Path, label: int) -> None:
            rel = path.relative_to(root)
            if path.suffix.lower() in IMAGE_EXTENSIONS and not _hidden(rel):
                self.samples.append((path, label))
            else:
                self.ignored.append(rel.as_posix())

        if classes:
            for label, name in enumerate(classes):
                for path in _files(root / name):
                    take(path, label)
            # loose files beside the class folders (and hidden folders) are not part of any class
            for path in entries:
                if path.name in classes:
                    continue
                self.ignored.append(path.name + ("/" if path.is_dir() else ""))
        else:
            for path in entries:
                if path.is_dir():  # only hidden/system folders get here
                    self.ignored.append(path.name + "/")
                else:
                    take(path, -1)
        self.ignored.sort()
        if not self.samples:
            raise DataNotFound(
                f"no images found under {root} (extensions: {', '.join(IMAGE_EXTENSIONS)})"
                + (f"; ignored {_listing(self.ignored)}" if self.ignored else "")
            )

    def __len__(self) -> int:
        return len(self.samples)

    def name(self, index: int) -> str:
        """The file of sample `index`, as bad-image reports name it."""
        return str(self.samples[index][0])

    def read(self, index: int) -> tuple[Any, int, list[tuple[str, str]]]:
        """`(image, label, notes)`: notes are `(file, message)` warnings about an image that was used
        (a decompression-bomb size). Raises `BadImage` for a file that cannot be used."""
        path, label = self.samples[index]
        notes: list[tuple[str, str]] = []
        decode = getattr(self.transform, "decode", None)  # a transform that reads the file itself (milan.data.fast)
        if decode is not None:
            return decode(path, name=str(path), min_size=self.min_size), label, notes
        img = load_rgb(path, min_size=self.min_size, exif_transpose=self.exif_transpose, notes=notes)
        return (self.transform(img) if self.transform else img), label, notes

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label, notes = self.read(index)
        for note in notes:
            _log.warning("%s: %s", *note)
        return image, label

    def describe(self) -> str:
        """"426 images in 5 classes; ignored 3 files: .DS_Store, cat/notes.txt, loose.jpg"."""
        what = f"{len(self.samples)} images" + (f" in {len(self.classes)} classes" if self.classes else "")
        return what + (f"; ignored {_listing(self.ignored)}" if self.ignored else "")


def _files(folder: Path) -> list[Path]:
    """Every file under `folder`, sorted (one `os.walk`: no stat per file, for million-image folders)."""
    found = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        found += [Path(parent, f) for f in files]
    return sorted(found)


def _listing(names: list[str], show: int = 5) -> str:
    more = f", … ({len(names) - show} more)" if len(names) > show else ""
    return f"{len(names)} file{'s' if len(names) != 1 else ''}: {', '.join(names[:show])}{more}"
