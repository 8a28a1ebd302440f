"""`milan detect`: detection + instance segmentation transfer, Mask R-CNN + FPN on a pretrained ViT (Table 3).

    encoder ─► ViTPyramid (4 blocks → strides 4/8/16/32) ─► FPN ─► RPN ─► box + mask heads
    (torchvision MaskRCNN; `milan.dense.detection`) ─► COCO box AP / mask AP (pycocotools)

The recipe of appendix A.1 (`detect_coco_vit_base.yaml`): AdamW β=(0.9, 0.999), batch 16 (total
over processes), lr 2e-4, layer-wise lr decay 0.75 (ViT-B; 0.85 ViT-L), weight decay 0.1, drop
path 0.1 (B; 0.2 L), 1× schedule: 12 epochs with the lr divided by 10 at epochs 8 and 11 (after a
linear warmup of `optim.warmup_iters` iterations from 0.001 × lr, Detectron's), 1024×1024 input
(long side resized to 1024, padded to a square), horizontal flip, single-scale test.

Data: a COCO-format folder (`data.kind=coco`, see `milan.dense.det_data`) or the built-in shapes
scenes (`data.kind=shapes`, 6 classes). Losses: the sum of torchvision's five (RPN objectness and
box regression, RoI classification, box regression and mask). On GPU the ViT + FPN run under bf16
autocast, the RPN / RoI heads in float32 (anchors and box decoding need the precision).
Evaluation at the end of every `run.eval_every_epochs`-th epoch and at the end: pycocotools
COCOeval "bbox" and "segm" (AP values are fractions in results.json, percentages in the log).

Run folder: `config.yaml`, `metrics.jsonl` (losses, lr; box_AP / mask_AP per evaluation),
`checkpoint-last.pt` (model, optimizer, step, epoch, RNG; written every `run.ckpt_every`
iterations and at every epoch end), `results.json`, and with `run.save_detections` the final
evaluation's COCO-format results `detections_bbox.json` / `detections_segm.json` (COCO category ids). `run.resume=auto` continues from
checkpoint-last.pt exactly: the data order and flips depend only on (seed, epoch, index), the
sampler skips the batches already seen in the epoch and the RNG state (drop path, RPN / RoI
sampling) is restored; `run.max_steps` stops early (the schedule still spans `optim.epochs`).

Unreadable image files (`milan.data.reading`): in training the sample is replaced by the next
readable one, image and annotations together (deterministically: resume stays exact); in
evaluation the image is left out and COCOeval is restricted to the readable image ids (the log line
and results.json give the count). Each file is warned about once, listed in `bad_images.txt` (run
folder) and counted in the closing line; `data.max_bad_fraction` stops a run with too many (judged
on distinct files; under torchrun every rank shares its bad files at each evaluation and checkpoint).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset

from milan.data import loader_workers
from milan.data.reading import BadFiles, collate_lists
from milan.data.sampler import EpochSampler
from milan.data.shapes import default_shapes_root, generate_shapes
from milan.dense.backbone import layer_decay_groups
from milan.dense.coco_eval import evaluate_results, to_coco_results
from milan.dense.det_data import (
    CocoDetection,
    DetSamples,
    ShapesDetection,
    load_coco,
    shapes_coco_gt,
)
from milan.dense.detection import ENCODER_PREFIX, build_mask_rcnn
from milan.errors import ConfigError, DataError, UserError
from milan.io.weights import build_encoder
from milan.train import distributed as distr
from milan.train.checkpoint import check_resumable
from milan.train.config import RunSection, save_config, to_dict
from milan.train.hooks import BadFilesHook, Periodic, Preemption
from milan.train.log import get_logger, progress
from milan.train.loop import Checkpoints, EpochLoader, Loop
from milan.train.recover import non_finite_guard
from milan.train.run import (
    find_resume_last,
    start_run,
)
from milan.train.schedule import fit_warmup

__all__ = ["DetectConfig", "CONFIG", "main", "evaluate", "warmup_step_lr", "build_datasets"]


@dataclass
class ModelConfig:
    weights: str | None = None  # pretrain checkpoint, `milan export` .safetensors, or timm/authors' ViT weights
    preset: str | None = None  # encoder preset; alone (no weights) trains from random init (a baseline)
    drop_path: float = 0.1  # 0.1 ViT-B, 0.2 ViT-L
    grad_checkpointing: bool = False  # recompute the encoder blocks' activations in backward (less memory)
    pyramid: Literal["intermediate", "simple"] = "intermediate"  # MAE necks + FPN, or ViTDet's (no FPN)
    out_indices: tuple[int, ...] | None = None  # intermediate: tapped blocks (default 4/6/8/12 of 12)
    fpn_channels: int = 256
    min_size: int = 1024  # resize: short side to min_size unless the long side exceeds max_size
    max_size: int = 1024
    pad_to: int | None = 1024  # pad every batch to at least this square (A.1: 1024 × 1024)
    anchor_sizes: tuple[tuple[int, ...], ...] | None = None  # per level p2..p5, pool; default 8 × stride
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    box_head_dim: int = 1024
    mask_head_channels: int = 256
    mask_head_layers: int = 4
    rpn_batch_size_per_image: int = 256
    rpn_pre_nms_top_n: tuple[int, int] = (2000, 1000)  # (train, test), per level
    rpn_post_nms_top_n: tuple[int, int] = (1000, 1000)  # (train, test)
    box_batch_size_per_image: int = 512
    box_score_thresh: float = 0.05
    detections_per_img: int = 100


@dataclass
class DataConfig:
    kind: Literal["coco", "shapes"] = "coco"
    path: str | None = None  # COCO root (annotations/, train2017/, val2017/) or a shapes folder
    train_json: str | None = None  # default path/annotations/instances_train2017.json (relative: to path)
    train_images: str | None = None  # default path/train2017
    val_json: str | None = None  # default path/annotations/instances_val2017.json
    val_images: str | None = None  # default path/val2017
    hflip: float = 0.5
    val_limit: int | None = None  # evaluate on the first N val images only (quick runs)
    eval_batch_size: int = 2  # per process
    num_workers: int = 8
    max_bad_fraction: float = 0.01  # stop when clearly more of the image files read are unreadable (README)


@dataclass
class OptimConfig:
    epochs: int = 12
    lr_steps: tuple[float, ...] = (8, 11)  # epochs after which the lr is multiplied by gamma (fractions ok)
    gamma: float = 0.1
    warmup_iters: int = 250  # linear warmup from warmup_factor × lr
    warmup_factor: float = 0.001
    batch_size: int = 16  # total over all processes (A.1: 16); per optimizer step × accum_steps
    accum_steps: int = 1  # micro-batches per optimizer step (DDP syncs gradients on the last one only)
    lr: float = 2e-4
    weight_decay: float = 0.1
    layer_decay: float = 0.75  # 0.75 ViT-B, 0.85 ViT-L
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = None


@dataclass
class RunConfig(RunSection):
    out_dir: str = "runs/detect"  # resume=auto: its checkpoint-last.pt
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    log_every: int = 20
    ckpt_every: int = 1000  # checkpoint-last.pt every N iterations; also at every epoch end
    eval_every_epochs: int = 1  # also evaluated at the end
    save_detections: bool = False  # write the last evaluation's COCO results (detections_{bbox,segm}.json)
    max_steps: int | None = None  # stop here (the schedule still spans optim.epochs); resume later


@dataclass
class DetectConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


CONFIG = DetectConfig


def warmup_step_lr(step: int, *, peak: float, milestones: tuple[int, ...] | list[int], warmup: int,
                   gamma: float = 0.1, warmup_factor: float = 0.001) -> float:
    """Step decay (× `gamma` at each milestone iteration passed) times Detectron's linear warmup.

    lr = peak · gamma^#{m ≤ step} · (warmup_factor + (1 − warmup_factor) · step / warmup while step < warmup).
    """
    lr = peak * gamma ** sum(step >= m for m in milestones)
    if step < warmup:
        alpha = step / warmup
        lr *= warmup_factor * (1 - alpha) + alpha
    return lr


def _under(root: Path | None, path: str | None, default: str, what: str) -> Path:
    if path is not None:
        p = Path(path).expanduser()
        return p if p.is_absolute() or root is None else root / p
    if root is None:
        raise ConfigError(f"set data.path=<COCO root> (or data.{what})")
    return root / default


def build_datasets(data: DataConfig) -> tuple[Dataset, Dataset, Any, dict[int, int], tuple[str, ...]]:
    """Train and val datasets, the val ground truth (pycocotools COCO), label → category id, class names."""
    if data.kind == "coco":
        root = Path(data.path).expanduser() if data.path else None
        train_json = _under(root, data.train_json, "annotations/instances_train2017.json", "train_json")
        train_images = _under(root, data.train_images, "train2017", "train_images")
        val_json = _under(root, data.val_json, "annotations/instances_val2017.json", "val_json")
        val_images = _under(root, data.val_images, "val2017", "val_images")
        try:
            train = CocoDetection(train_images, train_json, train=True)
            val = CocoDetection(val_images, val_json, train=False)
        except (FileNotFoundError, ValueError) as err:
            raise DataError(str(err)) from None
        if train.cat_ids != val.cat_ids:
            raise DataError(f"{train_json} and {val_json} have different categories")
        if data.val_limit is not None:
            val.ids = val.ids[: data.val_limit]
        return train, val, val.coco, train.label_to_cat, train.classes
    if data.kind == "shapes":
        if data.path:
            root = Path(data.path).expanduser()
        else:  # a set of its own: never replaces the (larger) default pretraining set
            root = generate_shapes(default_shapes_root().parent / "shapes-det", num_train=2000, num_val=500)
        try:
            train = ShapesDetection(root, "train")
            val = ShapesDetection(root, "val", limit=data.val_limit)
            coco_gt = load_coco(shapes_coco_gt(root, "val", limit=data.val_limit))
        except (FileNotFoundError, ValueError) as err:
            raise DataError(f"{err} (data.path={data.path})") from None
        return train, val, coco_gt, train.label_to_cat, train.classes
    raise ConfigError(f"unknown data.kind {data.kind!r}; choose coco or shapes")


def _to_device(targets: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    return [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, coco_gt: Any,
             label_to_cat: dict[int, int], *, image_ids: list[int] | None = None, masks: bool = True,
             keep_detections: bool = False, desc: str = "eval") -> dict[str, Any]:
    """COCO box (and mask) AP of `model` over `loader` (each process its share; rank 0 scores all).

    Mixed precision is the model's own (`model.backbone.amp_dtype`, see `milan.dense.detection`).

    Only the images the loader delivered are scored: `image_ids` (default: every image of `coco_gt`)
    less those it left out (unreadable image files), so their annotations do not count as missed.

    Returns {"bbox": {...}, "segm": {...}, "images": how many images were scored} (the AP dicts as
    `milan.dense.coco_eval.evaluate_results`), on every rank; with `keep_detections`, rank 0's also
    holds "detections": {"bbox": [...], "segm": [...]}, the COCO-format results (COCO category ids)
    of every process.
    """
    was_training = model.training
    model.eval()
    boxes: list[dict] = []
    segms: list[dict] = []
    scored: list[int] = []
    bar = progress(len(loader), desc=desc, unit="batch", active=distr.is_main())
    for images, targets in loader:
        bar.update(1)
        outputs = model([img.to(device, non_blocking=True) for img in images])
        ids = [int(t["image_id"]) for t in targets]
        b, s = to_coco_results(outputs, ids, label_to_cat, masks=masks)
        boxes += b
        segms += s
        scored += ids
    bar.close()
    model.train(was_training)
    gathered = distr.all_gather_object((boxes, segms, scored))
    result = detections = None
    if distr.is_main():
        all_boxes = [r for part in gathered for r in part[0]]
        all_segms = [r for part in gathered for r in part[1]]
        delivered = {i for part in gathered for i in part[2]}
        ids = [i for i in (coco_gt.getImgIds() if image_ids is None else image_ids) if i in delivered]
        result = evaluate_results(coco_gt, all_boxes, all_segms if masks else None, image_ids=ids)
        result["images"] = len(ids)
        if keep_detections:
            detections = {"bbox": all_boxes, "segm": all_segms}
    result = distr.all_gather_object(result)[0]
    if detections is not None:
        result["detections"] = detections
    return result


def _brief(result: dict[str, Any], step: int, epoch: float) -> dict[str, Any]:
    out: dict[str, Any] = {"step": step, "epoch": epoch, "val_images": result["images"]}
    for kind, name in (("bbox", "box"), ("segm", "mask")):
        if kind in result:
            for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
                out[f"{name}_{key}"] = result[kind][key]
            out[f"{name}_stats"] = result[kind]["stats"]
    return out


def main(cfg: DetectConfig) -> dict[str, Any]:
    """Train (or resume) and evaluate; returns the summary written to results.json (on every rank)."""
    log = get_logger()
    try:
        # lazy: pycocotools is the optional `dense` extra (checked here to name the fix)
        import pycocotools  # noqa: F401  (masks and COCO AP)
    except ImportError:
        raise UserError("needs pycocotools: pip install 'milan-mim[dense]'") from None
    info, run_dir, amp_dtype, precision = start_run(cfg, write_config=False)  # config.yaml once resuming is settled
    device = info.device

    # --- data ----------------------------------------------------------------------------------
    d, o, m = cfg.data, cfg.optim, cfg.model
    train_raw, val_raw, coco_gt, label_to_cat, classes = build_datasets(d)
    num_classes = len(classes)
    if o.batch_size % info.world_size:
        raise ConfigError(f"optim.batch_size={o.batch_size} (total) is not divisible by {info.world_size} "
                          "processes")
    per_rank = o.batch_size // info.world_size

    # --- model ---------------------------------------------------------------------------------
    encoder, meta = build_encoder(m.weights, preset=m.preset, img_size=m.pad_to, drop_path_rate=m.drop_path)
    encoder.set_grad_checkpointing(m.grad_checkpointing)
    try:
        model = build_mask_rcnn(
            encoder, num_classes, pyramid=m.pyramid, out_indices=m.out_indices, fpn_channels=m.fpn_channels,
            min_size=m.min_size, max_size=m.max_size, pad_to=m.pad_to, anchor_sizes=m.anchor_sizes,
            aspect_ratios=m.aspect_ratios, box_head_dim=m.box_head_dim, mask_head_channels=m.mask_head_channels,
            mask_head_layers=m.mask_head_layers, rpn_batch_size_per_image=m.rpn_batch_size_per_image,
            rpn_pre_nms_top_n=m.rpn_pre_nms_top_n, rpn_post_nms_top_n=m.rpn_post_nms_top_n,
            box_batch_size_per_image=m.box_batch_size_per_image, box_score_thresh=m.box_score_thresh,
            detections_per_img=m.detections_per_img)
    except ValueError as err:
        raise ConfigError(f"{err} (model.*)") from None
    model.backbone.amp_dtype = amp_dtype  # bf16 ViT + FPN on GPU; RPN / RoI heads stay float32
    model.to(device)
    groups = layer_decay_groups(model, weight_decay=o.weight_decay, layer_decay=o.layer_decay,
                                num_layers=model.backbone.num_layers, backbone=ENCODER_PREFIX)
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas)

    body = model.backbone.body
    unused = m.pyramid == "intermediate" and max(body.out_indices) < body.num_layers - 1
    ddp = (DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused)
           if info.world_size > 1 else None)
    net = ddp if ddp is not None else model

    try:
        sampler = EpochSampler(len(train_raw), rank=info.rank, world_size=info.world_size, seed=cfg.run.seed,
                               batch_size=per_rank)
    except ValueError as err:
        raise DataError(f"{err} (optim.batch_size is the total over processes)") from None
    pin = device.type == "cuda"
    # training: an unreadable image is replaced by the next readable sample (full batches, exact resume);
    # evaluation: it is left out with its annotations. Workers report the files through the batch.
    loader = DataLoader(DetSamples(train_raw, hflip=d.hflip, seed=cfg.run.seed, bad="replace"), batch_size=per_rank,
                        sampler=sampler, drop_last=True, num_workers=loader_workers(d.num_workers), pin_memory=pin,
                        collate_fn=collate_lists, generator=torch.Generator())  # keeps the global RNG untouched
    steps_per_epoch = sampler.per_rank // per_rank // o.accum_steps
    if steps_per_epoch == 0:
        raise DataError(f"{len(train_raw)} training images are fewer than one optimizer step: optim.batch_size="
                        f"{o.batch_size} (total) × optim.accum_steps={o.accum_steps}; lower them")
    total = o.epochs * steps_per_epoch
    milestones = [round(e * steps_per_epoch) for e in o.lr_steps]
    last_step = total if cfg.run.max_steps is None else min(total, cfg.run.max_steps)
    warmup = fit_warmup(o.warmup_iters, total, key="optim.warmup_iters", log=log if info.is_main else None)
    val_ids = list(val_raw.ids)
    val_loader = DataLoader(DetSamples(val_raw, bad="drop"), batch_size=d.eval_batch_size,
                            sampler=list(range(info.rank, len(val_raw), info.world_size)), num_workers=loader_workers(d.num_workers),
                            collate_fn=collate_lists, generator=torch.Generator())
    # one registry of bad files per run: warned once each (rank 0), the same on every rank after each
    # check point, listed in bad_images.txt; a resumed run starts from its checkpoint's list
    bad_files = BadFiles(max_fraction=d.max_bad_fraction, folder=run_dir if info.is_main else None,
                         verbose=info.is_main)
    bad_files.total = len(train_raw) + len(val_raw)
    evaluated = False
    history: list[dict[str, Any]] = []

    def seen(loop: Loop) -> int:
        """The distinct files read so far: the images of the steps done (capped at the training set)
        and the val images once evaluated."""
        return min(loop.step * o.batch_size * o.accum_steps, len(train_raw)) + (len(val_raw) if evaluated else 0)

    def train_step(batch: tuple[Any, Any], *, step: int, micro: int) -> tuple[Tensor, dict[str, Tensor]]:
        images = [img.to(device, non_blocking=pin) for img in batch[0]]
        losses = net(images, _to_device(batch[1], device))  # autocast (bf16) inside the backbone only
        return sum(v.float() for v in losses.values()), losses

    def run_eval(step: int, record: bool = True) -> dict[str, Any]:
        nonlocal evaluated
        epoch = step / steps_per_epoch
        final = step >= last_step
        result = evaluate(model, bad_files.track(val_loader, check=False), device, coco_gt, label_to_cat,
                          image_ids=val_ids, desc=f"val @{step}", keep_detections=final and cfg.run.save_detections)
        evaluated = True
        for kind, found in result.pop("detections", {}).items():
            (run_dir / f"detections_{kind}.json").write_text(json.dumps(found))
        if record:  # not when re-evaluating a finished run: its log has this step already
            loop.metrics.log(step, epoch=epoch, box_AP=result["bbox"]["AP"], box_AP50=result["bbox"]["AP50"],
                             mask_AP=result["segm"]["AP"], mask_AP50=result["segm"]["AP50"],
                             val_images=result["images"])
        if info.is_main:
            left_out = len(val_ids) - result["images"]
            note = f" ({left_out} unreadable image{'s' if left_out != 1 else ''} left out)" if left_out else ""
            log.info("iteration %d (epoch %.2f): box AP %.1f (AP50 %.1f, AP75 %.1f)  mask AP %.1f (AP50 %.1f, "
                     "AP75 %.1f) on %d val images%s\nbbox:\n%s\nsegm:\n%s", step, epoch,
                     *(100 * result[k][s] for k in ("bbox", "segm") for s in ("AP", "AP50", "AP75")),
                     result["images"], note, result["bbox"]["summary"], result["segm"]["summary"])
        if record:
            history.append(_brief(result, step, round(epoch, 3)))
        # every rank: the val images' bad files too, then the same threshold decision
        bad_files.sync(device)
        bad_files.check(seen=seen(loop))
        return result

    result = None

    def evaluate_now(loop: Loop) -> None:
        nonlocal result
        result = run_eval(loop.step)

    # --- the loop and its hooks ----------------------------------------------------------------
    encoder_shape = {**meta["encoder"], "img_size": m.pad_to or meta["encoder"]["img_size"]}
    identity = {"encoder": encoder_shape, "num_classes": num_classes, "pyramid": m.pyramid}
    loop = Loop(info=info, model=model, optimizer=optimizer, train_step=train_step, ddp=ddp,
                # alone, the threshold is checked after every batch; under torchrun at the check points
                data=EpochLoader(bad_files.track(loader, check=info.world_size == 1),
                           lambda epoch, start: sampler.set_epoch(epoch, start_batch=start, batch_size=per_rank),
                           steps_per_epoch),
                schedule=lambda s: warmup_step_lr(s, peak=o.lr, milestones=milestones, warmup=warmup,
                                                  gamma=o.gamma, warmup_factor=o.warmup_factor),
                total_steps=total, last_step=last_step,
                checkpoints=Checkpoints(run_dir, "detect", to_dict(cfg), identity, every=cfg.run.ckpt_every,
                                        name="checkpoint-last.pt", extra=lambda: {
                                            "preset": meta.get("preset"), "encoder": encoder_shape,
                                            "num_classes": num_classes, "classes": list(classes),
                                            "label_to_cat": {int(k): int(v) for k, v in label_to_cat.items()},
                                            "history": history}),
                accum_steps=o.accum_steps, clip_grad=o.clip_grad, precision=precision, batch_size=per_rank,
                log_every=cfg.run.log_every, log_throughput=False, desc="detect",
                hooks=[BadFilesHook(bad_files, seen=seen),
                       non_finite_guard(run_dir=run_dir, info=info, precision=precision,
                                        fix="Lower optim.lr or set optim.clip_grad=1.0, then rerun to resume from "
                                            "checkpoint-last.pt."),
                       Periodic(evaluate_now, every=max(1, cfg.run.eval_every_epochs) * steps_per_epoch, check=True),
                       Preemption.of_run(cfg.run, run_dir)])

    found = find_resume_last(cfg.run.resume, run_dir, info=info)
    if found is not None:
        path, state = found
        check_resumable(path, state, kind="detect", identity=identity, expected=model.state_dict(),
                        fix=f"Use a new run.out_dir, or run.resume=none to start over in {cfg.run.out_dir}")
        loop.load_state_dict(state, path=path)
        history[:] = list(state.get("history") or [])
        if info.is_main:
            log.info("resumed from %s at iteration %d", path, loop.step)
    if info.is_main:  # only now: a refused resume leaves the folder's config.yaml as it was
        save_config(cfg, run_dir / "config.yaml")

    loop.open_metrics(run_dir, cfg)
    if info.is_main:
        log.info("detect %s (%s): %d classes, %d train / %d val images, %d epochs × %d iterations, effective "
                 "batch %d (%d × accum %d × %d processes), lr %.3g (÷%g after epochs %s), layer decay %.2f, input %d–%d px (pad %s), "
                 "%.1fM params", meta.get("preset") or "encoder", meta.get("format") or "random init", num_classes,
                 len(train_raw), len(val_raw), o.epochs, steps_per_epoch, per_rank * o.accum_steps * info.world_size,
                 per_rank, o.accum_steps, info.world_size, o.lr,
                 1 / o.gamma, ", ".join(f"{e:g}" for e in o.lr_steps), o.layer_decay, m.min_size, m.max_size,
                 m.pad_to, sum(p.numel() for p in model.parameters()) / 1e6)
    loop.run()
    step = loop.step
    if result is None:  # resumed at (or past) the end: evaluate the loaded model
        result = run_eval(step, record=False)
    last = _brief(result, step, round(step / steps_per_epoch, 3))
    summary = {"last": last, "history": history, "num_classes": num_classes, "classes": list(classes),
               "epochs": o.epochs, "steps_per_epoch": steps_per_epoch, "step": step, "num_val": len(val_ids),
               "bad_images": len(bad_files.all_bad()), "run_dir": str(run_dir)}
    if info.is_main:
        (run_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    bad_files.log_summary()
    distr.barrier()
    return summary
