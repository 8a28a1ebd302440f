"""`milan bench data`: images/s per CPU core of the pretraining input path, and how many cores one GPU needs.

It times the worker side of `milan pretrain`'s input path (the exact transforms it runs, per
`data.decode` / `data.draft`), image by image in this process on one thread, split into

    decode (file bytes → pixels) ─► crop (RandomResizedCrop + flip + to tensor) ─► collate (a batch)

and, separately, the trainer side: `host_to_device` (pin + non-blocking copy + normalisation on
the device; on CPU only the normalisation). Paths, side by side:

  reference      PIL decode → bicubic crop → flip → ToTensor → Normalize in the worker (float32):
                 `milan pretrain` before the fast path
  uint8          the same crops, uint8 to the device, normalised there (bit-identical; the default)
  draft          uint8 + JPEG decoded at 1/2–1/8 size where the crop allows (data.draft=true)
  tensor         uint8 tensors: torchvision decode_jpeg + torch's uint8 bicubic antialias crop
                 (data.decode=tensor; the reference's pixels to ±2 levels)
  bounded        uint8 on shards re-encoded at a bounded short side (`milan data shards --max-size`)
  bounded_draft  bounded + draft (PIL decode and resize)
  bounded_tensor bounded + tensor
  fast           bounded + tensor + draft (data.decode=tensor data.draft=true on `--max-size`
                 shards): the CPU fast path the goal (≥ 2.5× per core) is about
  cuda           (CUDA only) workers parse headers and draw boxes; nvJPEG decodes and crops on the GPU

Timing on a shared machine is noisy, so every round runs every path once over the same images
(in this order, alternating), and the report gives per-path medians over rounds and, for each
path, the median over rounds of its speed-up over `reference` in the same round.

Images: a folder (ImageFolder or flat) or WebDataset shards (`--data`), read into memory first
(disk speed is not measured), or, without `--data`, a generated ImageNet-like set: 500×375
JPEGs, quality 90, ≈ 77 KB, multi-scale noise textures. Bounded paths re-encode the images in
memory with the function `milan data shards --max-size` uses.

Cores per GPU = the GPU's step rate (images/s, `--step-rate 3000` or a `milan bench speed --out`
JSON, whose MILAN variant's images/s is taken) / a path's images/s per core.

    milan bench data --quick --out data.json         # seconds: 16 small images, 2 rounds
    milan bench data --images 256 --rounds 5 --step-rate 3000
    milan bench data --data /data/shards --step-rate runs/bench_gpu/compiled.json --workers 2
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from milan.data.fast import (
    CudaJpegPlan,
    PretrainCrop,
    TensorCrop,
    _decode_tensor,
    collate_plans,
    decode_batch_cuda,
    normalize_on_device,
    reencode_jpeg,
)
from milan.data.folder import ImageFolderDataset, load_rgb
from milan.data.transforms import pretrain_transform
from milan.data.wds import _read_shard, expand_shards
from milan.errors import ConfigError, DataError
from milan.tools.bench.report import command_line
from milan.tools.bench.timing import machine_info

__all__ = ["add_arguments", "run_from_args", "run", "PATHS", "imagenet_like_jpegs", "read_images", "step_rate"]

PATHS = ("reference", "uint8", "draft", "tensor", "bounded", "bounded_draft", "bounded_tensor", "fast", "cuda")
STAGES = ("decode", "crop", "collate")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, help="an image folder or a folder of WebDataset .tar shards (default: a "
                   "generated ImageNet-like JPEG set)")
    p.add_argument("--images", type=int, help="images to time per path and round (default 256; 16 with --quick)")
    p.add_argument("--img-size", type=int, default=224, help="output crop size")
    p.add_argument("--crop-scale", type=float, nargs=2, default=(0.2, 1.0), metavar=("MIN", "MAX"))
    p.add_argument("--batch-size", type=int, help="images per collated batch (default 64; 8 with --quick)")
    p.add_argument("--max-size", type=int, default=256, help="bounded short side of the bounded/fast paths")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the bounded re-encode")
    p.add_argument("--rounds", type=int, help="rounds over all paths (default 5; 2 with --quick)")
    p.add_argument("--paths", help=f"comma-separated subset of {','.join(PATHS)} (default: all that apply)")
    p.add_argument("--workers", default="", help="also time a DataLoader with these worker counts, e.g. 1,2 "
                   "(images/s end to end, all paths)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--step-rate", help="the GPU's training images/s: a number, or a `milan bench speed` JSON file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="16 small generated images, 2 rounds (a smoke test)")
    p.add_argument("--out", type=Path, help="also write the results as JSON here")


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    quick = bool(args.quick)
    paths = tuple(p.strip() for p in args.paths.split(",")) if args.paths else None
    workers = [int(w) for w in args.workers.split(",") if w.strip()] if args.workers else []
    return run(
        data=args.data, images=args.images or (16 if quick else 256), img_size=args.img_size,
        crop_scale=tuple(args.crop_scale), batch_size=args.batch_size or (8 if quick else 64),
        max_size=args.max_size, quality=args.quality, rounds=args.rounds or (2 if quick else 5), paths=paths,
        workers=workers, device=args.device, step_rate_source=args.step_rate, seed=args.seed, quick=quick,
        out=args.out,
    )


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def imagenet_like_jpegs(count: int, *, size: tuple[int, int] = (500, 375), quality: int = 90,
                        seed: int = 0) -> list[bytes]:
    """`count` JPEGs shaped like ImageNet's typical photo: 500×375, quality 90, ≈ 77 KB each.

    Textures are noise at four scales (bicubic-upsampled), with a random colour cast: the mix of
    smooth areas and fine detail gives the file size, and so the entropy-decoding work, of a photo.
    """
    w, h = size
    out = []
    for k in range(count):
        g = torch.Generator().manual_seed(seed * 1_000_003 + k)
        x = torch.zeros(3, h, w)
        for cells, amp in ((4, 1.0), (16, 0.5), (64, 0.25), (250, 0.375)):
            noise = torch.randn(1, 3, max(2, cells * h // w), cells, generator=g)
            x += amp * F.interpolate(noise, size=(h, w), mode="bicubic", align_corners=False)[0]
        x = (x - x.mean()) / x.std() * 50 + 120 + torch.randn(3, 1, 1, generator=g) * 20
        pixels = x.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out


def read_images(path: Path, limit: int) -> list[bytes]:
    """Up to `limit` image files' bytes from a folder (ImageFolder or flat) or a folder of .tar shards."""
    path = Path(path).expanduser()
    if path.is_dir() and any(path.glob("*.tar")):
        found: list[bytes] = []
        for shard in expand_shards(path):
            for sample in _read_shard(shard):
                data = next((sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
                if data is not None:
                    found.append(data)
                if len(found) >= limit:
                    return found
        if not found:
            raise DataError(f"no images in the shards of {path}")
        return found
    folder = ImageFolderDataset(path)  # DataNotFound for a missing or empty folder
    return [p.read_bytes() for p, _ in folder.samples[:limit]]


def step_rate(source: str | None) -> tuple[float, str] | None:
    """(images/s, where it came from) from a number or a `milan bench speed` JSON; None without one."""
    if source is None:
        return None
    try:
        return float(source), "given"
    except ValueError:
        pass
    file = Path(source).expanduser()
    if not file.is_file():
        raise ConfigError(f"--step-rate {source}: neither a number nor a file (give images/s, e.g. 3000, or "
                          "a `milan bench speed --out` JSON)")
    try:
        variants = json.loads(file.read_text())["variants"]
        key = "milan" if "milan" in variants else next(iter(variants))
        return float(variants[key]["images_per_s"]), f"{file} ({key})"
    except (ValueError, KeyError, TypeError, StopIteration) as err:
        raise ConfigError(f"--step-rate {source}: not a `milan bench speed` JSON ({err!r})") from None


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------


class _Path:
    """One input path as timed stages: `decode(bytes) → state`, `crop(state) → sample`."""

    def __init__(self, name: str, decode: Callable[[bytes], Any], crop: Callable[[Any], Any], *,
                 bounded: bool, plans: bool = False, worker: Any = None) -> None:
        self.name, self.decode, self.crop, self.bounded, self.plans = name, decode, crop, bounded, plans
        self.worker = worker  # the transform a DataLoader worker runs (decode + crop in one)


def _paths(names: tuple[str, ...], img_size: int, scale: tuple[float, float]) -> list[_Path]:
    def pil(data: bytes) -> Any:
        return load_rgb(io.BytesIO(data), name="image")

    reference = pretrain_transform(img_size, scale=scale, output="float")
    uint8 = pretrain_transform(img_size, scale=scale, output="uint8")
    draft = PretrainCrop(img_size, scale=scale, draft=True)
    tensor = TensorCrop(img_size, scale=scale)
    fast = TensorCrop(img_size, scale=scale, draft=True)
    plan = CudaJpegPlan(img_size, scale=scale)

    def drafted(data: bytes) -> Any:
        return draft.read(io.BytesIO(data), name="image")

    def tensor_decode(data: bytes) -> Tensor:
        return _decode_tensor(data, name="image", min_size=1)

    def fast_decode(data: bytes) -> Any:
        return fast.read(io.BytesIO(data), name="image")

    made = {
        "reference": _Path("reference", pil, reference, bounded=False, worker=_Plain(reference)),
        "uint8": _Path("uint8", pil, uint8, bounded=False, worker=_Plain(uint8)),
        "draft": _Path("draft", drafted, lambda s: draft.finish(*s), bounded=False, worker=draft),
        "tensor": _Path("tensor", tensor_decode, tensor, bounded=False, worker=tensor),
        "bounded": _Path("bounded", pil, uint8, bounded=True, worker=_Plain(uint8)),
        "bounded_draft": _Path("bounded_draft", drafted, lambda s: draft.finish(*s), bounded=True, worker=draft),
        "bounded_tensor": _Path("bounded_tensor", tensor_decode, tensor, bounded=True, worker=tensor),
        "fast": _Path("fast", fast_decode, lambda s: fast.finish(*s), bounded=True, worker=fast),
        "cuda": _Path("cuda", lambda d: plan.decode(io.BytesIO(d), name="image"), lambda r: r, bounded=False,
                      plans=True, worker=plan),
    }
    return [made[n] for n in names]


class _Plain:
    """A PIL transform as a worker transform that decodes itself (the datasets' path for it)."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def decode(self, source: Any, *, name: str, min_size: int = 1) -> Any:
        return self.transform(load_rgb(source, min_size=min_size, name=name))


def _seed(seed: int, round_: int, index: int) -> None:
    # as Samples does: each sample's crop from (seed, epoch, index), here the round plays the epoch
    torch.manual_seed(hash((seed, round_, index)) & 0x7FFF_FFFF)


def _time_path(path: _Path, images: list[bytes], *, batch_size: int, device: torch.device, img_size: int,
               seed: int, round_: int) -> dict[str, float]:
    """Seconds per stage over all `images` (one thread), and the host→device seconds of its batches."""
    spent = dict.fromkeys((*STAGES, "host_to_device"), 0.0)
    clock = time.perf_counter
    for start in range(0, len(images), batch_size):
        samples = []
        for k in range(start, min(start + batch_size, len(images))):
            _seed(seed, round_, k)
            t0 = clock()
            state = path.decode(images[k])
            t1 = clock()
            sample = path.crop(state)
            spent["decode"] += t1 - t0
            spent["crop"] += clock() - t1
            samples.append((sample, 0, 0))
        t0 = clock()
        batch = collate_plans(samples)[0] if path.plans else default_collate(samples)[0]
        spent["collate"] += clock() - t0
        t0 = clock()
        if path.plans:
            out = normalize_on_device(decode_batch_cuda(batch, device, img_size))
        else:
            if device.type == "cuda":
                batch = batch.pin_memory()  # what the DataLoader's pin thread does
            out = normalize_on_device(batch.to(device, non_blocking=True))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        spent["host_to_device"] += clock() - t0
        del out
    return spent


class _Images(Dataset):
    """In-memory image bytes served the way `Samples` serves a folder: seeded per (epoch, index)."""

    def __init__(self, images: list[bytes], transform: Any, seed: int) -> None:
        self.images, self.transform, self.seed = images, transform, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        _seed(self.seed, 0, index)
        return self.transform.decode(io.BytesIO(self.images[index]), name=f"image {index}"), 0, 0


def _time_loader(path: _Path, images: list[bytes], *, workers: int, batch_size: int, device: torch.device,
                 img_size: int, seed: int) -> float:
    """Images/s of a DataLoader with `workers` workers (end to end, on the device and normalised)."""
    loader = DataLoader(_Images(images, path.worker, seed), batch_size=batch_size, num_workers=workers,
                        pin_memory=device.type == "cuda", drop_last=True,
                        collate_fn=collate_plans if path.plans else None)
    count, start = 0, time.perf_counter()
    for batch, _, _ in loader:
        if path.plans:
            out = decode_batch_cuda(batch, device, img_size)
        else:
            out = batch.to(device, non_blocking=True)
        out = normalize_on_device(out)
        count += out.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return count / (time.perf_counter() - start)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def run(*, data: Path | None = None, images: int = 256, img_size: int = 224,
        crop_scale: tuple[float, float] = (0.2, 1.0), batch_size: int = 64, max_size: int = 256, quality: int = 90,
        rounds: int = 5, paths: tuple[str, ...] | None = None, workers: list[int] | None = None,
        device: str = "auto", step_rate_source: str | None = None, seed: int = 0, quick: bool = False,
        out: Path | None = None) -> dict[str, Any]:
    """Measure, print a markdown report, write JSON to `out`; returns the results."""
    for key, value in (("--images", images), ("--img-size", img_size), ("--batch-size", batch_size),
                       ("--max-size", max_size), ("--rounds", rounds)):
        if value < 1:
            raise ConfigError(f"{key}={value} must be at least 1")
    if not 1 <= quality <= 100:
        raise ConfigError(f"--quality={quality} must be in 1..100")
    lo, hi = crop_scale
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"--crop-scale {lo} {hi} must satisfy 0 < min ≤ max ≤ 1")
    if any(w < 0 for w in workers or []):
        raise ConfigError(f"--workers {workers}: worker counts must not be negative")
    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but torch sees no CUDA device; use --device cpu")
    names = paths or tuple(p for p in PATHS if p != "cuda" or dev.type == "cuda")
    unknown = [p for p in names if p not in PATHS]
    if unknown:
        raise ConfigError(f"--paths: unknown {', '.join(unknown)}; choose from {', '.join(PATHS)}")
    if "cuda" in names and dev.type != "cuda":
        raise ConfigError("--paths cuda needs a CUDA device (GPU JPEG decoding); leave it out on CPU")
    rate = step_rate(step_rate_source)
    start = time.perf_counter()
    log = lambda msg: print(f"[bench data {time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core: one thread does everything a worker does
    try:
        machine = machine_info(dev)
        machine["threads"] = 1
        if data is not None:
            log(f"reading up to {images} images from {data}")
            originals = read_images(data, images)
            source = str(data)
        else:
            log(f"generating {images} ImageNet-like JPEGs (500×375, quality 90)")
            originals = imagenet_like_jpegs(images, seed=seed)
            source = "generated: 500×375 JPEG, quality 90, multi-scale noise"
        chosen = _paths(names, img_size, crop_scale)
        bounded: list[bytes] = []
        if any(p.bounded for p in chosen):
            log(f"re-encoding at short side ≤ {max_size}, quality {quality} (as `milan data shards --max-size`)")
            bounded = [b for b in (reencode_jpeg(d, max_size=max_size, quality=quality) for d in originals) if b]
        sets = {False: originals, True: bounded}
        spent: dict[str, list[dict[str, float]]] = {p.name: [] for p in chosen}
        for p in chosen:  # warm-up (first calls load codecs and caches), not counted
            warm = sets[p.bounded][:min(batch_size, 8)]
            _time_path(p, warm, batch_size=batch_size, device=dev, img_size=img_size, seed=seed, round_=-1)
        for r in range(rounds):
            log(f"round {r + 1}/{rounds}: {', '.join(p.name for p in chosen)}")
            for p in chosen:
                spent[p.name].append(_time_path(p, sets[p.bounded], batch_size=batch_size, device=dev,
                                                img_size=img_size, seed=seed, round_=r))
    finally:
        torch.set_num_threads(threads)

    results: dict[str, Any] = {}
    for p in chosen:
        n = len(sets[p.bounded])
        per_round = spent[p.name]
        worker_s = [sum(s[k] for k in STAGES) for s in per_round]
        entry: dict[str, Any] = {
            "images": n,
            "bounded": p.bounded,
            "images_per_s_per_core": n / statistics.median(worker_s),
            "per_round_images_per_s": [n / t for t in worker_s],
            "ms_per_image": {k: 1e3 * statistics.median(s[k] for s in per_round) / n for k in STAGES},
            "host_to_device_ms_per_batch": 1e3 * statistics.median(s["host_to_device"] for s in per_round)
            / -(-n // batch_size),
        }
        if "reference" in spent and p.name != "reference":
            ref_n = len(sets[False])
            ratios = [(n / t) / (ref_n / sum(r[k] for k in STAGES)) for t, r in zip(worker_s, spent["reference"])]
            entry["speedup_vs_reference"] = statistics.median(ratios)
            entry["speedup_per_round"] = ratios
        if rate is not None:
            entry["cores_per_gpu"] = rate[0] / entry["images_per_s_per_core"]
        results[p.name] = entry

    loaders: dict[str, dict[str, float]] = {}
    for w in workers or []:
        log(f"DataLoader with {w} worker(s)")
        loaders[str(w)] = {p.name: _time_loader(p, sets[p.bounded], workers=w, batch_size=batch_size, device=dev,
                                                img_size=img_size, seed=seed) for p in chosen}

    sizes = {"original_kb": statistics.fmean(len(d) for d in originals) / 1e3}
    if bounded:
        sizes["bounded_kb"] = statistics.fmean(len(d) for d in bounded) / 1e3
    result = {
        "command": command_line(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "settings": {"data": source, "images": len(originals), "img_size": img_size, "crop_scale": list(crop_scale),
                     "batch_size": batch_size, "max_size": max_size, "quality": quality, "rounds": rounds,
                     "device": dev.type, "seed": seed, "quick": quick},
        "sizes": sizes,
        "step_rate": None if rate is None else {"images_per_s": rate[0], "source": rate[1]},
        "paths": results,
        "workers": loaders,
        "notes": [
            "images_per_s_per_core: decode + crop + collate on one thread in this process (what one "
            "DataLoader worker does), median over rounds; host_to_device runs in the trainer, not a worker",
            "speedup_vs_reference: median over rounds of the ratio to the reference path in the same round",
            "cores_per_gpu = step rate / images_per_s_per_core",
        ],
    }
    print(format_markdown(result))
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {out}")
    return result


def format_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"## milan bench data: {s['data']}, {s['images']} images, {s['img_size']} px, "
        f"{s['device']}, {s['rounds']} rounds",
        "",
        "| path | images/s per core | × reference | decode ms | crop ms | collate ms | →device ms/batch "
        "| cores per GPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["paths"].items():
        ms = r["ms_per_image"]
        speed = f"{r['speedup_vs_reference']:.2f}" if "speedup_vs_reference" in r else "1"
        cores = f"{r['cores_per_gpu']:.1f}" if "cores_per_gpu" in r else "-"
        lines.append(f"| {name} | {r['images_per_s_per_core']:.0f} | {speed} | {ms['decode']:.2f} | "
                     f"{ms['crop']:.2f} | {ms['collate']:.3f} | {r['host_to_device_ms_per_batch']:.2f} | {cores} |")
    if result["step_rate"]:
        lines += ["", f"Step rate {result['step_rate']['images_per_s']:.0f} images/s "
                  f"({result['step_rate']['source']}): cores per GPU = step rate / images/s per core."]
    for w, rates in result["workers"].items():
        lines += ["", f"DataLoader, {w} worker(s): " + ", ".join(f"{k} {v:.0f}/s" for k, v in rates.items())]
    return "\n".join(lines)
