"""Frozen CLIP teachers: per-token targets and the CLS attention of the last layer.

`build_teacher(spec, weights=...)` turns a checkpoint already on disk into a frozen module whose
call returns `TeacherOutput(tokens [B, 1+N, Dt], cls_attn [B, N])`:

- tokens: the final LayerNorm and the projection applied to ALL tokens, CLS included (the
  library's own pooled output projects only the CLS token, and open_clip's `output_tokens=True`
  returns patch tokens without the projection, so neither is used).
- cls_attn: eq. 3 of the paper, softmax(q_cls K^T / sqrt(d)) of the last attention layer,
  averaged over heads, patch columns only (the CLS column is dropped, so rows sum to < 1).
  Only the CLS query row is computed; the blocks themselves run unchanged on the library's fused
  attention path, so the full [L, L] attention matrix never exists.

Specs: `openclip:<arch>` (OpenAI TorchScript archive, OpenAI or open_clip state dict),
`hf:<folder>` (transformers CLIPModel / CLIPVisionModel[WithProjection]), `timm:<model name>`
(a timm VisionTransformer; its head, when the weights have one, is the projection) and
`builtin:shapes` (the small teacher of the built-in demo). Nothing is downloaded.

The teacher is frozen for real: eval mode that `train()` cannot undo, no parameter requires grad,
forward runs under `no_grad`. It must never be part of the optimizer, of DDP or of the student's
checkpoint: keep it beside the model, not inside it (the pretrain recipe does), and rebuild it
from its spec when resuming.

Resolution: the student's batch is re-normalised to the teacher's mean/std and, when the patch
sizes differ, resized so both token grids match (a CLIP L/14 teacher under a ViT-L/16 student at
224 px sees 196 px). A grid that differs from the one the positional embedding was trained for is
handled by interpolating the positional embedding (bicubic), as each library does.

Loading is safe (`milan.io.safe_load`): safetensors, `torch.load(weights_only=True)`, and TorchScript
archives read by a restricted unpickler that never runs their code.
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from timm.data.constants import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from milan.io.safe_load import load_weights

__all__ = [
    "HFTeacher",
    "OpenCLIPTeacher",
    "Teacher",
    "TeacherOutput",
    "TimmTeacher",
    "build_teacher",
    "load_weights",
]

SPEC_FORMS = (
    "openclip:<arch> with weights=<OpenAI .pt | open_clip checkpoint | .safetensors>",
    "hf:<local folder of a transformers CLIPModel or CLIPVisionModel[WithProjection]>",
    "timm:<model name> with weights=<.safetensors | .pth>",
    "builtin:shapes",
)
# builtin teachers: name -> what they are (weights and card live in milan/assets, see milan.teacher.builtin)
BUILTIN_TEACHERS = {"shapes": "small CLIP trained on the captioned shapes data (milan.teacher.builtin)"}


class TeacherOutput(NamedTuple):
    tokens: Tensor  # [B, 1+N, Dt] final norm + projection on CLS and patch tokens, float32
    cls_attn: Tensor  # [B, N] last-layer CLS attention over patches, head-averaged, float32


# --------------------------------------------------------------------------------------------
# Teachers
# --------------------------------------------------------------------------------------------


class Teacher(nn.Module):
    """Frozen teacher: re-normalise and resize the student's batch, then run a backend.

    Subclasses wrap one library's vision tower (`self.backbone`) and implement `_tokens_and_attn`.

    Args:
        backbone: the library's module; frozen here.
        dim: target dim Dt (the projection's output dim).
        patch_size: the teacher's patch size.
        mean, std: the statistics the teacher was trained with.
        input_mean, input_std: the statistics the incoming batch is normalised with.
        student_patch_size: the student's patch size; when it differs from the teacher's, the
            input is resized so both token grids match. None: the teacher keeps the input size.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int,
        patch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        input_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        input_std: Sequence[float] = IMAGENET_DEFAULT_STD,
        student_patch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.dim = dim
        self.patch_size = patch_size
        self.student_patch_size = student_patch_size
        # x_teacher = (x * input_std + input_mean - mean) / std, folded into one affine map.
        mean_t, std_t = torch.tensor(mean), torch.tensor(std)
        scale = torch.tensor(input_std) / std_t
        shift = (torch.tensor(input_mean) - mean_t) / std_t
        self.register_buffer("in_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", shift.view(1, 3, 1, 1), persistent=False)
        # Frozen for real: dropout / patch dropout off, no grads, nothing for an optimizer to find.
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Teacher:
        # model.train() on an enclosing module must not turn on the teacher's dropout.
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The size the teacher sees for a student batch of `height` x `width` pixels."""
        patch = self.student_patch_size or self.patch_size
        if height % patch or width % patch:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the "
                f"{'student' if self.student_patch_size else 'teacher'} patch size {patch}"
            )
        return height // patch * self.patch_size, width // patch * self.patch_size

    @torch.no_grad()
    def forward(self, images: Tensor) -> TeacherOutput:
        """images [B, 3, H, W] normalised with input_mean/std -> TeacherOutput."""
        x = images.float() * self.in_scale + self.in_shift  # [B, 3, H, W] teacher statistics
        size = self.input_size(*x.shape[-2:])
        if size != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        tokens, cls_attn = self._tokens_and_attn(x.to(self.dtype))
        return TeacherOutput(tokens.float(), cls_attn.float())

    def _tokens_and_attn(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, 3, H, W] in teacher statistics -> tokens [B, 1+N, Dt], cls_attn [B, N]."""
        raise NotImplementedError


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """[B, L, H*d] -> [B, H, L, d]"""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def _cls_attention(q_cls: Tensor, k: Tensor, scale: float, num_prefix: int = 1) -> Tensor:
    """Eq. 3 from the CLS query row alone: q_cls [B, H, 1, d], k [B, H, L, d] -> [B, L - prefix].

    Softmax over all L keys (CLS and any register tokens included, as in the attention itself),
    then only the patch columns are kept. Computed in float32 even for an fp16/bf16 teacher.
    """
    logits = q_cls.float() @ k.float().transpose(-2, -1) * scale  # [B, H, 1, L]
    return logits.softmax(dim=-1).mean(dim=1)[:, 0, num_prefix:]  # [B, N]


class OpenCLIPTeacher(Teacher):
    """An open_clip `VisionTransformer` (model.visual), run block by block."""

    def __init__(self, visual: nn.Module, **kwargs: Any) -> None:
        from open_clip.transformer import VisionTransformer

        if not isinstance(visual, VisionTransformer):
            raise TypeError(
                f"open_clip visual tower {type(visual).__name__} is not a VisionTransformer "
                "(ResNet and timm-trunk towers have no CLS token here); for a timm trunk use "
                "spec 'timm:<model name>'"
            )
        if visual.attn_pool is not None:
            raise TypeError("open_clip towers with attentional pooling (CoCa) are not supported")
        last = visual.transformer.resblocks[-1].attn
        if getattr(last, "logit_scale", None) is not None:
            raise TypeError("open_clip scaled-cosine attention is not supported")
        dim = visual.proj.shape[1] if visual.proj is not None else visual.ln_post.weight.shape[0]
        kwargs.setdefault("mean", getattr(visual, "image_mean", None) or OPENAI_CLIP_MEAN)
        kwargs.setdefault("std", getattr(visual, "image_std", None) or OPENAI_CLIP_STD)
        super().__init__(visual, dim=dim, patch_size=visual.patch_size[0], **kwargs)
        # Older open_clip runs its blocks sequence-first.
        self.batch_first: bool = getattr(visual.transformer, "batch_first", False)

    def _block(self, block: nn.Module, x: Tensor) -> Tensor:
        if self.batch_first:
            return block(x)
        return block(x.transpose(0, 1)).transpose(0, 1)

    def _tokens_and_attn(self, x: Tensor) -> tuple[Tensor, Tensor]:
        v = self.backbone
        x = v.conv1(x)  # [B, D, h, w]
        grid = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # [B, N, D]
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, D]
        pos = resample_abs_pos_embed(  # [1, 1+N, D], interpolated if the grid differs
            v.positional_embedding[None], new_size=list(grid), old_size=list(v.grid_size)
        )
        # patch_dropout is skipped: it is a no-op in eval mode, the only mode a teacher has.
        x = v.ln_pre(torch.cat([cls, x], dim=1) + pos.to(x.dtype))  # [B, 1+N, D]
        *blocks, last = v.transformer.resblocks
        for block in blocks:
            x = self._block(block, x)
        cls_attn = self._cls_attn(last, x)
        x = v.ln_post(self._block(last, x))
        return (x @ v.proj if v.proj is not None else x), cls_attn

    @staticmethod
    def _cls_attn(block: nn.Module, x: Tensor) -> Tensor:
        # Same weights as the block's own attention: nn.MultiheadAttention (default block) or
        # open_clip's Attention (custom block, optional qk-norm); both keep a packed in_proj.
        attn = block.attn
        h = block.ln_1(x)  # [B, L, D]
        w_q, w_k, _ = attn.in_proj_weight.chunk(3)
        b_q, b_k = attn.in_proj_bias.chunk(3)[:2] if attn.in_proj_bias is not None else (None,) * 2
        q = _heads(F.linear(h[:, :1], w_q, b_q), attn.num_heads)  # [B, H, 1, d]
        k = _heads(F.linear(h, w_k, b_k), attn.num_heads)  # [B, H, L, d]
        if not isinstance(attn, nn.MultiheadAttention):
            q, k = attn.ln_q(q), attn.ln_k(k)
        return _cls_attention(q, k, scale=q.shape[-1] ** -0.5)


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
        cls_attn = _cls_attention(q, k, scale=attn.scale)
        x = v.post_layernorm(self._layer(last, x))
        return self.backbone["projection"](x), cls_attn


class TimmTeacher(Teacher):
    """A timm `VisionTransformer` with a class token; `head` (if any) is the projection.

    Register tokens are dropped from the outputs so that tokens are [CLS, patches].
    Build the model with `dynamic_img_size=True` to accept other grids than its own.
    """

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        from timm.layers import Attention
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(model, VisionTransformer) or model.cls_token is None:
            raise TypeError(
                f"timm teacher must be a VisionTransformer with a class token, got {type(model).__name__}"
            )
        if not isinstance(model.blocks[-1].attn, Attention):
            raise TypeError(
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
        cls_attn = _cls_attention(q, k, scale=attn.scale, num_prefix=prefix)
        x = m.head(m.fc_norm(m.norm(last(x))))  # exactly one of norm / fc_norm is not Identity
        return torch.cat([x[:, :1], x[:, prefix:]], dim=1), cls_attn


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def _describe_vit(state: dict[str, Tensor]) -> str:
    """One line describing the open_clip ViT a visual state dict belongs to, with matching archs."""
    import open_clip

    if "conv1.weight" not in state or "positional_embedding" not in state:
        return "the checkpoint does not look like an open_clip / OpenAI ViT visual tower"
    width, _, patch, _ = state["conv1.weight"].shape
    layers = len(
        {m.group(1) for k in state if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
    )
    image = round((state["positional_embedding"].shape[0] - 1) ** 0.5) * patch
    out_dim = state["proj"].shape[1] if "proj" in state else None
    found = (width, patch, layers, image, out_dim)
    matches = []
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name) or {}
        v = cfg.get("vision_cfg", {})
        size = v.get("image_size")
        size = size[0] if isinstance(size, list | tuple) else size
        if (
            v.get("width"),
            v.get("patch_size"),
            v.get("layers"),
            size,
            cfg.get("embed_dim"),
        ) == found:
            matches.append(name)
    hint = (
        f"try openclip:{' or openclip:'.join(matches[:4])}"
        if matches
        else "no open_clip config matches"
    )
    return (
        f"the checkpoint is a ViT with width {width}, patch {patch}, {layers} layers, "
        f"image {image}, output dim {out_dim}: {hint}"
    )


def _describe_timm_vit(state: dict[str, Tensor]) -> str:
    """One line describing the timm ViT a state dict belongs to, with candidate model names."""
    import timm

    if "patch_embed.proj.weight" not in state:
        return "the checkpoint does not look like a timm VisionTransformer"
    width, _, patch, _ = state["patch_embed.proj.weight"].shape
    depth = len({m.group(1) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    size = {192: "tiny", 384: "small", 512: "medium", 768: "base", 1024: "large", 1280: "huge"}
    names = timm.list_models(f"vit_{size.get(width, '*')}_patch{patch}_*")
    hint = f"e.g. timm:{' or timm:'.join(names[:4])}" if names else "no timm name guessed"
    return f"the checkpoint is a ViT with width {width}, patch {patch}, depth {depth}: {hint}"


def _check_fits(
    model: nn.Module, state: dict[str, Tensor], what: str, path: Path, hint: str
) -> None:
    """Strict loading, but with an error that names the keys, the shapes and the fix."""
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    shapes = [
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        return

    def few(items: list[str]) -> str:
        return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

    problems = [
        f"{label}: {few(items)}"
        for label, items in (
            ("shape mismatch", shapes),
            ("missing", missing),
            ("unexpected", unexpected),
        )
        if items
    ]
    raise ValueError(
        f"weights {path} do not fit {what}.\n  " + "\n  ".join(problems) + f"\n  {hint}"
    )


def _build_openclip(arch: str, weights: str | Path | None, **kwargs: Any) -> Teacher:
    import open_clip

    if weights is None:
        raise ValueError(
            f"teacher 'openclip:{arch}' needs weights=<path> (OpenAI .pt, open_clip checkpoint or "
            ".safetensors); nothing is downloaded"
        )
    if arch not in open_clip.list_models():
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=5)
        raise ValueError(f"unknown open_clip architecture {arch!r}; close matches: {close}")
    state, is_openai = load_weights(weights)
    if any(k.startswith("visual.") for k in state):  # full CLIP: keep the image tower only
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    # OpenAI's models were trained with QuickGELU; their files do not say so, their format does.
    # open_clip logs that the model is randomly initialised: true only until the load below.
    quiet = lambda record: "No pretrained weights loaded" not in record.getMessage()
    logging.root.addFilter(quiet)
    try:
        model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=is_openai)
    finally:
        logging.root.removeFilter(quiet)
    visual = model.visual
    _check_fits(
        visual, state, f"open_clip {arch!r} (visual tower)", Path(weights), _describe_vit(state)
    )
    visual.load_state_dict(state, strict=True)
    return OpenCLIPTeacher(visual, **kwargs)


def _build_hf(folder: str, weights: str | Path | None, **kwargs: Any) -> Teacher:
    from transformers import CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection

    path = Path(folder).expanduser()
    if weights is not None:
        raise ValueError(f"teacher 'hf:{folder}' reads its weights from the folder; drop weights=")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"teacher 'hf:{folder}': no config.json in {path} (expected a folder written by "
            "save_pretrained of a transformers CLIPModel or CLIPVisionModelWithProjection)"
        )
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type")
    # transformers reads model.safetensors, or pytorch_model.bin with torch.load(weights_only=True).
    load = {"local_files_only": True, "attn_implementation": "sdpa", "output_loading_info": True}
    if model_type == "clip":
        model, info = CLIPModel.from_pretrained(path, **load)
    elif model_type == "clip_vision_model" and config.get("architectures") == ["CLIPVisionModel"]:
        model, info = CLIPVisionModel.from_pretrained(path, **load)
    elif model_type == "clip_vision_model":
        model, info = CLIPVisionModelWithProjection.from_pretrained(path, **load)
    else:
        raise ValueError(
            f"teacher 'hf:{folder}': {config_file} has model_type {model_type!r}, which holds no "
            "CLIP vision tower; expected 'clip' (CLIPModel) or 'clip_vision_model' "
            "(CLIPVisionModel / CLIPVisionModelWithProjection)"
        )
    missing = {k for k in info["missing_keys"] if not k.startswith("text")}
    # A plain CLIPVisionModel has no projection: its targets are the post-LayerNorm tokens.
    projection = getattr(model, "visual_projection", None)
    if model_type == "clip_vision_model" and "visual_projection.weight" in missing:
        projection = None
        missing.discard("visual_projection.weight")
    if missing:
        raise ValueError(f"teacher 'hf:{folder}': weights in {path} lack {sorted(missing)[:5]}")
    vision = getattr(model, "vision_model", model)
    vision = getattr(vision, "vision_model", vision)  # transformers 4.x nests the tower deeper
    preprocessor = path / "preprocessor_config.json"
    if preprocessor.is_file():
        pre = json.loads(preprocessor.read_text())
        kwargs.setdefault("mean", pre.get("image_mean", OPENAI_CLIP_MEAN))
        kwargs.setdefault("std", pre.get("image_std", OPENAI_CLIP_STD))
    return HFTeacher(vision, projection, **kwargs)


def _build_timm(name: str, weights: str | Path | None, **kwargs: Any) -> Teacher:
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    if weights is None:
        raise ValueError(f"teacher 'timm:{name}' needs weights=<path>; nothing is downloaded")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise ValueError(f"unknown timm model {name!r}; close matches: {close}")
    state, _ = load_weights(weights)
    # The head, when the weights carry one, is the projection (CLIP ViTs in timm keep it there).
    head = state.get("head.weight", state.get("visual.proj"))
    num_classes = 0 if head is None else head.shape[0 if "head.weight" in state else 1]
    model = timm.create_model(
        name, pretrained=False, num_classes=num_classes, dynamic_img_size=True
    )
    state = checkpoint_filter_fn(state, model)  # OpenAI / open_clip layouts -> timm names
    _check_fits(model, state, f"timm {name!r}", Path(weights), _describe_timm_vit(state))
    model.load_state_dict(state, strict=True)
    return TimmTeacher(model, **kwargs)


def _build_builtin(name: str, weights: str | Path | None, **kwargs: Any) -> Teacher:
    from milan.teacher.builtin import WEIGHTS_FILE, load_shapes_visual

    if name not in BUILTIN_TEACHERS:
        raise ValueError(f"unknown builtin teacher {name!r}; available: {sorted(BUILTIN_TEACHERS)}")
    if weights is None and not WEIGHTS_FILE.is_file():
        raise FileNotFoundError(
            f"the built-in '{name}' teacher is missing ({WEIGHTS_FILE}); "
            "recreate it with `milan teacher train-shapes`"
        )
    # An open_clip CLIP vision tower with a conv stem (milan.teacher.builtin), rebuilt before loading.
    return OpenCLIPTeacher(load_shapes_visual(weights), **kwargs)


_BUILDERS = {
    "openclip": _build_openclip,
    "hf": _build_hf,
    "timm": _build_timm,
    "builtin": _build_builtin,
}


def build_teacher(
    spec: str,
    weights: str | Path | None = None,
    *,
    input_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    input_std: Sequence[float] = IMAGENET_DEFAULT_STD,
    dtype: torch.dtype = torch.float32,
    student_patch_size: int | None = None,
) -> Teacher:
    """Build a frozen teacher from a checkpoint on disk; nothing is downloaded.

    Args:
        spec: "openclip:<arch>", "hf:<folder>", "timm:<model name>" or "builtin:shapes".
        weights: checkpoint file for openclip / timm specs (hf reads its folder).
        input_mean, input_std: normalisation of the batches the teacher will receive.
        dtype: weight dtype; bf16 / fp16 halve the teacher's cost on GPU (outputs stay float32).
        student_patch_size: the student's patch size, so the teacher's grid can be made to match.

    Returns:
        A frozen `Teacher`: `teacher(images) -> TeacherOutput`, `.dim`, `.patch_size`.
        Move it with `.to(device)`; keep it out of the optimizer, DDP and the student's checkpoint.
    """
    kind, sep, name = spec.partition(":")
    if not sep or not name or kind not in _BUILDERS:
        raise ValueError(
            f"unknown teacher spec {spec!r}; valid forms:\n  " + "\n  ".join(SPEC_FORMS)
        )
    kwargs = {
        "input_mean": input_mean,
        "input_std": input_std,
        "student_patch_size": student_patch_size,
    }
    teacher = _BUILDERS[kind](name, weights, **kwargs)
    teacher.backbone.to(dtype=dtype)  # weights only: the input affine map stays float32
    return teacher
