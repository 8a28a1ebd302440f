"""`milan eval`: top-1/top-5 of a finetuned classifier on ImageFolder val sets.

Works for ImageNet-1k val, ImageNet-Sketch (1000 classes) and the 200-class ImageNet-A and
ImageNet-R: folder names are WordNet ids (`n01443537`), matched to the model's classes (the
checkpoint's own class list, or timm's ImageNet-1k synsets for a 1000-way head). When a folder
tree holds fewer classes than the model (A, R), the logits are restricted to those classes before
the arg-max, the standard protocol for these sets. Rank 0 evaluates; other ranks return at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from timm.data import ImageNetInfo
from torch.utils.data import DataLoader

from milan.data import loader_workers
from milan.data.reading import BadFiles, Checked, collate
from milan.data.split import classifier_sets
from milan.data.transforms import eval_transform
from milan.encoder import EncoderConfig
from milan.errors import ConfigError, DataError, WeightsError
from milan.io.weights import encoder_state_dict, load_encoder
from milan.train.checkpoint import load_checkpoint
from milan.train.classify import Relabel, build_classifier, evaluate
from milan.train.log import MetricsLogger, get_logger
from milan.train.run import start_run

__all__ = ["EvalConfig", "CONFIG", "main", "class_index", "imagenet_classes"]


@dataclass
class ModelConfig:
    weights: str | None = None  # a finetuned checkpoint (milan finetune) or its export


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)  # ImageFolder val sets (root/<wnid>/<image>)
    img_size: int | None = None  # default: the checkpoint's
    crop_pct: float = 0.875
    batch_size: int = 128
    num_workers: int = 8
    restrict_logits: Literal["auto", "always", "never"] = "auto"  # auto: when the set has fewer classes
    max_bad_fraction: float = 0.01  # stop when clearly more of the files read are unreadable (README: Data)
    exif_transpose: bool = True  # apply each photo's EXIF orientation


@dataclass
class RunConfig:
    out_dir: str = "runs/eval"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"


@dataclass
class EvalConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)


CONFIG = EvalConfig


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in the standard label order (from timm)."""
    return list(ImageNetInfo("imagenet-1k").label_names())


def class_index(folder_classes: list[str], model_classes: list[str]) -> torch.Tensor:
    """For each folder class, its output index in the model; a `DataError` when names do not match.

    Returns:
        `[C_folder]` int64 indices into the model's outputs.
    """
    index = {name: i for i, name in enumerate(model_classes)}
    unknown = [c for c in folder_classes if c not in index]
    if len(unknown) == len(folder_classes):
        raise DataError(
            f"none of the folder's classes ({', '.join(folder_classes[:4])}, ...) is a class of the model "
            f"({', '.join(model_classes[:3])}, ...); for ImageNet(-A/-R/-Sketch) the class folders must be "
            "named by WordNet id (n01440764, ...) as in the official releases"
        )
    if unknown:
        raise DataError(f"{len(unknown)} folder classes are not classes of the model: {', '.join(unknown[:8])}")
    return torch.tensor([index[c] for c in folder_classes], dtype=torch.long)


def _finetune_config(weights: str) -> dict[str, Any] | None:
    """The config a `milan finetune` checkpoint records (None for an export or other weights)."""
    if Path(weights).suffix != ".pt":
        return None
    config = load_checkpoint(weights).get("config")
    return config if isinstance(config, dict) else None


def main(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate the checkpoint on every set in data.paths; returns {set name: metrics} on rank 0."""
    log = get_logger()
    if not cfg.model.weights:
        raise ConfigError("set model.weights=<finetuned checkpoint, e.g. runs/finetune/checkpoint-best.pt>")
    if not cfg.data.paths:
        raise ConfigError("set data.paths=[/data/imagenet/val,/data/imagenet-r] (ImageFolder val sets)")
    info, run_dir, amp_dtype, _ = start_run(cfg)
    if not info.is_main:
        return {}  # rank 0 computes alone; waiting in a collective could outlast its timeout
    device = info.device

    state, meta = encoder_state_dict(cfg.model.weights)
    if "head.weight" not in state:
        raise WeightsError(f"{cfg.model.weights} has no classifier head; evaluate a finetuned checkpoint "
                           "(milan finetune), or use milan knn / milan linprobe for an encoder")
    config = EncoderConfig(**meta["encoder"])
    num_classes = meta["num_classes"]
    model = build_classifier(config, num_classes, global_pool="avg" if meta["global_pool"] == "avg" else "token")
    load_encoder(model, state, allow_missing=())
    model.eval().to(device)
    model_classes = list(meta.get("classes") or [])  # recorded by milan finetune (and kept by export)
    if not model_classes and num_classes == 1000:
        model_classes = imagenet_classes()

    img_size = cfg.data.img_size or config.img_size
    transform = eval_transform(img_size, crop_pct=cfg.data.crop_pct)
    metrics = MetricsLogger(run_dir, tensorboard=False)
    results: dict[str, Any] = {}
    # unreadable images are left out of the scores, warned about once each and listed in bad_images.txt
    bad_files = BadFiles(max_fraction=cfg.data.max_bad_fraction, folder=run_dir)
    trained = _finetune_config(cfg.model.weights)  # which images it was trained on: never scored
    for path in cfg.data.paths:
        dataset, source = classifier_sets(path, trained=trained, transform=transform,
                                          exif_transpose=cfg.data.exif_transpose, weights=cfg.model.weights)
        log.info("%s: %d images in %d classes (%s)", path, len(dataset), len(dataset.classes), source)
        bad_files.expect(dataset)
        if model_classes:
            try:
                index = class_index(dataset.classes, model_classes)
            except DataError as err:
                raise DataError(f"{path}: {err}") from None
        elif len(dataset.classes) == num_classes:  # no names to match: trust the folder order
            index = torch.arange(num_classes)
        else:
            raise DataError(f"{cfg.model.weights} records no class names and has {num_classes} outputs, but "
                            f"{path} has {len(dataset.classes)} classes; cannot match them")
        restrict = {"auto": len(index) < num_classes, "always": True, "never": False}[cfg.data.restrict_logits]
        if not restrict:
            dataset = Relabel(dataset, index)  # targets become model output indices
        loader = DataLoader(Checked(dataset), batch_size=cfg.data.batch_size, num_workers=loader_workers(cfg.data.num_workers),
                            collate_fn=collate)
        name = Path(path).name if Path(path).name not in ("val", "train") else Path(path).parent.name + "/val"
        result = evaluate(model, bad_files.track(loader), device, class_index=index if restrict else None,
                          amp_dtype=amp_dtype, desc=name)
        result.update(num_classes=len(index), restricted=restrict, path=str(path),
                      scored={"count": result["count"], "source": source})
        results[name] = result
        metrics.log(0, set=name, top1=result["top1"], top5=result["top5"])
        log.info("%s: top-1 %.2f%% top-5 %.2f%% (%d images, %d classes%s)", name, 100 * result["top1"],
                 100 * result["top5"], result["count"], len(index), ", logits restricted" if restrict else "")
    metrics.close()
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    bad_files.log_summary()
    return results
