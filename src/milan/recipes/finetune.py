"""`milan finetune`: end-to-end finetuning of a pretrained encoder as a timm ViT classifier.

    pretrained encoder ─► timm VisionTransformer(global_pool="avg": mean of patch tokens ─► fc_norm)
    RandAugment + random erasing ─► mixup/cutmix ─► soft-target CE ─► AdamW with layer-wise lr decay

The recipe of appendix A.1 (MAE's): AdamW β=(0.9, 0.999), lr = 1e-4 × batch / 256, 5 warmup
epochs then cosine to 0, layer decay 0.65 (B) / 0.75 (L), weight decay 0.05, drop path 0.1 (B) /
0.2 (L), mixup 0.8, cutmix 1.0, label smoothing 0.1, random erasing 0.25, 100 epochs. A different
`data.img_size` (e.g. 384) resamples the position embedding. The encoder's final norm is dropped
and `fc_norm` starts fresh (as MAE does with global pooling).

Checkpoints (`checkpoint-last.pt`, `checkpoint-best.pt`) hold the timm model's state dict under
"model", so `milan export` and `timm` read them directly; `milan eval` evaluates them.
`checkpoint-last.pt`, written at the end of every epoch, also holds the optimizer, the step, the
best top-1 so far and every RNG state (torch, CUDA, numpy, Python), so `run.resume=auto` (the
default) continues an interrupted run exactly as if it had never stopped; `checkpoint-best.pt` is
only replaced by a better epoch. `run.max_epochs` stops early (the schedule still spans
`optim.epochs`) for a later resume.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from milan.data import loader_workers
from milan.data.reading import BadFiles, Checked, collate
from milan.data.split import eval_sets
from milan.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from milan.encoder import ENCODER_PRESETS, EncoderConfig
from milan.errors import ConfigError, DataError
from milan.io.weights import encoder_state_dict, load_encoder
from milan.model import encoder_preset
from milan.train import distributed as distr
from milan.train.checkpoint import (
    CheckpointRecord,
    check_resumable,
    load_checkpoint,
    save_checkpoint,
)
from milan.train.classify import (
    Relabel,
    build_classifier,
    build_optimizer,
    evaluate,
    keep_posterize_bits,
)
from milan.train.config import RunSection, save_config, to_dict
from milan.train.hooks import BadFilesHook, Periodic, Preemption
from milan.train.log import get_logger
from milan.train.loop import Checkpoints, EpochLoader, Loop
from milan.train.probe import remap_labels
from milan.train.recover import non_finite_guard
from milan.train.run import (
    check_values,
    find_resume_last,
    start_run,
)
from milan.train.schedule import fit_warmup, scaled_lr, warmup_cosine

__all__ = ["FinetuneConfig", "CONFIG", "main"]


@dataclass
class ModelConfig:
    weights: str | None = None  # pretrain checkpoint, export (.safetensors) or authors' checkpoint
    preset: str | None = None  # encoder preset; alone (no weights) finetunes from scratch (a baseline)
    drop_path: float = 0.1  # 0.1 for ViT-B, 0.2 for ViT-L
    grad_checkpointing: bool = False  # recompute the blocks' activations in backward (less memory)


@dataclass
class DataConfig:
    kind: Literal["imagefolder", "shapes"] = "imagefolder"
    path: str | None = None  # root with train/ and val/ (imagefolder) or the shapes folder
    val_fraction: float = 0.2  # no separate val folder: score this stratified part held out of it (0: refuse)
    label: str = "shape"  # shapes only
    img_size: int | None = None  # default: the encoder's; e.g. 384 (position embedding resampled)
    crop_pct: float = 0.875  # eval: resize to img_size / crop_pct, centre-crop
    crop_scale: tuple[float, float] = (0.08, 1.0)
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec; None turns it off
    reprob: float = 0.25  # random erasing probability
    hflip: float = 0.5
    num_workers: int = 8
    max_bad_fraction: float = 0.01  # stop when clearly more of the files read are unreadable (README: Data)
    exif_transpose: bool = True  # apply each photo's EXIF orientation


@dataclass
class MixupConfig:
    mixup: float = 0.8  # alpha; 0 turns mixup off
    cutmix: float = 1.0  # alpha; 0 turns cutmix off
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1


@dataclass
class OptimConfig:
    epochs: int = 100
    warmup_epochs: int = 5
    batch_size: int = 64  # per process; effective = batch_size × accum_steps × world size
    accum_steps: int = 1  # micro-batches per optimizer step (DDP syncs gradients on the last one only)
    base_lr: float = 1e-4  # lr = base_lr × effective batch / 256 (A.1: 4e-4 at 1024)
    lr: float | None = None  # absolute lr; overrides base_lr scaling
    min_lr: float = 0.0
    weight_decay: float = 0.05
    layer_decay: float = 0.65  # 0.65 for ViT-B, 0.75 for ViT-L
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = None


@dataclass
class RunConfig(RunSection):
    out_dir: str = "runs/finetune"  # resume=auto: its checkpoint-last.pt
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    log_every: int = 50
    max_epochs: int | None = None  # stop after this many epochs (the schedule still spans optim.epochs); resume later


@dataclass
class FinetuneConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


CONFIG = FinetuneConfig


def _validate(cfg: FinetuneConfig) -> None:
    """Values the type check lets through but the run cannot use: one line naming the key."""
    o, r = cfg.optim, cfg.run
    check_values(at_least_one={
        "optim.epochs": o.epochs, "optim.batch_size": o.batch_size, "optim.accum_steps": o.accum_steps,
        "run.log_every": r.log_every,
        "run.max_epochs": r.max_epochs, "data.img_size": cfg.data.img_size,
    }, non_negative={"optim.warmup_epochs": o.warmup_epochs, "data.num_workers": cfg.data.num_workers})
    if o.warmup_epochs > o.epochs:
        raise ConfigError(f"optim.warmup_epochs={o.warmup_epochs} exceeds optim.epochs={o.epochs}; "
                          "lower optim.warmup_epochs (A.1: 5 of 100)")


def main(cfg: FinetuneConfig) -> dict[str, Any]:
    """Finetune; returns best/last top-1/top-5 and the run dir (on every rank)."""
    log = get_logger()
    _validate(cfg)
    info, run_dir, amp_dtype, precision = start_run(cfg, write_config=False)  # config.yaml once resuming is settled
    device = info.device

    # --- encoder weights and shape -------------------------------------------------------------
    if cfg.model.weights is not None:
        state, meta = encoder_state_dict(cfg.model.weights)
        config = EncoderConfig(**meta["encoder"])
        preset = meta["preset"]
    elif cfg.model.preset is not None:
        preset = encoder_preset(cfg.model.preset)
        state, config = None, ENCODER_PRESETS[preset]
    else:
        raise ConfigError("give model.weights=<pretrain checkpoint or export>, or "
                          f"model.preset=<one of: {', '.join(ENCODER_PRESETS)}> to train from scratch")
    img_size = cfg.data.img_size or config.img_size
    if img_size % config.patch_size:
        patch = config.patch_size
        raise ConfigError(f"data.img_size={img_size} is not a multiple of the patch size {patch}; "
                          f"use e.g. {max(patch, img_size // patch * patch)}")
    config = replace(config, img_size=img_size)

    # --- data ----------------------------------------------------------------------------------
    if cfg.data.kind == "imagefolder" and not cfg.data.path:
        raise ConfigError("set data.path=<root with train/ and val/>")
    train_tf = create_transform(
        img_size, is_training=True, scale=cfg.data.crop_scale, hflip=cfg.data.hflip,
        auto_augment=cfg.data.auto_augment, interpolation="bicubic", re_prob=cfg.data.reprob,
        re_mode="pixel", re_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    )
    keep_posterize_bits(train_tf)
    parts = eval_sets(cfg.data.kind, cfg.data.path, val_fraction=cfg.data.val_fraction, train_transform=train_tf,
                      val_transform=eval_transform(img_size, crop_pct=cfg.data.crop_pct), label=cfg.data.label,
                      exif_transpose=cfg.data.exif_transpose, log=info.is_main)
    train_set, val_set = parts.train, parts.val
    classes = list(getattr(train_set, "classes", []))
    if classes and getattr(val_set, "classes", None) not in (None, classes):
        lut = remap_labels(torch.arange(len(val_set.classes)), val_set.classes, classes)
        val_set = Relabel(val_set, lut)
    num_classes = len(classes)
    batch = cfg.optim.batch_size
    sampler = DistributedSampler(train_set, info.world_size, info.rank, shuffle=True, seed=cfg.run.seed,
                                 drop_last=True)
    # Workers are not persistent: each epoch's workers get their seeds from the global torch RNG, which
    # checkpoint-last.pt holds, so that a resumed epoch augments exactly as the uninterrupted one.
    # training: a bad image is replaced by the next good one (full batches); val: a bad one is left out.
    # Workers report bad files through the batch to this registry (one warning per file, bad_images.txt).
    loader = DataLoader(Checked(train_set, replace=True), batch_size=batch, sampler=sampler, drop_last=True,
                        num_workers=loader_workers(cfg.data.num_workers), collate_fn=collate)
    val_loader = DataLoader(Checked(val_set), batch_size=batch, num_workers=loader_workers(cfg.data.num_workers),
                            collate_fn=collate)
    bad_files = BadFiles(max_fraction=cfg.data.max_bad_fraction, folder=run_dir if info.is_main else None,
                         verbose=info.is_main)
    bad_files.total = len(train_set) + len(val_set)

    # --- model ---------------------------------------------------------------------------------
    model = build_classifier(config, num_classes, drop_path=cfg.model.drop_path)
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)  # timm's (non-reentrant unless TIMM_REENTRANT_CKPT=1)
    if state is not None:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}  # a new task's head
        # Average pooling uses fc_norm (fresh) in place of the final norm, as MAE finetuning.
        allow_unexpected = ("norm.",) if "norm.weight" in state else ()
        load_encoder(model, state, allow_missing=("head.", "fc_norm."), allow_unexpected=allow_unexpected)
    torch.nn.init.trunc_normal_(model.head.weight, std=2e-5)  # MAE: start near a uniform prediction
    torch.nn.init.zeros_(model.head.bias)
    model.to(device)

    accum = cfg.optim.accum_steps
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch == 0:
        raise DataError(f"{len(train_set)} training images are fewer than one optimizer step: optim.batch_size="
                        f"{batch} × optim.accum_steps={accum} × {info.world_size} process(es); lower them")
    total = cfg.optim.epochs * steps_per_epoch
    warmup = fit_warmup(cfg.optim.warmup_epochs * steps_per_epoch, total, key="optim.warmup_epochs",
                        log=log if info.is_main else None)
    effective_batch = batch * accum * info.world_size
    peak = cfg.optim.lr if cfg.optim.lr is not None else scaled_lr(cfg.optim.base_lr, effective_batch)
    optimizer = build_optimizer(model, peak, weight_decay=cfg.optim.weight_decay,
                                layer_decay=cfg.optim.layer_decay, betas=cfg.optim.betas)
    mix = cfg.mixup
    mixup = None
    if mix.mixup > 0 or mix.cutmix > 0:
        if batch % 2:
            raise ConfigError(f"mixup/cutmix need an even optim.batch_size, got {batch}")
        mixup = Mixup(mixup_alpha=mix.mixup, cutmix_alpha=mix.cutmix, prob=mix.prob, switch_prob=mix.switch_prob,
                      label_smoothing=mix.label_smoothing, num_classes=num_classes)
        criterion: torch.nn.Module = SoftTargetCrossEntropy()
    elif mix.label_smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=mix.label_smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if info.world_size > 1 else None
    net = ddp if ddp is not None else model

    def train_step(batch: tuple[torch.Tensor, Any], *, step: int, micro: int) -> torch.Tensor:
        images, targets = batch[0].to(device), torch.as_tensor(batch[1]).to(device)
        if mixup is not None:
            images, targets = mixup(images, targets)  # soft targets [B, C]
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            return criterion(net(images).float(), targets)

    # --- evaluation after every epoch (rank 0), the best checkpoint, the bad-file decision ------
    identity = {"encoder": asdict(config), "num_classes": num_classes}
    best, last = {"top1": -1.0}, None

    def payload() -> dict[str, Any]:
        return {"model": model.state_dict(), "preset": preset, "encoder": asdict(config),
                "num_classes": num_classes, "classes": classes, **(last or {})}

    def evaluate_epoch(loop: Loop) -> None:
        nonlocal best, last
        epoch = loop.step // steps_per_epoch
        if info.is_main:  # rank 0 evaluates the whole val set; the others wait at the next collective
            result = evaluate(model, bad_files.track(val_loader, check=False), device, amp_dtype=amp_dtype,
                              desc=f"val {epoch}")
            loop.metrics.log(loop.step, epoch=epoch, top1=result["top1"], top5=result["top5"], val_loss=result["loss"])
            last = {"top1": result["top1"], "top5": result["top5"]}
            if result["top1"] > best["top1"]:
                best = {**last, "epoch": epoch}
                record = CheckpointRecord("finetune", loop.step, to_dict(cfg), identity, epoch=epoch,
                                          world_size=info.world_size)
                save_checkpoint(record.state(**payload()), run_dir / "checkpoint-best.pt")
            log.info("epoch %d: top-1 %.2f%% top-5 %.2f%%", epoch, 100 * result["top1"], 100 * result["top5"])
        # every rank: the same bad files (rank 0's val ones included), then the same threshold decision,
        # judged on the whole dataset (each file has now been read)
        bad_files.sync(device)
        bad_files.check(seen=bad_files.total)

    loop = Loop(info=info, model=model, optimizer=optimizer, train_step=train_step, ddp=ddp,
                data=EpochLoader(bad_files.track(loader, check=False), lambda epoch, start: sampler.set_epoch(epoch),
                           steps_per_epoch),
                schedule=lambda s: warmup_cosine(s, total=total, warmup=warmup, peak=peak, final=cfg.optim.min_lr),
                total_steps=total, last_step=min(cfg.optim.epochs, cfg.run.max_epochs or cfg.optim.epochs)
                * steps_per_epoch, checkpoints=Checkpoints(run_dir, "finetune", to_dict(cfg), identity,
                                                           name="checkpoint-last.pt",
                                                           extra=lambda: {**payload(), "best": best}),
                accum_steps=accum, clip_grad=cfg.optim.clip_grad, precision=precision, batch_size=batch,
                log_every=cfg.run.log_every, log_throughput=False, desc="finetune",
                hooks=[BadFilesHook(bad_files, seen=lambda loop: min(loop.meter.seen * info.world_size,
                                                                     len(train_set))),
                       non_finite_guard(run_dir=run_dir, info=info, precision=precision, fix="Lower optim.lr or optim.base_lr, or set "
                                    "optim.clip_grad=1.0; then rerun to resume from checkpoint-last.pt."),
                       Periodic(evaluate_epoch, at_epoch_end=True, check=True),
                       Preemption.of_run(cfg.run, run_dir)])

    # --- resume --------------------------------------------------------------------------------
    found = find_resume_last(cfg.run.resume, run_dir, info=info)
    if found is not None:
        path, state = found
        check_resumable(path, state, kind="finetune", identity=identity, expected=model.state_dict(),
                        needs=("optimizer", "epoch"),
                        fix=f"Use a new run.out_dir, or run.resume=none to start over in {cfg.run.out_dir} "
                            "(its checkpoint-best.pt would be replaced)")
        _warn_if_weights_changed(path, state, cfg)
        loop.load_state_dict(state, path=path)
        best = dict(state["best"]) if state.get("best") else _best_of(run_dir / "checkpoint-best.pt")
        last = {"top1": state["top1"], "top5": state["top5"]}
        if info.is_main:
            log.info("resumed from %s after epoch %d (step %d, best top-1 %.2f%%)", path, state["epoch"], loop.step,
                     100 * best["top1"])
            if loop.step != int(state["epoch"]) * steps_per_epoch:
                log.warning("the checkpoint has %d steps for %d epochs, this run %d per epoch (batch size, "
                            "processes or data changed): the schedule no longer matches one uninterrupted run",
                            loop.step, state["epoch"], steps_per_epoch)
            if state.get("rng") is None:
                log.warning("%s holds no RNG state (an older milan): the resumed run is not exact", path)
    if info.is_main:  # only now: a refused resume leaves the folder's config.yaml as it was
        save_config(cfg, run_dir / "config.yaml")

    def summary() -> dict[str, Any]:
        out = {"best": best, "last": last, "epoch": loop.step // steps_per_epoch, "epochs": cfg.optim.epochs,
               "num_classes": num_classes, "run_dir": str(run_dir), **parts.record()}
        if info.is_main:
            (run_dir / "results.json").write_text(json.dumps(out, indent=2) + "\n")
        distr.barrier()
        return out

    start_epoch = loop.step // steps_per_epoch
    if loop.step >= loop.last_step:  # nothing left to train: report, do not retrain
        if info.is_main:
            log.info("%s: %d of %d epochs done, best top-1 %.2f%% at epoch %s; nothing to train%s",
                     "finished" if start_epoch >= cfg.optim.epochs else "stopped", start_epoch, cfg.optim.epochs,
                     100 * best["top1"], best.get("epoch"),
                     "" if start_epoch >= cfg.optim.epochs else " (raise run.max_epochs to continue)")
        return summary()

    loop.open_metrics(run_dir, cfg)
    if info.is_main:
        log.info("finetune %s at %dpx: %d classes, %d images, %d epochs × %d steps, effective batch %d (%d × accum "
                 "%d × %d processes), lr %.3g, layer decay %.2f", preset or "encoder", img_size, num_classes,
                 len(train_set), cfg.optim.epochs, steps_per_epoch, effective_batch, batch, accum, info.world_size,
                 peak, cfg.optim.layer_decay)
    loop.run()
    epochs_done = loop.step // steps_per_epoch
    if epochs_done < cfg.optim.epochs and info.is_main:
        log.info("stopped after epoch %d of %d (run.max_epochs): rerun to resume from checkpoint-last.pt",
                 epochs_done, cfg.optim.epochs)
    bad_files.log_summary()
    return summary()


def _best_of(path: Path) -> dict[str, Any]:
    """The best-so-far record from a checkpoint-best.pt (an older checkpoint-last.pt did not keep it)."""
    if not path.is_file():
        return {"top1": -1.0}
    state = load_checkpoint(path)
    return {"top1": state["top1"], "top5": state["top5"], "epoch": state["epoch"]}


def _warn_if_weights_changed(path: Path, state: dict[str, Any], cfg: FinetuneConfig) -> None:
    weights = (state.get("config") or {}).get("model", {}).get("weights")
    if weights != cfg.model.weights and distr.is_main():
        get_logger().warning("resuming %s, finetuned from model.weights=%s (this run: %s); the weights it "
                             "finetunes are the checkpoint's", path, weights, cfg.model.weights)
