"""`milan export RUN --to timm|hf --out ...`: weights that timm (and the Hugging Face Hub) load as they are.

`--to timm` writes one `.safetensors` file (the encoder in timm's `VisionTransformer` naming, plus
`head.*`/`fc_norm.*` for a finetuned classifier) and a JSON sidecar `FILE.json` with the timm model
name, its kwargs and the preprocessing milan evaluates with:

    import timm
    model = timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file="FILE.safetensors", num_classes=0,
                                                          mean=..., std=..., crop_pct=..., ...))

`num_classes` in the overlay makes timm load strictly (otherwise it drops the head and loads with
strict=False); the preprocessing fields make `timm.data.resolve_data_config(model=model)` give milan's
evaluation transform (ImageNet mean/std, bicubic, milan's crop ratio), not timm's defaults for the name.

`--to hf` writes a model folder — `config.json` (architecture, num_classes, model_args,
pretrained_cfg with that preprocessing), `model.safetensors`, and a `README.md` model card with the
pretraining setup and the evaluation results found beside the run — that
`timm.create_model("local-dir:DIR", pretrained=True)` loads strictly and the Hub takes unchanged.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from milan.errors import ConfigError

__all__ = ["export_timm", "export_hf", "preprocessing", "add_arguments", "run_from_args"]


def timm_crop_pct(img_size: int, crop_pct: float) -> float:
    """The crop ratio that makes timm resize like milan: timm floors img_size / crop_pct, milan rounds.

    Equal for the usual sizes (224 / 0.875 = 256); otherwise a ratio whose floor is milan's rounded size.
    """
    resize = int(round(img_size / crop_pct))  # milan.data.transforms.eval_transform
    if math.floor(img_size / crop_pct) == resize:
        return crop_pct
    return round(img_size / (resize + 0.5), 6)  # floor(img_size / this) = resize, with 0.5 to spare


def preprocessing(pretrained: Any) -> dict[str, Any]:
    """timm `pretrained_cfg` fields for milan's evaluation transform at the encoder's resolution.

    milan evaluates (kNN, linear probe, finetune, eval) with ImageNet mean/std, a bicubic resize of the
    short side to img_size / crop_pct and a centre crop; crop_pct is the run's `data.crop_pct` when its
    config has one (a finetune run), else the recipes' default.
    """
    # lazy: imports torch; the CLI imports this module for `milan export --help`
    from milan.data.transforms import EVAL_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD

    size = pretrained.encoder_config.img_size
    data = (pretrained.config or {}).get("data") or {}
    crop = data.get("crop_pct") if isinstance(data.get("crop_pct"), (int, float)) else EVAL_CROP_PCT
    return {"input_size": [3, size, size], "interpolation": "bicubic", "crop_pct": timm_crop_pct(size, float(crop)),
            "crop_mode": "center", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def _prepare(checkpoint: str | Path, *, head: bool) -> tuple[Any, dict[str, Any], dict[str, Any], dict[str, str]]:
    """(pretrained, state, timm create kwargs, safetensors header) of what is exported."""
    # lazy: imports torch; the CLI imports this module for `milan export --help`
    from milan.io.weights import load_pretrained

    pretrained = load_pretrained(checkpoint)
    state, meta = pretrained.state, pretrained.meta
    if not head:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    num_classes = int(state["head.weight"].shape[0]) if "head.weight" in state else 0
    create_kwargs: dict[str, Any] = {"num_classes": num_classes, "global_pool": meta["global_pool"]}
    header = {"milan": json.dumps({
        "encoder": meta["encoder"], "preset": meta["preset"], "source_format": meta["format"],
        "classes": meta.get("classes", []) if "head.weight" in state else [],
        "spec": asdict(pretrained.spec) if pretrained.spec is not None else None}), "format": "pt"}
    return pretrained, state, create_kwargs, header


def _save(state: dict[str, Any], out: Path, header: dict[str, str]) -> None:
    """`out` written atomically, readable by others (safetensors creates files as 0600)."""
    # lazy: imports torch; the CLI imports this module for `milan export --help`
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=header)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # exports are meant to be shared
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)  # only left when something above failed


def export_timm(checkpoint: str | Path, out: str | Path, *, head: bool = True) -> dict[str, Any]:
    """Write `out` (.safetensors) and `out.json` for timm; returns the sidecar dict.

    Args:
        checkpoint: any file or run folder `milan.io.weights.load_pretrained` reads.
        out: the .safetensors file to write.
        head: keep a finetuned classifier's head (`head.*`); ignored when there is none.
    """
    # lazy: imports torch; the CLI imports this module for `milan export --help`
    from milan.io.weights import timm_kwargs

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out must end in .safetensors, got {out}")
    pretrained, state, create_kwargs, header = _prepare(checkpoint, head=head)
    config = pretrained.encoder_config
    if config.timm_name is not None:
        # lazy: imports torch; the CLI imports this module for `milan export --help`
        import timm

        default_size = timm.models.get_pretrained_cfg(config.timm_name).input_size[-1]
        if default_size != config.img_size:
            create_kwargs["img_size"] = config.img_size
    meta = pretrained.meta
    sidecar = {
        "timm_name": config.timm_name,
        "architecture": _architecture(config),  # what the printed timm call uses (timm_name, else a ViT as wide)
        "create_model_kwargs": create_kwargs,
        "vision_transformer_kwargs": {**timm_kwargs(config), **create_kwargs},
        # timm's data config for this export (pretrained_cfg_overlay / resolve_data_config): milan's eval transform
        "pretrained_cfg": preprocessing(pretrained),
        "source": str(checkpoint),
        "format": meta["format"],
        "preset": meta["preset"],
        "dropped": meta["dropped"],
    }
    _save(state, out, header)
    out.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return sidecar


def _architecture(config: Any) -> str:
    """A registered timm ViT whose factory takes our shape as kwargs: the preset's, else one as wide."""
    # lazy: imports torch; the CLI imports this module for `milan export --help`
    from milan.encoder import ENCODER_PRESETS

    if config.timm_name is not None:
        return config.timm_name
    same_width = [c.timm_name for c in ENCODER_PRESETS.values() if c.embed_dim == config.embed_dim and c.timm_name]
    return (same_width or ["vit_base_patch16_224"])[0]  # model_args override every shape field


def export_hf(checkpoint: str | Path, out_dir: str | Path, *, head: bool = True) -> dict[str, Any]:
    """Write a timm / Hugging Face model folder: config.json, model.safetensors, README.md; returns the config.

    Args:
        checkpoint: any file or run folder `milan.io.weights.load_pretrained` reads.
        out_dir: the folder to write (created; files of a previous export are replaced).
        head: keep a finetuned classifier's head (`head.*`); ignored when there is none.
    """
    # lazy: imports torch; the CLI imports this module for `milan export --help`
    from milan.io.weights import timm_kwargs

    out_dir = Path(out_dir)
    if out_dir.suffix in (".safetensors", ".json", ".pt", ".pth", ".bin"):
        raise ConfigError(f"--to hf writes a folder; give --out DIR (not a file name like {out_dir.name})")
    pretrained, state, create_kwargs, header = _prepare(checkpoint, head=head)
    config = pretrained.encoder_config
    arch = _architecture(config)
    model_args = {**timm_kwargs(config), **create_kwargs}
    num_classes = create_kwargs["num_classes"]
    classes = json.loads(header["milan"])["classes"]
    pretrained_cfg = {"tag": "milan", "custom_load": False, **preprocessing(pretrained), "fixed_input_size": True,
                      "num_classes": num_classes, "first_conv": "patch_embed.proj", "classifier": "head"}
    hf_config: dict[str, Any] = {"architecture": arch, "num_classes": num_classes,
                                 "num_features": config.embed_dim, "global_pool": create_kwargs["global_pool"],
                                 "model_args": model_args, "pretrained_cfg": pretrained_cfg}
    if classes:
        hf_config["label_names"] = classes
    _save(state, out_dir / "model.safetensors", header)
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    (out_dir / "README.md").write_text(model_card(pretrained, hf_config, source=str(checkpoint)))
    return hf_config


def _results_near(run_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    """(folder, results.json) of evaluations of this run: in it, below it, or beside it naming it."""
    found: list[tuple[str, dict[str, Any]]] = []
    candidates = [run_dir, *sorted(p for p in run_dir.iterdir() if p.is_dir())]
    if run_dir.parent.is_dir():
        for sibling in sorted(p for p in run_dir.parent.iterdir() if p.is_dir() and p != run_dir):
            try:
                weights = ((yaml.safe_load((sibling / "config.yaml").read_text()) or {}).get("model") or {}).get("weights")
            except (OSError, yaml.YAMLError, AttributeError):
                continue
            if isinstance(weights, str) and weights:
                named = Path(weights).expanduser().resolve()
                if run_dir.resolve() in (named, named.parent):
                    candidates.append(sibling)
    for folder in candidates:
        try:
            found.append((folder.name, json.loads((folder / "results.json").read_text())))
        except (OSError, json.JSONDecodeError):
            continue
    return found


def _result_rows(results: list[tuple[str, dict[str, Any]]]) -> list[str]:
    rows = []
    for folder, r in results:
        if isinstance(r.get("knn_top1"), (int, float)):
            what, value = f"kNN (k={r.get('k')}, T={r.get('temperature')})", r["knn_top1"]
        elif isinstance(r.get("best"), dict) and isinstance(r["best"].get("top1"), (int, float)):
            what = "linear probe" if "semantic_topk" in r else "finetune"
            value = r["best"]["top1"]
        else:
            continue
        size = f"{r['num_val']} images" if "num_val" in r else f"{r.get('num_classes', '?')} classes"
        rows.append(f"| {what} | {100 * value:.2f} | {size} | `{folder}` |")
    return rows


def model_card(pretrained: Any, hf_config: dict[str, Any], *, source: str) -> str:
    """README.md for the Hub: what the weights are, how they were pretrained, what they scored."""
    config, spec, meta = pretrained.config or {}, pretrained.spec, pretrained.meta
    enc = pretrained.encoder_config
    pre = hf_config["pretrained_cfg"]
    clip = (spec.target if spec is not None else meta.get("target")) == "clip"  # MILAN-style, not MAE / timm
    lines = ["---", "library_name: timm", "tags:", "- image-feature-extraction", "- timm", "- milan", "---", "",
             f"# MILAN ViT ({meta['preset'] or f'{enc.embed_dim}-wide, {enc.depth} blocks'})", "",
             ("A ViT encoder pretrained with MILAN (masked image pretraining on language-assisted representation: "
              "the masked student reconstructs a frozen CLIP model's features), " if clip else "A ViT encoder, ")
             + f"exported by `milan export --to hf` from `{source}` ({meta['source']}).", "",
             "## Pretraining", ""]
    if spec is not None:
        lines.append(f"- model: `{spec.name}`, target {spec.target}, decoder {spec.decoder}"
                     + (f" ({spec.decoder_dim} wide, {spec.decoder_depth} blocks, {spec.decoder_heads} heads)"
                        if spec.decoder_dim else "") + f", {spec.masking} masking, mask ratio {spec.mask_ratio}")
    teacher = config.get("teacher") or {}
    if teacher.get("spec"):
        lines.append(f"- teacher: `{teacher['spec']}`" + (f" (weights `{teacher['weights']}`)" if teacher.get("weights")
                                                          else ""))
    data = config.get("data") or {}
    if data.get("kind"):
        lines.append(f"- data: {data['kind']}" + (f" `{data['path']}`" if data.get("path") else "")
                     + f", {data.get('img_size', enc.img_size)} px")
    optim = config.get("optim") or {}
    if pretrained.step is not None:
        planned = optim.get("steps") or (f"{optim['epochs']} epochs" if optim.get("epochs") else None)
        lines.append(f"- steps: {pretrained.step}" + (f" (of {planned})" if planned else ""))
    if len(lines) == lines.index("## Pretraining") + 2:
        lines.append(f"- not recorded in the source file ({meta['source']})")
    lines += ["", f"Encoder: patch {enc.patch_size}, width {enc.embed_dim}, {enc.depth} blocks, {enc.num_heads} heads, "
              f"{enc.img_size} px; features: the CLS token after the final norm"
              + (f"; a {hf_config['num_classes']}-class head (global {hf_config['global_pool']} pooling)"
                 if hf_config["num_classes"] else "") + ".", "", "## Evaluation", ""]
    run_dir = pretrained.path.parent if pretrained.config is not None else None
    rows = _result_rows(_results_near(run_dir)) if run_dir is not None else []
    if rows:
        lines += ["| evaluation | top-1 (%) | on | run folder |", "|---|---|---|---|", *rows]
    else:
        lines.append("No evaluation results were found beside the run (results.json of `milan knn`, "
                     "`milan linprobe`, `milan finetune`).")
    lines += ["", "## Use", "", "```python", "import timm", "", 'model = timm.create_model("local-dir:THIS_FOLDER", '
              "pretrained=True)  # or hf-hub:<your id> once uploaded",
              "config = timm.data.resolve_data_config(model=model)  # milan's evaluation preprocessing",
              "transform = timm.data.create_transform(**config)",
              "features = model(transform(image).unsqueeze(0))" + ("" if hf_config["num_classes"] else
                                                                   f"  # [1, {enc.embed_dim}]"), "```", "",
              f"Preprocessing: resize the short side to {pre['input_size'][1]} / {pre['crop_pct']} (bicubic), "
              f"centre-crop {pre['input_size'][1]}, ImageNet mean {pre['mean']} / std {pre['std']}.", ""]
    return "\n".join(lines)


def _snippet(path: Path, sidecar: dict[str, Any]) -> str:
    """The timm call that loads the export strictly, with milan's preprocessing in its pretrained_cfg."""
    create = dict(sidecar["create_model_kwargs"])
    if not sidecar["timm_name"]:  # a generic ViT name, every shape field given
        create = dict(sidecar["vision_transformer_kwargs"])
    pre = {k: tuple(v) if isinstance(v, list) else v for k, v in sidecar["pretrained_cfg"].items()}
    overlay = ", ".join(f"{k}={v!r}" for k, v in {"file": str(path), "num_classes": create["num_classes"], **pre}.items())
    extra = ", ".join(f"{k}={v!r}" for k, v in create.items())
    return (f"model = timm.create_model({sidecar['architecture']!r}, pretrained=True, {extra},\n"
            f"                          pretrained_cfg_overlay=dict({overlay}))\n"
            "transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))  # milan's eval")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path,
                        help="a run folder or checkpoint of milan, the MILAN authors' / MAE / mmpretrain checkpoint, "
                             "or a timm model folder")
    parser.add_argument("--to", choices=["timm", "hf"], default="timm",
                        help="timm: one .safetensors file + a .json sidecar; hf: a timm / Hugging Face model folder "
                             "(config.json, model.safetensors, README.md) for timm.create_model('local-dir:DIR') "
                             "or the Hub")
    parser.add_argument("--out", type=Path, required=True,
                        help="--to timm: the .safetensors file (a .json sidecar is written beside it); --to hf: the folder")
    parser.add_argument("--no-head", action="store_true", help="drop a finetuned classifier's head")


def run_from_args(args: argparse.Namespace) -> None:
    log = logging.getLogger("milan")
    if not log.handlers:  # the reader's lines (which file a folder stood for, its format, what was dropped)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    if args.to == "hf":
        config = export_hf(args.checkpoint, args.out, head=not args.no_head)
        pre = config["pretrained_cfg"]
        print(f"wrote {args.out}/config.json, model.safetensors, README.md ({config['architecture']}, "
              f"{config['num_classes']} classes; preprocessing: {pre['input_size'][1]} px, crop_pct {pre['crop_pct']}, "
              f"{pre['interpolation']}, ImageNet mean/std)")
        print(f"load it with:\n  import timm\n  model = timm.create_model('local-dir:{args.out}', pretrained=True)\n"
              "  transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))")
        return
    sidecar = export_timm(args.checkpoint, args.out, head=not args.no_head)
    dropped = sidecar["dropped"]
    if dropped:
        print(f"dropped {len(dropped)} non-encoder keys ({', '.join(dropped[:4])}{', ...' if len(dropped) > 4 else ''})")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    print("load it with:\n  import timm\n  " + _snippet(args.out, sidecar).replace("\n", "\n  "))
