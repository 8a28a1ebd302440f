"""A faster pretraining input path: uint8 batches, normalisation on the device, reduced-size JPEG
decoding, a tensor (torchvision) decode path and batched GPU JPEG decoding.

Reference path (`pretrain_transform(..., output="float")`, what `milan pretrain` ran before):

    PIL decode ─► RandomResizedCrop (PIL bicubic) ─► flip ─► ToTensor ─► Normalize    (worker, float32)

Fast paths, chosen with `data.decode` and `data.draft` (`milan bench data` measures them side by side):

- **uint8 to the device** (always, `output="uint8"`): workers return `uint8 [H, W, 3]` images, 4×
  fewer bytes to pass between processes and to copy to the device; `normalize_on_device` does
  `float → /255 → (x - mean) / std` in float32 there, which is bit-identical to ToTensor + Normalize
  (PIL paths stay channels last, PIL's layout, and are transposed on the device; tensor paths are
  `[3, H, W]`, torchvision's).
- **`PretrainCrop` (`data.decode=pil`)**: the reference crop (same `RandomResizedCrop.get_params`
  draws, so the same box for the same seed; PIL bicubic). With `draft=True` the box is drawn from
  the stored size *before* decoding and, when the crop is at least twice the output size, a JPEG
  is decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling (PIL `draft`), never below the
  output size; the box is then scaled to the smaller image (sub-pixel, `Image.resize(box=...)`).
  Same crop, slightly different pixels (the DCT downscale replaces part of the bicubic filter).
- **`TensorCrop` (`data.decode=tensor`)**: uint8 tensors from the decoder on: torchvision's
  `decode_jpeg`, then `resized_crop_uint8` — torch's bicubic antialiased resampling on uint8
  (PIL's bicubic filter, a = −0.5, widened when downscaling, in SIMD integer code: ≈ 3× faster
  than PIL's resize and equal to it within ±2 grey levels, mean ≈ 0.005 on photos); same box.
  With `draft=True` a JPEG whose crop is at least twice the output is decoded by PIL at 1/2–1/8
  scale (as above) and resampled the same way; the box is rounded to the reduced image's pixels.
- **`CudaJpegPlan` (`data.decode=cuda`, WebDataset shards, CUDA only)**: workers only read bytes,
  parse the JPEG header and draw the box and flip; `decode_batch_cuda` decodes the whole batch with
  nvJPEG (`torchvision.io.decode_jpeg(device="cuda")`) and crops, resizes (bicubic, antialias, in
  float32 there) and flips on the GPU. Images that are not JPEG (or that nvJPEG refuses) go the
  CPU tensor path.

Every path seeds nothing itself: `Samples` / `ShardStream` seed the global RNGs per sample before
calling it, so crops are functions of (seed, epoch, sample) and exact resume holds on all of them.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import transforms as T

from milan.data.folder import BadImage, UnreadableImages, draft_request, load_rgb
from milan.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PilToUint8,
    pil_to_uint8,
    pretrain_transform,
)

# re-exported: the bounded-shard side of the fast path
from milan.data.wds import bounded_draft, reencode_jpeg

__all__ = ["DECODERS", "PretrainCrop", "TensorCrop", "CudaJpegPlan", "PilToUint8", "pil_to_uint8", "normalize_on_device",
           "pretrain_input", "resized_crop_uint8",
           "to_device", "collate_plans", "decode_batch_cuda", "reencode_jpeg", "bounded_draft"]

DECODERS = ("pil", "tensor", "cuda")
_log = logging.getLogger("milan")

_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_JPEG_MAGIC = b"\xff\xd8\xff"


def normalize_on_device(images: Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                        std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """`uint8 [B, 3, H, W]` or channels-last `[B, H, W, 3]` → float32 `[B, 3, H, W]`
    `(x / 255 - mean) / std`, bit-identical to ToTensor + Normalize on each image (the same float32
    operations in the same order). A float batch (a transform that normalised already) is returned
    as it is."""
    if images.dtype != torch.uint8:
        return images
    if images.ndim == 4 and images.shape[-1] == 3 and images.shape[1] != 3:  # [B, H, W, 3]
        images = images.permute(0, 3, 1, 2).contiguous()
    x = images.to(torch.float32).div_(255)
    m, s = _stats(tuple(mean), tuple(std), x.device)
    return x.sub_(m).div_(s)


@functools.lru_cache(maxsize=8)
def _stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """mean and std as `[1, C, 1, 1]` float32 tensors on `device`, made once (not a copy per step)."""
    def col(v: tuple[float, ...]) -> Tensor:
        return torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return col(mean), col(std)


def to_device(images: Any, device: torch.device, *, img_size: int | None = None) -> Tensor:
    """What the training loop calls on a loader batch: copy (non-blocking; the loader pins memory on
    CUDA), decode on the GPU when the batch holds `CudaJpegPlan` records, normalise on the device."""
    if isinstance(images, list):  # data.decode=cuda: per-image plans (see collate_plans)
        if img_size is None:
            raise ValueError("img_size is needed to decode plans")
        return normalize_on_device(decode_batch_cuda(images, device, img_size))
    return normalize_on_device(images.to(device, non_blocking=True))


# --------------------------------------------------------------------------------------------
# CPU crops
# --------------------------------------------------------------------------------------------


def _draft_size(stored: tuple[int, int], box: tuple[int, int, int, int], out: int) -> tuple[int, int] | None:
    """The size to ask PIL's `draft` for so that the crop stays at least `out` pixels on both sides
    (None: no reduction possible): the largest of 1/2, 1/4, 1/8 that allows it, asked for exactly."""
    _, _, h, w = box
    return draft_request(stored, min(h, w) / out)


class _Crop:
    """What both CPU crops share: their settings, and `decode` (a file → `read` → `finish`).

    A subclass supplies `read(source, *, name, min_size) -> (image, plan)`, which decodes (at
    reduced size where `draft` and the crop allow) and may draw the box from the header into the
    plan, and `finish(image, plan) -> uint8 pixels`, which crops, resizes and flips.
    """

    def __init__(self, img_size: int, *, scale: tuple[float, float] = (0.2, 1.0), hflip: bool = True,
                 draft: bool = False, exif_transpose: bool = True) -> None:
        self.img_size, self.scale, self.hflip, self.draft = img_size, tuple(scale), hflip, draft
        self.exif_transpose = exif_transpose

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(img_size={self.img_size}, scale={self.scale}, hflip={self.hflip}, "
                f"draft={self.draft}, exif_transpose={self.exif_transpose})")

    def decode(self, source: str | Path | BinaryIO, *, name: str, min_size: int = 1) -> Tensor:
        return self.finish(*self.read(source, name=name, min_size=min_size))

    def read(self, source: str | Path | BinaryIO, *, name: str, min_size: int = 1) -> tuple[Any, dict[str, Any]]:
        raise NotImplementedError

    def finish(self, image: Any, plan: dict[str, Any]) -> Tensor:
        raise NotImplementedError


class PretrainCrop(_Crop):
    """RandomResizedCrop (PIL bicubic) + optional horizontal flip → `uint8 [S, S, 3]` (channels last).

    For the same global RNG state it draws the same box and flip as
    `T.Compose([T.RandomResizedCrop(S, scale, BICUBIC), T.RandomHorizontalFlip()])`; without
    `draft` the pixels are identical too. As a transform that decodes itself (`decode`), datasets
    hand it the file; called on a PIL image it is an ordinary transform.
    """

    def read(self, source: str | Path | BinaryIO, *, name: str,
             min_size: int = 1) -> tuple[Image.Image, dict[str, Any]]:
        """Decode (at reduced size where the crop allows): the image and the box drawn for it."""
        plan: dict[str, Any] = {}

        def hook(img: Image.Image) -> None:
            size = _plan_from_header(img, plan, self.scale, self.img_size if self.draft else None,
                                     exif_transpose=self.exif_transpose)
            if size is not None:
                img.draft(img.mode, size)

        return load_rgb(source, min_size=min_size, name=name, draft=hook, exif_transpose=self.exif_transpose), plan

    def __call__(self, img: Image.Image) -> Tensor:
        return self.finish(img, {})

    def finish(self, img: Image.Image, plan: dict[str, Any]) -> Tensor:
        """Crop `plan`'s box (drawing one if there is none), resize, flip → uint8."""
        size = self.img_size
        (i, j, h, w), sx, sy = _planned_box(img, img.size, plan, self.scale)
        if sx == 1:  # exactly F.resized_crop on PIL: crop, then bicubic resize
            out = img.crop((j, i, j + w, i + h)).resize((size, size), Image.Resampling.BICUBIC)
        else:  # decoded at 1/2^k: the same box in the smaller image's coordinates
            out = img.resize((size, size), Image.Resampling.BICUBIC,
                             box=(j * sx, i * sy, (j + w) * sx, (i + h) * sy))
        pixels = pil_to_uint8(out, channels_last=True)
        if self.hflip and torch.rand(1) < 0.5:  # RandomHorizontalFlip's draw, after the crop's
            pixels = pixels.flip(1)  # [H, W, 3]: the width axis
        return pixels


JPEG_FORMATS = ("JPEG", "MPO")  # PIL's names for JPEG files (MPO: phone photos with a second frame)


def _plan_from_header(img: Image.Image, plan: dict[str, Any], scale: tuple[float, float],
                      out: int | None, *, exif_transpose: bool = True) -> tuple[int, int] | None:
    """Before decoding: record the size the decoded image will have at full scale (the stored one,
    width and height swapped when an EXIF orientation 5–8 will be applied) and draw the crop box on
    it into `plan`, as the reference draws it on the decoded image; with `out` (draft decoding), the
    request for `img.draft` of a JPEG whose crop allows it, else None."""
    w, h = img.size
    if exif_transpose and img.format in JPEG_FORMATS and _orientation(img) in (5, 6, 7, 8):
        w, h = h, w
    plan["size"] = (w, h)
    dims = torch.empty(1, h, w, device="meta")  # get_params reads the shape only
    plan["box"] = T.RandomResizedCrop.get_params(dims, list(scale), list(_RATIO))
    if out is None or img.format not in JPEG_FORMATS:
        return None
    return _draft_size(img.size, plan["box"], out)


def _planned_box(image: Any, size: tuple[int, int], plan: dict[str, Any],
                 scale: tuple[float, float]) -> tuple[tuple[int, int, int, int], float, float]:
    """The box (i, j, h, w) in full-size coordinates for an image decoded at `size` (width, height),
    and the factors (x, y) from those to decoded pixels (1/a for a 1/a-scale decode: libjpeg's
    pixel k covers full-size pixels [a·k, a·k + a)). Drawn on `image` now when there is no plan (a
    plain transform call) or the decoder's geometry is not the planned one."""
    planned = plan.get("size")
    a = None if planned is None else _reduction(size, planned)
    if a is None:
        return T.RandomResizedCrop.get_params(image, list(scale), list(_RATIO)), 1.0, 1.0
    return plan["box"], 1 / a, 1 / a


def resized_crop_uint8(pixels: Tensor, box: tuple[int, int, int, int], size: int) -> Tensor:
    """`uint8 [3, H, W]` (any strides) → the box (i, j, h, w) resized to `uint8 [3, size, size]`
    with bicubic antialiased resampling, PIL's filter.

    On the CPU torch's native uint8 kernel does it (≈ 3× faster than PIL's resize, within ±2 grey
    levels of `Image.resize(BICUBIC)`, which also rounds and clips between its two passes);
    elsewhere (CUDA) in float32 in one go, then clamped and rounded: the same filter, but on
    high-contrast upsampling up to ≈ 20 levels from PIL where PIL clips its intermediate pass."""
    i, j, h, w = box
    crop = pixels[None, :, i:i + h, j:j + w]
    if crop.device.type == "cpu":
        out = torch.nn.functional.interpolate(crop, size=(size, size), mode="bicubic", antialias=True,
                                              align_corners=False)
    else:
        out = torch.nn.functional.interpolate(crop.float(), size=(size, size), mode="bicubic", antialias=True,
                                              align_corners=False).clamp_(0, 255).round_().to(torch.uint8)
    return out[0]


def _scale_box(box: tuple[int, int, int, int], sx: float, sy: float,
               shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """A full-size box in an image decoded at (sx, sy) of its size (`shape` = (H, W)): its edges
    rounded to the nearest whole pixel of the smaller image (at most half a pixel there)."""
    if sx == sy == 1:
        return box
    i, j, h, w = box
    top, left = min(round(i * sy), shape[0] - 1), min(round(j * sx), shape[1] - 1)
    bottom, right = min(max(round((i + h) * sy), top + 1), shape[0]), min(max(round((j + w) * sx), left + 1), shape[1])
    return top, left, bottom - top, right - left


def _reduction(size: tuple[int, int], stored: tuple[int, int]) -> int | None:
    """The factor a in 1, 2, 4, 8 by which `size` is `stored` reduced (rounded up, as libjpeg does),
    or None."""
    return next((a for a in (1, 2, 4, 8) if size == (-(-stored[0] // a), -(-stored[1] // a))), None)


def _read(source: str | Path | BinaryIO) -> bytes:
    if isinstance(source, (str, Path)):
        return Path(source).read_bytes()
    return source.read()


def _decode_tensor(data: bytes, *, name: str, min_size: int, exif_transpose: bool = True) -> Tensor:
    """JPEG bytes → `uint8 [3, H, W]` with torchvision's decoder; anything else (or a JPEG it
    refuses) through `load_rgb`, which raises `BadImage` for what cannot be used."""
    image = None
    if data[:3] == _JPEG_MAGIC:
        try:
            image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                                apply_exif_orientation=exif_transpose)
        except RuntimeError:
            image = None
    if image is None:  # channels-last memory, as decode_jpeg's: no transposing copy
        img = load_rgb(io.BytesIO(data), min_size=min_size, name=name, exif_transpose=exif_transpose)
        return pil_to_uint8(img, channels_last=True).permute(2, 0, 1)
    if min(image.shape[-2:]) < min_size:
        raise BadImage(f"{name}: {image.shape[-1]}x{image.shape[-2]} is smaller than min_size={min_size}")
    return image


_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, by walking its markers (no decoder, no EXIF
    parsing: cheaper than opening it with PIL); None when the bytes do not say."""
    pos, end = 2, len(data) - 9
    while pos < end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _SOF_MARKERS:
            return int.from_bytes(data[pos + 7:pos + 9], "big"), int.from_bytes(data[pos + 5:pos + 7], "big")
        if marker == 0x01 or 0xD0 <= marker <= 0xD9:  # markers without a length
            pos += 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


class _FullSize(Exception):
    """Raised by TensorCrop's header hook: no reduced-size decode, torchvision decodes instead."""


class TensorCrop(_Crop):
    """uint8 tensors end to end: torchvision decode, `resized_crop_uint8` (bicubic, antialias), flip.

    The same box and flip draws as `PretrainCrop` for the same RNG state; pixels differ from PIL's
    by the resampling code's rounding (±2 levels) and the decoders' (JPEG IDCT). With `draft`, a JPEG
    whose crop is at least twice `img_size` is decoded by PIL at 1/2–1/8 scale instead (the box drawn
    from its header, as `PretrainCrop(draft=True)` does; rounded to whole pixels of the smaller image).
    Returns `uint8 [3, S, S]`.
    """

    def read(self, source: str | Path | BinaryIO, *, name: str,
             min_size: int = 1) -> tuple[Tensor, dict[str, Any]]:
        """Decode (by PIL at reduced size where `draft` and the crop allow it): `uint8 [3, H, W]` and
        the plan (stored size and box) when one was drawn from the header."""
        data = _read(source)
        plan: dict[str, Any] = {}
        stored = _jpeg_size(data) if self.draft and data[:3] == _JPEG_MAGIC else None
        if stored is not None and min(stored) >= 2 * self.img_size:  # some crops of it can be reduced
            def hook(img: Image.Image) -> None:
                size = _plan_from_header(img, plan, self.scale, self.img_size, exif_transpose=self.exif_transpose)
                if size is None:
                    raise _FullSize
                img.draft(img.mode, size)

            try:
                img = load_rgb(io.BytesIO(data), min_size=min_size, name=name, draft=hook,
                               exif_transpose=self.exif_transpose)
            except _FullSize:  # the box is drawn (in `plan`); torchvision decodes at full size
                pass
            else:
                return pil_to_uint8(img, channels_last=True).permute(2, 0, 1), plan
        return _decode_tensor(data, name=name, min_size=min_size, exif_transpose=self.exif_transpose), plan

    def __call__(self, img: Image.Image | Tensor) -> Tensor:
        pixels = img if isinstance(img, Tensor) else pil_to_uint8(img, channels_last=True).permute(2, 0, 1)
        return self.finish(pixels, {})

    def finish(self, pixels: Tensor, plan: dict[str, Any]) -> Tensor:
        """Crop `plan`'s box (drawing one if there is none), resize, flip."""
        shape = tuple(pixels.shape[-2:])
        box, sx, sy = _planned_box(pixels, (shape[1], shape[0]), plan, self.scale)
        out = resized_crop_uint8(pixels, _scale_box(box, sx, sy, shape), self.img_size)
        if self.hflip and torch.rand(1) < 0.5:
            out = out.flip(-1)
        return out


# --------------------------------------------------------------------------------------------
# GPU decoding (nvJPEG) for WebDataset shards
# --------------------------------------------------------------------------------------------


class CudaJpegPlan:
    """Worker side of `data.decode=cuda`: read the bytes, parse the header, draw box and flip.

    Returns a record `{"jpeg": uint8 bytes, "box": (i, j, h, w), "flip": bool}` for a JPEG, or
    `{"pixels": uint8 [3, S, S], ...}` for anything else (decoded and cropped on the CPU by
    `TensorCrop`). `decode_batch_cuda` turns a list of them into a batch on the GPU.
    """

    def __init__(self, img_size: int, *, scale: tuple[float, float] = (0.2, 1.0), hflip: bool = True,
                 exif_transpose: bool = True) -> None:
        self.img_size, self.scale, self.hflip = img_size, tuple(scale), hflip
        self._cpu = TensorCrop(img_size, scale=scale, hflip=hflip, exif_transpose=exif_transpose)

    def decode(self, source: str | Path | BinaryIO, *, name: str, min_size: int = 1) -> dict[str, Any]:
        data = _read(source)
        if data[:3] != _JPEG_MAGIC:
            return {"pixels": self._cpu.decode(io.BytesIO(data), name=name, min_size=min_size), "name": name}
        try:
            with Image.open(io.BytesIO(data)) as img:  # the header only: size, no pixels
                width, height = img.size
                rotated = _exif_rotated(img)
        except (OSError, ValueError, SyntaxError) as err:
            raise BadImage(f"{name}: {err}") from err
        if rotated:  # nvJPEG ignores EXIF orientation: the CPU decoder applies it (or not: data.exif_transpose)
            return {"pixels": self._cpu.decode(io.BytesIO(data), name=name, min_size=min_size), "name": name}
        if min(width, height) < min_size:
            raise BadImage(f"{name}: {width}x{height} is smaller than min_size={min_size}")
        dims = torch.empty(3, height, width, dtype=torch.uint8, device="meta")  # get_params reads the shape only
        box = T.RandomResizedCrop.get_params(dims, list(self.scale), list(_RATIO))
        flip = bool(self.hflip and torch.rand(1) < 0.5)
        return {"jpeg": torch.frombuffer(bytearray(data), dtype=torch.uint8), "box": box, "flip": flip,
                "name": name}

    def __call__(self, img: Image.Image) -> dict[str, Any]:
        return {"pixels": self._cpu(img), "name": "?"}


def _exif_rotated(img: Image.Image) -> bool:
    """Whether the JPEG carries an EXIF orientation other than "as stored"."""
    return _orientation(img) != 1


def _orientation(img: Image.Image) -> int:
    """The EXIF Orientation tag (1: as stored), read from the header without decoding."""
    try:
        return img.getexif().get(0x0112, 1) or 1
    except Exception:  # noqa: BLE001 - a broken EXIF block: the decoders ignore it too
        return 1


def collate_plans(batch: list[tuple[Any, int, Any]]) -> tuple[list[dict[str, Any]], Tensor, list[Any]]:
    """DataLoader `collate_fn` for `CudaJpegPlan` records: the records stay a list; the samples' bad-file
    reports are joined (as `milan.data.reading.collate` does)."""
    records, labels, reports = zip(*batch)
    return list(records), torch.tensor(labels), [r for found in reports for r in found]


def decode_batch_cuda(records: list[dict[str, Any]], device: torch.device, img_size: int) -> Tensor:
    """`CudaJpegPlan` records → `uint8 [B, 3, S, S]` on `device`: one batched nvJPEG decode, then
    each image's box resized (bicubic, antialias; `resized_crop_uint8`) and flipped on the GPU. A JPEG nvJPEG refuses
    is decoded on the CPU instead (torchvision, then PIL), cropped with the same box; one that no
    decoder reads (corrupt past its header, so the worker could not tell) is logged and replaced by
    another image of the batch (it is not counted in the run's bad images)."""
    jpegs = [k for k, r in enumerate(records) if "jpeg" in r]
    decoded: dict[int, Tensor] = {}
    if jpegs:
        try:
            images = decode_jpeg([records[k]["jpeg"] for k in jpegs], mode=ImageReadMode.RGB, device=device,
                                 apply_exif_orientation=True)
            decoded = dict(zip(jpegs, images))
        except RuntimeError:  # one bad file fails the batch: decode one by one, CPU for the refused ones
            for k in jpegs:
                try:
                    decoded[k] = decode_jpeg(records[k]["jpeg"], mode=ImageReadMode.RGB, device=device,
                                             apply_exif_orientation=True)
                except RuntimeError:
                    data = records[k]["jpeg"].cpu().numpy().tobytes()
                    try:
                        decoded[k] = _decode_tensor(data, name=records[k]["name"], min_size=1).to(device)
                    except BadImage as err:
                        _log.warning("skipping bad image %s (replaced by another image of its batch)", err)
    out = torch.empty(len(records), 3, img_size, img_size, dtype=torch.uint8, device=device)
    unreadable = []
    for k, record in enumerate(records):
        if "pixels" in record:
            out[k] = record["pixels"].to(device, non_blocking=True)
            continue
        if k not in decoded:
            unreadable.append(k)
            continue
        try:
            crop = resized_crop_uint8(decoded[k], record["box"], img_size)
        except RuntimeError:  # e.g. a huge crop: CUDA's antialias kernel runs out of shared memory
            crop = resized_crop_uint8(decoded[k].cpu(), record["box"], img_size).to(device)
        out[k] = crop.flip(-1) if record["flip"] else crop
    if unreadable:
        good = [k for k in range(len(records)) if k not in unreadable]
        if not good:
            raise UnreadableImages(f"no image of a batch could be decoded (first: {records[0]['name']}); "
                                   "check the data")
        for n, k in enumerate(unreadable):
            out[k] = out[good[n % len(good)]]
    return out


# --------------------------------------------------------------------------------------------
# Choosing a path
# --------------------------------------------------------------------------------------------


def pretrain_input(img_size: int, *, scale: tuple[float, float] = (0.2, 1.0), hflip: bool = True,
                   decode: str = "pil", draft: bool = False, exif_transpose: bool = True) -> Any:
    """The worker-side transform of `data.decode` / `data.draft`; every one returns uint8 (or
    `CudaJpegPlan` records) for `to_device` to finish.

    pil without draft is the reference transform minus ToTensor + Normalize (bit-identical after
    `normalize_on_device`); pil with draft is `PretrainCrop(draft=True)`; tensor is
    `TensorCrop(draft=draft)`; cuda is `CudaJpegPlan` (nvJPEG has no reduced-size decode: draft
    does not apply).
    """
    if decode == "pil":
        if draft:
            return PretrainCrop(img_size, scale=scale, hflip=hflip, draft=True, exif_transpose=exif_transpose)
        return pretrain_transform(img_size, scale=scale, hflip=hflip, output="uint8")
    if decode == "tensor":
        return TensorCrop(img_size, scale=scale, hflip=hflip, draft=draft, exif_transpose=exif_transpose)
    if decode == "cuda":
        return CudaJpegPlan(img_size, scale=scale, hflip=hflip, exif_transpose=exif_transpose)
    raise ValueError(f"unknown decode {decode!r}; choose one of: {', '.join(DECODERS)}")
