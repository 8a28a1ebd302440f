"""Image transforms: MAE's pretraining augmentation and the usual eval resize/centre-crop."""

from __future__ import annotations

from torchvision import transforms as T

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "pretrain_transform", "eval_transform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pretrain_transform(img_size: int, *, scale: tuple[float, float] = (0.2, 1.0), hflip: bool = True) -> T.Compose:
    """A.1: RandomResizedCrop(scale 0.2–1) + horizontal flip + ImageNet normalisation."""
    steps = [T.RandomResizedCrop(img_size, scale=scale, interpolation=T.InterpolationMode.BICUBIC)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


def eval_transform(img_size: int, *, crop_pct: float = 0.875) -> T.Compose:
    """Resize the short side to img_size / crop_pct, centre-crop, normalise."""
    resize = int(round(img_size / crop_pct))
    return T.Compose([
        T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(img_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
