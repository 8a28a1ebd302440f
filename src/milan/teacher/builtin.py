"""The built-in teachers: small CLIPs trained on the captioned shapes data (`builtin:shapes`, and
`builtin:shapes-slip`, the same model trained the SLIP way: CLIP loss + SimCLR loss on two views).

It is an ordinary open_clip `CLIP` (vision ViT + text transformer) except for one change: the
vision tower's linear patch embedding (`visual.conv1`) is replaced by a small overlapping
convolutional stem (three 3×3 stride-2 convs with BatchNorm + ReLU, then a 1×1 conv to the
width) that still yields an 8×8 token grid at 64 px. With the plain linear patch embedding a
CPU-budget CLIP learns colour but not shape (see the project notes); with the stem it learns
both. Loading therefore rebuilds the stem before `load_state_dict`.

Files shipped in `milan/assets/`: `shapes_clip_visual.safetensors` (vision tower weights) and
`shapes_clip.json` (the card: config, training command, seed, zero-shot numbers, sha256); the
same three files with the `shapes_slip` stem for `builtin:shapes-slip` (`builtin_files`). Both
towers have the same architecture, so both load the same way.
`build_builtin_teacher` is the `builtin:<name>` builder of `milan.teacher.build_teacher`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from milan.errors import TeacherError
from milan.teacher.base import Teacher, TeacherFileNotFound, check_fits
from milan.teacher.openclip import OpenCLIPTeacher

__all__ = [
    "SHAPES_CLIP_CONFIG", "ConvStem", "build_shapes_clip", "load_shapes_visual",
    "ASSET_DIR", "WEIGHTS_FILE", "CARD_FILE", "ZEROSHOT_FILE", "sha256_file", "read_card",
    "load_zero_shot", "BUILTIN_TEACHERS", "build_builtin_teacher", "builtin_files",
]

# builtin teachers: name -> what they are (weights and card live in milan/assets)
BUILTIN_TEACHERS = {
    "shapes": "small CLIP trained on the captioned shapes data (milan.teacher.builtin)",
    "shapes-slip": "the same model trained the SLIP way: CLIP loss + SimCLR loss on two augmented views",
}

ASSET_DIR = Path(__file__).parents[1] / "assets"
WEIGHTS_FILE = ASSET_DIR / "shapes_clip_visual.safetensors"
CARD_FILE = ASSET_DIR / "shapes_clip.json"
#: Zero-shot classifiers from the text tower (colour [6, D], shape [6, D]); the text tower itself
#: is not shipped (its 49k-token embedding alone would be 25 MB).
ZEROSHOT_FILE = ASSET_DIR / "shapes_clip_zeroshot.safetensors"


def builtin_files(name: str) -> tuple[Path, Path, Path]:
    """(weights, card, zero-shot classifiers) of built-in teacher `name` in milan/assets."""
    if name == "shapes":  # the module globals, read now (a test may point them elsewhere)
        return WEIGHTS_FILE, CARD_FILE, ZEROSHOT_FILE
    stem = name.replace("-", "_")  # shapes-slip -> shapes_slip_visual.safetensors, shapes_slip.json
    return (ASSET_DIR / f"{stem}_visual.safetensors", ASSET_DIR / f"{stem}.json",
            ASSET_DIR / f"{stem}_zeroshot.safetensors")

#: open_clip CLIP(**config) arguments; the feasibility study's working configuration.
SHAPES_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32,
                   "patch_dropout": 0.5},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}
#: The teacher sees images normalised with these statistics (CLIP's own).
SHAPES_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
SHAPES_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ConvStem(nn.Module):
    """Overlapping conv stem: 64 px → 8×8 grid of `width` channels (replaces `visual.conv1`)."""

    def __init__(self, width: int, *, in_chans: int = 3, hidden: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_chans
        for channels in hidden:  # each 3×3 stride-2 conv halves the resolution: 64 → 8
            layers += [nn.Conv2d(prev, channels, 3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
            prev = channels
        layers.append(nn.Conv2d(prev, width, 1))
        self.stem = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)  # [B, width, H/8, W/8]


def build_shapes_clip(config: dict[str, Any] | None = None) -> nn.Module:
    """An untrained shapes CLIP (open_clip construction + conv stem)."""
    # lazy: open_clip is heavy and only needed to build an open_clip model
    import open_clip

    config = config or SHAPES_CLIP_CONFIG
    model = open_clip.CLIP(**config)
    model.visual.conv1 = ConvStem(config["vision_cfg"]["width"])
    return model


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_card(path: str | Path | None = None) -> dict[str, Any]:
    return json.loads(Path(path or CARD_FILE).read_text())


def load_shapes_visual(weights: str | Path | None = None, card: str | Path | None = None) -> nn.Module:
    """The shipped (or given) vision tower, conv stem rebuilt, weights loaded strictly, eval mode."""
    weights = Path(weights) if weights else WEIGHTS_FILE
    if card:
        card_path = Path(card)
    else:  # the card beside the weights: <stem>.json for <stem>_visual.safetensors
        stem = weights.name.removesuffix(".safetensors").removesuffix("_visual")
        card_path = weights.with_name(f"{stem}.json") if weights != WEIGHTS_FILE else CARD_FILE
    if not weights.is_file():
        raise TeacherFileNotFound(
            f"built-in teacher weights not found at {weights}; create them with `milan teacher train-shapes`"
        )
    config = read_card(card_path)["config"] if card_path.is_file() else SHAPES_CLIP_CONFIG
    visual = build_shapes_clip(config).visual
    try:
        state = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error type for a file that is not one
        raise TeacherError(f"cannot read the shapes teacher weights {weights} as safetensors ({err}); "
                           "give the shapes_clip_visual.safetensors written by `milan teacher train-shapes`") from err
    check_fits(visual, state, "the shapes teacher's vision tower", weights,
               "give the shapes_clip_visual.safetensors written by `milan teacher train-shapes`, "
               "with its shapes_clip.json beside it")
    visual.load_state_dict(state, strict=True)
    visual.image_mean, visual.image_std = SHAPES_CLIP_MEAN, SHAPES_CLIP_STD
    return visual.eval()


def build_builtin_teacher(name: str, weights: str | Path | None, **kwargs: Any) -> Teacher:
    """`builtin:<name>`: the shipped teacher, or its retrained tower from `weights`."""
    if name not in BUILTIN_TEACHERS:
        raise TeacherError(f"unknown builtin teacher {name!r}; available: {sorted(BUILTIN_TEACHERS)}")
    shipped, card, _ = builtin_files(name)
    if weights is None and not shipped.is_file():
        how = " --method slip" if name == "shapes-slip" else ""
        raise TeacherFileNotFound(
            f"the built-in '{name}' teacher is missing ({shipped}); "
            f"recreate it with `milan teacher train-shapes{how}`"
        )
    # An open_clip CLIP vision tower with a conv stem, rebuilt before loading.
    return OpenCLIPTeacher(load_shapes_visual(weights or shipped, None if weights else card), **kwargs)


def load_zero_shot(path: str | Path = ZEROSHOT_FILE) -> dict[str, torch.Tensor]:
    """The shipped zero-shot classifiers: {"colour": [6, D], "shape": [6, D]} (unit rows)."""
    return load_file(str(path))
