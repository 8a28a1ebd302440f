"""Toy Table 5 on a CPU: every MILAN ablation row (and Table 9's KD) on the built-in shapes data.

Each variant — target clip|pixel × decoder prompting|mae × masking semantic|random (Table 5
rows #1–#8), row #9 (MILAN with a SLIP teacher: `builtin:shapes-slip`, the same small model trained
with CLIP loss + SimCLR loss) and the knowledge-distillation baseline (Table 9: MILAN without its
decoder, the encoder regresses the teacher's tokens of the semantically sampled visible patches) —
pretrains the same tiny student (`vit_shapes_patch8`, 64 px) with the built-in `builtin:shapes`
teacher (#9: `builtin:shapes-slip`) under the same budget (steps × batch, lr, schedule, data),
once per seed. The frozen
encoder's mean-pooled patch tokens are then probed on held-out labels: a linear classifier and
weighted kNN, for the object's shape (6 classes), shape×colour (36) and the object count (3).
The table reports mean ± std over seeds.

    python benchmarks/ablation.py                        # the committed run (≈ 48 min on 2 quiet cores)
    python benchmarks/ablation.py --quick --out /tmp/abl # smoke check: every variant, tiny budget

Results go to OUT/results.jsonl (one line per variant × seed, appended as each finishes, so a
rerun with the same OUT skips finished pairs: a crash loses at most the run in progress),
OUT/results.json (summary) and OUT/results.md (the table). benchmarks/RESULTS.md holds the
committed table with its command, commit, machine and date, and what it says about the paper.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torchvision import transforms as T

from milan.data.shapes import ShapesDataset, default_shapes_root, generate_shapes
from milan.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from milan.io.weights import build_encoder
from milan.model import KD_BASELINE, TABLE5
from milan.recipes import pretrain
from milan.train.config import config_path, load_config
from milan.train.log import get_logger
from milan.train.probe import extract_features, knn_accuracy, linear_probe

#: Row name → (model name, config overrides, (target, decoder, masking)).
VARIANTS: dict[str, tuple[str, list[str], tuple[str, str, str]]] = {
    **{f"#{i}": ("milan_vit_shapes_patch8", [f"model.variant={i}"], (v.target, v.decoder, v.masking))
       for i, v in TABLE5.items()},
    # Table 5 #9: MILAN (#8's decoder and masking) reconstructing a SLIP teacher's features.
    "#9": ("milan_vit_shapes_patch8", ["model.variant=8", "teacher.spec=builtin:shapes-slip"],
           ("slip", TABLE5[8].decoder, TABLE5[8].masking)),
    "KD": ("kd_vit_shapes_patch8", ["model.decoder=none", "model.target=clip", "model.masking=semantic"],
           (KD_BASELINE.target, KD_BASELINE.decoder, KD_BASELINE.masking)),
}
#: Probed labels (columns of the table, linear and kNN each).
LABELS = ("shape", "shape_colour", "count")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/ablation"), help="results and run folders")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="ROW",
                   help=f"rows to run ({', '.join(VARIANTS)})")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=100, help="pretraining steps per run")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--data-size", type=int, default=20000, help="shapes training images")
    p.add_argument("--val-size", type=int, default=5000, help="shapes held-out images (probe test set)")
    p.add_argument("--probe-train", type=int, default=5000, help="training images for the probes")
    p.add_argument("--probe-test", type=int, default=2000, help="held-out images the probes are scored on")
    p.add_argument("--probe-epochs", type=int, default=100, help="linear-probe epochs")
    p.add_argument("--data", type=Path, help="shapes dataset folder (default: the demo's cache)")
    p.add_argument("--workers", type=int, default=1, help="data-loading worker processes per run")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoint (38 MB each)")
    p.add_argument("--quick", action="store_true",
                   help="smoke check: every variant, 2 seeds, 2 steps of 16 on 96 images, 5 probe epochs")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.batch_size = args.seeds[:2], 2, 16
        args.data_size, args.val_size, args.probe_train, args.probe_test = 96, 48, 96, 48
        args.probe_epochs, args.workers = 5, 0
    return args


def pretrain_and_probe(row: str, seed: int, args: argparse.Namespace, root: Path) -> dict[str, float]:
    """Pretrain one variant with one seed, then probe its frozen encoder; returns accuracies."""
    name, overrides, _ = VARIANTS[row]
    run_dir = args.out / "runs" / f"{row.strip('#')}-s{seed}"
    cfg = load_config(pretrain.CONFIG, config_path("pretrain_shapes"), [
        f"model.name={name}", *overrides, f"data.path={root}", f"optim.steps={args.steps}",
        f"optim.warmup_steps={max(1, args.steps // 10)}", f"optim.batch_size={args.batch_size}",
        f"optim.lr={args.lr}", f"run.out_dir={run_dir}", f"run.seed={seed}", "run.tensorboard=false",
        f"run.ckpt_every={args.steps}", "run.keep_last=1", "run.resume=none", "monitor.every=0",
        f"data.num_workers={args.workers}",
    ])
    started = time.perf_counter()
    pretrain.main(cfg)
    pretrain_s = time.perf_counter() - started
    checkpoint = run_dir / f"checkpoint-{args.steps:08d}.pt"
    encoder, _ = build_encoder(checkpoint)
    encoder.requires_grad_(False)

    tf = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    train_ds, val_ds = ShapesDataset(root, "train", transform=tf), ShapesDataset(root, "val", transform=tf)
    def encode(x):
        return encoder(x)[:, 1:].mean(1)
    xtr, _ = extract_features(encode, train_ds, limit=args.probe_train)
    xte, _ = extract_features(encode, val_ds, limit=args.probe_test)
    out = {"pretrain_s": pretrain_s}
    for lab in LABELS:
        ytr, yte = train_ds.labels[lab][: len(xtr)], val_ds.labels[lab][: len(xte)]
        out[f"linear {lab}"] = linear_probe(xtr, ytr, xte, yte, seed=seed, epochs=args.probe_epochs)
        out[f"knn {lab}"] = knn_accuracy(xtr, ytr, xte, yte)
    out["total_s"] = time.perf_counter() - started
    if not args.keep_checkpoints:
        checkpoint.unlink()
    return out


def load_done(path: Path) -> dict[tuple[str, int], dict[str, float]]:
    """Finished (row, seed) pairs from results.jsonl (a torn last line is ignored)."""
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[(rec["row"], rec["seed"])] = rec["metrics"]
    return done


def summarise(done: dict[tuple[str, int], dict[str, float]], rows: list[str],
              seeds: list[int]) -> dict[str, dict[str, tuple[float, float]]]:
    """Row → metric → (mean, std over seeds); std is 0 for a single seed."""
    table = {}
    for row in rows:
        runs = [done[(row, s)] for s in seeds if (row, s) in done]
        if not runs:
            continue
        table[row] = {}
        for key in runs[0]:
            vals = [r[key] for r in runs]
            table[row][key] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
    return table


def markdown(table: dict[str, dict[str, tuple[float, float]]]) -> str:
    cols = [f"{kind} {lab}" for lab in LABELS for kind in ("linear", "knn")]
    head = ["row", "target", "decoder", "masking"] + [c.replace("_", "×") for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|---|" + "---:|" * len(cols)]
    for row, metrics in table.items():
        target, decoder, masking = VARIANTS[row][2]
        cells = [f"{100 * metrics[c][0]:.1f} ± {100 * metrics[c][1]:.1f}" for c in cols]
        lines.append(f"| {row} | {target} | {decoder} | {masking} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> dict[str, object]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "commit": commit,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    log = get_logger()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    root = args.data or default_shapes_root().with_name(f"shapes-{args.data_size}-{args.val_size}-s0")
    generate_shapes(root, num_train=args.data_size, num_val=args.val_size, seed=0)

    results_path = args.out / "results.jsonl"
    done = load_done(results_path)
    todo = [(row, s) for row in args.variants for s in args.seeds if (row, s) not in done]
    started = time.perf_counter()
    for i, (row, seed) in enumerate(todo):
        log.info("ablation %d/%d: %s %s, seed %d", i + 1, len(todo), row, "·".join(VARIANTS[row][2]), seed)
        metrics = pretrain_and_probe(row, seed, args, root)
        done[(row, seed)] = metrics
        with results_path.open("a") as f:  # one line per finished run, flushed: nothing lost on a crash
            f.write(json.dumps({"row": row, "seed": seed, "metrics": metrics}) + "\n")
        log.info("  %s", "  ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    table = summarise(done, args.variants, args.seeds)
    text = markdown(table)
    summary = {
        "command": "python benchmarks/ablation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(), "minutes_this_invocation": (time.perf_counter() - started) / 60,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "table": {row: {k: list(v) for k, v in m.items()} for row, m in table.items()},
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    (args.out / "results.md").write_text(text + "\n")
    print(text)
    return summary


if __name__ == "__main__":
    main()
