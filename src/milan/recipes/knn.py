"""`milan knn`: weighted k-nearest-neighbour accuracy of a frozen encoder.

    frozen encoder ─► features (CLS after the final norm, or mean of patch tokens) of train and val
                   ─► cosine top-k neighbours, votes weighted by exp(sim / T) (DINO) ─► top-1

Cheap and hyper-parameter free: the quickest read of a pretrained representation. Runs on rank 0
only (other ranks return at once), so it is safe under torchrun.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from milan.data.reading import BadFiles
from milan.data.split import eval_sets
from milan.data.transforms import eval_transform
from milan.errors import ConfigError
from milan.io.weights import build_encoder
from milan.train.log import MetricsLogger, get_logger
from milan.train.probe import extract_features, knn_accuracy, remap_labels
from milan.train.run import start_run

__all__ = ["KnnConfig", "CONFIG", "main"]


@dataclass
class ModelConfig:
    weights: str | None = None  # pretrain checkpoint, export (.safetensors) or authors' checkpoint
    preset: str | None = None  # encoder preset; alone (no weights) gives a random-init baseline
    pool: Literal["cls", "mean"] = "cls"  # CLS after the final norm, or the mean of patch tokens


@dataclass
class DataConfig:
    kind: Literal["imagefolder", "shapes"] = "imagefolder"
    path: str | None = None  # root with train/ and val/ (imagefolder) or the shapes folder
    train_path: str | None = None  # overrides path for the reference (train) set
    val_path: str | None = None  # overrides path for the query (val) set
    val_fraction: float = 0.2  # no separate val folder: score this stratified part held out of it (0: refuse)
    label: str = "shape"  # shapes only: shape, colour, count, position, shape_colour
    img_size: int | None = None  # default: the encoder's
    crop_pct: float = 0.875  # resize to img_size / crop_pct, centre-crop img_size
    batch_size: int = 256
    num_workers: int = 8
    train_limit: int | None = None  # use only the first n reference images
    val_limit: int | None = None
    max_bad_fraction: float = 0.01  # stop when clearly more of the files read are unreadable (README: Data)
    exif_transpose: bool = True  # apply each photo's EXIF orientation


@dataclass
class KnnParams:
    k: int = 20
    temperature: float = 0.07


@dataclass
class RunConfig:
    out_dir: str = "runs/knn"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tensorboard: bool = False


@dataclass
class KnnConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    knn: KnnParams = field(default_factory=KnnParams)
    run: RunConfig = field(default_factory=RunConfig)


CONFIG = KnnConfig


def main(cfg: KnnConfig) -> dict[str, Any]:
    """Extract frozen features of both sets and report weighted-kNN top-1 (rank 0; {} elsewhere)."""
    log = get_logger()
    info, run_dir, _, _ = start_run(cfg)
    if not info.is_main:  # extraction is cheap next to training; one rank does it all
        return {}  # rank 0 computes alone; waiting in a collective could outlast its timeout

    encoder, meta = build_encoder(cfg.model.weights, preset=cfg.model.preset, img_size=cfg.data.img_size)
    encoder.requires_grad_(False)  # frozen: features only
    encoder.to(info.device)
    img_size = encoder.patch_embed.img_size[0]
    transform = eval_transform(img_size, crop_pct=cfg.data.crop_pct)
    train_path = cfg.data.train_path or cfg.data.path
    val_path = cfg.data.val_path or cfg.data.path
    if cfg.data.kind == "imagefolder" and not (train_path and val_path):
        raise ConfigError("set data.path=<root with train/ and val/> "
                          "(or data.train_path= and data.val_path=) for data.kind=imagefolder")
    parts = eval_sets(cfg.data.kind, train_path, val_path=cfg.data.val_path or (cfg.data.path if cfg.data.train_path
                      else None), val_fraction=cfg.data.val_fraction, train_transform=transform,
                      val_transform=transform, label=cfg.data.label, exif_transpose=cfg.data.exif_transpose)
    sets = {"train": parts.train, "val": parts.val}
    bad_files = BadFiles(max_fraction=cfg.data.max_bad_fraction, folder=run_dir)
    for split, limit in (("train", cfg.data.train_limit), ("val", cfg.data.val_limit)):
        bad_files.total += len(sets[split]) if limit is None else min(limit, len(sets[split]))

    def encode(images: torch.Tensor) -> torch.Tensor:
        tokens = encoder(images)  # [B, 1+N, D]
        return tokens[:, 0] if cfg.model.pool == "cls" else tokens[:, 1:].mean(1)

    common = dict(batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers, device=info.device,
                  bad_files=bad_files)
    xtr, ytr = extract_features(encode, sets["train"], limit=cfg.data.train_limit, desc="train features", **common)
    xte, yte = extract_features(encode, sets["val"], limit=cfg.data.val_limit, desc="val features", **common)
    if hasattr(sets["train"], "classes") and hasattr(sets["val"], "classes"):
        yte = remap_labels(yte, sets["val"].classes, sets["train"].classes)
    num_classes = int(max(ytr.max(), yte.max())) + 1
    top1 = knn_accuracy(xtr, ytr, xte, yte, k=cfg.knn.k, temperature=cfg.knn.temperature,
                        num_classes=num_classes)
    result = {"knn_top1": top1, "k": cfg.knn.k, "temperature": cfg.knn.temperature, "pool": cfg.model.pool,
              "num_train": len(xtr), "num_val": len(xte), "num_classes": num_classes,
              "weights": cfg.model.weights, "preset": meta["preset"], "bad_images": len(bad_files),
              **parts.record(train_count=len(xtr), val_count=len(xte))}
    metrics = MetricsLogger(run_dir, tensorboard=cfg.run.tensorboard)
    metrics.log(0, knn_top1=top1)
    metrics.close()
    (run_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    log.info("kNN (k=%d, T=%g, %s) top-1 %.2f%% on %d images (%s)", cfg.knn.k, cfg.knn.temperature,
             cfg.model.pool, 100 * top1, len(xte), parts.val_source)
    bad_files.log_summary()
    return result
