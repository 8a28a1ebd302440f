"""`hf:<folder>`: a transformers CLIP vision tower from a folder written by `save_pretrained`.

The folder holds a `CLIPModel`, a `CLIPVisionModelWithProjection` or a plain `CLIPVisionModel`
(no projection: its targets are the post-LayerNorm tokens). transformers reads model.safetensors,
or pytorch_model.bin with `torch.load(weights_only=True)`; `preprocessor_config.json`, when
present, gives the teacher's mean and std. A hub id (`hf:openai/clip-vit-base-patch16`) is not
downloaded: the error says how to download it and which folder to name instead.

Folders of SigLIP / SigLIP 2 (model_type siglip, siglip_vision_model, siglip2,
siglip2_vision_model) go to `hf_siglip` (targets and importance through the attention-pool head).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from timm.data.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from torch import Tensor, nn

from milan.errors import TeacherError
from milan.teacher.base import (
    Teacher,
    TeacherFileNotFound,
    _heads,
    cls_attention,
    download_hint,
    from_pretrained,
    hub_id,
)
from milan.teacher.hf_siglip import HF_SIGLIP_TYPES, build_hf_siglip_teacher
from milan.teacher.siglip import SIGLIP_MEAN, SIGLIP_STD

__all__ = ["HFTeacher", "build_hf_teacher"]


class HFTeacher(Teacher):
    """A transformers CLIP vision tower (`CLIPVisionModel` / `.vision_model`) + visual_projection."""

    def __init__(self, vision: nn.Module, projection: nn.Module | None, **kwargs: Any) -> None:
        projection = projection if projection is not None else nn.Identity()
        dim = (
            projection.out_features
            if isinstance(projection, nn.Linear)
            else vision.config.hidden_size
        )
        kwargs.setdefault("mean", OPENAI_CLIP_MEAN)
        kwargs.setdefault("std", OPENAI_CLIP_STD)
        backbone = nn.ModuleDict({"vision": vision, "projection": projection})
        super().__init__(backbone, dim=dim, patch_size=vision.config.patch_size, **kwargs)
        # transformers 4.x layers take a positional causal mask; 5.x layers do not.
        layer_args = inspect.signature(vision.encoder.layers[0].forward).parameters
        self._layer_args: tuple[None, ...] = (
            (None, None) if "causal_attention_mask" in layer_args else (None,)
        )

    def _layer(self, layer: nn.Module, x: Tensor) -> Tensor:
        out = layer(x, *self._layer_args)
        return out[0] if isinstance(out, tuple) else out

    def _tokens_and_attn(self, x: Tensor) -> tuple[Tensor, Tensor]:
        v = self.backbone["vision"]
        x = v.pre_layrnorm(v.embeddings(x, interpolate_pos_encoding=True))  # [B, 1+N, D]
        *layers, last = v.encoder.layers
        for layer in layers:
            x = self._layer(layer, x)
        attn = last.self_attn
        h = last.layer_norm1(x)
        q = _heads(attn.q_proj(h[:, :1]), attn.num_heads)  # [B, H, 1, d]
        k = _heads(attn.k_proj(h), attn.num_heads)  # [B, H, L, d]
        cls_attn = cls_attention(q, k, scale=attn.scale)
        x = v.post_layernorm(self._layer(last, x))
        return self.backbone["projection"](x), cls_attn


def build_hf_teacher(folder: str, weights: str | Path | None, **kwargs: Any) -> Teacher:
    """`hf:<folder>`; the weights come from the folder, so `weights` must be None."""
    # lazy: transformers is the optional `hf` extra
    from transformers import CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection

    path = Path(folder).expanduser()
    if weights is not None:
        raise TeacherError(f"teacher 'hf:{folder}' reads its weights from the folder; drop weights=")
    config_file = path / "config.json"
    repo = hub_id(folder)
    if repo and not path.exists():
        raise TeacherFileNotFound(
            f"teacher 'hf:{folder}': there is no folder {path} here; if {repo} is a Hugging Face hub id, "
            + download_hint(repo, "use teacher.spec=hf:DIR")
        )
    snapshots = sorted(p.parent for p in path.glob("snapshots/*/config.json"))
    if not config_file.is_file() and snapshots:  # a hub cache folder (models--org--name)
        raise TeacherFileNotFound(
            f"teacher 'hf:{folder}' is a Hugging Face cache folder; its files are in a snapshot: use "
            f"teacher.spec=hf:{snapshots[-1]}"
        )
    if not config_file.is_file():
        raise TeacherFileNotFound(
            f"teacher 'hf:{folder}': no config.json in {path} (expected a folder written by "
            "save_pretrained of a transformers CLIPModel or CLIPVisionModelWithProjection, or "
            "of a SigLIP / SigLIP 2 model)"
        )
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type")
    # transformers reads model.safetensors, or pytorch_model.bin with torch.load(weights_only=True).
    load = {"local_files_only": True, "attn_implementation": "sdpa", "output_loading_info": True}
    if model_type in HF_SIGLIP_TYPES:
        _preprocessor_stats(path, kwargs, SIGLIP_MEAN, SIGLIP_STD)
        return build_hf_siglip_teacher(folder, path, model_type, load, **kwargs)
    if model_type == "clip":
        model, info = from_pretrained(CLIPModel, path, load)
    elif model_type == "clip_vision_model" and config.get("architectures") == ["CLIPVisionModel"]:
        model, info = from_pretrained(CLIPVisionModel, path, load)
    elif model_type == "clip_vision_model":
        model, info = from_pretrained(CLIPVisionModelWithProjection, path, load)
    else:
        raise TeacherError(
            f"teacher 'hf:{folder}': {config_file} has model_type {model_type!r}, which holds no "
            "CLIP vision tower; expected 'clip' (CLIPModel) or 'clip_vision_model' "
            "(CLIPVisionModel / CLIPVisionModelWithProjection), or a SigLIP one: "
            + ", ".join(repr(t) for t in HF_SIGLIP_TYPES)
        )
    missing = {k for k in info["missing_keys"] if not k.startswith("text")}
    # A plain CLIPVisionModel has no projection: its targets are the post-LayerNorm tokens.
    projection = getattr(model, "visual_projection", None)
    if model_type == "clip_vision_model" and "visual_projection.weight" in missing:
        projection = None
        missing.discard("visual_projection.weight")
    if missing:
        raise TeacherError(f"teacher 'hf:{folder}': weights in {path} lack {sorted(missing)[:5]}")
    vision = getattr(model, "vision_model", model)
    vision = getattr(vision, "vision_model", vision)  # transformers 4.x nests the tower deeper
    _preprocessor_stats(path, kwargs, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    return HFTeacher(vision, projection, **kwargs)


def _preprocessor_stats(path: Path, kwargs: dict[str, Any], mean: Any, std: Any) -> None:
    """`preprocessor_config.json`, when present, sets the teacher's mean and std (in `kwargs`)."""
    preprocessor = path / "preprocessor_config.json"
    if preprocessor.is_file():
        pre = json.loads(preprocessor.read_text())
        kwargs.setdefault("mean", pre.get("image_mean", mean))
        kwargs.setdefault("std", pre.get("image_std", std))
