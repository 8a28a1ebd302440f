"""Detection / instance segmentation data: a COCO-format folder or the built-in shapes scenes.

COCO (`CocoDetection`), the layout of COCO 2017 as unpacked (any COCO-format json works)::

    root/annotations/instances_train2017.json      root/train2017/000000000009.jpg ...
    root/annotations/instances_val2017.json        root/val2017/000000000139.jpg ...

Polygons and RLE (compressed or not) become binary masks with pycocotools; crowd annotations
(`iscrowd=1`) and degenerate boxes (under 1 px wide or high) are left out of the targets (COCOeval
still reads the crowd regions from the json, as the official evaluation does); training drops
images left without annotations. An annotation without a segmentation gets its box as the mask. Category ids (sparse: 1..90 in COCO) map to contiguous labels
1..C in increasing id order (0 is torchvision's background); `label_to_cat` maps them back for the
results file.

Shapes (`ShapesDetection`, `milan data shapes`): every object of a scene is an instance; category
id = label = shape index + 1 (`SHAPES`). `shapes_coco_gt` writes a split as a COCO ground-truth
dict, so both kinds are evaluated by the same pycocotools code.

A sample is `(image, target)`: image `[3, H, W]` float in [0, 1] (the detector resizes and
normalises it), target {"boxes": `[K, 4]` float xyxy in pixels (continuous coordinates, COCO's),
"labels": `[K]` int64 1..C, "masks": `[K, H, W]` uint8, "image_id": int}. `DetSamples` adds the
training augmentation (horizontal flip, boxes and masks flipped along), seeded by
(seed, epoch, index) so a resumed run sees the same flips; `collate` keeps lists (sizes differ).

Images are read without EXIF rotation (boxes and masks index the stored pixels). The datasets
raise `milan.data.folder.BadImage` for an unreadable image file (or, for COCO, one the json names
that is not on disk; none of them on disk is a `DataNotFound` naming the layout); `DetSamples(bad="replace")`
(training) then uses the next readable sample, image and annotations together, and `bad="drop"`
(evaluation) leaves the sample out (its image id is then left out of COCOeval), both reporting
the file for `milan.data.reading.BadFiles`.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from milan.data.folder import BadImage, load_rgb
from milan.data.reading import first_readable
from milan.data.shapes import SHAPES, ShapesDataset
from milan.errors import DataError, DataNotFound

__all__ = [
    "CocoDetection", "ShapesDetection", "DetSamples", "collate", "hflip", "shapes_coco_gt", "load_coco",
    "COCO_LAYOUT",
]

COCO_LAYOUT = ("root/annotations/instances_{train,val}2017.json with images in root/{train,val}2017/ "
               "(or set data.train_json / data.train_images / data.val_json / data.val_images)")


def load_coco(source: str | Path | dict) -> Any:
    """A pycocotools `COCO` from a json path or an in-memory dict, without its prints."""
    # lazy: pycocotools is the optional `dense` extra
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(source, dict):
            coco = COCO()
            coco.dataset = source
            coco.createIndex()
            return coco
        return COCO(str(source))


def _read_image(path: Path) -> Tensor:
    """`[3, H, W]` in [0, 1] of the stored pixels (no EXIF rotation); `BadImage` when unreadable."""
    array = np.asarray(load_rgb(path, exif_transpose=False), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)  # [3, H, W]


def _valid(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)


class CocoDetection(Dataset):
    """Images of a COCO-format json with their non-crowd instances.

    Args:
        images: folder holding the json's `file_name`s.
        annotations: COCO instances json.
        train: drop images without (non-crowd, non-degenerate) annotations.
    """

    def __init__(self, images: str | Path, annotations: str | Path, *, train: bool = False) -> None:
        self.images, annotations = Path(images).expanduser(), Path(annotations).expanduser()
        if not annotations.is_file():
            raise DataNotFound(f"COCO annotations {annotations} not found; expected {COCO_LAYOUT}")
        if not self.images.is_dir():
            raise DataNotFound(f"COCO image folder {self.images} not found; expected {COCO_LAYOUT}")
        try:
            self.coco = load_coco(annotations)
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{annotations} is not a COCO instances json ({err!r})") from None
        cats = self.coco.dataset.get("categories") or []
        if not cats:
            raise DataError(f"{annotations} has no categories")
        self.cat_ids = sorted(c["id"] for c in cats)
        self.label_to_cat = {i + 1: cid for i, cid in enumerate(self.cat_ids)}
        self.cat_to_label = {cid: label for label, cid in self.label_to_cat.items()}
        self.classes = tuple(self.coco.cats[cid]["name"] for cid in self.cat_ids)
        ids = sorted(self.coco.imgs)
        if train:
            ids = [i for i in ids if len(self._annotations(i)[0])]
        self.ids = ids
        present = [i for i in ids if (self.images / self.coco.imgs[i]["file_name"]).is_file()]
        if ids and not present:  # the wrong folder, not a few lost files
            first = self.images / self.coco.imgs[ids[0]]["file_name"]
            raise DataNotFound(f"none of the {len(ids)} images {annotations.name} names is in {self.images} "
                               f"(first: {first}); expected {COCO_LAYOUT}")

    def __len__(self) -> int:
        return len(self.ids)

    def _annotations(self, image_id: int) -> tuple[np.ndarray, list[dict]]:
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        boxes = np.asarray([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh → xyxy
        keep = _valid(boxes)
        return boxes[keep], [a for a, k in zip(anns, keep) if k]

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.images / info["file_name"]
        if not path.is_file():  # skipped like an unreadable file (DetSamples), listed in bad_images.txt
            reason = f"missing (the annotations name it, image id {image_id})"
            raise BadImage(f"{path}: {reason}", name=str(path), reason=reason)
        image = _read_image(path)
        h, w = image.shape[-2:]
        boxes, anns = self._annotations(image_id)
        masks = np.zeros((len(anns), h, w), dtype=np.uint8)
        for k, (ann, box) in enumerate(zip(anns, boxes)):
            if ann.get("segmentation"):
                masks[k] = self.coco.annToMask(ann)  # polygon / RLE → [H, W]
            else:  # a box-only dataset: the box as the mask
                x0, y0, x1, y1 = np.round(box).astype(int)
                masks[k, y0:y1, x0:x1] = 1
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.as_tensor([self.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "masks": torch.from_numpy(masks),
            "image_id": int(image_id),
        }
        return image, target


class ShapesDetection(Dataset):
    """A shapes split (`milan.data.shapes`) as instance annotations; image id = index + 1."""

    def __init__(self, root: str | Path, split: str, *, limit: int | None = None) -> None:
        self.scenes = ShapesDataset(root, split)
        self.count = len(self.scenes) if limit is None else min(limit, len(self.scenes))
        self.classes = tuple(SHAPES)
        self.label_to_cat = {k + 1: k + 1 for k in range(len(SHAPES))}
        self.ids = [i + 1 for i in range(self.count)]

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        image = _read_image(self.scenes.split_dir / self.scenes.files[index])
        inst = self.scenes.instances(index)
        keep = _valid(inst.boxes)
        target = {
            "boxes": torch.from_numpy(inst.boxes[keep].copy()),
            "labels": torch.from_numpy(inst.classes[keep] + 1),
            "masks": torch.from_numpy(inst.masks[keep].astype(np.uint8)),
            "image_id": index + 1,
        }
        return image, target


def shapes_coco_gt(root: str | Path, split: str = "val", *, limit: int | None = None) -> dict[str, Any]:
    """A shapes split as a COCO ground-truth dict (RLE masks, mask areas, category id = shape + 1)."""
    # lazy: pycocotools is the optional `dense` extra
    from pycocotools import mask as mask_utils

    scenes = ShapesDataset(root, split)
    size = int(scenes.meta["params"]["image_size"])
    count = len(scenes) if limit is None else min(limit, len(scenes))
    images, annotations = [], []
    for index in range(count):
        inst = scenes.instances(index)
        images.append({"id": index + 1, "width": size, "height": size, "file_name": scenes.files[index]})
        for box, cls, mask in zip(inst.boxes, inst.classes, inst.masks):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            x0, y0, x1, y1 = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": int(cls) + 1,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(mask.sum()),
                                "segmentation": rle, "iscrowd": 0})
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(SHAPES)]
    return {"images": images, "annotations": annotations, "categories": categories}


def hflip(image: Tensor, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """Mirror an image and its target: x → W − x for boxes (x0 and x1 swap), masks flipped."""
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes, "masks": target["masks"].flip(-1)}


class DetSamples(Dataset):
    """Samples of a detection dataset, horizontally flipped with probability `hflip` (training).

    Training indices are `(epoch, index)` keys (`milan.data.sampler.EpochSampler`); the flip draws
    from a generator seeded by (seed, epoch, index). Plain int indices are never flipped.

    Args:
        bad: what an unreadable image does. "raise": a one-line `DataError`; items are
            `(image, target)`. "replace" (training): the next readable sample (index + 1, + 2, ...;
            its own (seed, epoch, index) flip) stands in, image and annotations together; "drop"
            (evaluation): the sample is `(None, None, reports)`. With both, items are
            `(image, target, reports)` for `milan.data.reading.collate_lists`.
    """

    def __init__(self, dataset: Dataset, *, hflip: float = 0.0, seed: int = 0,
                 bad: Literal["raise", "replace", "drop"] = "raise", max_tries: int = 16) -> None:
        if bad not in ("raise", "replace", "drop"):
            raise ValueError(f"bad must be 'raise', 'replace' or 'drop', not {bad!r}")
        self.dataset, self.hflip, self.seed, self.bad, self.max_tries = dataset, hflip, seed, bad, max_tries

    def __len__(self) -> int:
        return len(self.dataset)

    def _flipped(self, epoch: int | None, index: int, image: Tensor,
                 target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        if epoch is not None and self.hflip > 0:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            if torch.rand((), generator=g).item() < self.hflip:
                image, target = hflip(image, target)
        return image, target

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, ...]:
        epoch, index = (None, key) if isinstance(key, int) else key
        if self.bad == "raise":
            try:
                image, target = self.dataset[index]
            except BadImage as err:
                raise DataError(f"unreadable image {err}; replace or remove it (and its annotations)") from None
            return self._flipped(epoch, index, image, target)
        item, used, reports = first_readable(self.dataset.__getitem__, index, len(self),
                                             replace=self.bad == "replace", max_tries=self.max_tries)
        if item is None:
            return None, None, reports
        return (*self._flipped(epoch, used, *item), reports)


def collate(batch: list[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """Lists of images and targets (detection images differ in size)."""
    return [b[0] for b in batch], [b[1] for b in batch]
