"""`milan export CKPT --to timm --out FILE.safetensors`: weights that timm loads as they are.

The file holds the encoder in timm's `VisionTransformer` naming (plus `head.*`/`fc_norm.*` for a
finetuned classifier) and a JSON sidecar `FILE.json` with the timm model name and kwargs:

    import timm
    model = timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file="FILE.safetensors", num_classes=0))

`num_classes` in the overlay makes timm load strictly (otherwise it drops the head and loads with
strict=False). Presets without a timm name load with `timm.models.VisionTransformer(**kwargs)`
and `load_state_dict(safetensors.torch.load_file(FILE))`; the sidecar holds those kwargs.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from milan.errors import ConfigError

__all__ = ["export_timm", "add_arguments", "run_from_args"]


def export_timm(checkpoint: str | Path, out: str | Path, *, head: bool = True) -> dict[str, Any]:
    """Write `out` (.safetensors) and `out.json` for timm; returns the sidecar dict.

    Args:
        checkpoint: any file `milan.io.weights.encoder_state_dict` reads.
        out: the .safetensors file to write.
        head: keep a finetuned classifier's head (`head.*`); ignored when there is none.
    """
    from dataclasses import asdict

    from safetensors.torch import save_file

    from milan.io.weights import load_pretrained, timm_kwargs

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out must end in .safetensors, got {out}")
    pretrained = load_pretrained(checkpoint)
    state, meta = pretrained.state, pretrained.meta
    if not head:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    num_classes = int(state["head.weight"].shape[0]) if "head.weight" in state else 0
    config = pretrained.encoder_config
    kwargs = timm_kwargs(config)
    create_kwargs: dict[str, Any] = {"num_classes": num_classes, "global_pool": meta["global_pool"]}
    if config.timm_name is not None:
        import timm

        default_size = timm.models.get_pretrained_cfg(config.timm_name).input_size[-1]
        if default_size != config.img_size:
            create_kwargs["img_size"] = config.img_size
    sidecar = {
        "timm_name": config.timm_name,
        "create_model_kwargs": create_kwargs,
        "vision_transformer_kwargs": {**kwargs, **create_kwargs},
        "source": str(checkpoint),
        "format": meta["format"],
        "preset": meta["preset"],
        "dropped": meta["dropped"],
    }
    header = {"encoder": meta["encoder"], "preset": meta["preset"], "source_format": meta["format"],
              "classes": meta.get("classes", []) if "head.weight" in state else [],
              "spec": asdict(pretrained.spec) if pretrained.spec is not None else None}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
                  metadata={"milan": json.dumps(header), "format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates files as 0600; exports are meant to be shared
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)  # only left when something above failed
    out.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return sidecar


def _snippet(path: Path, sidecar: dict[str, Any]) -> str:
    create = dict(sidecar["create_model_kwargs"])
    overlay = f"pretrained_cfg_overlay=dict(file={str(path)!r}, num_classes={create['num_classes']})"
    extra = ", ".join(f"{k}={v!r}" for k, v in create.items())
    if sidecar["timm_name"]:
        return f"timm.create_model({sidecar['timm_name']!r}, pretrained=True, {extra}, {overlay})"
    kwargs = ", ".join(f"{k}={v!r}" for k, v in sidecar["vision_transformer_kwargs"].items())
    return (f"model = timm.models.VisionTransformer({kwargs})\n"
            f"model.load_state_dict(safetensors.torch.load_file({str(path)!r}))")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path,
                        help="a milan pretrain/finetune checkpoint, or an authors' MILAN/MAE checkpoint")
    parser.add_argument("--to", choices=["timm"], default="timm", help="target library (timm)")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors file (a .json sidecar is written beside it)")
    parser.add_argument("--no-head", action="store_true", help="drop a finetuned classifier's head")


def run_from_args(args: argparse.Namespace) -> None:
    sidecar = export_timm(args.checkpoint, args.out, head=not args.no_head)
    dropped = sidecar["dropped"]
    if dropped:
        print(f"dropped {len(dropped)} non-encoder keys ({', '.join(dropped[:4])}{', ...' if len(dropped) > 4 else ''})")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    print("load it with:\n  import timm, safetensors.torch\n  " + _snippet(args.out, sidecar).replace("\n", "\n  "))
