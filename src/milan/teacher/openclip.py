"""`openclip:<arch>`: an open_clip ViT vision tower from an OpenAI or open_clip checkpoint.

`build_openclip_teacher` reads OpenAI's TorchScript release (e.g. ViT-B-16.pt, read as plain
tensors), any TorchScript archive of an open_clip / OpenAI CLIP, an OpenAI or open_clip state
dict, or a .safetensors file. The MLP activation follows the file when it says (`_quick_gelu`): an
OpenAI state dict is QuickGELU, a TorchScript archive's own code shows QuickGELU or GELU; a plain
state dict follows the architecture (`<arch>-quickgelu`). Hub names and release tags are refused
with what to download (nothing is). A checkpoint that does not fit the named architecture fails with the open_clip
architectures it does fit (`_describe_vit`).

Towers built on a timm trunk (open_clip's `TimmModel`: the SigLIP / SigLIP 2 and EVA02 / EVA01
architectures) go to the timm teachers (`timm_vit.timm_teacher`): SigLIP via its attention-pool
head, EVA via its class token, with open_clip's own head (a projection, or empty) applied after
timm's on every token.
"""

from __future__ import annotations

import difflib
import logging
import re
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.data.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from milan.errors import TeacherError, TeacherFileNotFound
from milan.io.safe_load import load_weights
from milan.teacher.base import Teacher, _heads, check_fits, cls_attention, download_hint, hub_id
from milan.teacher.timm_vit import timm_teacher, timm_teacher_class

__all__ = ["OpenCLIPTeacher", "build_openclip_teacher", "openclip_tower_teacher"]

_log = logging.getLogger(__name__)


class OpenCLIPTeacher(Teacher):
    """An open_clip `VisionTransformer` (model.visual), run block by block."""

    def __init__(self, visual: nn.Module, **kwargs: Any) -> None:
        # lazy: open_clip is heavy and only needed to build an open_clip model
        from open_clip.transformer import VisionTransformer

        if not isinstance(visual, VisionTransformer):
            raise TeacherError(
                f"open_clip visual tower {type(visual).__name__} is not a VisionTransformer "
                "(ResNet towers have no CLS token); supported are open_clip ViTs and timm-trunk "
                "towers (SigLIP, EVA02)"
            )
        if visual.attn_pool is not None:
            raise TeacherError("open_clip towers with attentional pooling (CoCa) are not supported")
        last = visual.transformer.resblocks[-1].attn
        if getattr(last, "logit_scale", None) is not None:
            raise TeacherError("open_clip scaled-cosine attention is not supported")
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
        return cls_attention(q, k, scale=q.shape[-1] ** -0.5)


def _describe_vit(state: dict[str, Tensor]) -> str:
    """One line describing the open_clip ViT a visual state dict belongs to, with matching archs."""
    # lazy: open_clip is heavy and only needed to build an open_clip model
    import open_clip

    if "trunk.patch_embed.proj.weight" in state:  # a timm trunk (SigLIP, EVA02)
        width, _, patch, _ = state["trunk.patch_embed.proj.weight"].shape
        depth = len({m.group(1) for k in state if (m := re.match(r"trunk\.blocks\.(\d+)\.", k))})
        return (
            f"the checkpoint is a timm-trunk tower with width {width}, patch {patch}, depth "
            f"{depth}: pick the open_clip architecture of that size and image size"
        )
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


def _release_hint(arch: str, tag: str) -> str | None:
    """How to download open_clip's release `tag` of `arch` and name it (None when open_clip does not know it)."""
    # lazy: open_clip is heavy and only needed to build an open_clip model
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
    # A state dict does not say its activation: releases trained with QuickGELU need the -quickgelu arch.
    quick = f"{arch.removesuffix('-quickgelu')}-quickgelu"
    spec = (f"teacher.spec=openclip:{quick} (this release was trained with QuickGELU) "
            if cfg.get("quick_gelu") and quick in open_clip.list_models() else f"teacher.spec=openclip:{arch} ")
    parts = cfg.get("hf_hub", "").strip("/").split("/")
    if len(parts) >= 2:
        repo, file = "/".join(parts[:2]), "/".join(parts[2:]) or None
        then = spec + (f"teacher.weights=DIR/{file}" if file else
                       "teacher.weights=DIR/open_clip_model.safetensors (or DIR/open_clip_pytorch_model.bin)")
        return download_hint(repo, then, file)
    if cfg.get("url"):
        return (f"nothing is downloaded: fetch {cfg['url']} on a machine with internet, copy it here, then "
                f"{spec}teacher.weights=<its path>")
    return None


def _hub_release(repo: str) -> tuple[str, str] | None:
    """(architecture, release tag) of hub repo `repo`, when open_clip's release list has it."""
    # lazy: open_clip is heavy and only needed to build an open_clip model
    import open_clip

    for arch, tag in open_clip.list_pretrained():
        hub = (open_clip.get_pretrained_cfg(arch, tag) or {}).get("hf_hub", "").strip("/")
        if hub == repo or hub.startswith(f"{repo}/"):
            return arch, tag
    return None


def _refuse_hub_names(arch: str, weights: str | Path | None) -> None:
    """An open_clip hub name or release tag where a local file is needed: say what to download."""
    # lazy: open_clip is heavy and only needed to build an open_clip model
    import open_clip

    if arch.startswith(("hf-hub:", "hf_hub:")):
        repo = arch.split(":", 1)[1].strip("/")
        release = _hub_release(repo)
        hint = _release_hint(*release) if release else None
        raise TeacherError(
            f"teacher 'openclip:{arch}' is an open_clip hub name; "
            + (hint or download_hint(repo, "use teacher.spec=openclip:<the architecture in "
                                           "DIR/open_clip_config.json> teacher.weights=DIR/open_clip_model.safetensors "
                                           "(or DIR/open_clip_pytorch_model.bin)"))
        )
    tags = open_clip.list_pretrained_tags_by_model(arch) if arch in open_clip.list_models() else []
    if weights is None:
        example = _release_hint(arch, tags[0]) if tags else None
        raise TeacherError(
            f"teacher 'openclip:{arch}' needs weights=<path> (OpenAI .pt, open_clip checkpoint or "
            ".safetensors); " + (f"open_clip's {tags[0]!r} release of it, for example: {example}"
                                 if example else "nothing is downloaded")
        )
    if Path(weights).expanduser().exists():
        return
    if str(weights) in tags:
        hint = _release_hint(arch, str(weights))
        if hint:
            raise TeacherFileNotFound(
                f"teacher.weights={weights} is an open_clip release tag, not a file; {hint}"
            )
    repo = hub_id(weights)
    if repo:
        release = _hub_release(repo)
        hint = _release_hint(*release) if release else None
        raise TeacherFileNotFound(
            f"teacher weights {weights} are not a file here; if it is a Hugging Face hub id, "
            + (hint or download_hint(repo, "set teacher.weights=DIR/open_clip_model.safetensors "
                                           "(or DIR/open_clip_pytorch_model.bin)"))
        )


def _quick_gelu(arch: str, activation: str | None, path: Path) -> bool:
    """Whether to build `arch` with QuickGELU, from what the weights file says (`load_weights`).

    The file decides when it says: an OpenAI state dict or a TorchScript archive computing
    `x * sigmoid(1.702 x)` -> QuickGELU, an archive computing `torch.gelu` -> GELU. A state dict
    says nothing: the architecture decides (`<arch>-quickgelu` for QuickGELU). An archive whose
    activation cannot be read is refused unless the architecture names QuickGELU.
    """
    # lazy: open_clip is heavy and only needed to build an open_clip model
    import open_clip

    configured = bool((open_clip.get_model_config(arch) or {}).get("quick_gelu", False))
    if activation is None:
        return configured
    if activation in ("quick_gelu", "gelu"):
        if (activation == "quick_gelu") != configured:
            _log.info("%s computes %s in its MLP (read from the archive); building openclip:%s with it",
                      path, "QuickGELU" if activation == "quick_gelu" else "GELU", arch)
        return activation == "quick_gelu"
    if activation == "unknown" and configured:
        return True  # the user named a QuickGELU architecture for an archive that does not say
    base = arch.removesuffix("-quickgelu")
    quick = f"{base}-quickgelu" if f"{base}-quickgelu" in open_clip.list_models() else None
    choose = (f"use teacher.spec=openclip:{quick} if it is QuickGELU (OpenAI's releases are)"
              if quick else "name an architecture with \"quick_gelu\": true if it is QuickGELU")
    what = ("computes the tanh approximation of GELU, which open_clip's CLIP ViTs do not build"
            if activation == "gelu_tanh" else
            "does not show whether its MLP activation is QuickGELU (x * sigmoid(1.702 x)) or GELU")
    raise TeacherError(
        f"TorchScript archive {path} {what}; {choose}, or re-save its weights as a state dict from a trusted "
        f"environment (torch.save(torch.jit.load(PATH).state_dict(), 'state.pt')) and use "
        f"openclip:{base} for GELU"
    )


def build_openclip_teacher(arch: str, weights: str | Path | None, **kwargs: Any) -> Teacher:
    """`openclip:<arch>` with `weights` (OpenAI .pt, open_clip checkpoint or .safetensors)."""
    # lazy: open_clip is heavy and only needed to build an open_clip model
    import open_clip

    _refuse_hub_names(arch, weights)
    if arch not in open_clip.list_models():
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=5)
        raise TeacherError(f"unknown open_clip architecture {arch!r}; close matches: {close}")
    assert weights is not None  # _refuse_hub_names
    state, activation = load_weights(weights)
    if any(k.startswith("visual.") for k in state):  # full CLIP: keep the image tower only
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    timm_trunk = bool(open_clip.get_model_config(arch)["vision_cfg"].get("timm_model_name"))
    # OpenAI's models were trained with QuickGELU, open_clip's mostly with GELU; a state dict does
    # not say which, a TorchScript archive's code does (`_quick_gelu`).
    quick = False if timm_trunk else _quick_gelu(arch, activation, Path(weights))
    # open_clip logs that the model is randomly initialised: true only until the load below.
    quiet = lambda record: "No pretrained weights loaded" not in record.getMessage()
    logging.root.addFilter(quiet)
    try:
        model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick)
    finally:
        logging.root.removeFilter(quiet)
    visual = model.visual
    if not timm_trunk and not quick:  # a `-quickgelu` architecture whose archive computes GELU
        # lazy: open_clip is heavy and only needed to build an open_clip model
        from open_clip.transformer import QuickGELU

        for block in getattr(getattr(visual, "transformer", None), "resblocks", []):
            if isinstance(getattr(getattr(block, "mlp", None), "gelu", None), QuickGELU):
                block.mlp.gelu = nn.GELU()
    check_fits(
        visual, state, f"open_clip {arch!r} (visual tower)", Path(weights), _describe_vit(state)
    )
    visual.load_state_dict(state, strict=True)
    return openclip_tower_teacher(arch, visual, **kwargs)


def openclip_tower_teacher(arch: str, visual: nn.Module, **kwargs: Any) -> Teacher:
    """The teacher for an open_clip image tower `visual` of architecture `arch`, weights loaded.

    A ViT tower -> `OpenCLIPTeacher`; a timm-trunk tower (`TimmModel`: SigLIP, EVA02) -> the timm
    family's teacher, its trunk rebuilt for any grid and open_clip's head applied on every token.
    """
    # lazy: open_clip is heavy and only needed to build an open_clip model
    import open_clip
    from open_clip.timm_model import TimmModel

    if not isinstance(visual, TimmModel):
        return OpenCLIPTeacher(visual, **kwargs)
    trunk = visual.trunk
    timm_teacher_class(trunk)  # an unsupported trunk fails here, before any rebuilding
    # open_clip builds the trunk for one input size; the teacher must follow the student's grid.
    # The same timm model with dynamic_img_size=True (interpolated position embedding, rope for
    # the grid) takes the trunk's weights; open_clip's config names it.
    name = open_clip.get_model_config(arch)["vision_cfg"]["timm_model_name"]
    dynamic = timm.create_model(
        name,
        pretrained=False,
        num_classes=trunk.num_classes,
        global_pool=trunk.global_pool,
        dynamic_img_size=True,
    )
    dynamic.load_state_dict(trunk.state_dict(), strict=True)
    visual.trunk = dynamic
    return timm_teacher(dynamic, visual.head, **kwargs)
