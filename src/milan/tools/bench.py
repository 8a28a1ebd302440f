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
import contextlib
import ctypes
import gc
import json
import logging
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import milan
from milan.encoder import ENCODER_PRESETS
from milan.masking import Mask, random_masking, semantic_masking
from milan.model import KD_BASELINE, TABLE5, MaskedAutoencoder, build_model
from milan.recipes.pretrain import param_groups
from milan.teacher import OpenCLIPTeacher, Teacher, build_teacher

__all__ = ["add_arguments", "run_from_args", "run", "BenchSettings", "PHASES", "matmul_peak"]

PHASES = ("teacher", "masking", "forward", "backward", "optimizer")
QUICK_MODEL = "milan_vit_shapes_patch8"
FLOP_COUNT_BATCH = 8  # FLOPs are counted on this many images and scaled to the batch
# What `build_model` makes of a name's prefix (decoder overrides never change target or masking).
_PREFIX_VARIANTS = {"milan": TABLE5[8], "mae": TABLE5[1], "kd": KD_BASELINE}


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
# Measuring
# --------------------------------------------------------------------------------------------


class _Clock:
    """Marks on the host clock (CPU) or CUDA events on the current stream (read after a sync)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def spans_ms(self) -> list[float]:
        """Milliseconds between consecutive marks."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


@contextlib.contextmanager
def _countable_attention() -> Iterator[None]:
    """Attention as plain bmm's, which FlopCounterMode counts (see the module docstring)."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _count(fn: Callable[[], Any]) -> tuple[int, FlopCounterMode, Any]:
    with _countable_attention(), FlopCounterMode(display=False) as counter:
        result = fn()
    return counter.get_total_flops(), counter, result


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes: Sequence[int], repeats: int) -> dict[str, Any]:
    """Best FLOP/s over `repeats` `n × n` matmuls for each n in `sizes`: the denominator of MFU.

    Several sizes, because a CPU's BLAS can run one size well below its best (on our 2-core
    machine 2048² reached less than ViT-B's own GEMMs did); the largest rate found is the peak.
    """
    per_size = {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(2 if device.type == "cuda" else 1):
            a @ b
        times = []
        for _ in range(repeats):
            clock = _Clock(device)
            clock.mark()
            a @ b
            clock.mark()
            times.append(clock.spans_ms()[0])
        per_size[n] = 2 * n**3 / (min(times) / 1e3)
        del a, b
    n = max(per_size, key=per_size.__getitem__)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "repeats": repeats,
            "flops_per_s": per_size[n], "per_size": {str(k): v for k, v in per_size.items()}}


def _reset_peak_memory(device: torch.device) -> str:
    """Start a new peak; returns how the peak is measured."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda_max_memory_allocated"
    with contextlib.suppress(OSError, AttributeError):  # glibc: give freed heap back to the OS
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return "cpu_peak_rss_vmhwm"
    except OSError:
        return "cpu_max_rss_process"


def _peak_memory_mib(device: torch.device, kind: str) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if kind == "cpu_peak_rss_vmhwm":
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


MEMORY_LABELS = {
    "cuda_max_memory_allocated": "CUDA max_memory_allocated (reset before each variant)",
    "cpu_peak_rss_vmhwm": "CPU process peak RSS (VmHWM, reset before each variant; includes "
                          "Python, libraries and everything resident: an upper bound)",
    "cpu_max_rss_process": "CPU process max RSS (ru_maxrss: peak of the whole process so far, "
                           "not per variant)",
}


# --------------------------------------------------------------------------------------------
# Teachers
# --------------------------------------------------------------------------------------------


def _teacher_spec(settings: BenchSettings) -> str:
    if settings.teacher != "auto":
        return settings.teacher
    preset = ENCODER_PRESETS[settings.model.partition("_")[2]]
    return "builtin:shapes" if preset.img_size == 64 else "random:ViT-B-16"


def _build_teacher(spec: str, settings: BenchSettings, *, dtype: torch.dtype,
                   device: torch.device, student_patch_size: int) -> Teacher:
    kind, _, arch = spec.partition(":")
    if kind == "random":  # the real architecture with random weights: same cost, no download
        import open_clip

        # open_clip warns that the model is randomly initialised: here that is the point.
        quiet = lambda record: "No pretrained weights loaded" not in record.getMessage()
        logging.root.addFilter(quiet)
        try:
            visual = open_clip.create_model(arch, pretrained=None).visual
        finally:
            logging.root.removeFilter(quiet)
        teacher: Teacher = OpenCLIPTeacher(visual, student_patch_size=student_patch_size)
        teacher.backbone.to(dtype=dtype)
    else:
        teacher = build_teacher(spec, weights=settings.teacher_weights, dtype=dtype,
                                student_patch_size=student_patch_size)
    return teacher.to(device)


def _library_tokens(teacher: OpenCLIPTeacher) -> Callable[[Tensor], Tensor]:
    """open_clip's own embed + transformer + ln_post + proj on all tokens, no cls_attn.

    Same input handling as `Teacher.forward` (re-normalise, resize, cast), so the difference to
    the teacher is the CLS-row attention and the block-by-block loop. Only for the grid the
    position embedding was trained for (the library's forward does not interpolate it).
    """
    visual = teacher.backbone

    @torch.no_grad()
    def forward(images: Tensor) -> Tensor:
        x = images.float() * teacher.in_scale + teacher.in_shift  # [B, 3, H, W]
        size = teacher.input_size(*x.shape[-2:])
        if size != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        x = visual.transformer(visual._embeds(x.to(teacher.dtype)))  # [B, 1+N, D]
        x = visual.ln_post(x)
        return (x @ visual.proj if visual.proj is not None else x).float()  # [B, 1+N, Dt]

    return forward


# --------------------------------------------------------------------------------------------
# One pretraining step, as `milan pretrain` runs it
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _VariantSpec:
    key: str
    label: str
    model: str  # build_model name
    decoder: str | None = None  # override of the name's default


@dataclass
class _Step:
    model: MaskedAutoencoder  # eager, for counting
    net: nn.Module  # what runs (compiled or the model itself)
    optimizer: torch.optim.Optimizer
    teacher: Teacher | None
    mask_ratio: float
    autocast_dtype: torch.dtype | None
    generator: torch.Generator

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def teacher_out(self, images: Tensor) -> tuple[Tensor | None, Tensor | None]:
        if self.teacher is None:
            return None, None
        out = self.teacher(images)  # no_grad inside; outside autocast, as in the recipe
        return out.tokens, out.cls_attn  # [B, 1+N, Dt], [B, N]

    def mask(self, images: Tensor, cls_attn: Tensor | None) -> Mask:
        batch, num_patches = images.shape[0], self.model.num_patches
        noise = torch.rand(batch, num_patches, generator=self.generator, device=images.device)
        if self.model.variant.masking == "semantic":
            assert cls_attn is not None
            return semantic_masking(cls_attn, self.mask_ratio, noise=noise,
                                    check_values=images.device.type == "cpu")
        return random_masking(batch, num_patches, self.mask_ratio, noise=noise)

    def __call__(self, images: Tensor, clock: _Clock | None) -> Tensor:
        mark = clock.mark if clock is not None else lambda: None
        mark()
        targets, cls_attn = self.teacher_out(images)
        mark()
        mask = self.mask(images, cls_attn)
        mark()
        with self._autocast(images.device):
            loss = self.net(images, mask, targets).loss
        mark()
        loss.backward()
        mark()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        mark()
        return loss.detach()

    def count_flops(self, images: Tensor) -> dict[str, int]:
        """FLOPs of teacher forward, student forward and backward on `images` (eager model)."""
        teacher_flops, _, (targets, cls_attn) = _count(lambda: self.teacher_out(images))
        mask = self.mask(images, cls_attn)
        with self._autocast(images.device):
            forward_flops, counter, out = _count(lambda: self.model(images, mask, targets))
        backward_flops, _, _ = _count(out.loss.backward)
        self.optimizer.zero_grad(set_to_none=True)
        by_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
        root = type(self.model).__name__
        return {
            "teacher": teacher_flops, "forward": forward_flops, "backward": backward_flops,
            "total": teacher_flops + forward_flops + backward_flops,
            "encoder_forward": by_module.get(f"{root}.encoder", 0),
            "decoder_forward": by_module.get(f"{root}.decoder", 0),
        }


def _variants(settings: BenchSettings) -> list[_VariantSpec]:
    preset = settings.model.partition("_")[2]
    if not settings.compare:
        return [_VariantSpec(settings.model.partition("_")[0], settings.model, settings.model)]
    # MAE first: it needs no teacher, so its peak memory is measured before the teacher exists.
    return [
        _VariantSpec("mae", "MAE (pixel · MAE dec · random)", f"mae_{preset}"),
        _VariantSpec("milan", "MILAN (clip · prompting · semantic)", f"milan_{preset}"),
        _VariantSpec("milan_mae_decoder", "MILAN w/ MAE dec (clip · MAE dec · semantic)",
                     f"milan_{preset}", decoder="mae"),
    ]


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def run(settings: BenchSettings) -> dict[str, Any]:
    """Measure, print a markdown report, write JSON to `settings.out`; returns the results."""
    prefix, _, preset = settings.model.partition("_")
    if prefix not in _PREFIX_VARIANTS or preset not in ENCODER_PRESETS:
        from milan.model import model_names

        raise SystemExit(f"milan bench speed: unknown model {settings.model!r}; choose one of: "
                         f"{', '.join(model_names())}")
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    device = torch.device(
        settings.device if settings.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("milan bench speed: --device cuda but torch sees no CUDA device; use --device cpu")
    precision = settings.precision if settings.precision != "auto" else (
        "bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    autocast_dtype = torch.bfloat16 if precision == "bf16" else None
    if settings.compile and settings.warmup < 2:
        raise SystemExit("milan bench speed: --compile needs --warmup 2 or more (compilation "
                         "happens in the first steps)")
    machine = _machine(device)  # before measuring: the load average is then other jobs' only
    config = ENCODER_PRESETS[preset]
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
        log(f"variant {vspec.key}: {vspec.model}{' decoder=' + vspec.decoder if vspec.decoder else ''}")
        default = _PREFIX_VARIANTS[vspec.model.partition("_")[0]]
        needs_teacher = default.target == "clip" or default.masking == "semantic"
        t = get_teacher() if needs_teacher else None
        torch.manual_seed(settings.seed)
        model = build_model(vspec.model, target_dim=t.dim if t is not None else None,
                            decoder=vspec.decoder).to(device)
        model.train()
        optimizer = torch.optim.AdamW(param_groups(model, 0.05), betas=(0.9, 0.95),
                                      lr=1.5e-4 * settings.batch_size / 256)
        net = torch.compile(model) if settings.compile else model
        step = _Step(model, net, optimizer, t, settings.mask_ratio, autocast_dtype,
                     torch.Generator(device=device).manual_seed(settings.seed))
        flops = {k: round(v * flop_scale) for k, v in step.count_flops(count_images).items()}

        memory_kind = _reset_peak_memory(device)
        for _ in range(settings.warmup):
            step(images, None)
        clocks, loss = [], None
        for _ in range(settings.steps):
            clock = _Clock(device)
            loss = step(images, clock)
            clocks.append(clock)
        spans = [clock.spans_ms() for clock in clocks]  # [steps][phase]
        peak_mib = _peak_memory_mib(device, memory_kind)
        assert loss is not None
        variants[vspec.key] = _summarise_variant(
            vspec, model, spans, flops, settings.batch_size, peak["flops_per_s"], peak_mib,
            float(loss), needs_teacher,
        )
        del step, net, model, optimizer
        _reset_peak_memory(device)

    # --- teacher forward: with cls_attn (milan) vs the library's plain forward ---------------
    teacher_cmp: dict[str, Any] | None = None
    if settings.compare:
        teacher_cmp = _bench_teacher(get_teacher(), images, count_images, flop_scale, settings,
                                     device, peak["flops_per_s"])

    result = {
        "command": _command_line(),
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
        "comparisons": _comparisons(variants, teacher_cmp),
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


def _summarise_variant(
    vspec: _VariantSpec, model: MaskedAutoencoder, spans: list[list[float]], flops: dict[str, int],
    batch: int, peak_flops: float, peak_mib: float, loss: float, needs_teacher: bool,
) -> dict[str, Any]:
    step_ms = [sum(s) for s in spans]
    mean_ms = statistics.fmean(step_ms)
    phases_ms = {name: statistics.fmean(s[i] for s in spans) for i, name in enumerate(PHASES)}
    achieved = flops["total"] / (mean_ms / 1e3)
    phase_flops = {"teacher": flops["teacher"], "forward": flops["forward"],
                   "backward": flops["backward"]}
    return {
        "label": vspec.label,
        "model": vspec.model,
        "variant": asdict(model.variant),
        "uses_teacher": needs_teacher,
        "params": sum(p.numel() for p in model.parameters()),
        "images_per_s": batch / (mean_ms / 1e3),
        "step_ms": mean_ms,
        "step_ms_median": statistics.median(step_ms),
        "step_ms_min": min(step_ms),
        "phases_ms": phases_ms,
        "phases_pct": {name: 100 * ms / mean_ms for name, ms in phases_ms.items()},
        "flops": flops,
        "flops_per_image": flops["total"] / batch,
        "achieved_flops_per_s": achieved,
        "mfu": achieved / peak_flops,
        "phase_mfu": {name: (f / (phases_ms[name] / 1e3)) / peak_flops if phases_ms[name] > 0 else 0.0
                      for name, f in phase_flops.items() if f > 0},
        "peak_memory_mib": peak_mib,
        "loss": loss,
    }


def _bench_teacher(
    teacher: Teacher, images: Tensor, count_images: Tensor, flop_scale: float,
    settings: BenchSettings, device: torch.device, peak_flops: float,
) -> dict[str, Any]:
    if not isinstance(teacher, OpenCLIPTeacher):
        return {"skipped": f"the plain-forward comparison needs an open_clip teacher, not "
                           f"{type(teacher).__name__}"}
    grid = tuple(s // teacher.patch_size for s in teacher.input_size(*images.shape[-2:]))
    if grid != tuple(teacher.backbone.grid_size):
        return {"skipped": f"the library's forward cannot run a {grid} grid (trained for "
                           f"{tuple(teacher.backbone.grid_size)}) without interpolation"}
    plain = _library_tokens(teacher)
    fns: dict[str, Callable[[Tensor], Any]] = {"with_cls_attn": teacher, "plain": plain}
    labels = {"with_cls_attn": "milan Teacher: all tokens + cls_attn (CLS query row)",
              "plain": "library forward: all tokens, no cls_attn"}
    flops = {name: round(_count(lambda fn=fn: fn(count_images))[0] * flop_scale)
             for name, fn in fns.items()}
    with torch.no_grad():
        for _ in range(max(1, settings.warmup)):
            for fn in fns.values():
                fn(images)
        clocks: dict[str, list[_Clock]] = {name: [] for name in fns}
        for _ in range(settings.steps):  # interleaved: load on a shared machine hits both alike
            for name, fn in fns.items():
                clock = _Clock(device)
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


def _comparisons(variants: dict[str, dict[str, Any]],
                 teacher: dict[str, Any] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    if "milan" in variants and "mae" in variants:
        out["milan_over_mae_step_time"] = variants["milan"]["step_ms"] / variants["mae"]["step_ms"]
        out["milan_over_mae_flops"] = (variants["milan"]["flops"]["total"]
                                       / variants["mae"]["flops"]["total"])
    if "milan" in variants and "milan_mae_decoder" in variants:
        a, b = variants["milan"], variants["milan_mae_decoder"]
        out["prompting_over_mae_decoder_step_time"] = a["step_ms"] / b["step_ms"]
        out["prompting_over_mae_decoder_forward_flops"] = (
            a["flops"]["decoder_forward"] / b["flops"]["decoder_forward"])
    if teacher and "cls_attn_overhead" in teacher:
        out["teacher_cls_attn_overhead"] = teacher["cls_attn_overhead"]
    return out


def _command_line() -> str:
    if sys.argv[1:3] == ["bench", "speed"]:  # `milan ...` or `python -m milan ...`
        return shlex.join(["milan", *sys.argv[1:]])
    return shlex.join(sys.argv)  # called from Python (a test, a notebook)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "milan": milan.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
    }
    if hasattr(os, "getloadavg"):  # other jobs on a shared machine skew CPU timings: say so
        info["load_average_at_start"] = list(os.getloadavg())  # 1, 5, 15 min
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["allow_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        info["device_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    return info


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def format_markdown(result: dict[str, Any]) -> str:
    s, m, p = result["settings"], result["machine"], result["peak"]
    lines = [
        f"## milan bench speed: {s['model']} · batch {s['batch_size']} · {m['device']} "
        f"({m['device_name']}) · {s['precision']}{' · compiled' if s['compile'] else ''} · "
        f"{m['threads']} threads · torch {m['torch']}",
        "",
        f"teacher {s['teacher']} · mask ratio {s['mask_ratio']} · {s['steps']} timed steps after "
        f"{s['warmup']} warmup · matmul peak ({p['dtype']}, best of {p['repeats']} per size; "
        + ", ".join(f"{n}²: {_si(f, 'FLOP/s')}" for n, f in p.get("per_size", {}).items())
        + f"): {_si(p['flops_per_s'], 'FLOP/s')}",
        f"memory: {result['memory_label']}",
        "",
        "| variant | img/s | step ms | " + " | ".join(f"{ph} ms (%)" for ph in PHASES)
        + " | GFLOP/img | achieved | MFU | peak MiB |",
        "|---|---:|---:|" + "---:|" * len(PHASES) + "---:|---:|---:|---:|",
    ]
    for v in result["variants"].values():
        cells = []
        for ph in PHASES:
            ms, pct = v["phases_ms"][ph], v["phases_pct"][ph]
            skip = ph == "teacher" and not v["uses_teacher"]
            cells.append("–" if skip else f"{ms:.1f} ({pct:.0f}%)")
        lines.append(
            f"| {v['label']} | {v['images_per_s']:.1f} | {v['step_ms']:.1f} | " + " | ".join(cells)
            + f" | {v['flops_per_image'] / 1e9:.3g} | {_si(v['achieved_flops_per_s'], 'FLOP/s')} | "
            f"{v['mfu']:.1%} | {v['peak_memory_mib']:.0f} |"
        )
    t = result.get("teacher_forward")
    if t and "skipped" not in t:
        lines += [
            "",
            f"| teacher forward ({t['teacher_dtype']}, no grad) | ms | img/s | GFLOP/img | achieved | MFU |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name in ("with_cls_attn", "plain"):
            r = t[name]
            lines.append(
                f"| {r['label']} | {r['ms']:.1f} | {r['images_per_s']:.1f} | "
                f"{r['flops'] / s['batch_size'] / 1e9:.3g} | {_si(r['achieved_flops_per_s'], 'FLOP/s')} "
                f"| {r['mfu']:.1%} |"
            )
    elif t:
        lines += ["", f"teacher comparison skipped: {t['skipped']}"]
    c = result["comparisons"]
    parts = []
    if "milan_over_mae_step_time" in c:
        parts.append(f"MILAN / MAE step time {c['milan_over_mae_step_time']:.2f}× "
                     f"(FLOPs {c['milan_over_mae_flops']:.2f}×)")
    if "prompting_over_mae_decoder_step_time" in c:
        parts.append(f"prompting / MAE decoder: step time "
                     f"{c['prompting_over_mae_decoder_step_time']:.2f}×, decoder forward FLOPs "
                     f"{c['prompting_over_mae_decoder_forward_flops']:.2f}×")
    if "teacher_cls_attn_overhead" in c:
        parts.append(f"cls_attn overhead on the teacher forward {c['teacher_cls_attn_overhead']:+.1%}")
    if parts:
        lines += ["", "; ".join(parts)]
    return "\n".join(lines)
