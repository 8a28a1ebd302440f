"""`timm:<model name>`: a timm ViT tower from a weights file, dispatched on the model's class.

- `VisionTransformer` with a class token (CLIP ViTs): `TimmTeacher` here;
- `VisionTransformer` with `global_pool='map'` (SigLIP / SigLIP 2): `siglip.SiglipTeacher`;
- `Eva` with a class token (EVA-CLIP): `eva.EvaTeacher`.

`timm_teacher` applies the same dispatch to a model already built (open_clip's timm trunks).
The head, when the weights carry one, is the projection (CLIP ViTs in timm keep it there).
OpenAI / open_clip layouts are mapped to timm names by timm's own `checkpoint_filter_fn`.
Register tokens are dropped from the outputs, so tokens are [CLS, patches].
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.data.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.layers import Attention, AttentionPoolLatent
from timm.models import eva, vision_transformer
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from milan.errors import TeacherError, TeacherFileNotFound
from milan.io.safe_load import load_weights
from milan.teacher.base import Teacher, _heads, check_fits, cls_attention, download_hint, hub_id
from milan.teacher.eva import EvaTeacher
from milan.teacher.siglip import SiglipTeacher

__all__ = ["TimmTeacher", "build_timm_teacher", "timm_teacher"]


class TimmTeacher(Teacher):
    """A timm `VisionTransformer` with a class token; `head` (if any) is the projection.

    Register tokens are dropped from the outputs so that tokens are [CLS, patches].
    Build the model with `dynamic_img_size=True` to accept other grids than its own.
    """

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        if not isinstance(model, VisionTransformer) or model.cls_token is None:
            raise TeacherError(
                f"timm teacher must be a VisionTransformer with a class token, got {type(model).__name__}"
            )
        if not isinstance(model.blocks[-1].attn, Attention):
            raise TeacherError(
                f"timm teacher's last block uses {type(model.blocks[-1].attn).__name__}; "
                "only timm.layers.Attention (packed qkv) is supported"
            )
        dim = model.head.out_features if isinstance(model.head, nn.Linear) else model.embed_dim
        cfg = getattr(model, "pretrained_cfg", None) or {}
        kwargs.setdefault("mean", cfg.get("mean", OPENAI_CLIP_MEAN))
        kwargs.setdefault("std", cfg.get("std", OPENAI_CLIP_STD))
        super().__init__(model, dim=dim, patch_size=model.patch_embed.patch_size[0], **kwargs)

    def _tokens_and_attn(self, x: Tensor) -> tuple[Tensor, Tensor]:
        m = self.backbone
        prefix = m.num_prefix_tokens  # CLS + registers
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))  # [B, prefix+N, D]
        x = m.blocks[:-1](x)
        last = m.blocks[-1]
        attn = last.attn
        h = last.norm1(x)
        w_q, w_k, _ = attn.qkv.weight.chunk(3)
        b_q, b_k = attn.qkv.bias.chunk(3)[:2] if attn.qkv.bias is not None else (None,) * 2
        q = attn.q_norm(_heads(F.linear(h[:, :1], w_q, b_q), attn.num_heads))  # [B, H, 1, d]
        k = attn.k_norm(_heads(F.linear(h, w_k, b_k), attn.num_heads))  # [B, H, L, d]
        cls_attn = cls_attention(q, k, scale=attn.scale, num_prefix=prefix)
        x = m.head(m.fc_norm(m.norm(last(x))))  # exactly one of norm / fc_norm is not Identity
        return torch.cat([x[:, :1], x[:, prefix:]], dim=1), cls_attn


def timm_teacher_class(model: nn.Module) -> type[Teacher]:
    """The teacher class for a timm model, or a TeacherError that names what is supported."""
    kind = type(model).__name__
    if isinstance(model, VisionTransformer):
        if isinstance(model.attn_pool, AttentionPoolLatent):
            return SiglipTeacher
        if model.cls_token is not None:
            return TimmTeacher
        raise TeacherError(
            f"timm {kind} with global_pool={model.global_pool!r} has neither a class token nor an "
            "attention-pool head: nothing pools the image, so nothing ranks the patches. Use a CLS "
            "ViT, or the 'map' (attention-pool) variant, e.g. timm:vit_base_patch16_siglip_224 "
            "rather than a *_siglip_gap_* model"
        )
    if isinstance(model, Eva):
        return EvaTeacher
    if kind == "NaFlexVit":
        raise TeacherError(
            "timm NaFlexVit (variable-resolution) towers are not supported: use a fixed-resolution "
            "SigLIP 2 tower (timm:vit_*_siglip_<size>, openclip:ViT-*-SigLIP2*), or the NaFlex "
            "checkpoint as a transformers Siglip2 folder (hf:<folder>)"
        )
    raise TeacherError(
        f"timm {kind} is not a supported teacher tower: supported are a VisionTransformer with a "
        "class token (CLIP) or with global_pool='map' (SigLIP / SigLIP 2), and an Eva with a class "
        "token (EVA-CLIP)"
    )


def timm_teacher(model: nn.Module, head: nn.Module | None = None, **kwargs: Any) -> Teacher:
    """A teacher around a built timm model, by its class; `head`: open_clip's per-token head."""
    cls = timm_teacher_class(model)
    if cls is TimmTeacher:
        if head is not None and any(True for _ in head.parameters()):
            raise TeacherError(
                "a timm CLS ViT followed by an open_clip projection is not supported; "
                "load the tower with spec 'timm:<model name>'"
            )
        return TimmTeacher(model, **kwargs)
    return cls(model, head, **kwargs)


_WIDTH_NAMES = {192: "tiny", 384: "small", 512: "medium", 768: "base", 1024: "large", 1280: "huge"}


def _describe_timm_vit(state: dict[str, Tensor], pattern: str = "vit_{size}_patch{patch}_*") -> str:
    """One line describing the timm ViT a state dict belongs to, with candidate model names."""
    if "patch_embed.proj.weight" not in state:
        return "the checkpoint does not look like a timm VisionTransformer"
    width, _, patch, _ = state["patch_embed.proj.weight"].shape
    depth = len({m.group(1) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    names = timm.list_models(pattern.format(size=_WIDTH_NAMES.get(width, "*"), patch=patch))
    hint = f"e.g. timm:{' or timm:'.join(names[:4])}" if names else "no timm name guessed"
    return f"the checkpoint is a ViT with width {width}, patch {patch}, depth {depth}: {hint}"


def _num_classes(state: dict[str, Tensor]) -> int:
    """The head's width when the weights carry one (timm, OpenAI / open_clip layouts), else 0."""
    for key, axis in (("head.weight", 0), ("visual.trunk.head.weight", 0), ("visual.proj", 1)):
        if key in state:
            return state[key].shape[axis]
    return 0


def build_timm_teacher(name: str, weights: str | Path | None, **kwargs: Any) -> Teacher:
    """`timm:<model name>` with `weights` (.safetensors or .pth)."""
    _refuse_hub_names(name, weights)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise TeacherError(f"unknown timm model {name!r}; close matches: {close}")
    assert weights is not None  # _refuse_hub_names
    state, activation = load_weights(weights)
    # The head, when the weights carry one, is the projection (CLIP ViTs in timm keep it there).
    args = {"pretrained": False, "num_classes": _num_classes(state)}
    try:
        model = timm.create_model(name, dynamic_img_size=True, **args)
    except TypeError:  # a model family without dynamic sizes: the class check below says more
        model = timm.create_model(name, **args)
    cls = timm_teacher_class(model)
    if cls is EvaTeacher:
        state = eva.checkpoint_filter_fn(state, model)  # EVA / open_clip layouts -> timm names
        pattern = "eva*_patch{patch}_clip_*"
    else:
        state = vision_transformer.checkpoint_filter_fn(state, model)  # OpenAI / open_clip -> timm
        pattern = "vit_{size}_patch{patch}_siglip_*" if cls is SiglipTeacher else "vit_{size}_patch{patch}_*"
    check_fits(model, state, f"timm {name!r}", Path(weights), _describe_timm_vit(state, pattern))
    _check_activation(name, model, activation, Path(weights), cls)
    model.load_state_dict(state, strict=True)
    return timm_teacher(model, **kwargs)


def _refuse_hub_names(name: str, weights: str | Path | None) -> None:
    """A timm hub name, or no / a hub id for weights: say what to download (nothing is)."""
    then = "teacher.weights=DIR/model.safetensors (or DIR/pytorch_model.bin)"
    if name.startswith(("hf-hub:", "hf_hub:")):
        repo = name.split(":", 1)[1].strip("/")
        model = repo.rpartition("/")[2]
        spec = f"timm:{model}" if timm.is_model(model) else "timm:<the architecture in DIR/config.json>"
        raise TeacherError(f"teacher 'timm:{name}' is a timm hub name; "
                           + download_hint(repo, f"use teacher.spec={spec} {then}"))
    if weights is None:
        try:
            cfg = timm.models.get_pretrained_cfg(name) if timm.is_model(name) else None
        except Exception:  # a name without a pretrained config
            cfg = None
        repo = getattr(cfg, "hf_hub_id", None)
        quick = name.partition(".")[0].replace("_clip_", "_clip_quickgelu_")
        if "QuickGELU" in " ".join(getattr(cfg, "notes", None) or ()) and timm.is_model(quick):
            then = f"use teacher.spec=timm:{quick} (these weights were trained with QuickGELU) {then}"
        raise TeacherError(f"teacher 'timm:{name}' needs weights=<path> (.safetensors or .pth); "
                           + (download_hint(repo, then) if repo else "nothing is downloaded"))
    repo = hub_id(weights)
    if repo:
        raise TeacherFileNotFound(f"teacher weights {weights} are not a file here; if it is a Hugging Face "
                                  "hub id, " + download_hint(repo, then))


def _act_kind(module: nn.Module | None) -> str | None:
    """'quick_gelu', 'gelu', 'gelu_tanh' or None (another function) for a timm MLP activation."""
    name = type(module).__name__
    if "QuickGELU" in name:
        return "quick_gelu"
    if "GELU" in name:
        return "gelu_tanh" if "Tanh" in name or getattr(module, "approximate", "none") == "tanh" else "gelu"
    return None


def _check_activation(name: str, model: nn.Module, activation: str | None, path: Path, cls: type) -> None:
    """Refuse weights whose file says it computes another MLP activation than timm model `name`."""
    blocks = getattr(model, "blocks", None)
    built = _act_kind(getattr(getattr(blocks[0], "mlp", None), "act", None)) if blocks else None
    known = ("quick_gelu", "gelu", "gelu_tanh")
    if activation is None or activation == built or built is None:
        return
    if activation == "unknown" and (cls is not TimmTeacher or built == "quick_gelu"):
        return  # an archive that does not say: a QuickGELU model was named on purpose
    if activation != "unknown" and activation not in known:
        return
    other = (name.replace("_clip_quickgelu_", "_clip_") if built == "quick_gelu"
             else name.replace("_clip_", "_clip_quickgelu_"))
    other = other.partition(".")[0]
    instead = f"use timm:{other}" if other != name.partition(".")[0] and timm.is_model(other) else \
        "use a timm model built with that activation"
    said = {"quick_gelu": "QuickGELU (x * sigmoid(1.702 x); OpenAI's CLIP)", "gelu": "GELU",
            "gelu_tanh": "tanh-approximated GELU"}
    if activation == "unknown":
        raise TeacherError(f"TorchScript archive {path} does not show whether its MLP activation is QuickGELU or "
                           f"GELU, and timm:{name} builds {said[built]}: {instead} if it is QuickGELU (OpenAI's "
                           "releases are), or re-save its weights as a state dict from a trusted environment")
    raise TeacherError(f"weights {path} were trained with {said[activation]} but timm:{name} builds "
                       f"{said[built]}, which would give wrong targets: {instead}")
