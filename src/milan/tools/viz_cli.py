"""`milan viz {masks,attention,tsne,curves}`: the paper's figures as PNG files (headless).

    masks      Figure 4: image | semantic-aware mask | random mask | per-patch loss of a checkpoint
    attention  Figure 3: teacher and student last-layer CLS attention over the image
    tsne       Figure 2: t-SNE of pooled features, coloured by class, one panel per source
    curves     loss / lr / img/s / kNN accuracy from one or more runs' metrics.jsonl
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

import milan
from milan.data import DATASET_KINDS, build_dataset
from milan.data.reading import BadFiles, Tolerant
from milan.data.split import eval_sets, resolve_roots
from milan.data.transforms import eval_transform
from milan.errors import ConfigError, DataError, WeightsError
from milan.io.weights import Pretrained, load_pretrained
from milan.masking import RandomMasking, SemanticMasking
from milan.model import build_model
from milan.pretraining import MILAN
from milan.tools import viz
from milan.train.log import get_logger
from milan.train.probe import extract_features

__all__ = ["add_arguments", "run_from_args", "load_student", "mask_and_loss"]


# --- arguments ----------------------------------------------------------------------------------


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", choices=DATASET_KINDS,
                   help="dataset kind: the built-in shapes set or an ImageFolder tree (default: the data the "
                        "checkpoint was trained on, else shapes)")
    p.add_argument("--data-path", help="dataset folder (default: the checkpoint's data.path when --data matches "
                                       "its data.kind; shapes: the cache)")
    p.add_argument("--split", default="val", choices=("train", "val"),
                   help="split to draw images from; an ImageFolder without val/ splits as the evaluation "
                        "commands do (val: the part they hold out, --val-fraction)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="ImageFolder without val/: the stratified part held out as val (as data.val_fraction)")


def _figure_args(p: argparse.ArgumentParser, *, seed: str) -> None:
    p.add_argument("--num", type=int, default=6, help="number of images (rows)")
    p.add_argument("--seed", type=int, default=0, help=seed)
    p.add_argument("--out", type=Path, default=Path("figures"), help="output folder")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `masks`, `attention`, `tsne` and `curves` subcommands to `parser` (sets its `func`)."""
    parser.description = parser.description or "Write the paper's figures as PNG files (headless matplotlib)."
    parser.set_defaults(func=run_from_args)
    sub = parser.add_subparsers(dest="viz_command", metavar="FIGURE", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser("masks", formatter_class=fmt, help="semantic vs random masks and per-patch loss (Fig. 4)",
                       description="For N images: the image, the semantic-aware mask at the checkpoint's mask "
                       "ratio (kept patches bright, masked dimmed), a random mask for comparison, and the "
                       "checkpoint's per-patch reconstruction loss as a heat map. target=clip: "
                       "‖p/‖p‖ − t/‖t‖‖² on every patch; target=pixel: MSE to normalised pixels on masked "
                       "patches (visible patches are blank). The teacher comes from the checkpoint's config.")
    p.add_argument("checkpoint", type=Path, help="checkpoint file (.pt) or run folder (its newest checkpoint)")
    _data_args(p)
    _figure_args(p, seed="seed for image choice and mask draws")
    p.set_defaults(viz_fn=_masks)

    p = sub.add_parser("attention", formatter_class=fmt, help="teacher vs student CLS attention (Fig. 3)",
                       description="Last-layer CLS attention (head-averaged, patch columns) overlaid on the "
                       "image. Columns: image, the teacher, then one per --checkpoint (its encoder's last "
                       "block, recomputed from its qkv weights). Without --teacher, the first checkpoint's "
                       "config names the teacher.")
    p.add_argument("--teacher", help="teacher spec, e.g. builtin:shapes or openclip:ViT-B-16")
    p.add_argument("--teacher-weights", help="teacher checkpoint file (openclip / timm specs)")
    p.add_argument("--checkpoint", type=Path, action="append", default=[],
                   help="student checkpoint or run folder (repeatable)")
    _data_args(p)
    p.add_argument("--img-size", type=int, help="input resolution without a checkpoint (default: 224, shapes 64)")
    _figure_args(p, seed="seed for the image choice")
    p.set_defaults(viz_fn=_attention)

    p = sub.add_parser("tsne", formatter_class=fmt, help="t-SNE of pooled features by class (Fig. 2)",
                       description="t-SNE (fixed random_state) of mean-pooled patch tokens for up to --classes "
                       "classes, one panel per source. A source is a checkpoint file or run folder (student "
                       "encoder), 'teacher:SPEC' (teacher tokens; weights via --teacher-weights) or "
                       "'random:MODEL_NAME' (random-init student, e.g. random:milan_vit_shapes_patch8).")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="CKPT | RUN_DIR | teacher:SPEC | random:NAME")
    _data_args(p)
    p.add_argument("--teacher-weights", help="weights for teacher:SPEC sources (openclip / timm specs)")
    p.add_argument("--label", default="shape", help="shapes label to colour by (shape, colour, count, ...)")
    p.add_argument("--classes", type=int, default=20, help="at most this many classes (the first ones)")
    p.add_argument("--per-class", type=int, default=50, help="images per class")
    p.add_argument("--img-size", type=int, help="input resolution when no checkpoint fixes it")
    p.add_argument("--seed", type=int, default=0, help="t-SNE random_state")
    p.add_argument("--out", type=Path, default=Path("figures"), help="output folder")
    p.set_defaults(viz_fn=_tsne)

    p = sub.add_parser("curves", formatter_class=fmt, help="loss, lr, img/s, kNN accuracy of runs",
                       description="One panel per metric (loss, lr, img_per_s, knn_acc) found in the runs' "
                       "metrics.jsonl, one line per run (legend: run folder name). Metrics a run lacks are "
                       "skipped.")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run folder(s) with metrics.jsonl")
    p.add_argument("--out", type=Path, default=Path("figures/curves.png"), help="output PNG file")
    p.set_defaults(viz_fn=_curves)


def run_from_args(args: argparse.Namespace) -> Path:
    """Dispatch to the chosen subcommand; returns the PNG written (also printed)."""
    path = args.viz_fn(args)
    print(path)
    bad_files = getattr(args, "bad_files", None)  # set by _dataset
    if bad_files is not None and bad_files.summary() is not None:
        print(bad_files.summary())
    return path


# --- checkpoints ---------------------------------------------------------------------------------


def load_student(path: Path) -> Pretrained:
    """A `milan pretrain` checkpoint (or run folder) with its spec and config; `.model()` rebuilds it."""
    pretrained = load_pretrained(path)
    if pretrained.spec is None or pretrained.config is None:
        raise WeightsError(f"{pretrained.path} has no pretraining config (a {pretrained.meta['format']} file); "
                           "viz needs a checkpoint written by `milan pretrain`")
    return pretrained


def _stem(student: Pretrained) -> str:
    return f"{student.path.parent.name}-{student.path.stem}".replace(" ", "_")


def _teacher_for(cfg: dict[str, Any], patch_size: int):
    teacher_cfg = cfg.get("teacher") or {}
    if not teacher_cfg.get("spec"):
        raise ConfigError("the checkpoint's config has no teacher.spec; it was not written by `milan pretrain`")
    return milan.build_teacher(teacher_cfg["spec"], weights=teacher_cfg.get("weights"),
                               student_patch_size=patch_size).eval()


# --- data ---------------------------------------------------------------------------------------


def _dataset(args: argparse.Namespace, img_size: int, cfg: dict[str, Any] | None = None, *, label: str = "shape"):
    """The images to draw: `--data`/`--data-path` if given, else the data the checkpoint was trained on
    (its config's data.kind and data.path), else the built-in shapes. Sets `args.data_used`, the
    description that goes into the log and the figure title."""
    log = get_logger()  # set up before build_dataset, which logs the folder's start line to it
    trained = (cfg or {}).get("data") or {}
    kind = args.data
    if kind is None:
        kind = trained.get("kind") or "shapes"
        if kind not in DATASET_KINDS:
            raise ConfigError(f"the checkpoint was trained on data.kind={kind} ({trained.get('path')}); viz reads "
                              "a folder: pass --data imagefolder --data-path DIR (images like the training data)")
    if kind not in DATASET_KINDS:
        raise ConfigError(f"unknown data kind {kind!r}; choose one of: {', '.join(DATASET_KINDS)}")
    path = args.data_path
    if path is None and trained.get("kind") == kind:
        path = trained.get("path")
    tf = eval_transform(img_size, crop_pct=1.0)
    if kind == "imagefolder":
        dataset, args.data_used = _folder_part(args, path, tf, trained)
    else:
        dataset = build_dataset(kind, path, split=args.split, transform=tf, label=label)
        where = getattr(dataset, "root", None) or path or "the shapes cache"
        args.data_used = f"{kind} {where} ({args.split} split)"
    log.info("drawing images from %s", args.data_used)
    # an unreadable image is replaced by the next good one, warned about once; no run folder to list them in
    args.bad_files = getattr(args, "bad_files", None) or BadFiles(max_fraction=None)
    return Tolerant(dataset, args.bad_files)


def _folder_part(args: argparse.Namespace, path: str | None, transform: Callable,
                 trained: dict[str, Any]) -> tuple[Any, str]:
    """The train or val part of an ImageFolder, split as the evaluation commands split it
    (`milan.data.split`), and a truthful label: which part, and whether the checkpoint pretrained on it."""
    if not path:
        raise ConfigError("--data imagefolder needs --data-path DIR (or a checkpoint trained on a folder)")
    parts = eval_sets("imagefolder", path, val_fraction=args.val_fraction, train_transform=transform,
                      val_transform=transform, log=False)
    dataset = parts.val if args.split == "val" else parts.train
    root = Path(dataset.root)
    if parts.held_out:
        role = (f"held out as val, data.val_fraction={args.val_fraction:g}" if args.split == "val"
                else "train, without the part held out as val")
    else:
        role = args.split
    seen = trained.get("kind") == "imagefolder" and trained.get("path") and \
        resolve_roots(trained["path"])[0].resolve() == root.resolve()
    return dataset, f"imagefolder {root} ({role}{'; the checkpoint pretrained on this folder' if seen else ''})"


def _sample(dataset, num: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:num].tolist()
    return torch.stack([dataset[i][0] for i in idx])  # [B, 3, H, W]


# --- subcommands --------------------------------------------------------------------------------


@torch.no_grad()
def mask_and_loss(student: Pretrained, teacher, images: Tensor, *, seed: int = 0):
    """(semantic mask, random mask, per-patch loss `[B, N]`, loss label) for `viz masks`.

    The loss is the checkpoint's own objective (`MILAN`'s token loss) under the masking it was
    trained with; NaN where its objective scores no token.
    """
    model = student.model()
    step = MILAN(model, teacher=teacher)
    ratio = model.spec.mask_ratio
    out = step.teach(images)
    g = torch.Generator().manual_seed(seed)
    semantic = SemanticMasking(ratio)(images.shape[0], model.num_patches, importance=out.cls_attn, generator=g)
    random = RandomMasking(ratio)(images.shape[0], model.num_patches, generator=g)
    mask = semantic if model.spec.masking == "semantic" else random
    loss = step.forward(images, mask, out).token_loss[:, 1:]  # [B, N]
    label = {"clip": "feature loss ‖p̂−t̂‖² (all patches)", "pixel": "pixel MSE (masked; visible blank)"}[model.spec.target]
    if model.spec.decoder == "none":
        label = "feature loss (visible; masked blank)"
    return semantic, random, loss, label


def _masks(args: argparse.Namespace) -> Path:
    student = load_student(args.checkpoint)
    spec = student.spec
    teacher = _teacher_for(student.config, spec.encoder.patch_size)
    images = _sample(_dataset(args, student.encoder_config.img_size, student.config), args.num, args.seed)
    semantic, random, loss, label = mask_and_loss(student, teacher, images, seed=args.seed)
    teacher_spec = (student.config.get("teacher") or {}).get("spec")
    title = (f"{student.label} — {spec.target} target, {spec.decoder} decoder, {spec.masking} masking, "
             f"mask ratio {spec.mask_ratio}; teacher {teacher_spec}; data {args.data_used}")
    return viz.plot_mask_loss(images, semantic, random, loss, spec.encoder.patch_size,
                              Path(args.out) / f"masks_{_stem(student)}.png", title=title, loss_label=label)


def _attention(args: argparse.Namespace) -> Path:
    students = [load_student(c) for c in args.checkpoint]
    spec, weights = args.teacher, args.teacher_weights
    if spec is None:
        if not students:
            raise ConfigError("pass --teacher SPEC (and --teacher-weights W) or at least one --checkpoint")
        spec = (students[0].config.get("teacher") or {}).get("spec")
        weights = weights or (students[0].config.get("teacher") or {}).get("weights")
        if not spec:
            raise ConfigError(f"{students[0].path} has no teacher.spec in its config; pass --teacher SPEC")
    sizes = {s.encoder_config.img_size for s in students}
    if len(sizes) > 1:
        raise ConfigError(f"checkpoints are built for different resolutions {sorted(sizes)}; plot them separately")
    patch = students[0].encoder_config.patch_size if students else None
    img_size = sizes.pop() if sizes else (args.img_size or (64 if args.data in (None, "shapes") else 224))
    teacher = milan.build_teacher(spec, weights=weights, student_patch_size=patch).eval()
    images = _sample(_dataset(args, img_size, students[0].config if students else None), args.num, args.seed)
    with torch.no_grad():
        maps = {f"teacher {spec}": teacher(images).cls_attn}
        for s in students:
            maps[f"student {s.label}"] = viz.student_cls_attention(s.encoder(), images)
    stem = "_".join([spec.replace(":", "-").replace("/", "-"), *(_stem(s) for s in students)])
    return viz.plot_attention_columns(images, maps, Path(args.out) / f"attention_{stem}.png",
                                      title=f"last-layer CLS attention (head-averaged); data {args.data_used}")


def _encoder_for(source: str, args: argparse.Namespace) -> tuple[str, Callable[[Tensor], Tensor], int | None, dict | None]:
    """(panel name, images → [B, D], img_size or None, config or None) for a tsne source."""
    kind, sep, rest = source.partition(":")
    if sep and kind == "teacher":
        teacher = milan.build_teacher(rest, weights=args.teacher_weights).eval()
        return f"teacher {rest}", lambda x: teacher(x).tokens[:, 1:].mean(1), None, None
    if sep and kind == "random":
        torch.manual_seed(args.seed)
        model = build_model(rest, target="pixel", decoder="mae", masking="random")  # the decoder is discarded
        encoder = model.encoder.eval()
        return f"random init {rest}", lambda x: encoder(x)[:, 1:].mean(1), encoder.patch_embed.img_size[0], None
    student = load_pretrained(Path(source))
    encoder = student.encoder()
    return (f"student {student.label}", lambda x: encoder(x)[:, 1:].mean(1), student.encoder_config.img_size,
            student.config)


def _targets(dataset) -> Tensor:
    """Class index per image without decoding images (ShapesDataset.targets, ImageFolder samples)."""
    if hasattr(dataset, "targets"):
        return torch.as_tensor(dataset.targets)
    if hasattr(dataset, "samples"):
        return torch.tensor([label for _, label in dataset.samples])
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])


def _balanced_subset(targets: Tensor, classes: int, per_class: int) -> list[int]:
    picked: list[int] = []
    for c in [c for c in torch.unique(targets).tolist() if c >= 0][:classes]:
        picked += torch.nonzero(targets == c).flatten()[:per_class].tolist()
    return picked


def _tsne(args: argparse.Namespace) -> Path:
    sources = [_encoder_for(s, args) for s in args.sources]
    sizes = {size for _, _, size, _ in sources if size is not None}
    if len(sizes) > 1:
        raise ConfigError(f"sources are built for different resolutions {sorted(sizes)}; plot them separately")
    img_size = sizes.pop() if sizes else (args.img_size or (64 if args.data in (None, "shapes") else 224))
    cfg = next((c for *_, c in sources if c is not None), None)
    dataset = _dataset(args, img_size, cfg, label=args.label)
    targets = _targets(dataset)
    if (targets < 0).all():
        raise DataError(f"{args.data_used} has no classes; t-SNE colours by class "
                         "(an ImageFolder needs root/<class>/<image>)")
    subset = torch.utils.data.Subset(dataset, _balanced_subset(targets, args.classes, args.per_class))
    panels = {}
    with torch.no_grad():
        for name, encode, _, _ in sources:
            feats, labels = extract_features(encode, subset, batch_size=128)
            panels[name] = (viz.tsne_embed(feats, seed=args.seed), labels.numpy())
    stem = "_".join(Path(s).stem if ":" not in s else s.replace(":", "-").replace("/", "-") for s in args.sources)
    return viz.plot_tsne(panels, Path(args.out) / f"tsne_{stem}.png", classes=getattr(dataset, "classes", None),
                         title=f"t-SNE of mean-pooled patch tokens ({args.data_used}, {len(subset)} images)")


def _curves(args: argparse.Namespace) -> Path:
    runs = {_run_label(Path(r)): viz.read_metrics(r) for r in args.runs}
    return viz.plot_curves(runs, args.out, title="training curves")


def _run_label(run_dir: Path) -> str:
    """`name (teacher SPEC, data KIND PATH)` from the run's config.yaml (just the name without one)."""
    name = run_dir.resolve().name
    config = run_dir / "config.yaml"
    if not config.is_file():
        return name
    cfg = yaml.safe_load(config.read_text()) or {}
    data, teacher = cfg.get("data") or {}, cfg.get("teacher") or {}
    facts = [f"teacher {teacher['spec']}" if teacher.get("spec") else None,
             f"data {data.get('kind')} {data.get('path') or ''}".rstrip() if data.get("kind") else None]
    facts = [f for f in facts if f]
    return f"{name} ({', '.join(facts)})" if facts else name
