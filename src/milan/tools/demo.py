"""`milan demo`: the method end to end on a CPU, with nothing downloaded.

1. Generate the captioned shapes dataset (cached).
2. Load `builtin:shapes`, the small CLIP we ship (trained with language supervision).
3. Pretrain a tiny MILAN student for a fixed number of steps (optionally MAE beside it).
4. Probe frozen features on held-out labels (linear probe and kNN) for the student, a
   random-init student and the teacher itself; write a table, figures and a report.

The probes are cheap next to pretraining: the images are decoded once, each encoder runs once over
them, and per encoder one L-BFGS solve fits the linear probes of all five labels and one
neighbour search serves the five kNN votes.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset
from torchvision import transforms as T

import milan
from milan.data.shapes import SHAPES, ShapesDataset, default_shapes_root, generate_shapes
from milan.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from milan.masking import RandomMasking, SemanticMasking
from milan.model import build_model
from milan.recipes import pretrain
from milan.tools.viz import (
    plot_attention,
    plot_curves,
    plot_masks,
    plot_tsne,
    read_metrics,
    tsne_embed,
)
from milan.train.config import config_path, load_config
from milan.train.log import get_logger
from milan.train.probe import extract_features, knn_accuracies, linear_probes

__all__ = ["add_arguments", "run_from_args", "run", "PROBE_LABELS"]

PROBE_LABELS = ("shape", "colour", "count", "position", "shape_colour")
MONITOR_TRAIN = 2000  # reference images of pretraining's periodic kNN (training_curves.png)
TSNE_IMAGES = 1200  # held-out images in the t-SNE figure (sklearn t-SNE is O(M log M); ~10 s per panel)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (report, figures, checkpoints)")
    p.add_argument("--steps", type=int, default=400, help="pretraining steps per model (batch 128)")
    p.add_argument("--data-size", type=int, default=20000, help="training images to generate")
    p.add_argument("--val-size", type=int, default=5000, help="held-out images (probe test set)")
    p.add_argument("--probe-train", type=int, default=10000, help="training images for the probes")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--baseline", action="store_true", help="also pretrain the MAE pixel baseline (Table 5 #1)")
    p.add_argument("--data", type=Path, help="shapes dataset folder (default: cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")


def run_from_args(args: argparse.Namespace) -> None:
    run(out=args.out, steps=args.steps, data_size=args.data_size, val_size=args.val_size,
        probe_train=args.probe_train, batch_size=args.batch_size, baseline=args.baseline,
        data=args.data, seed=args.seed, threads=args.threads)


@dataclass
class Encoder:
    name: str
    encode: Any  # images [B,3,H,W] → features [B, D]


def _student_encoder(run_dir: Path | None, name: str, target_dim: int, seed: int) -> Any:
    """Mean-pooled patch tokens of a pretrained (or, with run_dir=None, random-init) encoder."""
    if run_dir is not None:
        encoder = milan.load_pretrained(run_dir).encoder()
    else:
        torch.manual_seed(seed)
        encoder = build_model(name, target_dim=target_dim).encoder.eval()
    return lambda images: encoder(images)[:, 1:].mean(1)


def run(
    *, out: Path = Path("runs/demo"), steps: int = 400, data_size: int = 20000, val_size: int = 5000,
    probe_train: int = 10000, batch_size: int = 128, baseline: bool = False, data: Path | None = None,
    seed: int = 0, threads: int = 0,
) -> dict[str, Any]:
    """Run the demo; returns the results table as a dict (also written to `out/results.json`)."""
    log = get_logger()
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    # 1. data -----------------------------------------------------------------------------------
    root = Path(data) if data else default_shapes_root().with_name(f"shapes-{data_size}-{val_size}-s{seed}")
    log.info("[1/4] shapes dataset at %s", root)
    generate_shapes(root, num_train=data_size, num_val=val_size, seed=seed)

    # 2. teacher --------------------------------------------------------------------------------
    log.info("[2/4] built-in teacher")
    teacher = milan.build_teacher("builtin:shapes", student_patch_size=8)

    # 3. pretraining ----------------------------------------------------------------------------
    runs = {"MILAN": ("milan_vit_shapes_patch8", ["model.variant=8"])}
    if baseline:
        runs["MAE (pixels)"] = ("mae_vit_shapes_patch8", ["model.variant=1"])
    for i, (label, (name, extra)) in enumerate(runs.items()):
        log.info("[3/4] pretraining %s (%d/%d), %d steps", label, i + 1, len(runs), steps)
        cfg = load_config(pretrain.CONFIG, config_path("pretrain_shapes"), [
            f"model.name={name}", f"data.path={root}", f"optim.steps={steps}",
            f"optim.warmup_steps={max(1, steps // 10)}", f"optim.batch_size={batch_size}",
            f"run.out_dir={out / name}", f"run.seed={seed}", "run.tensorboard=false",
            # the curves' periodic kNN (every 100 steps) on 2000 reference images instead of 5000: it
            # traces progress, the table below measures it; no effect on training (no RNG drawn)
            f"monitor.train_size={MONITOR_TRAIN}", *extra,
        ])
        pretrain.main(cfg)

    # 4. probes ---------------------------------------------------------------------------------
    log.info("[4/4] probing frozen features (linear probe and kNN)")
    tf = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    train_ds = ShapesDataset(root, "train", transform=tf)
    val_ds = ShapesDataset(root, "val", transform=tf)
    n_train = min(probe_train, len(train_ds))
    encoders = [Encoder(label, _student_encoder(out / name, name, teacher.dim, seed))
                for label, (name, _) in runs.items()]
    encoders.append(Encoder("random init", _student_encoder(None, "milan_vit_shapes_patch8", teacher.dim, seed)))
    encoders.append(Encoder("teacher (builtin:shapes)", lambda x: teacher(x).tokens[:, 1:].mean(1)))
    # the images are decoded once (uint8) for every encoder; normalised per batch as `tf` would
    images = {"train": _decode(root, "train", n_train), "val": _decode(root, "val", len(val_ds))}
    train_ys = {lab: train_ds.labels[lab][:n_train] for lab in PROBE_LABELS}
    val_ys = {lab: val_ds.labels[lab] for lab in PROBE_LABELS}
    results: dict[str, dict[str, float]] = {}
    tsne_features: dict[str, torch.Tensor] = {}
    for enc in encoders:
        xtr, xte = (_features(enc.encode, images[split]) for split in ("train", "val"))
        # one standardisation and one L-BFGS solve for all five labels; one neighbour search for kNN
        linear = _single_threaded(linear_probes, xtr, train_ys, xte, val_ys)
        knn = knn_accuracies(xtr, train_ys, xte, val_ys)
        row = {k: v for lab in PROBE_LABELS for k, v in ((f"linear {lab}", linear[lab]), (f"knn {lab}", knn[lab]))}
        results[enc.name] = row
        tsne_features[enc.name] = xte[:TSNE_IMAGES]
        log.info("  %-26s %s", enc.name, "  ".join(f"{k}={v:.3f}" for k, v in row.items() if k.startswith("linear")))

    figures = _figures(out, teacher, val_ds, seed)
    figures += _tsne_and_curves(out, tsne_features, val_ds.labels["shape"][:TSNE_IMAGES],
                                {label: out / name for label, (name, _) in runs.items()}, seed)
    minutes = (time.perf_counter() - started) / 60
    table = _table(results)
    print("\n" + table)
    (out / "results.json").write_text(json.dumps({"results": results, "minutes": minutes, "steps": steps}, indent=2))
    _report(out, table, figures, steps=steps, data_size=data_size, val_size=val_size,
            probe_train=n_train, minutes=minutes, root=root)
    log.info("report: %s (%.1f min)", out / "report.md", minutes)
    return results


def _single_threaded(fn: Any, *args: Any) -> Any:
    """`fn(*args)` on one torch thread. The L-BFGS solve is many small ops; on cores shared with other
    jobs, two OpenMP threads stalled on each other and the solve took 10-30× longer (measured: 4.5 s
    to 130 s for the same 786 iterations), while one thread took 1-6 s at any load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def _decode(root: Path, split: str, n: int) -> torch.Tensor:
    """The first `n` images of a shapes split as one uint8 tensor `[n, 3, H, W]`."""
    ds = ShapesDataset(root, split, transform=T.PILToTensor())
    return torch.stack([ds[i][0] for i in range(n)])


def _features(encode: Any, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """`encode` over uint8 images, normalised per batch exactly as ToTensor + Normalize do."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    labels = torch.zeros(len(images), dtype=torch.long)  # extract_features wants (image, label) pairs
    feats, _ = extract_features(lambda u8: encode(u8.float().div(255).sub_(mean).div_(std)),
                                TensorDataset(images, labels), batch_size=batch_size)
    return feats


def _table(results: dict[str, dict[str, float]]) -> str:
    cols = [f"linear {lab}" for lab in PROBE_LABELS] + ["knn shape", "knn shape_colour"]
    lines = ["| features | " + " | ".join(c.replace("_", "×") for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * row[c]:.1f}" for c in cols) + " |")
    return "\n".join(lines)


@torch.no_grad()
def _figures(out: Path, teacher: torch.nn.Module, val_ds: ShapesDataset, seed: int) -> list[Path]:
    images = torch.stack([val_ds[i][0] for i in range(12)])
    attn = teacher(images).cls_attn
    g = torch.Generator().manual_seed(seed)
    sem = SemanticMasking(0.75)(6, attn.shape[1], importance=attn[:6], generator=g)
    rnd = RandomMasking(0.75)(6, attn.shape[1], generator=g)
    return [
        plot_masks(images[:6], attn[:6], sem, rnd, 8, out / "masks_semantic_vs_random.png",
                   title="builtin:shapes teacher, mask ratio 0.75 (dimmed = masked)"),
        plot_attention(images, attn, out / "teacher_attention.png",
                       title="builtin:shapes teacher: last-layer CLS attention"),
    ]


def _tsne_and_curves(out: Path, features: dict[str, torch.Tensor], labels: torch.Tensor,
                     run_dirs: dict[str, Path], seed: int) -> list[Path]:
    panels = {name: (tsne_embed(x, seed=seed), labels.numpy()) for name, x in features.items()}
    return [
        plot_tsne(panels, out / "tsne_shape.png", classes=list(SHAPES),
                  title=f"t-SNE of mean-pooled patch tokens, {len(labels)} held-out images, by shape"),
        plot_curves({name: read_metrics(d) for name, d in run_dirs.items()}, out / "training_curves.png",
                    title="pretraining on shapes: " + ", ".join(run_dirs)),
    ]


def _report(out: Path, table: str, figures: list[Path], **facts: Any) -> None:
    lines = [
        "# milan demo",
        "",
        f"MILAN pretraining on the built-in shapes data ({facts['data_size']} train / {facts['val_size']} "
        f"val images, 64 px) with the built-in teacher, {facts['steps']} steps of batch 128, on this machine in "
        f"{facts['minutes']:.1f} minutes (all stages). Probes use mean-pooled patch tokens of the frozen "
        f"encoder: a linear classifier on standardised features and weighted kNN (k=20, T=0.07), trained on "
        f"{facts['probe_train']} images and tested on the {facts['val_size']} held-out ones. Accuracy in %.",
        "The linear probe is the converged L2-regularised (1e-4) multinomial logistic regression (one L-BFGS "
        "solve per encoder for all labels); the training curves' periodic kNN uses "
        f"{MONITOR_TRAIN} reference images.",
        "",
        table,
        "",
        "Labels: shape (6) and colour (6) of the large object, object count (3), its 3×3 grid position (9),",
        "and shape×colour (36). Colour is easy for any features (random init does well): a sanity check.",
        "",
    ]
    lines += [f"![{p.stem}]({p.name})" for p in figures]
    lines += ["", f"Data: `{facts['root']}`. Checkpoints and metrics.jsonl: the sub-folders of this run."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
