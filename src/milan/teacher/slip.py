"""`slip:<model>`: the image tower of a checkpoint saved by SLIP's training script (Table 5 #9).

SLIP (facebookresearch/SLIP) saves `{'epoch', 'state_dict', 'optimizer', 'scaler', 'best_acc1',
'args'}` with `args` an `argparse.Namespace` and `state_dict` the DDP-wrapped model's weights
(`module.` prefix): the image tower under `visual.*` (a timm VisionTransformer built with
`num_classes=0`), `image_projection` [width, embed_dim], the text tower, `logit_scale` and, for
SLIP models, the SimCLR head `image_mlp.*`. One layout holds the repo's three model kinds:

- SLIP_VIT{S,B,L}16 and CLIP_VIT{S,B,L}16 have an `image_projection` into the space shared with
  text: they can be teachers.
- SIMCLR_VIT{S,B,L}16 have none (their image features were never aligned with language): refused.

Targets are every token of the tower after its final norm, times `image_projection` (the place
CLIP's `ln_post @ proj` sits, and what the MILAN authors feed from SLIP). The projection becomes the
timm model's head, so `TimmTeacher` computes tokens and the last block's CLS-row attention as it
does for any CLS ViT. Input statistics: SLIP's `main.py` normalises with ImageNet's mean/std.

Loading is safe: the `Namespace` is allowed by name (`milan.io.safe_load.SAFE_CLASSES`), any other
pickled object is refused unrun. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from milan.errors import TeacherError, TeacherFileNotFound
from milan.io.safe_load import file_kind, read_safetensors, read_torch_file
from milan.teacher.base import check_fits
from milan.teacher.timm_vit import TimmTeacher

__all__ = ["SLIP_MEAN", "SLIP_MODELS", "SLIP_STD", "SLIP_TOWERS", "build_slip_teacher", "slip_tower"]

#: SLIP's `main.py` normalises with ImageNet's statistics (not CLIP's).
SLIP_MEAN, SLIP_STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

#: Tower -> (timm model, overrides) as SLIP's models.py builds it (always num_classes=0).
#: ViT-S is MoCo v3's small ViT (`vit_small_mocov3_patch16_224`): 12 heads of 32, where timm's
#: vit_small has 6 heads of 64; the weights have the same shapes, so only the name tells them apart.
SLIP_TOWERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ViT-S-16": ("vit_small_patch16_224", {"num_heads": 12}),
    "ViT-B-16": ("vit_base_patch16_224", {}),
    "ViT-L-16": ("vit_large_patch16_224", {}),
}
#: SLIP's model names (its `--model`, saved in `args.model`) -> tower.
SLIP_MODELS: dict[str, str] = {
    f"{kind}_VIT{size}16": f"ViT-{size}-16" for kind in ("SLIP", "CLIP", "SIMCLR") for size in "SBL"
}
#: Other names a user may reach for: the timm names SLIP's models.py creates.
_ALIASES: dict[str, str] = {
    "vit_small_mocov3_patch16_224": "ViT-S-16",
    "vit_base_patch16_224": "ViT-B-16",
    "vit_large_patch16_224": "ViT-L-16",
}
_WIDTHS = {384: "ViT-S-16", 768: "ViT-B-16", 1024: "ViT-L-16"}
_EXPECTED = "a checkpoint saved by SLIP's main.py (e.g. the released slip_base_100ep.pt)"


def _tower_of(name: str) -> str:
    """The tower a spec name means, or a TeacherError listing the names."""
    if name in SLIP_TOWERS:
        return name
    if name.upper() in SLIP_MODELS:
        if name.upper().startswith("SIMCLR"):
            raise TeacherError(_simclr_refusal(name.upper()))
        return SLIP_MODELS[name.upper()]
    if name in _ALIASES:
        return _ALIASES[name]
    usable = [m for m in SLIP_MODELS if not m.startswith("SIMCLR")]
    raise TeacherError(f"unknown SLIP model {name!r}; use one of {', '.join(usable)} (SLIP's --model names) "
                       f"or the tower {', '.join(SLIP_TOWERS)}")


def _simclr_refusal(what: str) -> str:
    return (f"{what} is a SimCLR model of the SLIP repo: it has no image_projection (its features were never "
            "aligned with text), so it cannot be a MILAN teacher; use a SLIP_* or CLIP_* checkpoint")


def slip_tower(tower: str) -> nn.Module:
    """The timm VisionTransformer SLIP builds for `tower`, random weights, any input grid."""
    timm_name, overrides = SLIP_TOWERS[tower]
    return timm.create_model(timm_name, pretrained=False, num_classes=0, dynamic_img_size=True, **overrides)


def _read(path: Path) -> tuple[dict[str, Tensor], str | None]:
    """(state dict without `module.`, args.model or None) of a SLIP checkpoint, read safely."""
    if not path.is_file():
        raise TeacherFileNotFound(f"SLIP checkpoint not found: {path} (teacher.weights=PATH to {_EXPECTED})")
    if file_kind(path) == "safetensors":
        obj: Any = read_safetensors(path, subject="teacher weights", expected=_EXPECTED, error=TeacherError)[0]
    else:
        obj = read_torch_file(path, subject="teacher weights", expected=_EXPECTED, error=TeacherError)
    args = obj.get("args") if isinstance(obj, dict) else None
    model = getattr(args, "model", None) if isinstance(args, argparse.Namespace) else None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise TeacherError(f"teacher weights {path} hold no state dict (got {type(obj).__name__}): "
                           f"expected {_EXPECTED}")
    return {k.removeprefix("module."): v for k, v in obj.items()}, model if isinstance(model, str) else None


def build_slip_teacher(name: str, weights: str | Path | None, **kwargs: Any) -> TimmTeacher:
    """`slip:<model>` with `weights` = a SLIP checkpoint (SLIP / CLIP models of that repo)."""
    tower = _tower_of(name)
    if weights is None:
        raise TeacherError(f"teacher 'slip:{name}' needs weights=<path> ({_EXPECTED}); nothing is downloaded: "
                           "SLIP's README links the released checkpoints")
    path = Path(weights).expanduser()
    state, model_name = _read(path)
    if model_name and model_name.upper().startswith("SIMCLR"):
        raise TeacherError(f"teacher weights {path}: " + _simclr_refusal(model_name))
    if "image_projection" not in state:
        if any(k.startswith("image_mlp.") for k in state):
            raise TeacherError(f"teacher weights {path}: " + _simclr_refusal("this checkpoint"))
        raise TeacherError(f"teacher weights {path} have no image_projection (keys: {', '.join(list(state)[:4])}, "
                           f"...): expected {_EXPECTED}")
    if model_name in SLIP_MODELS and SLIP_MODELS[model_name] != tower:
        raise TeacherError(f"teacher weights {path} are SLIP's {model_name} (its args.model), a "
                           f"{SLIP_MODELS[model_name]} tower, not {tower}: use teacher.spec=slip:{model_name}")
    visual = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    projection = state["image_projection"]  # [width, embed_dim]
    model = slip_tower(tower)
    width = projection.shape[0]
    guess = _WIDTHS.get(width)
    hint = (f"the checkpoint's image_projection has {width} rows: "
            + (f"a {guess} tower, use teacher.spec=slip:{guess}" if guess else "not a SLIP ViT-S/B/L tower"))
    check_fits(model, visual, f"SLIP's {tower} image tower", path, hint)
    model.load_state_dict(visual, strict=True)
    if width != model.embed_dim:
        raise TeacherError(f"teacher weights {path}: image_projection {list(projection.shape)} does not fit the "
                           f"{model.embed_dim}-wide tower; {hint}")
    # The projection as the timm head: TimmTeacher applies head(norm(x)) to every token.
    head = nn.Linear(width, projection.shape[1], bias=False)
    with torch.no_grad():
        head.weight.copy_(projection.T)
    model.head = head
    kwargs.setdefault("mean", SLIP_MEAN)
    kwargs.setdefault("std", SLIP_STD)
    return TimmTeacher(model, **kwargs)
