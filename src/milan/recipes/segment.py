"""`milan segment`: semantic segmentation transfer, UperNet on a pretrained ViT (Tables 3 and 6).

    encoder ─► ViTPyramid (blocks 4/6/8/12 → strides 4/8/16/32) ─► UperNet (+ FCN aux, 0.4) ─► CE

The recipe of appendix A.1 (MAE's ADE20K recipe, `segment_ade20k_vit_base.yaml`): AdamW
β=(0.9, 0.999), batch 16, lr 3e-5, 1500 linear warmup iterations then poly (power 1) decay to
0 at 160k iterations, layer-wise lr decay 0.9, weight decay 0.05, drop path 0.1, 512×512 crops,
single-scale (sliding-window) evaluation. `optim.batch_size` is the total over processes.

Data: an ADE20K-layout folder (`data.kind=ade20k`) or the built-in shapes masks
(`data.kind=shapes`, 7 classes); see `milan.dense.seg_data`. The loss is pixel cross-entropy
averaged over labelled pixels (255 = ignored). Evaluation (every `run.eval_every` iterations
and at the end) reports mIoU, mAcc and aAcc from a confusion matrix summed over processes.

Unreadable image files (`milan.data.reading`): in training the sample is replaced by the next
readable one, image and label map together (deterministically: resume stays exact); in evaluation
the image is left out of the metric with its label map (mIoU over the readable images; the log line
and results.json give the count). Each file is warned about once, listed in `bad_images.txt` and
counted in the closing line; `data.max_bad_fraction` stops a run with too many (judged on distinct
files; under torchrun every rank shares its bad files at each evaluation and checkpoint).

Run folder: `config.yaml`, `metrics.jsonl`, `checkpoint-last.pt` (model, optimizer, step, RNG,
best so far, bad files: `run.resume=auto` continues exactly), `checkpoint-best.pt` (best mIoU;
model only), `results.json` and, when some image was unreadable, `bad_images.txt`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset

from milan.data import loader_workers
from milan.data.reading import BadFiles, collate, collate_lists
from milan.data.sampler import EpochSampler
from milan.data.shapes import default_shapes_root, generate_shapes
from milan.dense.backbone import layer_decay_groups
from milan.dense.seg_data import (
    IGNORE_INDEX,
    ADE20KDataset,
    SegEvalTransform,
    SegSamples,
    SegTrainTransform,
    ShapesSegDataset,
)
from milan.dense.seg_metrics import SegMetric
from milan.dense.upernet import Segmenter, build_segmenter
from milan.errors import ConfigError, DataError
from milan.io.weights import build_encoder
from milan.train import distributed as distr
from milan.train.checkpoint import CheckpointRecord, check_resumable, save_checkpoint
from milan.train.config import RunSection, save_config, to_dict
from milan.train.hooks import BadFilesHook, Periodic, Preemption
from milan.train.log import get_logger, progress
from milan.train.loop import Checkpoints, EpochLoader, Loop
from milan.train.recover import non_finite_guard
from milan.train.run import (
    find_resume_last,
    start_run,
)
from milan.train.schedule import fit_warmup, warmup_poly

__all__ = ["SegmentConfig", "CONFIG", "main", "evaluate", "predict", "seg_loss", "build_datasets"]


@dataclass
class ModelConfig:
    weights: str | None = None  # pretrain checkpoint, `milan export` .safetensors, or timm/authors' ViT weights
    preset: str | None = None  # encoder preset; alone (no weights) trains from random init (a baseline)
    drop_path: float = 0.1
    grad_checkpointing: bool = False  # recompute the encoder blocks' activations in backward (less memory)
    pyramid: Literal["intermediate", "simple"] = "intermediate"  # MAE/BEiT necks, or ViTDet's
    out_indices: tuple[int, ...] | None = None  # intermediate: tapped blocks (default 4/6/8/12 of 12)
    out_channels: int = 256  # simple pyramid only
    channels: int = 768  # UperNet width (MAE ViT-B recipe: 768)
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)
    dropout: float = 0.1
    aux: bool = True  # FCN auxiliary head on the stride-p level
    aux_channels: int = 256
    aux_weight: float = 0.4
    sync_bn: bool = True  # SyncBatchNorm under multi-GPU DDP


@dataclass
class DataConfig:
    kind: Literal["ade20k", "shapes"] = "ade20k"
    path: str | None = None  # ADE20K-layout root; shapes: default a small set in the milan cache
    num_classes: int | None = None  # default: the dataset's (150 ADE20K, 7 shapes)
    reduce_zero_label: bool = True  # ade20k: id 0 ("other") ignored, 1..150 → 0..149
    crop_size: int = 512  # a multiple of the patch size
    scale: tuple[int, int] = (2048, 512)  # base (long, short) size: train rescales ×ratio, eval fits in it
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75  # re-draw crops dominated by one class (1.0: off)
    hflip: float = 0.5
    eval_mode: Literal["slide", "whole"] = "slide"  # slide: crop_size windows; whole: the full image
    eval_stride: int | None = None  # slide stride (default: 2/3 of crop_size, 341 at 512)
    eval_batch_size: int = 1  # per process; images of equal size are stacked
    val_limit: int | None = None  # evaluate on the first N val images only (quick runs)
    num_workers: int = 8
    max_bad_fraction: float = 0.01  # stop when clearly more of the image files read are unreadable (README)


@dataclass
class OptimConfig:
    iters: int = 160_000
    warmup_iters: int = 1500
    batch_size: int = 16  # total over all processes (A.1: 16 = 8 GPUs × 2); per optimizer step × accum_steps
    accum_steps: int = 1  # micro-batches per optimizer step (DDP syncs gradients on the last one only)
    lr: float = 3e-5
    min_lr: float = 0.0
    power: float = 1.0  # poly exponent
    weight_decay: float = 0.05
    layer_decay: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = None


@dataclass
class RunConfig(RunSection):
    out_dir: str = "runs/segment"  # resume=auto: its checkpoint-last.pt
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    log_every: int = 50
    eval_every: int = 16_000  # also evaluated at the end; 0: only at the end
    ckpt_every: int = 2000  # checkpoint-last.pt; also written at the end
    max_iters: int | None = None  # stop here (the schedule still spans optim.iters); resume later


@dataclass
class SegmentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


CONFIG = SegmentConfig


def seg_loss(logits: Tensor, target: Tensor, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Pixel cross-entropy averaged over labelled pixels (0, not NaN, when none is labelled)."""
    total = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    return total / (target != ignore_index).sum().clamp(min=1)


def build_datasets(data: DataConfig) -> tuple[Dataset, Dataset, tuple[str, ...] | None]:
    """Raw (image, label) train and val datasets and the class names (None if unknown)."""
    if data.kind == "ade20k":
        if not data.path:
            raise ConfigError("set data.path=<ADE20K root with images/{training,validation} and "
                              "annotations/{training,validation}>")
        try:
            train = ADE20KDataset(data.path, "train", reduce_zero_label=data.reduce_zero_label)
            val = ADE20KDataset(data.path, "val", reduce_zero_label=data.reduce_zero_label)
        except (FileNotFoundError, ValueError) as err:
            raise DataError(str(err)) from None
        return train, val, train.classes
    if data.kind == "shapes":
        if data.path:
            root = Path(data.path).expanduser()
        else:  # a small set of its own: never replaces the (larger) default pretraining set
            root = generate_shapes(default_shapes_root().parent / "shapes-seg", num_train=2000, num_val=500)
        try:
            train, val = ShapesSegDataset(root, "train"), ShapesSegDataset(root, "val")
        except (FileNotFoundError, ValueError) as err:
            raise DataError(f"{err} (data.path={data.path})") from None
        return train, val, train.classes
    raise ConfigError(f"unknown data.kind {data.kind!r}; choose ade20k or shapes")


def _forward_padded(model: nn.Module, images: Tensor, patch: int) -> Tensor:
    """Logits of images padded (bottom/right, zeros) to a multiple of the patch, cropped back."""
    h, w = images.shape[-2:]
    ph, pw = -h % patch, -w % patch
    if ph or pw:
        images = F.pad(images, (0, pw, 0, ph))
    return model(images)[..., :h, :w].float()


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, *, num_classes: int, patch: int, mode: str = "whole",
            crop: int = 512, stride: int = 341, amp_dtype: torch.dtype | None = None) -> Tensor:
    """Logits `[B, K, H, W]` of normalised images `[B, 3, H, W]`, whole-image or sliding-window.

    Sliding window (mmseg's): `crop`-sized windows every `stride` pixels, the last one flush with
    the border; overlapping logits are averaged.
    """
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        if mode == "whole":
            return _forward_padded(model, images, patch)
        if mode != "slide":
            raise ValueError(f"mode must be 'whole' or 'slide', not {mode!r}")
        b, _, h, w = images.shape
        out = images.new_zeros(b, num_classes, h, w, dtype=torch.float32)
        count = images.new_zeros(1, 1, h, w, dtype=torch.float32)
        rows = max(h - crop + stride - 1, 0) // stride + 1
        cols = max(w - crop + stride - 1, 0) // stride + 1
        for r in range(rows):
            for c in range(cols):
                y1, x1 = min(r * stride + crop, h), min(c * stride + crop, w)
                y0, x0 = max(y1 - crop, 0), max(x1 - crop, 0)
                out[..., y0:y1, x0:x1] += _forward_padded(model, images[..., y0:y1, x0:x1], patch)
                count[..., y0:y1, x0:x1] += 1
        return out / count


@torch.no_grad()
def evaluate(model: Segmenter, loader: DataLoader, device: torch.device, *, num_classes: int,
             mode: str = "whole", crop: int = 512, stride: int = 341, amp_dtype: torch.dtype | None = None,
             class_names: tuple[str, ...] | None = None, desc: str = "eval") -> dict[str, Any]:
    """mIoU / mAcc / aAcc (+ per-class IoU) of `model` on this process's share of `loader`, summed over
    processes, and "images": how many images that is. Logits are resized (bilinear) to each label's
    original size before the argmax. `loader` yields `(images, labels)` lists (samples whose image
    was unreadable already left out)."""
    was_training = model.training
    model.eval()
    patch = model.backbone.encoder.patch_size
    metric = SegMetric(num_classes, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    bar = progress(len(loader), desc=desc, unit="batch", active=distr.is_main())
    for images, labels in loader:
        bar.update(1)
        count += len(images)
        same = len({tuple(x.shape) for x in images}) == 1 and len({tuple(y.shape) for y in labels}) == 1
        groups = [(images, labels)] if same else [([x], [y]) for x, y in zip(images, labels)]
        for xs, ys in groups:
            logits = predict(model, torch.stack(xs).to(device), num_classes=num_classes, patch=patch, mode=mode,
                             crop=crop, stride=stride, amp_dtype=amp_dtype)
            target = torch.stack(ys).to(device)
            if logits.shape[-2:] != target.shape[-2:]:
                logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
            metric.update(logits.argmax(1), target)
    bar.close()
    metric.all_reduce()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
    model.train(was_training)
    return {**metric.compute(class_names), "images": int(count.item())}


def _brief(result: dict[str, Any], step: int) -> dict[str, Any]:
    return {"mIoU": result["mIoU"], "mAcc": result["mAcc"], "aAcc": result["aAcc"], "step": step,
            "val_images": result["images"]}


def main(cfg: SegmentConfig) -> dict[str, Any]:
    """Train (or resume) and evaluate; returns the summary written to results.json (on every rank)."""
    log = get_logger()
    info, run_dir, amp_dtype, precision = start_run(cfg, write_config=False)  # config.yaml once resuming is settled
    device = info.device

    # --- data ----------------------------------------------------------------------------------
    d, o = cfg.data, cfg.optim
    train_raw, val_raw, classes = build_datasets(d)
    num_classes = d.num_classes or (len(classes) if classes else None)
    if num_classes is None:
        raise ConfigError("set data.num_classes (the class names are unknown without reduce_zero_label)")
    if classes is not None and len(classes) != num_classes:
        classes = None
    if o.batch_size % info.world_size:
        raise ConfigError(f"optim.batch_size={o.batch_size} (total) is not divisible by {info.world_size} "
                          "processes")
    per_rank = o.batch_size // info.world_size

    # --- model ---------------------------------------------------------------------------------
    m = cfg.model
    encoder, meta = build_encoder(m.weights, preset=m.preset, img_size=d.crop_size, drop_path_rate=m.drop_path)
    encoder.set_grad_checkpointing(m.grad_checkpointing)
    patch = encoder.patch_size
    if d.crop_size % patch:
        raise ConfigError(f"data.crop_size={d.crop_size} is not a multiple of the patch size {patch}; "
                          f"use e.g. {max(patch, d.crop_size // patch * patch)}")
    if per_rank < 2 and not (m.sync_bn and device.type == "cuda" and info.world_size > 1):
        raise ConfigError(f"{per_rank} image per process is too few for BatchNorm in the UperNet head; "
                          "raise optim.batch_size (or use SyncBatchNorm on several GPUs)")
    model = build_segmenter(encoder, num_classes, pyramid=m.pyramid, out_indices=m.out_indices,
                            out_channels=m.out_channels, channels=m.channels, pool_scales=m.pool_scales,
                            dropout=m.dropout, aux=m.aux, aux_channels=m.aux_channels)
    if info.world_size > 1 and m.sync_bn and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    groups = layer_decay_groups(model, weight_decay=o.weight_decay, layer_decay=o.layer_decay,
                                num_layers=model.backbone.num_layers)
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas)

    unused = m.pyramid == "intermediate" and max(model.backbone.out_indices) < model.backbone.num_layers - 1
    ddp = (DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused)
           if info.world_size > 1 else None)
    net = ddp if ddp is not None else model

    train_tf = SegTrainTransform(d.crop_size, scale=d.scale, ratio_range=d.ratio_range,
                                 cat_max_ratio=d.cat_max_ratio, hflip=d.hflip)
    try:
        sampler = EpochSampler(len(train_raw), rank=info.rank, world_size=info.world_size, seed=cfg.run.seed,
                               batch_size=per_rank)
    except ValueError as err:
        raise DataError(f"{err} (optim.batch_size is the total over processes)") from None
    pin = device.type == "cuda"
    # training: an unreadable image is replaced by the next readable sample (full batches, exact resume);
    # evaluation: it is left out with its label map. Workers report the files through the batch.
    loader = DataLoader(SegSamples(train_raw, train_tf, seed=cfg.run.seed, bad="replace"), batch_size=per_rank,
                        sampler=sampler, drop_last=True, num_workers=loader_workers(d.num_workers), pin_memory=pin,
                        collate_fn=collate,
                        generator=torch.Generator())  # keeps the global RNG (dropout, drop path) untouched
    steps_per_epoch = sampler.per_rank // per_rank // o.accum_steps
    if steps_per_epoch == 0:
        raise DataError(f"{len(train_raw)} training images are fewer than one optimizer step: optim.batch_size="
                        f"{o.batch_size} (total) × optim.accum_steps={o.accum_steps}; lower them")
    num_val = len(val_raw) if d.val_limit is None else min(d.val_limit, len(val_raw))
    val_loader = DataLoader(SegSamples(val_raw, SegEvalTransform(d.scale), bad="drop"), batch_size=d.eval_batch_size,
                            sampler=list(range(info.rank, num_val, info.world_size)), num_workers=loader_workers(d.num_workers),
                            collate_fn=collate_lists, generator=torch.Generator())
    # one registry of bad files per run: warned once each (rank 0), the same on every rank after each
    # check point, listed in bad_images.txt; a resumed run starts from its checkpoint's list
    bad_files = BadFiles(max_fraction=d.max_bad_fraction, folder=run_dir if info.is_main else None,
                         verbose=info.is_main)
    bad_files.total = len(train_raw) + num_val
    evaluated = False
    stride = d.eval_stride or max(patch, d.crop_size * 2 // 3)

    def seen(loop: Loop) -> int:
        """The distinct files read so far: the images of the steps done (capped at the training set)
        and the val images once evaluated."""
        return min(loop.step * o.batch_size * o.accum_steps, len(train_raw)) + (num_val if evaluated else 0)

    def train_step(batch: tuple[Any, Any], *, step: int, micro: int) -> tuple[Tensor, dict[str, Tensor]]:
        images, targets = batch[0].to(device, non_blocking=pin), batch[1].to(device, non_blocking=pin)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits, aux = net(images, with_aux=True)
        main_loss = seg_loss(logits, targets)
        loss = main_loss + m.aux_weight * seg_loss(aux, targets) if aux is not None else main_loss
        return loss, {"seg_loss": main_loss}

    def run_eval(step: int, record: bool = True) -> dict[str, Any]:
        nonlocal evaluated
        result = evaluate(model, bad_files.track(val_loader, check=False), device, num_classes=num_classes,
                          mode=d.eval_mode, crop=d.crop_size, stride=stride, amp_dtype=amp_dtype,
                          class_names=classes, desc=f"val @{step}")
        evaluated = True
        if record:  # not when re-evaluating a finished run: its log has this step already
            loop.metrics.log(step, mIoU=result["mIoU"], mAcc=result["mAcc"], aAcc=result["aAcc"],
                             val_images=result["images"])
        if info.is_main:
            left_out = num_val - result["images"]
            note = f" ({left_out} unreadable image{'s' if left_out != 1 else ''} left out)" if left_out else ""
            log.info("iteration %d: mIoU %.2f  mAcc %.2f  aAcc %.2f on %d val images%s", step,
                     100 * result["mIoU"], 100 * result["mAcc"], 100 * result["aAcc"], result["images"], note)
        # every rank: the val images' bad files too, then the same threshold decision
        bad_files.sync(device)
        bad_files.check(seen=seen(loop))
        return result

    def checkpoint(step: int, **payload: Any) -> dict[str, Any]:
        return {"model": model.state_dict(), "preset": meta.get("preset"), "encoder": encoder_shape,
                "num_classes": num_classes, "classes": list(classes) if classes else None, **payload}

    result, best = None, None

    def eval_and_keep_best(loop: Loop) -> None:
        nonlocal result, best
        result = run_eval(loop.step)
        if best is None or result["mIoU"] > best["mIoU"]:
            best = _brief(result, loop.step)
            if info.is_main:
                record = CheckpointRecord("segment", loop.step, to_dict(cfg), identity, world_size=info.world_size)
                save_checkpoint(record.state(**checkpoint(loop.step, mIoU=result["mIoU"], aAcc=result["aAcc"])),
                                run_dir / "checkpoint-best.pt")

    # --- the loop and its hooks ----------------------------------------------------------------
    encoder_shape = {**meta["encoder"], "img_size": d.crop_size}
    identity = {"encoder": encoder_shape, "num_classes": num_classes, "pyramid": m.pyramid}
    last_step = o.iters if cfg.run.max_iters is None else min(o.iters, cfg.run.max_iters)
    warmup = fit_warmup(o.warmup_iters, o.iters, key="optim.warmup_iters", log=log if info.is_main else None)
    loop = Loop(info=info, model=model, optimizer=optimizer, train_step=train_step, ddp=ddp,
                # alone, the threshold is checked after every batch; under torchrun at the check points
                data=EpochLoader(bad_files.track(loader, check=info.world_size == 1),
                           lambda epoch, start: sampler.set_epoch(epoch, start_batch=start, batch_size=per_rank),
                           steps_per_epoch),
                schedule=lambda s: warmup_poly(s, total=o.iters, warmup=warmup, peak=o.lr, power=o.power,
                                               final=o.min_lr),
                total_steps=o.iters, last_step=last_step,
                checkpoints=Checkpoints(run_dir, "segment", to_dict(cfg), identity, every=cfg.run.ckpt_every,
                                        at_epoch_end=False, name="checkpoint-last.pt",
                                        extra=lambda: {**checkpoint(loop.step), "best": best}),
                accum_steps=o.accum_steps, clip_grad=o.clip_grad, precision=precision, batch_size=per_rank,
                log_every=cfg.run.log_every, log_throughput=False, desc="segment",
                hooks=[BadFilesHook(bad_files, seen=seen),
                       non_finite_guard(run_dir=run_dir, info=info, precision=precision, fix="Lower optim.lr or set optim.clip_grad=1.0, then rerun "
                                    "to resume from checkpoint-last.pt."),
                       Periodic(eval_and_keep_best, every=cfg.run.eval_every, check=True),
                       Preemption.of_run(cfg.run, run_dir)])

    found = find_resume_last(cfg.run.resume, run_dir, info=info)
    if found is not None:
        path, state = found
        check_resumable(path, state, kind="segment", identity=identity, expected=model.state_dict(),
                        fix=f"Use a new run.out_dir, or run.resume=none to start over in {cfg.run.out_dir} "
                            "(its checkpoint-best.pt would be replaced)")
        loop.load_state_dict(state, path=path)
        best = state.get("best")
        if info.is_main:
            log.info("resumed from %s at iteration %d", path, loop.step)
    if info.is_main:  # only now: a refused resume leaves the folder's config.yaml as it was
        save_config(cfg, run_dir / "config.yaml")
    loop.open_metrics(run_dir, cfg)
    if info.is_main:
        log.info("segment %s (%s) at %dpx: %d classes, %d train / %d val images, %d iterations, effective batch "
                 "%d (%d × accum %d × %d processes), lr %.3g, layer decay %.2f, %d params",
                 meta.get("preset") or "encoder", meta.get("format") or "random init", d.crop_size, num_classes,
                 len(train_raw), num_val, o.iters, per_rank * o.accum_steps * info.world_size, per_rank,
                 o.accum_steps, info.world_size, o.lr, o.layer_decay, sum(p.numel() for p in model.parameters()))
    loop.run()
    step = loop.step
    if result is None:  # resumed at (or past) the end: evaluate the loaded model
        result = run_eval(step, record=False)
        if best is None:
            best = _brief(result, step)
    last = _brief(result, step)
    if classes:
        last["IoU"] = dict(zip(classes, result["IoU"]))
    summary = {"best": best, "last": last, "num_classes": num_classes, "iters": o.iters, "step": step,
               "num_val": num_val, "bad_images": len(bad_files.all_bad()), "run_dir": str(run_dir)}
    if info.is_main:
        (run_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    bad_files.log_summary()
    distr.barrier()
    return summary
