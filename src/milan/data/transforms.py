"""Image transforms: MAE's pretraining augmentation and the usual eval resize/centre-crop."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "EVAL_CROP_PCT", "pretrain_transform", "eval_transform", "PilToUint8", "pil_to_uint8"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Evaluation crop ratio (kNN, linear probe, finetune, eval default): resize to img_size / 0.875, centre-crop.
EVAL_CROP_PCT = 0.875


def pil_to_uint8(img: Image.Image, *, channels_last: bool = False) -> torch.Tensor:
    """RGB PIL image → `uint8 [3, H, W]` (the pixels ToTensor would scale to [0, 1], unscaled), or
    `[H, W, 3]` with `channels_last` (PIL's own layout: no transposing copy in the worker)."""
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
    return pixels if channels_last else pixels.permute(2, 0, 1).contiguous()


class PilToUint8:
    """Transform step: RGB PIL image → `uint8 [H, W, 3]` tensor, channels last as PIL stores it
    (`milan.data.fast.normalize_on_device` transposes and normalises on the device)."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return pil_to_uint8(img, channels_last=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def pretrain_transform(img_size: int, *, scale: tuple[float, float] = (0.2, 1.0), hflip: bool = True,
                       output: Literal["float", "uint8"] = "float") -> T.Compose:
    """A.1: RandomResizedCrop(scale 0.2–1, bicubic) + horizontal flip + ImageNet normalisation.

    `output="uint8"` stops before ToTensor + Normalize and returns `uint8 [H, W, 3]` (channels last);
    `milan.data.fast.normalize_on_device` then gives bit-identical `[B, 3, H, W]` float images on the device.
    """
    steps = [T.RandomResizedCrop(img_size, scale=scale, interpolation=T.InterpolationMode.BICUBIC)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    if output == "uint8":
        steps.append(PilToUint8())
    else:
        steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


def eval_transform(img_size: int, *, crop_pct: float = EVAL_CROP_PCT) -> T.Compose:
    """Resize the short side to img_size / crop_pct, centre-crop, normalise."""
    resize = int(round(img_size / crop_pct))
    return T.Compose([
        T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(img_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
