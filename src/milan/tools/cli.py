"""The `milan` command line: `milan <command> [--config FILE] [key=value ...]`.

Recipe commands (`pretrain`, ...) take a YAML config (a path, or the name of one shipped in
`milan/configs/`, e.g. `--config pretrain_vit_base`) and dotted `key=value` overrides. Every
command has `--help`. `python -m milan` and `torchrun -m milan` behave the same way.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from milan.train.config import config_path, config_recipe, shipped_configs

__all__ = ["main", "run", "build_parser"]


def _recipe_parser(sub: argparse._SubParsersAction, name: str, help: str, config_cls_path: str,
                   example: str = "optim.epochs=100 data.path=/data/imagenet") -> None:
    configs = [c for c in shipped_configs() if config_recipe(c) == name]
    p = sub.add_parser(
        name, help=help, description=help,
        epilog=(
            f"Overrides are dotted keys, e.g. {example} run.out_dir=runs/x. "
            f"Shipped configs for {name}: {', '.join(configs) or 'none (the defaults are the recipe)'}. "
            "Use --print-config to see every key with its resolved value."
        ),
    )
    p.add_argument("--config", help="YAML file or shipped config name")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=_run_recipe, config_cls=config_cls_path)


def _tool_parser(sub: argparse._SubParsersAction, name: str, module: str, help: str, description: str) -> None:
    """A subcommand whose module brings its own `add_arguments` and `run_from_args`."""
    import importlib

    tool = importlib.import_module(module)
    p = sub.add_parser(name, help=help, description=description,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    tool.add_arguments(p)
    p.set_defaults(func=tool.run_from_args)


def _run_recipe(args: argparse.Namespace) -> None:
    import importlib

    import yaml

    from milan.train.config import load_config, to_dict

    module = importlib.import_module(args.config_cls)
    cfg = load_config(module.CONFIG, config_path(args.config), args.overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return
    module.main(cfg)


def _cmd_data_shapes(args: argparse.Namespace) -> None:
    from milan.data.shapes import default_shapes_root, generate_shapes

    root = generate_shapes(
        args.out or default_shapes_root(), num_train=args.num_train, num_val=args.num_val,
        image_size=args.image_size, seed=args.seed, workers=args.workers,
    )
    print(root)


def _cmd_data_shards(args: argparse.Namespace) -> None:
    from milan.data.wds import folder_to_shards

    shards = folder_to_shards(args.folder, args.out, per_shard=args.per_shard, seed=args.seed,
                              max_size=args.max_size, quality=args.quality)
    bounded = f" (short side ≤ {args.max_size}, JPEG quality {args.quality})" if args.max_size else ""
    print(f"wrote {len(shards)} shards to {args.out}{bounded}")


def _cmd_info(args: argparse.Namespace) -> None:
    import milan
    from milan.model import model_names

    print(f"milan {milan.__version__}")
    print("models:   " + ", ".join(model_names()))
    print("teachers: openclip:<arch> (weights=FILE), hf:<folder>, timm:<name> (weights=FILE), builtin:shapes")
    print("configs:  " + ", ".join(shipped_configs()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="milan",
        description="MILAN: masked image pretraining on language-assisted representation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)

    _recipe_parser(sub, "pretrain", "pretrain a ViT with MILAN (or an ablation variant)", "milan.recipes.pretrain")

    _recipe_parser(sub, "knn", "weighted kNN top-1 of a frozen encoder (k=20, T=0.07, cosine)", "milan.recipes.knn",
                   "model.weights=runs/pretrain data.path=/data/imagenet")

    _recipe_parser(sub, "linprobe", "linear probe of a frozen encoder (BN + linear head, LARS)", "milan.recipes.linprobe")

    _recipe_parser(sub, "finetune", "finetune a pretrained encoder as a timm ViT classifier (A.1 recipe)",
                   "milan.recipes.finetune")

    _recipe_parser(sub, "eval", "top-1/top-5 of a finetuned classifier on ImageFolder val sets "
                   "(ImageNet, -A, -R, -Sketch)", "milan.recipes.evaluate",
                   "model.weights=runs/finetune/checkpoint-best.pt data.paths=[/data/imagenet/val]")

    _recipe_parser(sub, "segment", "semantic segmentation transfer: UperNet on a ViT pyramid (ADE20K folder or shapes)",
                   "milan.recipes.segment", "optim.iters=1000 model.weights=runs/pretrain")

    _recipe_parser(sub, "detect", "detection / instance segmentation transfer: Mask R-CNN + FPN on a ViT pyramid "
                   "(COCO json or shapes)", "milan.recipes.detect", "optim.epochs=2 model.weights=runs/pretrain")

    export = sub.add_parser(
        "export", help="export encoder (or finetuned classifier) weights for timm (.safetensors + .json)",
        description="Write a checkpoint's encoder as timm-named safetensors plus a JSON sidecar with the "
        "timm model name and kwargs; prints the timm.create_model call that loads it.",
    )
    from milan.io import export as export_module

    export_module.add_arguments(export)
    export.set_defaults(func=export_module.run_from_args)

    _tool_parser(sub, "demo", "milan.tools.demo",
                 "end-to-end demo on the built-in shapes data and teacher (CPU, minutes)",
                 "Generate the shapes data, load builtin:shapes, pretrain a tiny MILAN student, probe it "
                 "against a random-init student and the teacher, write a report and figures.")

    data = sub.add_parser("data", help="dataset utilities")
    data_sub = data.add_subparsers(dest="data_command", metavar="<what>", required=True)
    shapes = data_sub.add_parser("shapes", help="generate the built-in captioned shapes dataset",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    shapes.add_argument("--out", type=Path, help="output folder (default: $MILAN_CACHE/shapes or ~/.cache/milan/shapes)")
    shapes.add_argument("--num-train", type=int, default=50000)
    shapes.add_argument("--num-val", type=int, default=10000)
    shapes.add_argument("--image-size", type=int, default=64)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--workers", type=int, default=2)
    shapes.set_defaults(func=_cmd_data_shapes)
    shards = data_sub.add_parser("shards", help="convert an ImageFolder into shuffled WebDataset tar shards")
    shards.add_argument("folder", type=Path, help="ImageFolder root (root/<class>/<image>)")
    shards.add_argument("out", type=Path, help="output folder for shard-000000.tar, ... and sizes.json")
    shards.add_argument("--per-shard", type=int, default=1000, help="images per shard")
    shards.add_argument("--seed", type=int, default=0, help="shuffle seed")
    shards.add_argument("--max-size", type=int, help="re-encode images whose short side is larger to this short "
                        "side (JPEG; faster decoding, FFCV-style; recorded in sizes.json). Default: copy bytes")
    shards.add_argument("--quality", type=int, default=90, help="JPEG quality of the --max-size re-encode")
    shards.set_defaults(func=_cmd_data_shards)

    teacher = sub.add_parser("teacher", help="teacher utilities")
    teacher_sub = teacher.add_subparsers(dest="teacher_command", metavar="<what>", required=True)
    _tool_parser(teacher_sub, "train-shapes", "milan.tools.train_shapes_teacher",
                 "train the small CLIP shipped as builtin:shapes (≈10 min on 2 CPU cores)",
                 "Train the shapes CLIP with language supervision, report zero-shot accuracy and attention on "
                 "objects, export the vision tower and card (default: runs/shapes_teacher; use it with "
                 "teacher.spec=builtin:shapes teacher.weights=runs/shapes_teacher/shapes_clip_visual.safetensors).")

    bench = sub.add_parser("bench", help="benchmarks (speed, MFU)")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="<what>", required=True)
    from milan.tools import bench as bench_module

    speed = bench_sub.add_parser(
        "speed", help="images/s, phase split, peak memory and MFU of one pretraining step (CPU or CUDA)"
    )
    bench_module.add_arguments(speed)
    speed.set_defaults(func=bench_module.run_from_args)
    _tool_parser(bench_sub, "data", "milan.tools.bench.data",
                 "images/s per CPU core of the pretraining input path, and cores per GPU (CPU or CUDA)",
                 "Time the input path of milan pretrain (decode, crop, collate, host→device) for the reference "
                 "path and the fast paths side by side, per core and optionally with N DataLoader workers; with "
                 "--step-rate, how many cores one GPU needs.")

    from milan.tools import viz_cli

    viz_cli.add_arguments(sub.add_parser("viz", help="paper figures as PNG files: masks, attention, tsne, curves"))

    info = sub.add_parser("info", help="list models, teacher specs and shipped configs")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Parse and run one command; errors propagate (the form tests and Python callers want)."""
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    func(args)


def run(argv: Sequence[str] | None = None) -> None:
    """The `milan` executable: `main`, with a `milan.errors.UserError` (a bad config value, a missing
    file, an unreadable checkpoint: anything the user can fix) printed as one line and exit status 2.
    Every other exception keeps its traceback (it may be a bug); MILAN_TRACEBACK=1 shows the
    traceback of user errors too."""
    import os

    from milan.errors import UserError

    try:
        main(argv)
    except UserError as err:
        if os.environ.get("MILAN_TRACEBACK"):
            raise
        args = argv if argv is not None else sys.argv[1:]
        command = " ".join(a for a in args[:2] if not a.startswith("-") and "=" not in a)
        print(f"milan {command}: error: {err}\n(MILAN_TRACEBACK=1 shows where it was raised)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    run(sys.argv[1:])
