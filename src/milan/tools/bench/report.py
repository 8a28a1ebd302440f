"""`milan bench speed`'s results: per-variant summary, side-by-side ratios, markdown table."""

from __future__ import annotations

import shlex
import statistics
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from milan.model import MaskedAutoencoder
    from milan.tools.bench import VariantSpec

__all__ = ["PHASES", "summarise_variant", "comparisons", "command_line", "si", "format_markdown"]

PHASES = ("teacher", "masking", "forward", "backward", "optimizer")


def summarise_variant(
    vspec: VariantSpec, model: MaskedAutoencoder, spans: list[list[float]], flops: dict[str, int],
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
        "model": vspec.spec.name,
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


def comparisons(variants: dict[str, dict[str, Any]],
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


def command_line() -> str:
    if sys.argv[1:3] == ["bench", "speed"]:  # `milan ...` or `python -m milan ...`
        return shlex.join(["milan", *sys.argv[1:]])
    return shlex.join(sys.argv)  # called from Python (a test, a notebook)


def si(value: float, unit: str) -> str:
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
        + ", ".join(f"{n}²: {si(f, 'FLOP/s')}" for n, f in p.get("per_size", {}).items())
        + f"): {si(p['flops_per_s'], 'FLOP/s')}",
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
            + f" | {v['flops_per_image'] / 1e9:.3g} | {si(v['achieved_flops_per_s'], 'FLOP/s')} | "
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
                f"{r['flops'] / s['batch_size'] / 1e9:.3g} | {si(r['achieved_flops_per_s'], 'FLOP/s')} "
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
