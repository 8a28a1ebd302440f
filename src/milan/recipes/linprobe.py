"""`milan linprobe`: linear probing of a frozen encoder (MAE/MILAN recipe, appendix A.1).

    frozen encoder ─► CLS after the final norm [B, D] ─► BatchNorm1d(affine=False) ─► Linear ─► CE

LARS (momentum 0.9, trust ratio on weight matrices), lr = base_lr × batch / 256, no weight
decay, linear warmup then cosine. `cache_features=true` runs the encoder once over the training
set (centre crops, no augmentation) so each epoch is a pass over a feature matrix.

`optim.solver` (auto by default): below `optim.lbfgs_max_images` training images LARS with A.1's
settings cannot move the head in the few steps a small set gives (lr × 0.001 × |w|/|g| per step),
so auto fits the same head (BatchNorm statistics, then the linear layer) by one L-BFGS solve on
cached centre-crop features instead; at ImageNet scale it is A.1's LARS. The log names the solver
and the reason; a run whose loss stays at chance after warm-up, or whose top-1 is not clearly
above chance, is warned about.

Semantic-aware probing (Table 7 #6): with `semantic_topk=x` the encoder sees only the top-x
fraction of patches ranked by the teacher's CLS attention, in training and evaluation alike.

Runs on rank 0 only (other ranks return at once): the head is tiny and the encoder frozen.

`head-last.pt`, written at the end of every epoch, holds the head, the LARS state, the step, the
best top-1 so far and the RNG states, so `run.resume=auto` (the default) continues an interrupted
probe exactly; `head-best.pt` is only replaced by a better epoch. `run.max_epochs` stops early
(the schedule still spans `optim.epochs`) for a later resume.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.optim import Lars
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision import transforms as T

import milan
from milan.data import loader_workers
from milan.data.reading import BadFiles, Checked, collate
from milan.data.split import EvalSets, eval_sets
from milan.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from milan.errors import ConfigError, TeacherError
from milan.io.weights import build_encoder
from milan.train import distributed as distr
from milan.train.checkpoint import CheckpointRecord, check_resumable, save_checkpoint
from milan.train.config import RunSection, save_config, to_dict
from milan.train.hooks import Periodic, Preemption
from milan.train.log import MetricsLogger, get_logger
from milan.train.loop import Checkpoints, Loop
from milan.train.probe import (
    beats_chance,
    extract_features,
    fit_linear,
    label_entropy,
    remap_labels,
    topk_accuracy,
)
from milan.train.run import (
    check_values,
    find_resume_last,
    start_run,
)
from milan.train.schedule import fit_warmup, scaled_lr, warmup_cosine

__all__ = ["LinprobeConfig", "CONFIG", "main", "ProbeHead"]


@dataclass
class ModelConfig:
    weights: str | None = None  # pretrain checkpoint, export (.safetensors) or authors' checkpoint
    preset: str | None = None  # encoder preset; alone (no weights) gives a random-init baseline
    semantic_topk: float | None = None  # e.g. 0.5: keep the top half of patches by teacher CLS attention


@dataclass
class TeacherConfig:
    """Only used for semantic-aware probing (model.semantic_topk)."""

    spec: str | None = None  # e.g. openclip:ViT-B-16, builtin:shapes
    weights: str | None = None


@dataclass
class DataConfig:
    kind: Literal["imagefolder", "shapes"] = "imagefolder"
    path: str | None = None  # root with train/ and val/ (imagefolder) or the shapes folder
    val_fraction: float = 0.2  # no separate val folder: score this stratified part held out of it (0: refuse)
    label: str = "shape"  # shapes only
    img_size: int | None = None  # default: the encoder's
    crop_pct: float = 0.875  # eval: resize to img_size / crop_pct, centre-crop
    crop_scale: tuple[float, float] = (0.08, 1.0)  # train RandomResizedCrop (when not cached)
    hflip: bool = True
    num_workers: int = 8
    train_limit: int | None = None
    val_limit: int | None = None
    max_bad_fraction: float = 0.01  # stop when clearly more of the files read are unreadable (README: Data)
    exif_transpose: bool = True  # apply each photo's EXIF orientation


@dataclass
class OptimConfig:
    epochs: int = 100
    warmup_epochs: int = 10
    batch_size: int = 256
    base_lr: float = 0.05  # lr = base_lr × batch / 256 (A.1: 3.2 at 16384 for ViT-B; 0.02 → 1.28 for ViT-L)
    lr: float | None = None  # absolute lr; overrides base_lr scaling
    momentum: float = 0.9
    weight_decay: float = 0.0
    cache_features: bool = False  # extract frozen features once; epochs become cheap (no augmentation)
    # lars: the A.1 recipe above. lbfgs: cached features, one full-batch L-BFGS solve of the same head
    # (BN without affine + linear, cross-entropy + lbfgs_l2) — no lr, epochs or batch size to get right.
    # auto: lbfgs below lbfgs_max_images training images, where LARS with MAE's settings cannot move
    # the head (steps are lr × 0.001 × |w|/|g|), else lars.
    solver: Literal["auto", "lars", "lbfgs"] = "auto"
    lbfgs_max_images: int = 100_000
    lbfgs_l2: float = 1e-4  # L2 on the weights (mean CE + l2/2·|W|²), biases free
    lbfgs_max_iter: int = 1000


@dataclass
class RunConfig(RunSection):
    out_dir: str = "runs/linprobe"  # resume=auto: its head-last.pt
    max_epochs: int | None = None  # stop after this many epochs (the schedule still spans optim.epochs); resume later


@dataclass
class LinprobeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


CONFIG = LinprobeConfig


def _validate(cfg: LinprobeConfig) -> None:
    """Values the type check lets through but the run cannot use: one line naming the key."""
    o = cfg.optim
    check_values(at_least_one={
        "optim.epochs": o.epochs, "optim.batch_size": o.batch_size, "run.max_epochs": cfg.run.max_epochs,
        "data.img_size": cfg.data.img_size, "optim.lbfgs_max_iter": o.lbfgs_max_iter,
    }, non_negative={"optim.warmup_epochs": o.warmup_epochs, "data.num_workers": cfg.data.num_workers,
                     "optim.lbfgs_max_images": o.lbfgs_max_images})
    if o.lbfgs_l2 < 0:
        raise ConfigError(f"optim.lbfgs_l2={o.lbfgs_l2} must not be negative (default 1e-4)")
    if o.warmup_epochs > o.epochs:
        raise ConfigError(f"optim.warmup_epochs={o.warmup_epochs} exceeds optim.epochs={o.epochs}; "
                          "lower optim.warmup_epochs (A.1: 10 of 100)")


class ProbeHead(nn.Sequential):
    """BatchNorm1d without affine (feature standardisation, MAE) followed by a linear classifier."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self[1].weight, std=0.01)
        nn.init.zeros_(self[1].bias)


def _feature_fn(encoder: nn.Module, teacher: nn.Module | None, topk: float | None) -> Callable[[Tensor], Tensor]:
    @torch.no_grad()
    def features(images: Tensor) -> Tensor:  # [B, 3, H, W] -> [B, D]
        keep = None
        if teacher is not None:
            attn = teacher(images).cls_attn  # [B, N]
            k = max(1, int(round(attn.shape[1] * topk)))
            keep = attn.topk(k, dim=1).indices  # [B, K] most-attended patches
        return encoder(images, keep)[:, 0]  # CLS after the final norm
    return features


def main(cfg: LinprobeConfig) -> dict[str, Any]:
    """Train a linear head on frozen features; returns best/last top-1/top-5 (rank 0; {} elsewhere)."""
    log = get_logger()
    _validate(cfg)
    info, run_dir, _, _ = start_run(cfg, write_config=False)  # config.yaml once resuming is settled
    if not info.is_main:
        return {}  # rank 0 computes alone; waiting in a collective could outlast its timeout
    device = info.device

    # --- frozen encoder (and teacher for semantic-aware probing) --------------------------------
    encoder, meta = build_encoder(cfg.model.weights, preset=cfg.model.preset, img_size=cfg.data.img_size)
    patch = encoder.patch_size
    if cfg.data.img_size is not None and cfg.data.img_size % patch:
        raise ConfigError(f"data.img_size={cfg.data.img_size} is not a multiple of the patch size {patch}; "
                          f"use e.g. {max(patch, cfg.data.img_size // patch * patch)}")
    encoder.requires_grad_(False)  # frozen: only the head learns
    encoder.eval().to(device)
    img_size = encoder.patch_embed.img_size[0]
    teacher = None
    topk = cfg.model.semantic_topk
    if topk is not None:
        if not 0 < topk <= 1:
            raise ConfigError(f"model.semantic_topk={topk} must be in (0, 1], e.g. 0.5")
        if not cfg.teacher.spec:
            raise TeacherError("model.semantic_topk needs teacher.spec=... "
                               "(and teacher.weights=... except for builtin:shapes)")
        teacher = milan.build_teacher(cfg.teacher.spec, weights=cfg.teacher.weights,
                                      student_patch_size=encoder.patch_size).to(device)
    features = _feature_fn(encoder, teacher, topk)

    # --- data ----------------------------------------------------------------------------------
    if cfg.data.kind == "imagefolder" and not cfg.data.path:
        raise ConfigError("set data.path=<root with train/ and val/>")
    val_tf = eval_transform(img_size, crop_pct=cfg.data.crop_pct)
    train_tf = val_tf
    if not cfg.optim.cache_features:
        steps = [T.RandomResizedCrop(img_size, scale=cfg.data.crop_scale, interpolation=T.InterpolationMode.BICUBIC)]
        steps += [T.RandomHorizontalFlip()] if cfg.data.hflip else []
        train_tf = T.Compose([*steps, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    parts = eval_sets(cfg.data.kind, cfg.data.path, val_fraction=cfg.data.val_fraction, train_transform=train_tf,
                      val_transform=val_tf, label=cfg.data.label, exif_transpose=cfg.data.exif_transpose)
    train_set, val_set = parts.train, parts.val
    classes = {"train": getattr(train_set, "classes", None), "val": getattr(val_set, "classes", None)}
    for name, limit in (("train", cfg.data.train_limit), ("val", cfg.data.val_limit)):
        if limit is not None:
            subset = torch.utils.data.Subset(train_set if name == "train" else val_set, range(limit))
            train_set, val_set = (subset, val_set) if name == "train" else (train_set, subset)
    batch = cfg.optim.batch_size
    num_train = len(train_set)
    if classes["train"]:
        num_classes = len(classes["train"])
    else:  # labels only, no encoder pass: known before the (costly) features, for the resume check
        num_classes = int(max(max(_targets(train_set)), max(_targets(val_set)))) + 1
    steps_per_epoch = max(1, num_train // batch)
    bad_files = BadFiles(max_fraction=cfg.data.max_bad_fraction, folder=run_dir)  # one warning per file, listed
    bad_files.total = len(train_set) + len(val_set)
    solver, why = choose_solver(cfg.optim, num_train)
    log.info("linear probe solver: %s (%s)", solver, why)
    if solver == "lbfgs":
        _set_transform(train_set, val_tf)  # cached features: centre crops, as A.1's cache_features
        result = _solve_lbfgs(cfg, run_dir, features, encoder.embed_dim, train_set, val_set, classes, num_classes,
                              {"preset": meta.get("preset"), "encoder": {**meta["encoder"], "img_size": img_size},
                               "semantic_topk": topk}, device, bad_files, parts)
        bad_files.log_summary()
        return result

    # --- head, LARS, schedule ------------------------------------------------------------------
    head = ProbeHead(encoder.embed_dim, num_classes).to(device)
    total = cfg.optim.epochs * steps_per_epoch
    warmup = fit_warmup(cfg.optim.warmup_epochs * steps_per_epoch, total, key="optim.warmup_epochs", log=log)
    peak = cfg.optim.lr if cfg.optim.lr is not None else scaled_lr(cfg.optim.base_lr, batch)
    matrices = [p for p in head.parameters() if p.ndim > 1]
    vectors = [p for p in head.parameters() if p.ndim <= 1]
    # MAE's LARS adapts weight matrices always and leaves biases alone.
    optimizer = Lars([{"params": matrices, "always_adapt": True}, {"params": vectors, "always_adapt": False}],
                     lr=peak, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    encoder_meta = {"preset": meta.get("preset"), "encoder": {**meta["encoder"], "img_size": img_size},
                    "semantic_topk": topk}
    identity = {"encoder": encoder_meta["encoder"], "semantic_topk": topk, "num_classes": num_classes}

    def payload() -> dict[str, Any]:
        return {**encoder_meta, **({"top1": last["top1"], "top5": last["top5"]} if last else {}),
                "num_classes": num_classes, "best": best,
                "loader_rng": None if cfg.optim.cache_features else loader.generator.get_state()}

    best, last, loader, train_x, train_y = {"top1": -1.0}, None, None, None, None

    class Batches:  # the loop's `Data`: epoch e of cached features in a seeded order, or of the loader
        def __init__(self) -> None:
            self.steps_per_epoch = steps_per_epoch

        def epoch(self, epoch: int, start: int) -> Iterator[tuple[Tensor, Tensor]]:
            if cfg.optim.cache_features:
                order = torch.randperm(num_train, generator=torch.Generator().manual_seed(cfg.run.seed + epoch))
                for i in range(start, steps_per_epoch):
                    idx = order[i * batch:(i + 1) * batch]
                    yield train_x[idx].to(device), train_y[idx].to(device)
            else:
                for images, targets in bad_files.track(loader):
                    yield features(images.to(device)), torch.as_tensor(targets).to(device)

    epoch_loss = torch.zeros((), device=device)  # the epoch's summed loss (the chance warning), no sync per step

    def train_step(batch: tuple[Tensor, Tensor], *, step: int, micro: int) -> Tensor:
        nonlocal epoch_loss
        loss = F.cross_entropy(head(batch[0]), batch[1])
        epoch_loss = epoch_loss + loss.detach()
        return loss

    # rank 0 alone (world size 1 for the loop: no collective)
    loop = Loop(info=distr.DistInfo(rank=0, world_size=1, local_rank=0, device=device), model=head,
                optimizer=optimizer, train_step=train_step, data=Batches(),
                schedule=lambda s: warmup_cosine(s, total=total, warmup=warmup, peak=peak),
                total_steps=total, last_step=min(cfg.optim.epochs, cfg.run.max_epochs or cfg.optim.epochs)
                * steps_per_epoch, log_every=0, batch_size=batch, desc="linprobe",
                checkpoints=Checkpoints(run_dir, "linprobe", to_dict(cfg), identity, name="head-last.pt",
                                        model_key="head", extra=payload))

    # --- resume (before the features: a finished or refused run costs no encoder pass) ----------
    found = find_resume_last(cfg.run.resume, run_dir, "head-last.pt")
    saved = found[1] if found is not None else None
    if found is not None:
        path = found[0]
        check_resumable(path, saved, kind="linprobe", identity=identity, expected=head.state_dict(),
                        weights_key="head", needs=("optimizer", "epoch", "best"),
                        fix=f"Use a new run.out_dir, or run.resume=none to start over in {cfg.run.out_dir} "
                            "(its head-best.pt would be replaced)")
        _warn_if_weights_changed(path, saved, cfg)
        loop.load_state_dict(saved, path=path)
        best = dict(saved["best"])
        last = {"top1": saved["top1"], "top5": saved["top5"], "epoch": int(saved["epoch"])}
        log.info("resumed from %s after epoch %d (step %d, best top-1 %.2f%%)", path, saved["epoch"], loop.step,
                 100 * best["top1"])
        if loop.step != int(saved["epoch"]) * steps_per_epoch:
            log.warning("the checkpoint has %d steps for %d epochs, this run %d per epoch (batch size or data "
                        "changed): the schedule no longer matches one uninterrupted run",
                        loop.step, saved["epoch"], steps_per_epoch)
    save_config(cfg, run_dir / "config.yaml")  # only now: a refused resume leaves the folder as it was

    def finish(epochs_done: int) -> dict[str, Any]:
        result = {"best": best, "last": last, "epoch": epochs_done, "epochs": cfg.optim.epochs,
                  "num_classes": num_classes, "semantic_topk": topk, "weights": cfg.model.weights, "solver": "lars",
                  **parts.record(train_count=len(train_set), val_count=len(val_set))}
        (run_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        return result

    start_epoch = loop.step // steps_per_epoch
    if loop.step >= loop.last_step:  # nothing left to train: report, do not retrain
        done = start_epoch >= cfg.optim.epochs
        log.info("%s: %d of %d epochs done, best top-1 %.2f%% at epoch %s; nothing to train%s",
                 "finished" if done else "stopped", start_epoch, cfg.optim.epochs, 100 * best["top1"],
                 best.get("epoch"), "" if done else " (raise run.max_epochs to continue)")
        return finish(start_epoch)

    # --- features ------------------------------------------------------------------------------
    common = dict(batch_size=batch, num_workers=cfg.data.num_workers, device=device, bad_files=bad_files)
    val_x, val_y = extract_features(features, val_set, desc="val features", **common)
    if classes["train"] is not None and classes["val"] is not None:
        val_y = remap_labels(val_y, classes["val"], classes["train"])
    if cfg.optim.cache_features:
        train_x, train_y = extract_features(features, train_set, desc="train features (cached)", **common)
    else:
        # its own generator (shuffle order, worker seeds): its state is part of head-last.pt
        # a bad image is replaced by the next good one (batches stay full)
        loader = DataLoader(Checked(train_set, replace=True), batch_size=batch, shuffle=True,
                            drop_last=len(train_set) >= batch, num_workers=loader_workers(cfg.data.num_workers),
                            generator=torch.Generator().manual_seed(cfg.run.seed), collate_fn=collate)
        if saved is not None and saved.get("loader_rng") is not None:
            loader.generator.set_state(saved["loader_rng"])

    chance_loss = label_entropy(train_y if cfg.optim.cache_features else torch.tensor(_targets(train_set)))
    warned = False

    def evaluate_epoch(loop: Loop) -> None:
        nonlocal best, last, warned, epoch_loss
        epoch = loop.step // steps_per_epoch
        mean_loss = float(epoch_loss) / steps_per_epoch
        epoch_loss = torch.zeros((), device=device)
        if not warned and epoch >= max(1, cfg.optim.warmup_epochs):
            warned = _warn_if_at_chance(mean_loss, chance_loss, epoch, peak)
        head.eval()
        with torch.no_grad():
            logits = torch.cat([head(val_x[i:i + 1024].to(device)).cpu() for i in range(0, len(val_x), 1024)])
        head.train()
        top1, top5 = topk_accuracy(logits, val_y)
        loop.metrics.log(loop.step, epoch=epoch, loss=mean_loss, top1=top1, top5=top5, lr=loop.lr)
        last = {"top1": top1, "top5": top5, "epoch": epoch}
        if top1 > best["top1"]:
            best = {"top1": top1, "top5": top5, "epoch": epoch}
            record = CheckpointRecord("linprobe", loop.step, to_dict(cfg), identity, epoch=epoch)
            save_checkpoint(record.state(head=head.state_dict(), **payload()), run_dir / "head-best.pt")

    loop.hooks += [Periodic(evaluate_epoch, at_epoch_end=True), Preemption.of_run(cfg.run, run_dir)]
    loop.open_metrics(run_dir, cfg)
    log.info("linear probe: %d train / %d val images, %d classes, %d epochs × %d steps, lr %.4g%s",
             num_train, len(val_x), num_classes, cfg.optim.epochs, steps_per_epoch, peak,
             f", semantic top-{topk:.0%} patches" if topk is not None else "")
    loop.run()  # puts back the checkpoint's RNG first (building the head and the features drew from it)
    if last["epoch"] < cfg.optim.epochs:
        log.info("stopped after epoch %d of %d (run.max_epochs): rerun to resume from head-last.pt",
                 last["epoch"], cfg.optim.epochs)
    log.info("linear probe top-1 %.2f%% (best %.2f%% at epoch %d)", 100 * last["top1"], 100 * best["top1"],
             best["epoch"])
    bad_files.log_summary()
    _warn_if_no_better_than_chance(best["top1"], val_y, "lars")
    return finish(last["epoch"])


def choose_solver(optim: OptimConfig, num_train: int) -> tuple[str, str]:
    """`optim.solver` resolved for this many training images: (solver, the reason, for the log)."""
    if optim.solver != "auto":
        return optim.solver, f"optim.solver={optim.solver}"
    if num_train < optim.lbfgs_max_images:
        return "lbfgs", (f"optim.solver=auto: {num_train} training images < optim.lbfgs_max_images="
                         f"{optim.lbfgs_max_images}, where LARS with the A.1 settings takes too few steps to "
                         "learn; cached features, one L-BFGS solve; optim.solver=lars forces A.1")
    return "lars", (f"optim.solver=auto: {num_train} training images >= optim.lbfgs_max_images="
                    f"{optim.lbfgs_max_images}: the A.1 recipe (LARS)")


def _warn_if_at_chance(loss: float, chance: float, epoch: int, lr: float) -> bool:
    """Warn (once) when the mean training loss after warm-up is still that of the class prior."""
    if loss < 0.98 * chance:
        return False
    get_logger().warning(
        "linear probe: mean training loss %.4f after epoch %d is still at chance (%.4f = the label entropy, "
        "ln C for balanced classes): the head is not learning. LARS steps are lr × 0.001 × |w|/|g|, so with "
        "peak lr %.4g and this few steps the weights barely move; use optim.solver=lbfgs (cached features, "
        "no lr to tune) or a much larger optim.lr", loss, epoch, chance, lr)
    return True


def _warn_if_no_better_than_chance(top1: float, val_y: Tensor, solver: str) -> None:
    if not beats_chance(top1, val_y):
        majority = float(torch.bincount(val_y.long()).max()) / max(1, len(val_y))
        get_logger().warning(
            "linear probe (%s): top-1 %.2f%% is not clearly above chance (always the most frequent class: "
            "%.2f%% of %d val images): the features carry no usable signal for these labels, or the probe did "
            "not learn%s", solver, 100 * top1, 100 * majority, len(val_y),
            "" if solver == "lbfgs" else " (try optim.solver=lbfgs)")


def _set_transform(dataset: Any, transform: Callable[..., Any]) -> None:
    """Give a dataset (or the dataset under a Subset) another transform."""
    base = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    if not hasattr(base, "transform"):
        raise ConfigError(f"optim.solver=lbfgs cannot set the centre-crop transform on {type(base).__name__}; "
                          "use optim.solver=lars")
    base.transform = transform


def _solve_lbfgs(cfg: LinprobeConfig, run_dir: Path, features: Callable[[Tensor], Tensor], dim: int,
                 train_set: Any, val_set: Any, classes: dict[str, Any], num_classes: int,
                 encoder_meta: dict[str, Any], device: torch.device, bad_files: BadFiles,
                 parts: EvalSets) -> dict[str, Any]:
    """Cached features, one L-BFGS solve of the ProbeHead: BatchNorm statistics of the training
    features, then the multinomial logistic regression on its output (probe.fit_linear)."""
    log = get_logger()
    o = cfg.optim
    save_config(cfg, run_dir / "config.yaml")
    if cfg.run.resume != "none" and (run_dir / "head-last.pt").is_file():
        log.info("optim.solver=lbfgs solves in one go: %s (a LARS run's resume point) is left as it is",
                 run_dir / "head-last.pt")
    common = dict(batch_size=o.batch_size, num_workers=cfg.data.num_workers, device=device, bad_files=bad_files)
    val_x, val_y = extract_features(features, val_set, desc="val features", **common)
    if classes["train"] is not None and classes["val"] is not None:
        val_y = remap_labels(val_y, classes["val"], classes["train"])
    train_x, train_y = extract_features(features, train_set, desc="train features (cached)", **common)
    head = ProbeHead(dim, num_classes)
    bn = head[0]
    with torch.no_grad():  # the BatchNorm's statistics are the training set's (what it learns in train mode)
        bn.running_mean.copy_(train_x.mean(0))
        bn.running_var.copy_(train_x.var(0))
    head.eval()
    with torch.no_grad():
        fit = fit_linear(bn(train_x).to(device), [train_y], [num_classes], l2=o.lbfgs_l2, max_iter=o.lbfgs_max_iter)[0]
        head[1].weight.copy_(fit.weight.cpu())
        head[1].bias.copy_(fit.bias.cpu())
        logits = torch.cat([head(val_x[i:i + 1024]) for i in range(0, len(val_x), 1024)])
    top1, top5 = topk_accuracy(logits, val_y)
    chance = label_entropy(train_y)
    log.info("L-BFGS: %d iterations%s, training loss %.4f (chance %.4f), l2 %g", fit.iterations,
             "" if fit.converged else f" (optim.lbfgs_max_iter={o.lbfgs_max_iter} reached before convergence)",
             fit.loss, chance, o.lbfgs_l2)
    if fit.loss >= 0.98 * chance:
        log.warning("linear probe (lbfgs): training loss %.4f is at chance (%.4f, the label entropy): the features "
                    "carry no usable signal for these labels", fit.loss, chance)
    _warn_if_no_better_than_chance(top1, val_y, "lbfgs")
    epochs = o.epochs  # the solve stands for the whole schedule
    metrics = MetricsLogger(run_dir, config=cfg)
    metrics.log(fit.iterations, loss=fit.loss, top1=top1, top5=top5, solver="lbfgs")
    metrics.close()
    identity = {"encoder": encoder_meta["encoder"], "semantic_topk": encoder_meta["semantic_topk"],
                "num_classes": num_classes}
    record = CheckpointRecord("linprobe", fit.iterations, to_dict(cfg), identity, epoch=epochs)
    save_checkpoint(record.state(head=head.state_dict(), **encoder_meta, top1=top1, top5=top5,
                                 num_classes=num_classes, solver="lbfgs"), run_dir / "head-best.pt")
    best = {"top1": top1, "top5": top5}
    # one solve, no epochs: the results say the solver and its iterations (optim.epochs played no part)
    result = {"best": best, "last": best, "num_classes": num_classes,
              "semantic_topk": encoder_meta["semantic_topk"], "weights": cfg.model.weights, "solver": "lbfgs",
              "lbfgs": {"iterations": fit.iterations, "max_iter": o.lbfgs_max_iter, "converged": fit.converged,
                        "train_loss": fit.loss, "chance_loss": chance, "l2": o.lbfgs_l2},
              **parts.record(train_count=len(train_x), val_count=len(val_x))}
    (run_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    log.info("linear probe top-1 %.2f%%, top-5 %.2f%% on %d images (%s); L-BFGS on %d cached training features",
             100 * top1, 100 * top5, len(val_x), parts.val_source, len(train_x))
    return result


def _warn_if_weights_changed(path: Path, state: dict[str, Any], cfg: LinprobeConfig) -> None:
    weights = (state.get("config") or {}).get("model", {}).get("weights")
    if weights != cfg.model.weights:
        get_logger().warning("resuming %s, probed on model.weights=%s (this run: %s): the head continues on "
                             "this run's encoder", path, weights, cfg.model.weights)


def _targets(dataset: Any) -> list[int]:
    """Integer labels of a dataset (ShapesDataset.targets, ImageFolder samples, or a Subset of one)."""
    if isinstance(dataset, torch.utils.data.Subset):
        labels = _targets(dataset.dataset)  # once, not once per index
        return [labels[i] for i in dataset.indices]
    if hasattr(dataset, "targets"):
        return [int(t) for t in dataset.targets]
    if hasattr(dataset, "samples"):
        return [int(s[1]) for s in dataset.samples]
    return [int(dataset[i][1]) for i in range(len(dataset))]

