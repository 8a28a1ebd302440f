"""`milan pretrain`: MILAN pretraining, one flat loop from config to checkpoints.

    milan.MILAN: teacher(images) ─► tokens, cls_attn ─► mask ─► model(images, mask, tokens) ─► loss ─► step

Single process, `torchrun` DDP (NCCL on GPU, gloo on CPU), gradient accumulation with `no_sync`,
AMP (bf16 on GPU by default, fp16 with a scaler, fp32 on CPU), atomic checkpoints and exact
resume (data order, crops and masks are functions of (seed, epoch, index, step), never of how
the run was interrupted), and automatic recovery from instability (`recover`, docs/RECOVERY.md):
a NaN/inf or spiking step is found at check points, every rank rolls back to the newest in-memory
snapshot, skips batches, lowers the lr for a while and retries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

import milan
from milan.data import build_dataset, loader_workers
from milan.data.fast import CudaJpegPlan, collate_plans, pretrain_input, to_device
from milan.data.reading import BadFiles, Samples, collate
from milan.data.sampler import EpochSampler
from milan.data.split import eval_sets
from milan.data.transforms import eval_transform
from milan.data.wds import ShardStream, count_samples
from milan.errors import CheckpointError, ConfigError, DataError
from milan.io.weights import init_model
from milan.model import ModelSpec, build_model
from milan.pretraining import MILAN
from milan.train import distributed as distr
from milan.train.checkpoint import (
    check_resumable,
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint,
    step_checkpoints,
)
from milan.train.config import RunSection, save_config, to_dict
from milan.train.hooks import BadFilesHook, Periodic, Preemption
from milan.train.log import get_logger
from milan.train.loop import Checkpoints, EpochLoader, Hook, Loop
from milan.train.probe import extract_features, knn_accuracy
from milan.train.recover import DebugConfig, RecoverConfig, RecoveryHook
from milan.train.run import agree_on_checkpoint, check_values, resolve_precision, start_run
from milan.train.schedule import fit_warmup, scaled_lr, warmup_cosine

__all__ = ["PretrainConfig", "CONFIG", "main", "param_groups", "build_step", "mask_noise"]


@dataclass
class ModelConfig:
    """What to pretrain, resolved by `milan.ModelSpec.resolve` as soon as the config is read: the
    name's prefix (milan_ = Table 5 #8, mae_ = #1, kd_ = Table 9's KD), then `variant` (a Table 5
    row), then explicit target / decoder / masking. After resolution no choice is left null, so
    `--print-config` and config.yaml show what runs."""

    name: str = "milan_vit_base_patch16"
    target: Literal["clip", "pixel"] | None = None  # None: from variant, else from the name
    decoder: Literal["prompting", "mae", "none"] | None = None
    masking: Literal["semantic", "random"] | None = None
    mask_ratio: float = 0.75
    variant: int | None = None  # a Table 5 row (1–8) sets target, decoder and masking
    decoder_dim: int | None = None  # None: the preset's (512 × 8 × 16 for ViT-B/L, as MAE)
    decoder_depth: int | None = None
    decoder_heads: int | None = None
    # Published weights to start a NEW run from (step 0, fresh optimizer): a run folder or checkpoint of
    # ours, the MILAN authors' / MAE / mmpretrain checkpoints, a timm folder (README: Published weights).
    init: str | None = None
    init_decoder: bool = True  # also the file's decoder, where it has one that fits; false: a fresh decoder
    grad_checkpointing: bool = False  # recompute the encoder's and decoder's block activations in backward

    def __post_init__(self) -> None:
        spec = self.spec()
        self.target, self.decoder, self.masking = spec.target, spec.decoder, spec.masking
        self.decoder_dim, self.decoder_depth, self.decoder_heads = (
            spec.decoder_dim, spec.decoder_depth, spec.decoder_heads)

    def spec(self) -> ModelSpec:
        return ModelSpec.resolve(self.name, variant=self.variant, target=self.target, decoder=self.decoder,
                                 masking=self.masking, mask_ratio=self.mask_ratio, decoder_dim=self.decoder_dim,
                                 decoder_depth=self.decoder_depth, decoder_heads=self.decoder_heads)


@dataclass
class TeacherConfig:
    spec: str = "openclip:ViT-B-16"
    weights: str | None = None
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU


@dataclass
class DataConfig:
    kind: Literal["imagefolder", "webdataset", "shapes"] = "imagefolder"
    path: str | None = None  # folder; for webdataset a brace pattern, a list file's folder or a dir of .tar
    num_samples: int | None = None  # webdataset only: images per epoch (default: from sizes.json / tar headers)
    shuffle_buffer: int = 1000  # webdataset only: per-worker sample shuffle buffer
    img_size: int = 224
    crop_scale: tuple[float, float] = (0.2, 1.0)
    hflip: bool = True
    num_workers: int = 8
    prefetch_factor: int = 2  # batches each worker prepares ahead (order and crops do not depend on it)
    # Input path (README "Feeding a fast GPU"; `milan bench data` measures them). Workers always return uint8
    # images and the device normalises them (bit-identical to ToTensor + Normalize in the worker).
    decode: Literal["pil", "tensor", "cuda"] = "pil"  # pil: PIL decode + bicubic RandomResizedCrop (the reference);
    # tensor: uint8 tensors, torchvision decode_jpeg + torch's bicubic/antialias kernel (same boxes, pixels within
    # ±2 levels, ≈ 2× faster per core); cuda: nvJPEG batch decode + crop on the GPU, workers only read bytes
    # (CPU tensor path without CUDA)
    draft: bool = False  # decode=pil|tensor: decode JPEGs at 1/2, 1/4 or 1/8 size when the crop stays ≥ img_size
    min_size: int = 16  # images with a shorter side are skipped as bad
    max_bad_fraction: float = 0.01  # stop when clearly more of the distinct files read are bad (README: Data)
    exif_transpose: bool = True  # apply each photo's EXIF orientation (training and the kNN monitor)


@dataclass
class OptimConfig:
    epochs: int = 400
    warmup_epochs: int = 40
    steps: int | None = None  # total optimizer steps; overrides epochs (short runs, demos)
    warmup_steps: int | None = None  # overrides warmup_epochs
    batch_size: int = 64  # per process; effective = batch_size × accum_steps × world size
    accum_steps: int = 1
    base_lr: float = 1.5e-4  # lr = base_lr × effective batch / 256 (A.1)
    lr: float | None = None  # absolute lr; overrides base_lr scaling
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float | None = None


@dataclass
class RunConfig(RunSection):
    out_dir: str = "runs/pretrain"  # resume=auto: its newest good checkpoint-<step>.pt
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    compile: bool = False
    log_every: int = 20
    ckpt_every: int = 1000  # optimizer steps; also at every epoch end
    keep_last: int = 2
    milestone_every: int = 0  # keep every n-th step's checkpoint forever (0: none)
    max_steps: int | None = None  # stop early (the schedule still spans all epochs)


@dataclass
class MonitorConfig:
    """A cheap, periodic kNN accuracy of the frozen encoder on a labelled held-out set."""

    every: int = 0  # optimizer steps between evaluations; 0 turns the monitor off
    kind: Literal["imagefolder", "shapes"] = "imagefolder"
    train_path: str | None = None  # labelled reference images (ImageFolder: root/<class>/...)
    val_path: str | None = None  # labelled query images; unset (or the same folder): a part held out of train_path
    val_fraction: float = 0.2  # that held-out part, as the evaluation commands' data.val_fraction (0: refuse)
    label: str = "shape"  # for shapes: shape, colour, count, position, shape_colour
    train_size: int = 5000
    val_size: int = 1000


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on norms, biases, tokens and position embeddings (A.1, MAE)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim <= 1 or name.endswith(("cls_token", "mask_token", "pos_embed"))
        (no_decay if skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _validate(cfg: PretrainConfig) -> None:
    """Values the type check lets through but the run cannot use: one line naming the key."""
    o, r = cfg.optim, cfg.run
    check_values(at_least_one={
        "optim.batch_size": o.batch_size, "optim.accum_steps": o.accum_steps, "optim.epochs": o.epochs,
        "optim.steps": o.steps, "run.log_every": r.log_every, "run.ckpt_every": r.ckpt_every,
        "run.max_steps": r.max_steps, "data.img_size": cfg.data.img_size,
    }, non_negative={"optim.warmup_epochs": o.warmup_epochs, "optim.warmup_steps": o.warmup_steps,
                     "run.keep_last": r.keep_last, "data.num_workers": cfg.data.num_workers})
    check_values(at_least_one={"data.prefetch_factor": cfg.data.prefetch_factor})
    if o.steps is None and o.warmup_steps is None and o.warmup_epochs > o.epochs:
        raise ConfigError(f"optim.warmup_epochs={o.warmup_epochs} exceeds optim.epochs={o.epochs}")
    if o.steps is not None and o.warmup_steps is not None and o.warmup_steps > o.steps:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} exceeds optim.steps={o.steps}")
    lo, hi = cfg.data.crop_scale
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"data.crop_scale={list(cfg.data.crop_scale)} must satisfy 0 < min ≤ max ≤ 1, "
                          "e.g. [0.2, 1.0]")
    rc, dbg = cfg.recover, cfg.debug
    check_values(at_least_one={
        "recover.check_every": rc.check_every, "recover.snapshot_every": rc.snapshot_every,
        "recover.retry_window": rc.retry_window, "recover.spike_window": rc.spike_window,
    }, non_negative={"recover.skip_batches": rc.skip_batches, "recover.lr_scale_steps": rc.lr_scale_steps,
                     "recover.max_retries": rc.max_retries, "recover.spike_warmup": rc.spike_warmup,
                     "debug.nan_rank": dbg.nan_rank})
    for key, value in (("recover.lr_scale", rc.lr_scale), ("recover.loss_spike_z", rc.loss_spike_z),
                       ("recover.grad_spike_z", rc.grad_spike_z), ("debug.spike_factor", dbg.spike_factor)):
        if value is not None and not value > 0:
            raise ConfigError(f"{key}={value} must be positive")
    for key in ("nan_at_steps", "spike_at_steps", "skip_batches"):
        if any(v < 0 for v in getattr(dbg, key)):
            raise ConfigError(f"debug.{key}={getattr(dbg, key)} must list steps/batches ≥ 0")
    img_size = cfg.model.spec().encoder.img_size
    if cfg.data.img_size != img_size:
        raise ConfigError(f"data.img_size={cfg.data.img_size} but {cfg.model.name} is built for {img_size}px; "
                          f"set data.img_size={img_size}")


def build_step(cfg: PretrainConfig, device: torch.device, *, amp_dtype: torch.dtype | None = None) -> MILAN:
    """The run's `MILAN` step: its teacher (built only when the variant needs one) and a fresh student."""
    spec = cfg.model.spec()
    teacher = None
    if spec.needs_teacher:
        dtype = cfg.teacher.dtype if cfg.teacher.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
        if dtype == "bf16":  # bf16 weights on CPU: the same trap as bf16 autocast (refused unless overridden)
            resolve_precision(dtype, device, key="teacher.dtype")
        teacher = milan.build_teacher(
            cfg.teacher.spec, weights=cfg.teacher.weights,
            dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype],
            student_patch_size=spec.encoder.patch_size,
        ).to(device)
    model = build_model(spec, target_dim=teacher.dim if teacher is not None else None).to(device)
    return MILAN(model, teacher=teacher, amp_dtype=amp_dtype)


def mask_noise(seed: int, step: int, micro: int, shape: tuple[int, int], *, rank: int = 0, world_size: int = 1,
               accum_steps: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
    """The uniform draws behind micro-step `micro` of optimizer step `step`: `[B, N]` for this rank.

    One draw of `[B·W·A, N]` per optimizer step (A = accum_steps), row i for the i-th image of the
    step's global batch as the sampler orders it (micro-batch m of rank r holds images m·B·W + r,
    m·B·W + r + W, ...): masks depend on (seed, step) and the image's place in the step only, not on
    how many processes run, how the step is split into micro-batches, or where a run was interrupted.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(hash((seed, step, 0)) & 0x7FFF_FFFF_FFFF)
    batch, num_patches = shape
    rows = batch * world_size  # one micro-batch over every rank
    noise = torch.rand(rows * accum_steps, num_patches, generator=gen, device=device)
    return noise[micro * rows:(micro + 1) * rows][rank::world_size]


def main(cfg: PretrainConfig) -> dict[str, Any]:
    """Run (or resume) pretraining; returns a summary (final step, last logged loss, run dir, recovery
    events, rollbacks and batches skipped)."""
    log = get_logger()
    _validate(cfg)
    info, run_dir, amp_dtype, precision = start_run(cfg, write_config=False, seed_per_rank=False)
    device = info.device
    spec = cfg.model.spec()
    if cfg.recover.fallback_precision is not None:  # a rollback must not switch a CPU run to bf16 either
        resolve_precision(cfg.recover.fallback_precision, device, key="recover.fallback_precision")
    if cfg.debug.nan_rank is not None and cfg.debug.nan_rank >= info.world_size:
        raise ConfigError(f"debug.nan_rank={cfg.debug.nan_rank} but the run has {info.world_size} process(es)")

    # --- the step: frozen teacher (never in the optimizer, DDP or the checkpoint) + student ------
    step_fn = build_step(cfg, device, amp_dtype=amp_dtype)
    if cfg.model.init is not None:  # a resumed run then loads its own checkpoint over it, below
        loaded = init_model(step_fn.model, cfg.model.init, init_decoder=cfg.model.init_decoder)
        if info.is_main:
            log.info("model.init: %s", loaded)
    model, teacher = step_fn.model, step_fn.teacher
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    img_size = spec.encoder.img_size

    # --- data ----------------------------------------------------------------------------------
    batch, accum = cfg.optim.batch_size, cfg.optim.accum_steps
    decode = cfg.data.decode
    if decode == "cuda" and device.type != "cuda":
        if info.is_main:
            log.warning("data.decode=cuda needs a CUDA device; decoding on the CPU instead (data.decode=tensor)")
        decode = "tensor"
    transform = pretrain_input(img_size, scale=cfg.data.crop_scale, hflip=cfg.data.hflip, decode=decode,
                               draft=cfg.data.draft, exif_transpose=cfg.data.exif_transpose)
    loader, set_epoch, per_rank, num_images = _train_loader(cfg, info, transform)
    steps_per_epoch = per_rank // batch // accum
    total_steps = cfg.optim.steps if cfg.optim.steps is not None else cfg.optim.epochs * steps_per_epoch
    warmup_steps = fit_warmup(cfg.optim.warmup_steps if cfg.optim.warmup_steps is not None
                              else cfg.optim.warmup_epochs * steps_per_epoch, total_steps, log=log,
                              key="optim.warmup_steps" if cfg.optim.warmup_steps is not None else "optim.warmup_epochs")
    effective_batch = batch * accum * info.world_size
    peak_lr = cfg.optim.lr if cfg.optim.lr is not None else scaled_lr(cfg.optim.base_lr, effective_batch)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=peak_lr,
                                  betas=cfg.optim.betas)
    # The teacher stays outside DDP: it has no gradients to synchronise.
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if info.world_size > 1 else None
    net: torch.nn.Module = ddp if ddp is not None else model
    if cfg.run.compile:
        net = torch.compile(net)

    # one registry of bad files per run: warned once each (rank 0), the same on every rank after
    # each check point, listed in bad_images.txt; a resumed run starts from its checkpoint's list
    bad_files = BadFiles(max_fraction=cfg.data.max_bad_fraction, folder=run_dir if info.is_main else None,
                         verbose=info.is_main)
    bad_files.total = num_images

    def train_step(batch: tuple[torch.Tensor, Any], *, step: int, micro: int) -> torch.Tensor:
        images = to_device(batch[0], device, img_size=img_size)  # uint8 → normalised float32 there
        noise = mask_noise(cfg.run.seed, step, micro, (images.shape[0], model.num_patches),
                           rank=info.rank, world_size=info.world_size, accum_steps=accum, device=device)
        return step_fn(images, noise=noise, net=net, check_values=device.type == "cpu").loss

    def set_precision(dtype: torch.dtype | None) -> None:
        step_fn.amp_dtype = dtype

    # --- the loop and its hooks ----------------------------------------------------------------
    identity = {"model": spec.name, "variant": "/".join((spec.target, spec.decoder, spec.masking))}
    last_step = total_steps if cfg.run.max_steps is None else min(total_steps, cfg.run.max_steps)
    recovery = RecoveryHook(cfg.recover, cfg.debug, run_dir=run_dir, precision=precision, info=info,
                            fix="Lower optim.lr or base_lr, set optim.clip_grad=1.0, or use run.precision=bf16/fp32; "
                                "then resume from the last checkpoint.")
    hooks: list[Hook] = [BadFilesHook(bad_files, seen=lambda loop: loop.meter.seen * info.world_size), recovery,
                         Preemption.of_run(cfg.run, run_dir)]
    if cfg.monitor.every and info.is_main:
        knn = _knn_monitor(cfg, img_size, device, bad_files)

        def monitor(loop: Loop) -> None:
            acc = knn(model.encoder)
            loop.metrics.log(loop.step, knn_acc=acc)
            log.info("step %d: kNN %s accuracy %.3f", loop.step, cfg.monitor.label, acc)
        hooks.append(Periodic(monitor, every=cfg.monitor.every))
    checkpoints = Checkpoints(run_dir, "pretrain", to_dict(cfg), identity, every=cfg.run.ckpt_every,
                              keep_last=cfg.run.keep_last, keep_every=cfg.run.milestone_every,
                              extra=lambda: {"spec": asdict(spec), "variant": [spec.target, spec.decoder, spec.masking]})
    loop = Loop(info=info, model=model, optimizer=optimizer, train_step=train_step, ddp=ddp,
                data=EpochLoader(bad_files.track(loader, check=False), set_epoch, steps_per_epoch),
                schedule=lambda s: warmup_cosine(s, total=total_steps, warmup=warmup_steps, peak=peak_lr,
                                                 final=cfg.optim.min_lr),
                total_steps=total_steps, last_step=last_step, checkpoints=checkpoints,
                accum_steps=accum, clip_grad=cfg.optim.clip_grad, precision=precision, batch_size=batch,
                log_every=cfg.run.log_every, hooks=hooks, on_precision=set_precision, desc="pretrain",
                log_epoch=True)

    found = _find_resume(cfg.run.resume, run_dir, info)
    if found is not None:
        path, state = found
        check_resumable(path, state, kind="pretrain", identity=identity, expected=model.state_dict(),
                        needs=("optimizer", "scaler"),
                        fix=f"Use a new run.out_dir, or run.resume=none to start over in {cfg.run.out_dir} "
                            "(its checkpoints would be pruned)")
        _warn_if_batch_changed(state, cfg, world_size=info.world_size)
        loop.load_state_dict(state, path=path)
        if "bad_files" not in state:  # an older checkpoint: the folder's list
            bad_files.load(run_dir)
        if info.is_main:
            log.info("resumed from %s at step %d", path, loop.step)
            if state.get("total_steps") not in (None, total_steps):
                log.warning("the schedule now spans %d steps (the checkpoint's run: %d): from step %d the lr "
                            "follows the new warmup/cosine; use run.max_steps to pause a run without changing it",
                            total_steps, state["total_steps"], loop.step)
    if info.is_main:  # only now: a refused resume leaves the folder's config.yaml as it was
        save_config(cfg, run_dir / "config.yaml")
    if loop.step >= last_step:
        if info.is_main:
            log.info("nothing to do: %s is at step %d, the run stops at %d (optim.steps / optim.epochs / "
                     "run.max_steps); raise it to continue", run_dir, loop.step, last_step)
        distr.cleanup()
        return {"step": loop.step, "loss": float("nan"), "run_dir": str(run_dir), "bad_images": 0,
                **recovery.recovery.summary()}

    loop.open_metrics(run_dir, cfg)
    if info.is_main:
        log.info(
            "%s | %d params | teacher %s | %d images | effective batch %d (%d × accum %d × %d processes) | lr %.3g | "
            "%d steps (%d/epoch)", cfg.model.name, sum(p.numel() for p in model.parameters()),
            cfg.teacher.spec if teacher else "-", num_images, effective_batch, batch, accum, info.world_size, peak_lr,
            total_steps, steps_per_epoch,
        )
        if cfg.debug != DebugConfig():
            log.warning("debug: fault injection is on (%s)", to_dict(cfg.debug))
    loop.run()
    summary = recovery.recovery.summary()
    if info.is_main:
        log.info("done: step %d, loss %.4f, %d recovery event(s) (%d rollback(s), %d batch(es) skipped), "
                 "checkpoints in %s", loop.step, loop.last_loss, summary["events"], summary["rollbacks"],
                 summary["batches_skipped"], run_dir)
        bad_files.log_summary()
    distr.cleanup()
    return {"step": loop.step, "loss": loop.last_loss, "run_dir": str(run_dir), "bad_images": len(bad_files),
            "bad_files": list(bad_files.bad), **summary}


def _train_loader(cfg: PretrainConfig, info: distr.DistInfo, transform: Any):
    """The training DataLoader and how to start an epoch at a given batch.

    Returns (loader, set_epoch(epoch, start_batch), images per rank per epoch, dataset size).
    """
    batch, accum = cfg.optim.batch_size, cfg.optim.accum_steps
    pin = info.device.type == "cuda"
    # Workers, prefetching and pinning change when a batch is ready, never which batch or crop it is: the
    # sampler / stream fixes the order and each sample's seed (exact resume). persistent_workers stays off:
    # set_epoch must reach the workers' copies of the dataset at every iter(loader).
    workers = loader_workers(cfg.data.num_workers)
    extra: dict[str, Any] = {"prefetch_factor": cfg.data.prefetch_factor} if workers > 0 else {}
    # the bad files each sample passed over travel with the batch (milan.data.reading.collate)
    extra["collate_fn"] = collate
    if isinstance(transform, CudaJpegPlan):  # records, not tensors: stacked on the GPU (to_device)
        extra["collate_fn"] = collate_plans
    if cfg.data.kind == "webdataset":
        if not cfg.data.path:
            raise ConfigError("data.path is required for data.kind=webdataset (e.g. /data/train-{000000..000999}.tar)")
        num_images = cfg.data.num_samples or count_samples(cfg.data.path)
        per_rank = (num_images // info.world_size) // (batch * accum) * (batch * accum)
        if per_rank == 0:
            raise DataError(f"{num_images} images are too few for batch_size={batch} × accum_steps={accum} "
                            f"× {info.world_size} process(es) = {batch * accum * info.world_size} images per step; "
                            "lower the batch size or add data")
        stream = ShardStream(cfg.data.path, transform=transform, rank=info.rank, world_size=info.world_size,
                             seed=cfg.run.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                             min_size=cfg.data.min_size, samples_per_rank=per_rank, batch_size=batch,
                             exif_transpose=cfg.data.exif_transpose)
        stream.check_workers(workers)
        loader = DataLoader(stream, batch_size=batch, num_workers=workers, pin_memory=pin,
                            drop_last=True, persistent_workers=False, **extra)
        return loader, lambda epoch, start: stream.set_epoch(epoch, skip=start * batch), per_rank, num_images

    dataset = build_dataset(cfg.data.kind, cfg.data.path, split="train", transform=transform,
                            min_size=cfg.data.min_size, exif_transpose=cfg.data.exif_transpose)
    sampler = EpochSampler(len(dataset), rank=info.rank, world_size=info.world_size,
                           seed=cfg.run.seed, batch_size=batch, accum_steps=accum)
    loader = DataLoader(Samples(dataset, seed=cfg.run.seed), batch_size=batch, sampler=sampler,
                        num_workers=workers, pin_memory=pin, drop_last=True,
                        persistent_workers=False, **extra)
    return (loader, lambda epoch, start: sampler.set_epoch(epoch, start_batch=start, batch_size=batch),
            sampler.per_rank, len(dataset))


def _find_resume(resume: str, run_dir: Path, info: distr.DistInfo) -> tuple[Path, dict[str, Any]] | None:
    """run.resume: auto (the newest readable checkpoint in run_dir), none, or a path. Rank 0 chooses
    and every rank loads that file (ranks must not disagree on where they start)."""
    if resume == "none":
        return None
    if resume == "auto":
        return agree_on_checkpoint(lambda: latest_checkpoint(run_dir), info)
    step = checkpoint_step(resume)
    newer = [p for p in step_checkpoints(run_dir) if p.resolve() != Path(resume).resolve()
             and checkpoint_step(p) > (-1 if step is None else step)]
    if newer:
        raise CheckpointError(f"run.resume={resume} is older than {newer[-1].name} in {run_dir}; resuming it "
                              "there would mix two runs' checkpoints and logs. Use a new run.out_dir (or delete "
                              "the newer checkpoints)")
    return agree_on_checkpoint(lambda: (Path(resume), load_checkpoint(resume)), info)


def _warn_if_batch_changed(state: dict[str, Any], cfg: PretrainConfig, *, world_size: int) -> None:
    optim = state.get("config", {}).get("optim", {})
    before = optim.get("batch_size", cfg.optim.batch_size) * optim.get("accum_steps", cfg.optim.accum_steps) \
        * state.get("world_size", world_size)
    now = cfg.optim.batch_size * cfg.optim.accum_steps * world_size
    if before != now and distr.is_main():
        get_logger().warning("resuming with effective batch %d (the checkpoint used %d): steps continue from "
                             "the checkpoint, but the data order and schedule no longer match one "
                             "uninterrupted run", now, before)


def _knn_monitor(full: PretrainConfig, img_size: int, device: torch.device, run_files: BadFiles):
    """Returns encoder → weighted-kNN top-1 on the held-out set (mean-pooled patch tokens).

    For shapes the sets default to the training data's own train/val splits.
    """
    tf = eval_transform(img_size, crop_pct=1.0)
    cfg = full.monitor
    paths = {"train": cfg.train_path, "val": cfg.val_path}
    if cfg.kind == "shapes" and full.data.kind == "shapes":
        paths = {split: path or full.data.path for split, path in paths.items()}
    if cfg.kind == "imagefolder" and not paths["train"]:
        raise ConfigError("monitor.every > 0 needs monitor.train_path (a labelled ImageFolder; monitor.val_path "
                          "for separate query images, else a part is held out)")
    # never queries that are also references: a separate val folder, or a held-out part (milan.data.split)
    parts = eval_sets(cfg.kind, paths["train"], val_path=paths["val"], val_fraction=cfg.val_fraction,
                      train_transform=tf, val_transform=tf, label=cfg.label,
                      exif_transpose=full.data.exif_transpose, key="monitor.val_fraction")
    sets = {"train": parts.train, "val": parts.val}
    # the monitor's own registry (its own threshold), listed in the run's bad_images.txt
    bad_files = BadFiles(max_fraction=full.data.max_bad_fraction, key="data.max_bad_fraction (kNN monitor sets)")
    bad_files.total = sum(min(len(sets[s]), limit) for s, limit in (("train", cfg.train_size), ("val", cfg.val_size)))
    run_files.attach(bad_files)

    def evaluate(encoder: torch.nn.Module) -> float:
        was_training = encoder.training
        encoder.eval()

        def encode(x: torch.Tensor) -> torch.Tensor:
            return encoder(x)[:, 1:].mean(1)
        xtr, ytr = extract_features(encode, sets["train"], device=device, limit=cfg.train_size,
                                    bad_files=bad_files)
        xte, yte = extract_features(encode, sets["val"], device=device, limit=cfg.val_size, bad_files=bad_files)
        encoder.train(was_training)
        return knn_accuracy(xtr, ytr, xte, yte)

    return evaluate


CONFIG = PretrainConfig
