"""The `milan` command line: `milan <command> [--config FILE] [key=value ...]`.

Recipe commands (`pretrain`, ...) take a YAML config (a path, or the name of one shipped in
`milan/configs/`, e.g. `--config pretrain_vit_base`) and dotted `key=value` overrides. Every
command has `--help`. `python -m milan` and `torchrun -m milan` behave the same way.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

import milan
from milan.errors import ConfigError, UserError
from milan.train.config import config_path, config_recipe, load_config, shipped_configs, to_dict

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


def _tool_parser(sub: argparse._SubParsersAction, name: str, module: str, help: str, description: str | None = None,
                 *, load: bool = True, formatter: type = argparse.ArgumentDefaultsHelpFormatter) -> None:
    """A subcommand whose module brings its own `add_arguments` and `run_from_args`.

    The module (which imports torch) is imported only when `load` is true, i.e. when the command line
    names this subcommand: `milan --help` lists every command without importing any of them.
    """
    p = sub.add_parser(name, help=help, description=description or help, formatter_class=formatter)
    if load:
        tool = importlib.import_module(module)
        tool.add_arguments(p)
        if hasattr(tool, "run_from_args"):
            p.set_defaults(func=tool.run_from_args)


def _run_recipe(args: argparse.Namespace) -> None:
    module = importlib.import_module(args.config_cls)
    cfg = load_config(module.CONFIG, config_path(args.config), args.overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return
    module.main(cfg)


def _cmd_data_shapes(args: argparse.Namespace) -> None:
    # lazy: these import torch; `milan --help` loads only milan.train.config
    from milan.data.shapes import default_shapes_root, generate_shapes

    root = generate_shapes(
        args.out or default_shapes_root(), num_train=args.num_train, num_val=args.num_val,
        image_size=args.image_size, seed=args.seed, workers=args.workers,
    )
    print(root)


def _cmd_data_shards(args: argparse.Namespace) -> None:
    # lazy: these import torch; `milan --help` loads only milan.train.config
    from milan.data.reading import BadFiles
    from milan.data.wds import folder_to_shards
    from milan.train.log import get_logger

    get_logger()  # the folder's start line and one warning per unreadable file
    bad = BadFiles(max_fraction=None, folder=args.out)
    shards = folder_to_shards(args.folder, args.out, per_shard=args.per_shard, seed=args.seed,
                              max_size=args.max_size, quality=args.quality, min_size=args.min_size, bad_files=bad)
    bounded = f" (short side ≤ {args.max_size}, JPEG quality {args.quality})" if args.max_size else ""
    print(f"wrote {len(shards)} shards to {args.out}{bounded}")
    if bad.summary() is not None:
        print(bad.summary())


def _cmd_info(args: argparse.Namespace) -> None:
    # lazy: these import torch; `milan --help` loads only milan.train.config
    from milan.encoder import ENCODER_PRESETS
    from milan.model import model_names
    from milan.teacher import SPEC_FORMS

    print(f"milan {milan.__version__}")
    print("models:   " + ", ".join(model_names()) + "  (pretrain: model.name=)")
    print("encoders: " + ", ".join(ENCODER_PRESETS) + "  (knn, linprobe, finetune, segment, detect: model.preset=; "
          "a model name works too)")
    print("teachers: " + "\n          ".join(SPEC_FORMS))
    print("configs:  " + ", ".join(shipped_configs()))


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with `argv`, only the subcommands it names get their (torch-importing) arguments."""

    def wanted(name: str) -> bool:
        return argv is None or name in argv

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

    _tool_parser(sub, "export", "milan.io.export",
                 "export encoder (or finetuned classifier) weights for timm (.safetensors + .json) or as a "
                 "timm / Hugging Face model folder (--to hf)",
                 "Write a checkpoint's encoder as timm-named safetensors plus a JSON sidecar with the timm model "
                 "name, kwargs and milan's evaluation preprocessing (--to timm), or a model folder that "
                 "timm.create_model('local-dir:DIR') and the Hub load (--to hf); prints the call that loads it.",
                 load=wanted("export"), formatter=argparse.HelpFormatter)

    _tool_parser(sub, "demo", "milan.tools.demo",
                 "end-to-end demo on the built-in shapes data and teacher (CPU, minutes)",
                 "Generate the shapes data, load builtin:shapes, pretrain a tiny MILAN student, probe it "
                 "against a random-init student and the teacher, write a report and figures.", load=wanted("demo"))

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
    shards.add_argument("--min-size", type=int, default=16,
                        help="leave out images with a shorter side (as pretrain's data.min_size)")
    shards.set_defaults(func=_cmd_data_shards)

    teacher = sub.add_parser("teacher", help="teacher utilities")
    teacher_sub = teacher.add_subparsers(dest="teacher_command", metavar="<what>", required=True)
    _tool_parser(teacher_sub, "train-shapes", "milan.tools.train_shapes_teacher",
                 "train the small CLIP shipped as builtin:shapes (≈10 min on 2 CPU cores; --method slip: "
                 "builtin:shapes-slip)",
                 "Train the shapes CLIP with language supervision (--method slip: plus SLIP's SimCLR loss on two "
                 "augmented views), report zero-shot accuracy and attention on objects, export the vision tower "
                 "and card (default: runs/shapes_teacher; use it with teacher.spec=builtin:shapes "
                 "teacher.weights=runs/shapes_teacher/shapes_clip_visual.safetensors, or builtin:shapes-slip "
                 "with shapes_slip_visual.safetensors).",
                 load=wanted("train-shapes"))

    bench = sub.add_parser("bench", help="benchmarks (speed, MFU)")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="<what>", required=True)
    _tool_parser(bench_sub, "speed", "milan.tools.bench",
                 "images/s, phase split, peak memory and MFU of one pretraining step (CPU or CUDA)",
                 load=wanted("speed"), formatter=argparse.HelpFormatter)

    _tool_parser(bench_sub, "data", "milan.tools.bench.data",
                 "images/s per CPU core of the pretraining input path, and cores per GPU (CPU or CUDA)",
                 "Time the input path of milan pretrain (decode, crop, collate, host→device) for the reference "
                 "path and the fast paths side by side, per core and optionally with N DataLoader workers; with "
                 "--step-rate, how many cores one GPU needs.", load=wanted("data"))

    _tool_parser(sub, "viz", "milan.tools.viz_cli", "paper figures as PNG files: masks, attention, tsne, curves",
                 "Write the paper's figures as PNG files (headless matplotlib).", load=wanted("viz"),
                 formatter=argparse.HelpFormatter)

    info = sub.add_parser("info", help="list models, teacher specs and shipped configs")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Parse and run one command; errors propagate (the form tests and Python callers want)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _check_override_form(unknown, recipe=hasattr(args, "config_cls"))
        parser.parse_args(argv)  # argparse's own message for anything else
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except BaseException:
        if "milan.train.run" in sys.modules:  # a run folder may have been started
            sys.modules["milan.train.run"].discard_failed_starts()
        raise


def _check_override_form(unknown: list[str], *, recipe: bool) -> None:
    """`--data.path=/x` (or `--lr=1`) to a recipe command: a `ConfigError` naming the form,
    not argparse's top-level usage. Dotted `--a.b` anywhere is taken for an override too."""
    for arg in unknown:
        key = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if key and (recipe or "." in key):
            value = arg.split("=", 1)[1] if "=" in arg else "..."
            raise ConfigError(f"overrides are key=value, no leading dashes: {key}={value} (not {arg})")


#: commands that resume from their run folder's newest checkpoint when run again
_RESUMABLE = ("pretrain", "finetune", "linprobe", "segment", "detect")


def _interrupted(err: KeyboardInterrupt, command: str) -> str:
    """The one line printed for Ctrl-C. A training loop sets `err.step` (the step reached) before
    re-raising; the resume hint only for commands that resume."""
    step = getattr(err, "step", None)
    where = f" at step {step}" if isinstance(step, int) and not isinstance(step, bool) else ""
    resume = "; rerun the same command to resume from the newest checkpoint" if command.split(" ")[0] in _RESUMABLE \
        else ""
    return f"milan {command}: interrupted{where}{resume}"


def run(argv: Sequence[str] | None = None) -> None:
    """The `milan` executable: `main`, with a `milan.errors.UserError` (a bad config value, a missing
    file, an unreadable checkpoint: anything the user can fix) printed as one line and exit status 2.
    Ctrl-C (`KeyboardInterrupt`) is one line too, with the step reached when the loop records it
    (`err.step`) and how to resume, and exit status 130. A preempted run (checkpointed, resumable)
    prints one line and exits with status 75 (`milan.train.loop.EXIT_PREEMPTED`). Every other exception
    keeps its traceback (it may be a bug); MILAN_TRACEBACK=1 shows the traceback of user errors and
    Ctrl-C too."""
    args = argv if argv is not None else sys.argv[1:]
    command = " ".join(a for a in args[:2] if not a.startswith("-") and "=" not in a)
    try:
        main(argv)
    except UserError as err:
        if os.environ.get("MILAN_TRACEBACK"):
            raise
        print(f"milan {command}: error: {err}\n(MILAN_TRACEBACK=1 shows where it was raised)", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as err:  # Ctrl-C: one line, no traceback, the shell's status for SIGINT
        if os.environ.get("MILAN_TRACEBACK"):
            raise
        print(_interrupted(err, command), file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:
        if type(err).__name__ != "Preempted":  # (milan.train.loop.Preempted; --help imports no torch)
            raise
        # preempted after its checkpoint: resumable, and said so by the exit status (the SLURM script requeues)
        print(f"milan: {err} (exit status {err.exit_status})", file=sys.stderr)
        raise SystemExit(err.exit_status) from None


if __name__ == "__main__":
    run(sys.argv[1:])
