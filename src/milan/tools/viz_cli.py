"""`milan viz {masks,attention,tsne,curves}`: the paper's figures as PNG files (headless).

    masks      Figure 4: image | semantic-aware mask | random mask | per-patch loss of a checkpoint
    attention  Figure 3: teacher and student last-layer CLS attention over the image
    tsne       Figure 2: t-SNE of pooled features, coloured by class, one panel per source
    curves     loss / lr / img/s / kNN accuracy from one or more runs' metrics.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from milan.data import DATASET_KINDS
from milan.tools import viz

__all__ = ["add_arguments", "run_from_args", "load_student", "Student"]


# --- arguments ----------------------------------------------------------------------------------


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", choices=DATASET_KINDS, default="shapes",
                   help="dataset kind: the built-in shapes set or an ImageFolder tree")
    p.add_argument("--data-path", help="dataset folder (shapes default: the checkpoint's data.path or the cache)")
    p.add_argument("--split", default="val", help="split to draw images from")


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
    p.add_argument("--num", type=int, default=6, help="number of images (rows)")
    p.add_argument("--seed", type=int, default=0, help="seed for image choice and mask draws")
    p.add_argument("--out", type=Path, default=Path("figures"), help="output folder")
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
    p.add_argument("--num", type=int, default=6, help="number of images (rows)")
    p.add_argument("--seed", type=int, default=0, help="seed for the image choice")
    p.add_argument("--out", type=Path, default=Path("figures"), help="output folder")
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
    return path


# --- checkpoints --------------------------------------------------------------------------------


@dataclasses.dataclass
class Student:
    """A model rebuilt from a self-describing checkpoint."""

    model: Any  # MaskedAutoencoder, eval mode
    config: dict[str, Any]  # the resolved config saved with it
    path: Path
    step: int | None

    @property
    def label(self) -> str:
        step = f" @ step {self.step}" if self.step is not None else ""
        return f"{self.path.parent.name}/{self.path.stem}{step}"

    @property
    def stem(self) -> str:
        return f"{self.path.parent.name}-{self.path.stem}".replace(" ", "_")

    @property
    def img_size(self) -> int:
        return self.model.encoder.patch_embed.img_size[0]


def _checkpoint_file(path: Path) -> Path:
    from milan.train.checkpoint import step_checkpoints

    path = Path(path).expanduser()
    if path.is_dir():
        found = step_checkpoints(path)
        if not found:
            raise FileNotFoundError(f"no checkpoint-<step>.pt in run folder {path}; pass a checkpoint file")
        return found[-1]
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (pass a .pt file or a run folder)")
    return path


def _teacher_for(cfg: dict[str, Any], patch_size: int):
    import milan

    teacher_cfg = cfg.get("teacher") or {}
    if not teacher_cfg.get("spec"):
        raise ValueError("the checkpoint's config has no teacher.spec; it was not written by `milan pretrain`")
    return milan.build_teacher(teacher_cfg["spec"], weights=teacher_cfg.get("weights"),
                               student_patch_size=patch_size).eval()


def load_student(path: Path) -> Student:
    """Rebuild the `MaskedAutoencoder` of a pretraining checkpoint from the config it carries."""
    from milan.model import build_model, parse_name
    from milan.recipes.pretrain import ModelConfig, resolve_variant
    from milan.train.checkpoint import load_checkpoint

    file = _checkpoint_file(path)
    state = load_checkpoint(file)
    cfg = state.get("config")
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise ValueError(f"checkpoint {file} has no 'config' with a 'model' section; "
                         "viz needs a checkpoint written by `milan pretrain`")
    if "model" not in state:
        raise ValueError(f"checkpoint {file} has no 'model' weights")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    mcfg = resolve_variant(ModelConfig(**{k: v for k, v in cfg["model"].items() if k in names}))
    default, _ = parse_name(mcfg.name)
    target = mcfg.target or default.target
    target_dim = None
    if target == "clip":
        target_dim = _student_target_dim(state["model"])
    model = build_model(mcfg.name, target_dim=target_dim, target=mcfg.target, decoder=mcfg.decoder,
                        masking=mcfg.masking, decoder_dim=mcfg.decoder_dim, decoder_depth=mcfg.decoder_depth,
                        decoder_heads=mcfg.decoder_heads)
    model.load_state_dict(state["model"])  # strict: a mismatch is a real error, not noise
    return Student(model.eval(), cfg, file, state.get("step"))


def _student_target_dim(weights: dict[str, Tensor]) -> int:
    """teacher.dim, read off the decoder's output layer, so that no teacher is built just for its width."""
    head = weights.get("decoder.head.weight")
    if head is None or head.dim() != 2:
        raise ValueError("cannot infer the teacher width: the checkpoint has no 'decoder.head.weight'")
    return int(head.shape[0])  # [Dt, D_dec]


# --- data ---------------------------------------------------------------------------------------


def _dataset(args: argparse.Namespace, img_size: int, cfg: dict[str, Any] | None = None, *, label: str = "shape"):
    from milan.data import build_dataset
    from milan.data.transforms import eval_transform

    if args.data not in DATASET_KINDS:
        raise ValueError(f"unknown data kind {args.data!r}; choose one of: {', '.join(DATASET_KINDS)}")
    path = args.data_path
    if path is None and cfg is not None and (cfg.get("data") or {}).get("kind") == args.data:
        path = cfg["data"].get("path")
    tf = eval_transform(img_size, crop_pct=1.0)
    return build_dataset(args.data, path, split=args.split, transform=tf, label=label)


def _sample(dataset, num: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:num].tolist()
    return torch.stack([dataset[i][0] for i in idx])  # [B, 3, H, W]


# --- subcommands --------------------------------------------------------------------------------


@torch.no_grad()
def mask_and_loss(student: Student, teacher, images: Tensor, *, seed: int = 0):
    """(semantic mask, random mask, per-patch loss `[B, N]`, loss label) for `viz masks`.

    The loss is the checkpoint's own objective under the masking it was trained with.
    """
    from milan.masking import random_masking, semantic_masking

    model = student.model
    ratio = float(student.config["model"].get("mask_ratio", 0.75))
    out = teacher(images)
    g = torch.Generator().manual_seed(seed)
    semantic = semantic_masking(out.cls_attn, ratio, generator=g)
    random = random_masking(images.shape[0], model.num_patches, ratio, generator=g)
    mask = semantic if model.variant.masking == "semantic" else random
    pred = model(images, mask, out.tokens).pred
    if model.variant.target == "clip":
        if model.variant.decoder == "none":  # KD head: only the visible tokens are predicted
            from milan.masking import gather_tokens

            vis = viz.per_patch_feature_loss(pred[:, 1:], gather_tokens(out.tokens[:, 1:], mask.keep))
            loss = torch.full((images.shape[0], model.num_patches), float("nan")).scatter(1, mask.keep, vis)
            label = "feature loss (visible; masked blank)"
        else:
            loss = viz.per_patch_feature_loss(pred[:, 1:], out.tokens[:, 1:])
            label = "feature loss ‖p̂−t̂‖² (all patches)"
    else:
        loss = viz.per_patch_pixel_loss(pred[:, 1:], images, mask.is_masked(), patch_size=model.patch_size)
        label = "pixel MSE (masked; visible blank)"
    return semantic, random, loss, label


def _masks(args: argparse.Namespace) -> Path:
    student = load_student(args.checkpoint)
    teacher = _teacher_for(student.config, student.model.patch_size)
    images = _sample(_dataset(args, student.img_size, student.config), args.num, args.seed)
    semantic, random, loss, label = mask_and_loss(student, teacher, images, seed=args.seed)
    ratio = student.config["model"].get("mask_ratio", 0.75)
    v = student.model.variant
    title = (f"{student.label} — {v.target} target, {v.decoder} decoder, {v.masking} masking, "
             f"mask ratio {ratio}")
    return viz.plot_mask_loss(images, semantic, random, loss, student.model.patch_size,
                              Path(args.out) / f"masks_{student.stem}.png", title=title, loss_label=label)


def _attention(args: argparse.Namespace) -> Path:
    import milan

    students = [load_student(c) for c in args.checkpoint]
    spec, weights = args.teacher, args.teacher_weights
    if spec is None:
        if not students:
            raise ValueError("pass --teacher SPEC (and --teacher-weights W) or at least one --checkpoint")
        spec = (students[0].config.get("teacher") or {}).get("spec")
        weights = weights or (students[0].config.get("teacher") or {}).get("weights")
        if not spec:
            raise ValueError(f"{students[0].path} has no teacher.spec in its config; pass --teacher SPEC")
    sizes = {s.img_size for s in students}
    if len(sizes) > 1:
        raise ValueError(f"checkpoints are built for different resolutions {sorted(sizes)}; plot them separately")
    patch = students[0].model.patch_size if students else None
    img_size = sizes.pop() if sizes else (args.img_size or (64 if args.data == "shapes" else 224))
    teacher = milan.build_teacher(spec, weights=weights, student_patch_size=patch).eval()
    images = _sample(_dataset(args, img_size, students[0].config if students else None), args.num, args.seed)
    with torch.no_grad():
        maps = {f"teacher {spec}": teacher(images).cls_attn}
        for s in students:
            maps[f"student {s.label}"] = viz.student_cls_attention(s.model.encoder, images)
    stem = "_".join([spec.replace(":", "-").replace("/", "-"), *(s.stem for s in students)])
    return viz.plot_attention_columns(images, maps, Path(args.out) / f"attention_{stem}.png",
                                      title="last-layer CLS attention (head-averaged)")


def _encoder_for(source: str, args: argparse.Namespace) -> tuple[str, Callable[[Tensor], Tensor], int | None, dict | None]:
    """(panel name, images → [B, D], img_size or None, config or None) for a tsne source."""
    import milan
    from milan.model import build_model

    kind, sep, rest = source.partition(":")
    if sep and kind == "teacher":
        teacher = milan.build_teacher(rest, weights=args.teacher_weights).eval()
        return f"teacher {rest}", lambda x: teacher(x).tokens[:, 1:].mean(1), None, None
    if sep and kind == "random":
        torch.manual_seed(args.seed)
        model = build_model(rest, target="pixel", decoder="mae")  # the decoder is discarded
        encoder = model.encoder.eval()
        return f"random init {rest}", lambda x: encoder(x)[:, 1:].mean(1), encoder.patch_embed.img_size[0], None
    student = load_student(Path(source))
    encoder = student.model.encoder
    return f"student {student.label}", lambda x: encoder(x)[:, 1:].mean(1), student.img_size, student.config


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
    from milan.train.probe import extract_features

    sources = [_encoder_for(s, args) for s in args.sources]
    sizes = {size for _, _, size, _ in sources if size is not None}
    if len(sizes) > 1:
        raise ValueError(f"sources are built for different resolutions {sorted(sizes)}; plot them separately")
    img_size = sizes.pop() if sizes else (args.img_size or (64 if args.data == "shapes" else 224))
    cfg = next((c for *_, c in sources if c is not None), None)
    dataset = _dataset(args, img_size, cfg, label=args.label)
    targets = _targets(dataset)
    if (targets < 0).all():
        raise ValueError(f"{args.data} images at {args.data_path} have no classes; t-SNE colours by class "
                         "(an ImageFolder needs root/<class>/<image>)")
    subset = torch.utils.data.Subset(dataset, _balanced_subset(targets, args.classes, args.per_class))
    panels = {}
    with torch.no_grad():
        for name, encode, _, _ in sources:
            feats, labels = extract_features(encode, subset, batch_size=128)
            panels[name] = (viz.tsne_embed(feats, seed=args.seed), labels.numpy())
    stem = "_".join(Path(s).stem if ":" not in s else s.replace(":", "-").replace("/", "-") for s in args.sources)
    return viz.plot_tsne(panels, Path(args.out) / f"tsne_{stem}.png", classes=getattr(dataset, "classes", None),
                         title=f"t-SNE of mean-pooled patch tokens ({args.data} {args.split}, {len(subset)} images)")


def _curves(args: argparse.Namespace) -> Path:
    runs = {Path(r).resolve().name: viz.read_metrics(r) for r in args.runs}
    return viz.plot_curves(runs, args.out, title="training curves: " + ", ".join(runs))
