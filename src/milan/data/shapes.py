"""The built-in "shapes" dataset: procedurally generated scenes with captions.

Each image is a small RGB scene (64x64 by default): a smooth colour-noise background
(5x5 colour noise upsampled, plus per-pixel noise) with one *large* object and 0-2
*small* ones, each in its own cell of a 3x3 grid. Objects have one of six shapes
(:data:`SHAPES`) and six colours (:data:`COLOURS`, with jitter) and a small rotation.
The caption names the large object and counts the small ones, e.g.
``"a large red circle at the top left and two small shapes"`` -- a caption style that
lets a tiny CLIP teacher learn shape, not only colour.

Labels (for linear probing) describe the large object and the scene:

=================  ==================================================================
``shape``          index into :data:`SHAPES` of the large object
``colour``         index into :data:`COLOURS` of the large object
``position``       index into :data:`POSITIONS`: the 3x3 cell holding its centre
``count``          number of objects minus one, i.e. index into :data:`COUNTS`
``shape_colour``   ``shape * len(COLOURS) + colour`` (computed by :class:`ShapesDataset`)
=================  ==================================================================

On-disk format (format version :data:`FORMAT_VERSION`), readable without the generator::

    root/
      meta.json                 # written last: its presence marks a complete dataset
      train/
        labels.jsonl            # one JSON object per image, in index order
        images/000000.png ...   # RGB PNG, image_size x image_size
        masks/000000.png ...    # mode 'L' PNG: 0 = background, k = k-th object (1-based)
      val/
        (same layout)

``meta.json`` holds ``format`` (``"milan-shapes"``), ``format_version``,
``milan_version``, ``params`` (``image_size``, ``num_train``, ``num_val``, ``seed``,
``generator_version``), ``splits`` (split name -> number of images) and ``classes``
(label name -> list of class names). A ``labels.jsonl`` row looks like::

    {"image": "images/000000.png", "mask": "masks/000000.png",
     "caption": "a large red circle at the top left and two small shapes",
     "shape": 0, "colour": 0, "position": 0, "count": 2,
     "boxes": [[3.0, 2.0, 28.0, 27.0], ...], "classes": [0, 3, 5], "colours": [0, 2, 1]}

``boxes``, ``classes`` (shape index) and ``colours`` list the objects in mask order;
object 0 (mask value 1) is always the large, labelled one. Boxes are ``[x0, y0, x1, y1]``
in pixels with exclusive ``x1, y1`` (the box covers pixel edges), tight around the
object's mask.

Generation is deterministic: image ``i`` of a split depends only on ``(seed, split, i)``
(a ``numpy.random.SeedSequence`` keyed on them), never on the number of workers. It
writes into a hidden sibling folder ``.<root name>.tmp-*`` and renames it into place, so
an interrupted run never leaves something that looks complete; such leftovers can be
deleted.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import sys
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from milan import __version__
from milan.errors import ConfigError, DataError, DataNotFound

logger = logging.getLogger(__name__)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "hexagon")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan")
# fmt: off
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
# fmt: on
COUNTS: tuple[str, ...] = ("one", "two", "three")
LABELS: tuple[str, ...] = ("shape", "colour", "position", "count", "shape_colour")
SPLITS: tuple[str, ...] = ("train", "val")

FORMAT = "milan-shapes"
FORMAT_VERSION = 1
# Bump when rendering changes, so cached datasets made by older code are regenerated.
GENERATOR_VERSION = 1

_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "magenta": (205, 50, 205),
    "cyan": (40, 205, 215),
}
_POSITION_PHRASES: tuple[str, ...] = tuple(
    ("in the " if p == "center" else "on the " if p in ("left", "right") else "at the ") + p
    for p in POSITIONS
)
_COUNT_PHRASES: tuple[str, ...] = ("", " and one small shape", " and two small shapes")

# Geometry at 64 px; everything scales with image_size / 64.
_LARGE_RADIUS = (11.0, 13.0)  # circumradius range of the labelled object
_SMALL_RADIUS = (5.0, 6.0)
_GAP = 2.0  # minimum free space between the circumcircles of two objects
_MAX_ROTATION = math.radians(15.0)
_COLOUR_JITTER = 20
_PIXEL_NOISE = 10  # pixel noise is uniform in [-10, 10] (std ~6)
_MIN_IMAGE_SIZE = 32


@dataclass
class Scene:
    """One rendered scene.

    Attributes:
        image: ``[H, W, 3]`` uint8 RGB image.
        caption: English caption of the large object and the number of small ones.
        labels: ``{"shape", "colour", "position", "count"}`` class indices of the large
            object / scene; ``count`` is the number of objects minus one.
        mask: ``[H, W]`` uint8 instance map, 0 = background, ``k`` = object ``k - 1``.
        boxes: per object ``[x0, y0, x1, y1]`` (pixels, ``x1, y1`` exclusive).
        classes: per object shape index; object 0 is the large one.
        colours: per object colour index.
    """

    image: np.ndarray
    caption: str
    labels: dict[str, int]
    mask: np.ndarray
    boxes: list[list[float]]
    classes: list[int]
    colours: list[int]

    @property
    def num_objects(self) -> int:
        return len(self.classes)


@dataclass
class Instances:
    """Instance annotations of one image, for detection / segmentation.

    Attributes:
        masks: ``[K, H, W]`` bool, one binary mask per object.
        boxes: ``[K, 4]`` float32 ``[x0, y0, x1, y1]`` (pixels, ``x1, y1`` exclusive).
        classes: ``[K]`` int64 shape index per object (object 0 is the large one).
        colours: ``[K]`` int64 colour index per object.
    """

    masks: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray
    colours: np.ndarray


def caption_for(shape: int, colour: int, position: int, count: int) -> str:
    """The caption of a scene from its labels (``count`` is objects minus one)."""
    return (
        f"a large {COLOURS[colour]} {SHAPES[shape]} "
        f"{_POSITION_PHRASES[position]}{_COUNT_PHRASES[count]}"
    )


def _shape_vertices(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple]:
    """Polygon of ``shape`` with circumradius ``r`` (so all shapes fit the same circle)."""
    if shape == "square":
        polar = [(r, math.pi / 4 + k * math.pi / 2) for k in range(4)]
    elif shape == "triangle":
        polar = [(r, -math.pi / 2 + k * 2 * math.pi / 3) for k in range(3)]
    elif shape == "hexagon":
        polar = [(r, k * math.pi / 3) for k in range(6)]
    elif shape == "star":
        polar = [(r if k % 2 == 0 else 0.45 * r, -math.pi / 2 + k * math.pi / 5) for k in range(10)]
    elif shape == "cross":
        # A plus sign whose arm corners (+-w, +-a) lie on the circumcircle.
        w, a = 0.34 * r, math.sqrt(1 - 0.34**2) * r
        pts = [(w, a), (w, w), (a, w), (a, -w), (w, -w), (w, -a)]
        pts += [(-x, -y) for x, y in pts]
        polar = [(math.hypot(x, y), math.atan2(y, x)) for x, y in pts]
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return [(cx + d * math.cos(t + angle), cy + d * math.sin(t + angle)) for d, t in polar]


def _draw(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, fill: Any
) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(_shape_vertices(shape, cx, cy, r, angle), fill=fill)


def _cell_of(cx: float, cy: float, image_size: int) -> int:
    cell = image_size / 3
    return min(int(cy // cell), 2) * 3 + min(int(cx // cell), 2)


def _place(
    rng: np.random.Generator, cell: int, r: float, jitter: float, image_size: int
) -> tuple[float, float]:
    """A centre near the middle of ``cell``, kept ``r + 1`` px inside the image."""
    size = image_size / 3
    lo, hi = r + 1.0, image_size - r - 2.0
    cx = (cell % 3 + 0.5) * size + rng.uniform(-jitter, jitter) * size
    cy = (cell // 3 + 0.5) * size + rng.uniform(-jitter, jitter) * size
    return min(max(float(cx), lo), hi), min(max(float(cy), lo), hi)


def render_scene(rng: np.random.Generator, image_size: int = 64) -> Scene:
    """Render one random scene.

    Args:
        rng: source of all randomness; the same generator state gives the same scene.
        image_size: side of the square image in pixels (at least 32); object sizes
            scale with ``image_size / 64``.

    Returns:
        The :class:`Scene` with image, caption, labels and instance annotations.
    """
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {_MIN_IMAGE_SIZE}, got {image_size}")
    scale = image_size / 64

    # Background: smooth low-frequency colour noise; object colours stay more saturated.
    base = rng.uniform(70.0, 180.0) + rng.uniform(-25.0, 25.0, size=3)  # a tinted grey
    coarse = np.clip(base + rng.normal(0.0, 25.0, size=(5, 5, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(coarse, "RGB").resize((image_size, image_size), Image.BILINEAR)
    mask = Image.new("L", (image_size, image_size), 0)
    draw_image, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)

    # Objects: (shape, colour, cx, cy, r); the large one first.
    objects: list[tuple[int, int, float, float, float]] = []
    cells: set[int] = set()
    large_cell = int(rng.integers(9))
    r = rng.uniform(*_LARGE_RADIUS) * scale
    cx, cy = _place(rng, large_cell, r, 0.25, image_size)
    objects.append((int(rng.integers(6)), int(rng.integers(6)), cx, cy, r))
    cells.add(_cell_of(cx, cy, image_size))
    num_small = int(rng.integers(3))
    for _ in range(num_small):
        r = rng.uniform(*_SMALL_RADIUS) * scale
        # Rejection sampling; a free cell far from the large object always exists, so
        # this practically never gives up (if it does, the scene has one object fewer).
        for _ in range(50):
            free = [c for c in range(9) if c not in cells]
            cx, cy = _place(rng, free[int(rng.integers(len(free)))], r, 1 / 3, image_size)
            if _cell_of(cx, cy, image_size) in cells:
                continue
            if all(math.hypot(cx - o[2], cy - o[3]) > r + o[4] + _GAP * scale for o in objects):
                objects.append((int(rng.integers(6)), int(rng.integers(6)), cx, cy, r))
                cells.add(_cell_of(cx, cy, image_size))
                break

    boxes: list[list[float]] = []
    for k, (shape, colour, cx, cy, r) in enumerate(objects, start=1):
        angle = rng.uniform(-_MAX_ROTATION, _MAX_ROTATION)
        jitter = rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=3)
        fill = tuple(
            min(max(c + int(j), 0), 255) for c, j in zip(_RGB[COLOURS[colour]], jitter, strict=True)
        )
        _draw(draw_image, SHAPES[shape], cx, cy, r, angle, fill)
        _draw(draw_mask, SHAPES[shape], cx, cy, r, angle, k)

    mask_array = np.asarray(mask, dtype=np.uint8).copy()
    for k in range(1, len(objects) + 1):
        ys, xs = np.nonzero(mask_array == k)
        boxes.append([float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)])

    # Pixel noise only has to break up flat colour; uniform integers are 4x cheaper to
    # draw than Gaussian noise.
    noise = rng.integers(
        -_PIXEL_NOISE, _PIXEL_NOISE + 1, size=(image_size, image_size, 3), dtype=np.int16
    )
    pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)

    shape, colour, cx, cy = objects[0][:4]
    labels = {
        "shape": shape,
        "colour": colour,
        "position": _cell_of(cx, cy, image_size),
        "count": len(objects) - 1,
    }
    return Scene(
        image=pixels,
        caption=caption_for(**labels),
        labels=labels,
        mask=mask_array,
        boxes=boxes,
        classes=[o[0] for o in objects],
        colours=[o[1] for o in objects],
    )


def default_shapes_root() -> Path:
    """``$MILAN_CACHE/shapes`` if ``MILAN_CACHE`` is set, else ``~/.cache/milan/shapes``."""
    cache = os.environ.get("MILAN_CACHE")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache" / "milan"
    return base / "shapes"


def _scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), index]))


def _render_chunk(job: tuple[Path, str, int, int, int, int]) -> list[dict[str, Any]]:
    """Render and write images ``[start, stop)`` of a split; return their label rows."""
    split_dir, split, seed, image_size, start, stop = job
    rows = []
    for i in range(start, stop):
        scene = render_scene(_scene_rng(seed, split, i), image_size)
        name = f"{i:06d}.png"
        # Pixel noise leaves nothing for LZ matching: Huffman-only is faster and smaller.
        Image.fromarray(scene.image, "RGB").save(
            split_dir / "images" / name, compress_type=zlib.Z_HUFFMAN_ONLY
        )
        Image.fromarray(scene.mask, "L").save(split_dir / "masks" / name)
        rows.append(
            {
                "image": f"images/{name}",
                "mask": f"masks/{name}",
                "caption": scene.caption,
                **scene.labels,
                "boxes": scene.boxes,
                "classes": scene.classes,
                "colours": scene.colours,
            }
        )
    return rows


def _read_meta(root: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((root / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def _classes() -> dict[str, list[str]]:
    return {
        "shape": list(SHAPES),
        "colour": list(COLOURS),
        "position": list(POSITIONS),
        "count": list(COUNTS),
        "shape_colour": [f"{c} {s}" for s in SHAPES for c in COLOURS],
    }


def _progress(total: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return None
    try:
        # lazy: the progress bar is optional here (shapes are generated without tqdm)
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="img")


def _pool_context() -> mp.context.BaseContext:
    # fork skips re-importing torch in every worker; the workers only use numpy and PIL.
    if sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods():
        return mp.get_context("fork")
    return mp.get_context("spawn")


def generate_shapes(
    root: str | Path,
    *,
    num_train: int = 50000,
    num_val: int = 10000,
    image_size: int = 64,
    seed: int = 0,
    workers: int = 2,
    progress: bool = True,
) -> Path:
    """Write the shapes dataset to ``root`` (see the module docstring for the format).

    Returns at once if ``root`` already holds a complete dataset with the same
    parameters. A shapes dataset with other parameters is replaced; any other existing,
    non-empty folder is an error.

    Args:
        root: folder to create.
        num_train: number of training images.
        num_val: number of validation images.
        image_size: side of the square images in pixels (at least 32).
        seed: base seed (>= 0); image ``i`` of a split depends only on ``(seed, split, i)``.
        workers: processes to render with; the output does not depend on it.
        progress: show a tqdm progress bar (if tqdm is installed).

    Returns:
        ``root`` as a :class:`~pathlib.Path`.
    """
    if num_train < 0 or num_val < 0:
        raise ConfigError(f"num_train and num_val must be >= 0, got {num_train}, {num_val}")
    if image_size < _MIN_IMAGE_SIZE:
        raise ConfigError(f"image_size must be >= {_MIN_IMAGE_SIZE}, got {image_size}")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    root = Path(root).expanduser()
    params = {
        "image_size": image_size,
        "num_train": num_train,
        "num_val": num_val,
        "seed": seed,
        "generator_version": GENERATOR_VERSION,
    }
    meta = _read_meta(root)
    if meta is not None and meta.get("params") == params:
        return root
    if meta is None and root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(
            f"{root} exists and is not a milan shapes dataset (no valid meta.json); "
            "remove it or choose another --out"
        )

    root.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = root.parent / f".{root.name}.tmp-{tag}"
    counts = {"train": num_train, "val": num_val}
    try:
        bar = _progress(num_train + num_val, progress, f"shapes -> {root}")
        pool = _pool_context().Pool(workers) if workers > 1 else None
        try:
            for split in SPLITS:
                split_dir = tmp / split
                (split_dir / "images").mkdir(parents=True)
                (split_dir / "masks").mkdir()
                n = counts[split]
                chunk = max(1, min(256, math.ceil(n / (4 * max(workers, 1)))))
                jobs = [
                    (split_dir, split, seed, image_size, s, min(s + chunk, n))
                    for s in range(0, n, chunk)
                ]
                results: Iterator[list[dict[str, Any]]] = (
                    pool.imap(_render_chunk, jobs) if pool else map(_render_chunk, jobs)
                )
                with open(split_dir / "labels.jsonl", "w") as f:
                    for rows in results:
                        f.writelines(json.dumps(row) + "\n" for row in rows)
                        if bar is not None:
                            bar.update(len(rows))
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
            if bar is not None:
                bar.close()

        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "milan_version": __version__,
            "params": params,
            "splits": counts,
            "classes": _classes(),
        }
        # meta.json last: its presence is what marks the dataset as complete.
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _move_into_place(tmp, root, params)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _move_into_place(tmp: Path, root: Path, params: dict[str, Any]) -> None:
    """Rename ``tmp`` to ``root``, replacing a stale dataset there; tolerate a racing writer."""
    if root.exists():
        meta = _read_meta(root)
        if meta is not None and meta.get("params") == params:
            return  # another process finished the same dataset first
        logger.info("replacing %s (empty or made with other parameters)", root)
        old = root.parent / f".{root.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(root, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(tmp, root)
    except OSError:
        meta = _read_meta(root)
        if meta is None or meta.get("params") != params:
            raise


@functools.lru_cache(maxsize=8)
def _read_rows_cached(path: str, mtime_ns: int, size: int) -> tuple[dict[str, Any], ...]:
    with open(path) as f:
        return tuple(json.loads(line) for line in f if line.strip())


def _open_split(root: str | Path, split: str) -> tuple[Path, dict[str, Any], tuple[dict, ...]]:
    """Check ``root`` / ``split`` and return the split folder, meta and label rows."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    root = Path(root).expanduser()
    meta = _read_meta(root)
    if meta is None:
        if root.is_dir() and any(root.iterdir()):  # the user's own images, most likely
            raise DataNotFound(f"{root} is not a shapes dataset (no meta.json); to train or evaluate on your own "
                               "images there, set data.kind=imagefolder (monitor.kind for the kNN monitor)")
        raise DataNotFound(
            f"no shapes dataset at {root} (missing or invalid meta.json); "
            f"run `milan data shapes --out {root}` to generate it"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"shapes dataset at {root} has format version {meta.get('format_version')}, "
            f"this milan reads {FORMAT_VERSION}; regenerate it with `milan data shapes --out {root}`"
        )
    labels = root / split / "labels.jsonl"
    if not labels.is_file():
        raise DataNotFound(
            f"{labels} is missing; regenerate the dataset with `milan data shapes --out {root}`"
        )
    st = labels.stat()
    rows = _read_rows_cached(str(labels.resolve()), st.st_mtime_ns, st.st_size)
    if len(rows) != meta["splits"][split]:
        raise DataError(
            f"{labels} has {len(rows)} rows but meta.json says {meta['splits'][split]}; "
            f"regenerate it with `milan data shapes --out {root}`"
        )
    return root / split, meta, rows


def load_instances(root: str | Path, split: str, index: int) -> Instances:
    """Instance masks, boxes and classes of image ``index`` of a split.

    Args:
        root: dataset folder written by :func:`generate_shapes`.
        split: ``"train"`` or ``"val"``.
        index: image index within the split.
    """
    split_dir, _, rows = _open_split(root, split)
    row = rows[index]
    with Image.open(split_dir / row["mask"]) as im:
        mask = np.asarray(im, dtype=np.uint8)
    ids = np.arange(1, len(row["classes"]) + 1, dtype=np.uint8)
    return Instances(
        masks=mask[None] == ids[:, None, None],  # [K, H, W]
        boxes=np.asarray(row["boxes"], dtype=np.float32).reshape(-1, 4),
        classes=np.asarray(row["classes"], dtype=np.int64),
        colours=np.asarray(row["colours"], dtype=np.int64),
    )


class ShapesDataset(Dataset):
    """Images of a shapes split with one integer label per image.

    Args:
        root: dataset folder written by :func:`generate_shapes`.
        split: ``"train"`` or ``"val"``.
        transform: applied to the PIL RGB image.
        label: target to return, one of :data:`LABELS`.

    Attributes:
        captions: caption per image.
        labels: label name -> ``[N]`` LongTensor, for every name in :data:`LABELS`.
        targets: ``[N]`` LongTensor of the chosen label.
        classes: class names of the chosen label.
        num_classes: ``len(classes)``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable[[Image.Image], Any] | None = None,
        label: str = "shape",
    ) -> None:
        if label not in LABELS:
            raise DataError(f"unknown label {label!r}; expected one of {list(LABELS)}")
        self.root = Path(root).expanduser()
        self.split = split
        self.transform = transform
        self.label = label
        self.split_dir, self.meta, rows = _open_split(self.root, split)
        self.files: list[str] = [row["image"] for row in rows]
        self.captions: list[str] = [row["caption"] for row in rows]
        self.labels: dict[str, torch.Tensor] = {
            name: torch.tensor([row[name] for row in rows], dtype=torch.long) for name in LABELS[:4]
        }
        self.labels["shape_colour"] = self.labels["shape"] * len(COLOURS) + self.labels["colour"]
        self.targets = self.labels[label]
        self.classes: list[str] = list(self.meta["classes"][label])
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        with Image.open(self.split_dir / self.files[index]) as im:
            image = im.convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])

    def instances(self, index: int) -> Instances:
        """Instance annotations of image ``index`` (see :func:`load_instances`)."""
        return load_instances(self.root, self.split, index)


__all__ = [
    "COLOURS",
    "COUNTS",
    "LABELS",
    "POSITIONS",
    "SHAPES",
    "SPLITS",
    "Instances",
    "Scene",
    "ShapesDataset",
    "caption_for",
    "default_shapes_root",
    "generate_shapes",
    "load_instances",
    "render_scene",
]
