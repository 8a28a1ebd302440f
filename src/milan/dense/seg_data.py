"""Semantic segmentation data: an ADE20K-layout folder or the built-in shapes masks, joint transforms.

ADE20K (ADEChallengeData2016 as unpacked, or any dataset laid out the same way)::

    root/images/training/ADE_train_00000001.jpg        root/annotations/training/ADE_train_00000001.png
    root/images/validation/ADE_val_00000001.jpg        root/annotations/validation/ADE_val_00000001.png

Annotations are single-channel PNGs of class ids; with `reduce_zero_label` (ADE20K's default) id 0
("other") becomes 255 = ignored and ids 1..150 become 0..149.

Shapes (`milan data shapes`): per-pixel class = shape index + 1 on object pixels, 0 on background,
i.e. 7 classes `("background",) + SHAPES`.

Transforms (the mmseg ADE20K pipeline of the MAE/BEiT recipes, without photometric distortion):
    train: rescale to fit `scale × r` (long, short side; r ~ U(ratio_range), aspect kept;
        image bilinear, label nearest) → random crop `crop_size` (re-drawn up to 10 times while one
        class covers more than `cat_max_ratio` of it) → horizontal flip → ImageNet normalisation →
        pad to `crop_size` (image 0, label 255).
    eval: rescale to fit `scale`, normalise; the label stays at its original size (predictions
        are resized to it).
Training randomness comes from a generator seeded by (seed, epoch, index) (`SegSamples`), so a
resumed run sees the same crops, whatever the number of workers.

Images are read without EXIF rotation (the label maps index the stored pixels). The datasets raise
`milan.data.folder.BadImage` for an unreadable image file; `SegSamples(bad="replace")` (training)
then uses the next readable sample, image and label map together, and `bad="drop"` (evaluation)
leaves the sample out, both reporting the file for `milan.data.reading.BadFiles`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from milan.data.folder import BadImage, load_rgb
from milan.data.reading import first_readable
from milan.data.shapes import SHAPES, ShapesDataset, load_instances
from milan.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from milan.errors import DataError, DataNotFound

__all__ = [
    "ADE20K_CLASSES", "SHAPES_SEG_CLASSES", "IGNORE_INDEX", "ADE20KDataset", "ShapesSegDataset",
    "SegSamples", "SegTrainTransform", "SegEvalTransform", "collate_eval", "reduce_zero_label",
]

IGNORE_INDEX = 255

ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table",
    "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island",
    "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
    "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy",
    "washer", "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot",
    "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce",
    "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_SPLIT_DIRS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}


def _shapes_classes() -> tuple[str, ...]:
    return ("background",) + tuple(SHAPES)


SHAPES_SEG_CLASSES: tuple[str, ...] = _shapes_classes()


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """0 → 255 (ignored), k → k − 1 (ADE20K: 150 classes from ids 1..150); 255 stays 255."""
    label = label.astype(np.uint8, copy=True)
    label[label == 0] = IGNORE_INDEX
    label = label - 1  # 255 → 254 wraps back to 255 below
    label[label == IGNORE_INDEX - 1] = IGNORE_INDEX
    return label


_LAYOUT = ("expected the ADE20K layout {root}/images/{{training,validation}}/*.jpg with "
           "{root}/annotations/{{training,validation}}/*.png of the same names (as ADEChallengeData2016 unpacks)")


class ADE20KDataset(Dataset):
    """Image/label pairs of an ADE20K-layout folder; items are `(PIL RGB image, uint8 label [H, W])`.

    Args:
        root: folder holding `images/` and `annotations/`.
        split: "train"/"training" or "val"/"validation".
        reduce_zero_label: map id 0 to 255 (ignored) and shift the others down by one.
        classes: class names (default: ADE20K's 150 when reducing the zero label).
    """

    def __init__(self, root: str | Path, split: str = "train", *, reduce_zero_label: bool = True,
                 classes: Sequence[str] | None = None) -> None:
        if split not in _SPLIT_DIRS:
            raise DataError(f"unknown split {split!r}; expected one of {sorted(_SPLIT_DIRS)}")
        self.root = Path(root).expanduser()
        layout = _LAYOUT.format(root=self.root)
        if not self.root.is_dir():
            raise DataNotFound(f"data.path {self.root} does not exist; {layout}")
        sub = _SPLIT_DIRS[split]
        image_dir, label_dir = self.root / "images" / sub, self.root / "annotations" / sub
        for d in (image_dir, label_dir):
            if not d.is_dir():
                raise DataNotFound(f"{d} is missing; {layout}")
        images = {p.stem: p for p in sorted(image_dir.iterdir()) if p.suffix.lower() in _IMAGE_SUFFIXES}
        labels = {p.stem: p for p in sorted(label_dir.iterdir()) if p.suffix.lower() == ".png"}
        if not images:
            raise DataNotFound(f"no images (*.jpg, *.jpeg, *.png) in {image_dir}; {layout}")
        no_label = sorted(set(images) - set(labels))
        no_image = sorted(set(labels) - set(images))
        if no_label or no_image:
            parts = []
            if no_label:
                parts.append(f"{len(no_label)} image(s) in {image_dir} have no annotation "
                             f"{label_dir}/<name>.png (e.g. {', '.join(no_label[:3])})")
            if no_image:
                parts.append(f"{len(no_image)} annotation(s) in {label_dir} have no image "
                             f"(e.g. {', '.join(no_image[:3])})")
            raise DataNotFound("; ".join(parts) + f"; {layout}")
        self.stems = sorted(images)
        self.images = [images[s] for s in self.stems]
        self.labels = [labels[s] for s in self.stems]
        self.reduce_zero_label = reduce_zero_label
        if classes is None and reduce_zero_label:
            classes = ADE20K_CLASSES
        self.classes: tuple[str, ...] | None = tuple(classes) if classes is not None else None

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, index: int) -> tuple[Image.Image, np.ndarray]:
        image = _read_image(self.images[index])
        with Image.open(self.labels[index]) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise DataError(f"{self.labels[index]}: annotation should be a single-channel PNG of class ids, "
                                f"got mode {im.mode}")
            label = np.asarray(im)
        if label.max(initial=0) > 255:
            raise DataError(f"{self.labels[index]} holds class id {int(label.max())} > 255")
        label = label.astype(np.uint8)
        if label.shape != (image.height, image.width):
            raise DataError(f"{self.labels[index]} is {label.shape[1]}×{label.shape[0]} but its image is "
                            f"{image.width}×{image.height}")
        if self.reduce_zero_label:
            label = reduce_zero_label(label)
        return image, label


class ShapesSegDataset(Dataset):
    """Semantic masks of a shapes split: 0 background, shape index + 1 on each object's pixels."""

    def __init__(self, root: str | Path, split: str = "train") -> None:
        self.root = Path(root).expanduser()
        self.split = "train" if split in ("train", "training") else "val" if split in ("val", "validation") else split
        self.images = ShapesDataset(self.root, split=self.split)  # checks the folder, lists the files
        self.classes = SHAPES_SEG_CLASSES

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, np.ndarray]:
        image = _read_image(self.images.split_dir / self.images.files[index])
        inst = load_instances(self.root, self.split, index)
        label = np.zeros((image.height, image.width), dtype=np.uint8)
        for mask, cls in zip(inst.masks, inst.classes):
            label[mask] = cls + 1
        return image, label


def _read_image(path: Path) -> Image.Image:
    """RGB of the stored pixels (no EXIF rotation: labels index them); `BadImage` when unreadable."""
    return load_rgb(path, exif_transpose=False)


def _normalise(image: Image.Image | np.ndarray) -> Tensor:
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def _fit(width: int, height: int, scale: Sequence[float]) -> tuple[int, int]:
    """Size (w, h) with the aspect kept, scaled so long ≤ max(scale) and short ≤ min(scale) (one touching)."""
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return max(1, int(width * factor + 0.5)), max(1, int(height * factor + 0.5))


def _rescale(image: Image.Image, label: np.ndarray | None, size: tuple[int, int]) -> tuple[Image.Image, np.ndarray | None]:
    if size == image.size:
        return image, label
    image = image.resize(size, Image.BILINEAR)
    if label is not None:
        label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
    return image, label


class SegTrainTransform:
    """Rescale (random ratio) → random crop → flip → normalise → pad; see the module docstring.

    Call: `(image, label, rng)` → image `[3, crop, crop]` float, label `[crop, crop]` int64.
    """

    def __init__(self, crop_size: int, *, scale: Sequence[int] = (2048, 512),
                 ratio_range: Sequence[float] = (0.5, 2.0), cat_max_ratio: float = 0.75, hflip: float = 0.5,
                 ignore_index: int = IGNORE_INDEX) -> None:
        self.crop, self.scale, self.ratio_range = crop_size, tuple(scale), tuple(ratio_range)
        self.cat_max_ratio, self.hflip, self.ignore_index = cat_max_ratio, hflip, ignore_index

    def _crop_box(self, label: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int, int]:
        h, w = label.shape
        y = int(rng.integers(0, max(h - self.crop, 0) + 1))
        x = int(rng.integers(0, max(w - self.crop, 0) + 1))
        return y, min(y + self.crop, h), x, min(x + self.crop, w)

    def __call__(self, image: Image.Image, label: np.ndarray, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        ratio = float(rng.uniform(*self.ratio_range))
        image, label = _rescale(image, label, _fit(image.width, image.height, [s * ratio for s in self.scale]))
        box = self._crop_box(label, rng)
        if self.cat_max_ratio < 1.0:  # avoid crops that are nearly one class (mmseg RandomCrop)
            for _ in range(10):
                y0, y1, x0, x1 = box
                values, counts = np.unique(label[y0:y1, x0:x1], return_counts=True)
                counts = counts[values != self.ignore_index]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                box = self._crop_box(label, rng)
        y0, y1, x0, x1 = box
        img = np.asarray(image, dtype=np.uint8)[y0:y1, x0:x1]
        lab = label[y0:y1, x0:x1]
        if rng.random() < self.hflip:
            img, lab = img[:, ::-1], lab[:, ::-1]
        x = _normalise(img)
        out = torch.zeros(3, self.crop, self.crop)
        out[:, : x.shape[1], : x.shape[2]] = x
        target = torch.full((self.crop, self.crop), self.ignore_index, dtype=torch.long)
        target[: lab.shape[0], : lab.shape[1]] = torch.from_numpy(lab.astype(np.int64))
        return out, target


class SegEvalTransform:
    """Rescale the image to fit `scale` (aspect kept) and normalise; the label keeps its size.

    Call: `(image, label, rng=None)` → image `[3, h, w]` float, label `[H, W]` int64.
    """

    def __init__(self, scale: Sequence[int] = (2048, 512)) -> None:
        self.scale = tuple(scale)

    def __call__(self, image: Image.Image, label: np.ndarray, rng: Any = None) -> tuple[Tensor, Tensor]:
        image, _ = _rescale(image, None, _fit(image.width, image.height, self.scale))
        return _normalise(image), torch.from_numpy(label.astype(np.int64))


class SegSamples(Dataset):
    """Applies a joint transform to a raw dataset; keys are indices or `(epoch, index)` pairs.

    With `(epoch, index)` keys (from `milan.data.sampler.EpochSampler`) the transform's generator
    is seeded by (seed, epoch, index): the same sample of the same epoch is augmented the same
    way in any run, so a resumed run continues exactly.

    Args:
        bad: what an unreadable image does. "raise": a one-line `DataError`; items are
            `(image, label)`. "replace" (training): the next readable sample (index + 1, + 2, ...;
            its own (seed, epoch, index) augmentation) stands in, image and label together;
            "drop" (evaluation): the sample is `(None, None, reports)`. With both, items are
            `(image, label, reports)` for `milan.data.reading.collate` / `collate_lists`.
    """

    def __init__(self, dataset: Dataset, transform: Callable[..., tuple[Tensor, Tensor]], *, seed: int = 0,
                 bad: Literal["raise", "replace", "drop"] = "raise", max_tries: int = 16) -> None:
        if bad not in ("raise", "replace", "drop"):
            raise ValueError(f"bad must be 'raise', 'replace' or 'drop', not {bad!r}")
        self.dataset, self.transform, self.seed, self.bad, self.max_tries = dataset, transform, seed, bad, max_tries

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _item(self, epoch: int, index: int, image: Image.Image, label: np.ndarray) -> tuple[Tensor, Tensor]:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, index]))
        return self.transform(image, label, rng)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, ...]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        if self.bad == "raise":
            try:
                image, label = self.dataset[index]
            except BadImage as err:
                raise DataError(f"unreadable image {err}; replace or remove it (and its annotation)") from None
            return self._item(epoch, index, image, label)
        item, used, reports = first_readable(self.dataset.__getitem__, index, len(self),
                                             replace=self.bad == "replace", max_tries=self.max_tries)
        if item is None:
            return None, None, reports
        return (*self._item(epoch, used, *item), reports)


def collate_eval(batch: list[tuple[Tensor, Tensor]]) -> tuple[list[Tensor], list[Tensor]]:
    """Keep eval images and labels as lists: their sizes differ."""
    return [b[0] for b in batch], [b[1] for b in batch]
