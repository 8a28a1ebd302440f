"""`milan bench speed`: how fast one pretraining step runs, where the time goes, and MFU.

For a named preset and batch size, on CPU or CUDA (same command), it times the full step of
`milan pretrain` on a fixed synthetic batch (data loading excluded):

    teacher ─► masking ─► forward (encoder + decoder + loss) ─► backward ─► optimizer (AdamW)

and reports images/s, the time of each phase, peak memory, the FLOPs of one step counted with
`torch.utils.flop_counter.FlopCounterMode`, and the achieved FLOP/s as a fraction of the matmul
peak measured in the same run on the same device and dtype (MFU).

Side by side (`--compare`, the default), on the same encoder:
  mae                MAE baseline: pixel target, MAE decoder, random masking, no teacher (Table 5 #1)
  milan              MILAN: CLIP target, prompting decoder, semantic masking (Table 5 #8)
  milan_mae_decoder  MILAN with MAE's decoder (Table 5 #6): the full step, so that the difference
                     to `milan` is the decoder's cost and nothing else (same teacher, masking,
                     encoder and loss); the decoder's forward FLOPs are also reported alone
  teacher            the teacher's forward with cls_attn (milan's `Teacher`) against the library's
                     plain forward of all tokens (final norm + projection) without cls_attn

How it counts (decisions a reader of the numbers should know):
- Time: CUDA events on the current stream (nothing synchronises inside the timed steps), or
  `time.perf_counter` on CPU. images/s = batch / mean step time.
- FLOPs: matmuls, convolutions and attention, as FlopCounterMode counts them (norms, GELU,
  softmax and the optimizer's element-wise work are not counted, as usual). Counted on a sub-batch
  of at most 8 images and scaled to the batch (every counted op is linear in the batch). While
  counting, attention runs on the math SDPA backend and nn.MultiheadAttention's fast path is off:
  FlopCounterMode counts neither the fused CPU SDPA kernel nor `_native_multi_head_attention`
  (open_clip's blocks in eval mode), so without this the attention (and, in the teacher, the
  whole attention block) would silently count as zero FLOPs. Timing uses the normal kernels.
- Peak: the best 2·n³ / t of a few `n × n` matmuls of several sizes in the run's dtype.
- Memory: on CUDA `torch.cuda.max_memory_allocated`, reset before each variant. On CPU the
  process's peak resident set (VmHWM, reset before each variant through /proc/self/clear_refs;
  where that is impossible, `ru_maxrss`, the peak of the whole process so far): it includes
  Python, the libraries and everything resident, so read it as an upper bound.
- The teacher's weights use the run's precision (bf16 on GPU, as `milan pretrain` by default).

    milan bench speed --quick                                       # seconds, tiny model
    milan bench speed --model milan_vit_shapes_patch8 --batch-size 128 --steps 5
    milan bench speed --batch-size 256 --compile --out bench.json   # ViT-B on a GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from milan.errors import ConfigError
from milan.model import MaskedAutoencoder, ModelSpec, build_model
from milan.pretraining import MILAN
from milan.recipes.pretrain import param_groups
from milan.teacher import (
    EvaTeacher,
    OpenCLIPTeacher,
    SiglipTeacher,
    Teacher,
    TimmTeacher,
    build_teacher,
)
from milan.teacher.openclip import openclip_tower_teacher
from milan.tools.bench.flops import count_flops
from milan.tools.bench.report import (
    PHASES,
    command_line,
    comparisons,
    format_markdown,
    summarise_variant,
)
from milan.tools.bench.timing import (
    MEMORY_LABELS,
    Clock,
    machine_info,
    matmul_peak,
    peak_memory_mib,
    reset_peak_memory,
)
from milan.train.run import AMP_DTYPES, resolve_precision

__all__ = ["add_arguments", "run_from_args", "run", "BenchSettings", "PHASES", "matmul_peak"]

QUICK_MODEL = "milan_vit_shapes_patch8"
FLOP_COUNT_BATCH = 8  # FLOPs are counted on this many images and scaled to the batch


@dataclass(frozen=True)
class BenchSettings:
    """What one `milan bench speed` run measures (all defaults resolved)."""

    model: str = "milan_vit_base_patch16"
    teacher: str = "auto"
    teacher_weights: str | None = None
    batch_size: int = 64
    steps: int = 10
    warmup: int = 3
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    threads: int = 0
    mask_ratio: float = 0.75
    compare: bool = True
    seed: int = 0
    quick: bool = False
    out: str | None = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="build_model name (default milan_vit_base_patch16; "
                   f"{QUICK_MODEL} is the CPU-sized one)")
    p.add_argument("--teacher", default="auto",
                   help="auto (random-weight open_clip ViT-B-16 for 224 px presets, builtin:shapes for "
                        "the shapes preset), random:<open_clip arch>, or any build_teacher spec")
    p.add_argument("--teacher-weights", help="weights file for openclip:/timm: teacher specs")
    p.add_argument("--batch-size", type=int, help="images per step (default 64; 4 with --quick)")
    p.add_argument("--steps", type=int, help="timed steps per variant (default 10; 2 with --quick)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3; 1 with --quick)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the student")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                   help="run MAE, MILAN, MILAN with MAE's decoder and the teacher comparison side "
                        "by side (--no-compare: only --model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_MODEL}, batch 4, 2 steps, small matmul peak (smoke test)")
    p.add_argument("--out", type=Path, help="also write the results as JSON here")


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    quick = bool(args.quick)
    settings = BenchSettings(
        model=args.model or (QUICK_MODEL if quick else BenchSettings.model),
        teacher=args.teacher,
        teacher_weights=args.teacher_weights,
        batch_size=args.batch_size or (4 if quick else BenchSettings.batch_size),
        steps=args.steps or (2 if quick else BenchSettings.steps),
        # Compilation happens in the first two steps (forward, then backward graphs).
        warmup=args.warmup if args.warmup is not None else (
            (2 if args.compile else 1) if quick else BenchSettings.warmup),
        device=args.device,
        precision=args.precision,
        compile=args.compile,
        threads=args.threads,
        mask_ratio=args.mask_ratio,
        compare=args.compare,
        seed=args.seed,
        quick=quick,
        out=str(args.out) if args.out else None,
    )
    return run(settings)


# --------------------------------------------------------------------------------------------
# Teachers
# --------------------------------------------------------------------------------------------


def _teacher_spec(settings: BenchSettings) -> str:
    if settings.teacher != "auto":
        return settings.teacher
    return "builtin:shapes" if ModelSpec.resolve(settings.model).encoder.img_size == 64 else "random:ViT-B-16"


def _build_teacher(spec: str, settings: BenchSettings, *, dtype: torch.dtype,
                   device: torch.device, student_patch_size: int) -> Teacher:
    kind, _, arch = spec.partition(":")
    if kind == "random":  # the real architecture with random weights: same cost, no download
        # lazy: open_clip is heavy and only needed to build an open_clip model
        import open_clip

        # open_clip warns that the model is randomly initialised: here that is the point.
        quiet = lambda record: "No pretrained weights loaded" not in record.getMessage()
        logging.root.addFilter(quiet)
        try:
            visual = open_clip.create_model(arch, pretrained=None).visual
        finally:
            logging.root.removeFilter(quiet)
        teacher: Teacher = openclip_tower_teacher(arch, visual, student_patch_size=student_patch_size)
        teacher.backbone.to(dtype=dtype)
    else:
        teacher = build_teacher(spec, weights=settings.teacher_weights, dtype=dtype,
                                student_patch_size=student_patch_size)
    return teacher.to(device)


def _library_forward(teacher: Teacher) -> tuple[Callable[[Tensor], Tensor], str] | str:
    """The library's own forward of the teacher's tower without the importance signal, and what it
    computes; or why there is none to compare with.

    Same input handling as `Teacher.forward` (re-normalise, resize, cast), so the difference to
    the teacher is the importance computation (and, for CLIP, the block-by-block loop):
    - open_clip CLIP: embed + transformer + ln_post + proj on all tokens, at the grid the position
      embedding was trained for (its forward does not interpolate);
    - timm (CLIP ViT, EVA-CLIP): `forward_features` + head on all tokens;
    - timm SigLIP: `forward_features` + the attention-pool head (the pooled embedding only: the
      library has no per-patch output to compare with).
    """
    if isinstance(teacher, OpenCLIPTeacher):
        visual = teacher.backbone
        grid = tuple(visual.grid_size)

        def tower(x: Tensor) -> Tensor:
            x = visual.ln_post(visual.transformer(visual._embeds(x)))  # [B, 1+N, D]
            return x @ visual.proj if visual.proj is not None else x  # [B, 1+N, Dt]
        what = "open_clip forward: ln_post + proj on all tokens, no cls_attn"
    elif isinstance(teacher, SiglipTeacher):
        trunk, head = teacher.backbone["trunk"], teacher.backbone["head"]
        grid = None

        def tower(x: Tensor) -> Tensor:
            return head(trunk.forward_head(trunk.forward_features(x)))  # [B, Dt] pooled
        what = "timm forward: features + attention-pool head (pooled only), no importance"
    elif isinstance(teacher, EvaTeacher | TimmTeacher):
        trunk = teacher.backbone["trunk"] if isinstance(teacher, EvaTeacher) else teacher.backbone
        head = teacher.backbone["head"] if isinstance(teacher, EvaTeacher) else torch.nn.Identity()
        grid = None

        def tower(x: Tensor) -> Tensor:
            return head(trunk.head(trunk.fc_norm(trunk.forward_features(x))))  # [B, prefix+N, Dt]
        what = "timm forward: features + head on all tokens, no cls_attn"
    else:
        return f"no library forward to compare a {type(teacher).__name__} with"

    @torch.no_grad()
    def forward(images: Tensor) -> Tensor:
        x = images.float() * teacher.in_scale + teacher.in_shift  # [B, 3, H, W]
        size = teacher.input_size(*x.shape[-2:])
        if size != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        if grid is not None and tuple(s // teacher.patch_size for s in size) != grid:
            raise ValueError(f"the library's forward cannot run this grid (trained for {grid})")
        return tower(x.to(teacher.dtype)).float()

    return forward, what


# --------------------------------------------------------------------------------------------
# One pretraining step, as `milan pretrain` runs it
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VariantSpec:
    key: str
    label: str
    spec: ModelSpec


@dataclass
class _Step:
    """`milan pretrain`'s step (the same `MILAN` object) plus backward and AdamW, with a clock mark
    between phases."""

    step: MILAN  # its model is the eager one, for counting
    net: nn.Module  # what runs the student (compiled or the model itself)
    optimizer: torch.optim.Optimizer
    generator: torch.Generator

    @property
    def model(self) -> MaskedAutoencoder:
        return self.step.model

    def __call__(self, images: Tensor, clock: Clock | None, *, noise: Tensor | None = None) -> Tensor:
        mark = clock.mark if clock is not None else lambda: None
        check = images.device.type == "cpu"  # no host sync on GPU, as in the recipe
        mark()
        teacher_out = self.step.teach(images)
        mark()
        mask = self.step.sample_mask(images, teacher_out, noise=noise, generator=self.generator,
                                     check_values=check)
        mark()
        loss = self.step.forward(images, mask, teacher_out, net=self.net).loss
        mark()
        loss.backward()
        mark()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        mark()
        return loss.detach()

    def count_flops(self, images: Tensor) -> dict[str, int]:
        """FLOPs of teacher forward, student forward and backward on `images` (eager model)."""
        teacher_flops, _, teacher_out = count_flops(lambda: self.step.teach(images))
        mask = self.step.sample_mask(images, teacher_out, generator=self.generator)
        forward_flops, counter, out = count_flops(lambda: self.step.forward(images, mask, teacher_out))
        backward_flops, _, _ = count_flops(out.loss.backward)
        self.optimizer.zero_grad(set_to_none=True)
        by_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
        root = type(self.model).__name__
        return {
            "teacher": teacher_flops, "forward": forward_flops, "backward": backward_flops,
            "total": teacher_flops + forward_flops + backward_flops,
            "encoder_forward": by_module.get(f"{root}.encoder", 0),
            "decoder_forward": by_module.get(f"{root}.decoder", 0),
        }


def build_bench_step(spec: ModelSpec, teacher: Teacher | None, *, batch_size: int, device: torch.device,
                     amp_dtype: torch.dtype | None = None, compile: bool = False, seed: int = 0) -> _Step:
    """A fresh student of `spec` with the recipe's AdamW groups, wrapped for timing."""
    torch.manual_seed(seed)
    model = build_model(spec, target_dim=teacher.dim if teacher is not None else None).to(device)
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), betas=(0.9, 0.95), lr=1.5e-4 * batch_size / 256)
    net = torch.compile(model) if compile else model
    return _Step(MILAN(model, teacher=teacher if spec.needs_teacher else None, amp_dtype=amp_dtype), net,
                 optimizer, torch.Generator(device=device).manual_seed(seed))


def _variants(settings: BenchSettings) -> list[VariantSpec]:
    spec = ModelSpec.resolve(settings.model, mask_ratio=settings.mask_ratio)
    if not settings.compare:
        return [VariantSpec(spec.name.partition("_")[0], spec.name, spec)]
    # MAE first: it needs no teacher, so its peak memory is measured before the teacher exists.
    preset, ratio = spec.preset, settings.mask_ratio
    return [
        VariantSpec("mae", "MAE (pixel · MAE dec · random)", ModelSpec.resolve(f"mae_{preset}", mask_ratio=ratio)),
        VariantSpec("milan", "MILAN (clip · prompting · semantic)",
                     ModelSpec.resolve(f"milan_{preset}", mask_ratio=ratio)),
        VariantSpec("milan_mae_decoder", "MILAN w/ MAE dec (clip · MAE dec · semantic)",
                     ModelSpec.resolve(f"milan_{preset}", decoder="mae", mask_ratio=ratio)),
    ]


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def run(settings: BenchSettings) -> dict[str, Any]:
    """Measure, print a markdown report, write JSON to `settings.out`; returns the results."""
    config = ModelSpec.resolve(settings.model, mask_ratio=settings.mask_ratio).encoder  # names a bad --model
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    device = torch.device(
        settings.device if settings.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but torch sees no CUDA device; use --device cpu")
    precision = resolve_precision(settings.precision, device, key="--precision")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    autocast_dtype = AMP_DTYPES[precision]
    if settings.compile and settings.warmup < 2:
        raise ConfigError("--compile needs --warmup 2 or more (compilation happens in the first steps)")
    machine = machine_info(device)  # before measuring: the load average is then other jobs' only
    torch.manual_seed(settings.seed)
    images = torch.randn(settings.batch_size, 3, config.img_size, config.img_size, device=device)
    count_images = images[:FLOP_COUNT_BATCH]
    flop_scale = settings.batch_size / count_images.shape[0]
    start = time.perf_counter()
    log = lambda msg: print(f"[bench {time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr,
                            flush=True)

    # --- the matmul peak, the denominator of MFU ----------------------------------------------
    if device.type == "cuda":
        sizes, repeats = ((2048,), 5) if settings.quick else ((4096, 8192, 16384), 10)
    else:
        sizes, repeats = ((1024,), 3) if settings.quick else ((1024, 2048, 4096), 3)
    log(f"matmul peak: {'/'.join(map(str, sizes))}² {precision} on {device.type}")
    peak = matmul_peak(device, dtype, sizes, repeats)

    spec = _teacher_spec(settings)
    teacher: Teacher | None = None

    def get_teacher() -> Teacher:
        nonlocal teacher
        if teacher is None:
            log(f"teacher: {spec} ({precision})")
            teacher = _build_teacher(spec, settings, dtype=dtype, device=device,
                                     student_patch_size=config.patch_size)
        return teacher

    # --- full steps, one variant at a time ----------------------------------------------------
    variants: dict[str, dict[str, Any]] = {}
    memory_kind = ""
    for vspec in _variants(settings):
        v = vspec.spec
        log(f"variant {vspec.key}: {v.name} ({v.target} target, {v.decoder} decoder, {v.masking} masking)")
        needs_teacher = v.needs_teacher
        step = build_bench_step(v, get_teacher() if needs_teacher else None, batch_size=settings.batch_size,
                                device=device, amp_dtype=autocast_dtype, compile=settings.compile,
                                seed=settings.seed)
        model = step.model
        flops = {k: round(v * flop_scale) for k, v in step.count_flops(count_images).items()}

        memory_kind = reset_peak_memory(device)
        for _ in range(settings.warmup):
            step(images, None)
        clocks, loss = [], None
        for _ in range(settings.steps):
            clock = Clock(device)
            loss = step(images, clock)
            clocks.append(clock)
        spans = [clock.spans_ms() for clock in clocks]  # [steps][phase]
        peak_mib = peak_memory_mib(device, memory_kind)
        assert loss is not None
        variants[vspec.key] = summarise_variant(
            vspec, model, spans, flops, settings.batch_size, peak["flops_per_s"], peak_mib,
            float(loss), needs_teacher,
        )
        del step, model
        reset_peak_memory(device)

    # --- teacher forward: with cls_attn (milan) vs the library's plain forward ---------------
    teacher_cmp: dict[str, Any] | None = None
    if settings.compare:
        teacher_cmp = _bench_teacher(get_teacher(), images, count_images, flop_scale, settings,
                                     device, peak["flops_per_s"])

    result = {
        "command": command_line(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "settings": {**asdict(settings), "device": device.type, "precision": precision,
                     "teacher": spec, "img_size": config.img_size, "patch_size": config.patch_size,
                     "num_patches": (config.img_size // config.patch_size) ** 2,
                     "flops_counted_on_images": int(count_images.shape[0])},
        "peak": peak,
        "memory_kind": memory_kind,
        "memory_label": MEMORY_LABELS[memory_kind],
        "phases": list(PHASES),
        "variants": variants,
        "teacher_forward": teacher_cmp,
        "comparisons": comparisons(variants, teacher_cmp),
        "notes": [
            "synthetic images already on the device: data loading is not included",
            "FLOPs: matmul/conv/attention only (FlopCounterMode); optimizer and element-wise ops "
            "are not counted; attention counted via the math SDPA backend with the MHA fast "
            "path off",
            "mfu = achieved FLOP/s (counted step FLOPs / mean step time) / matmul peak",
        ],
    }
    print(format_markdown(result))
    if settings.out:
        out = Path(settings.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {out}")
    return result


def _bench_teacher(
    teacher: Teacher, images: Tensor, count_images: Tensor, flop_scale: float,
    settings: BenchSettings, device: torch.device, peak_flops: float,
) -> dict[str, Any]:
    found = _library_forward(teacher)
    if isinstance(found, str):
        return {"skipped": found}
    plain, what = found
    if isinstance(teacher, OpenCLIPTeacher):
        grid = tuple(s // teacher.patch_size for s in teacher.input_size(*images.shape[-2:]))
        if grid != tuple(teacher.backbone.grid_size):
            return {"skipped": f"the library's forward cannot run a {grid} grid (trained for "
                               f"{tuple(teacher.backbone.grid_size)}) without interpolation"}
    fns: dict[str, Callable[[Tensor], Any]] = {"with_cls_attn": teacher, "plain": plain}
    labels = {"with_cls_attn": f"milan {type(teacher).__name__}: all-token targets + importance",
              "plain": what}
    flops = {name: round(count_flops(lambda fn=fn: fn(count_images))[0] * flop_scale)
             for name, fn in fns.items()}
    with torch.no_grad():
        for _ in range(max(1, settings.warmup)):
            for fn in fns.values():
                fn(images)
        clocks: dict[str, list[Clock]] = {name: [] for name in fns}
        for _ in range(settings.steps):  # interleaved: load on a shared machine hits both alike
            for name, fn in fns.items():
                clock = Clock(device)
                clock.mark()
                fn(images)
                clock.mark()
                clocks[name].append(clock)
    out: dict[str, Any] = {"teacher_dtype": str(teacher.dtype).removeprefix("torch.")}
    for name in fns:
        times = [c.spans_ms()[0] for c in clocks[name]]
        mean_ms = statistics.fmean(times)
        achieved = flops[name] / (mean_ms / 1e3)
        out[name] = {
            "label": labels[name], "ms": mean_ms, "ms_median": statistics.median(times),
            "images_per_s": images.shape[0] / (mean_ms / 1e3), "flops": flops[name],
            "achieved_flops_per_s": achieved, "mfu": achieved / peak_flops,
        }
    out["cls_attn_overhead"] = out["with_cls_attn"]["ms"] / out["plain"]["ms"] - 1
    return out


