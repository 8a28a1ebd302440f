"""Other projects' checkpoint layouts, mapped to ours: timm names for the encoder, `MaskedAutoencoder`
names (`decoder.*`) for a pretraining decoder.

    mapped = map_state(raw)     # raw: a state dict as the peer saved it (its `model` / `state_dict`)

Layouts (each pinned by a test that runs the peer's forward, written out from its source):
- **MAE `save_model`** (the MILAN authors' training checkpoints, MAE's own, `mae_pretrain_vit_base.pth`):
  encoder keys already in timm naming; decoder `decoder_embed`, `mask_token`, `decoder_pos_embed`,
  `decoder_blocks.N.*`, `decoder_norm`, `decoder_pred`. The authors' prompting decoder splits each
  block's attention into `attn.q` [D, D] and `attn.kv` [2D, D] (keys/values over prompts + mask
  tokens): concatenated, that is our `attn.qkv` (q rows first, then k, then v, as their reshape reads
  them). MAE's decoder blocks are timm `Block`s, as our `MAEDecoder`'s.
- **mmpretrain** (`{'meta', 'state_dict'}`): `backbone.*` in mmpretrain's `VisionTransformer` naming
  (`layers.N.ln1 / attn.qkv / attn.proj / ln2 / ffn.layers.0.0 / ffn.layers.1`, `patch_embed.projection`,
  final `ln1`, avg-pool `ln2`); `neck.*` the MILAN / MAE decoder (`decoder_blocks.N` in the same block
  naming, `ln1` its final norm); `target_generator.*` the CLIP teacher (dropped); `head.fc` /
  `head.layers.head` a classifier.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from milan.errors import WeightsError

__all__ = ["Mapped", "map_state", "MAE_DECODER_KEYS", "is_mmpretrain", "is_mae_layout"]

#: Top-level names of MAE's decoder in its `save_model` layout.
MAE_DECODER_KEYS = ("decoder_embed.", "mask_token", "decoder_pos_embed", "decoder_blocks.", "decoder_norm.",
                    "decoder_pred.")


@dataclass
class Mapped:
    """A peer's state dict in our names.

    Attributes:
        encoder: timm `VisionTransformer` names (plus `head.*` / `fc_norm.*` of a classifier).
        decoder: `MaskedAutoencoder.decoder` names without the `decoder.` prefix; empty when none.
        decoder_kind: 'prompting' (MILAN's), 'mae' (MAE's) or None.
        dropped: keys of the file that are in neither (optimizer-free parts: teacher, BN neck, ...).
        notes: what was dropped and why, in words, for the log.
        target: 'clip' or 'pixel' when the layout says what the decoder predicted, else None.
    """

    encoder: dict[str, Tensor]
    decoder: dict[str, Tensor] = field(default_factory=dict)
    decoder_kind: str | None = None
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    target: str | None = None


def _rename(key: str, rules: list[tuple[str, str]]) -> str | None:
    """`key` renamed by the first matching (regex, replacement) rule; None when no rule matches."""
    for pattern, repl in rules:
        new, count = re.subn(pattern, repl, key)
        if count:
            return new
    return None


def _fuse_q_kv(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`blocks.N.attn.q.*` [D,·] + `blocks.N.attn.kv.*` [2D,·] → our fused `blocks.N.attn.qkv.*` [3D,·]."""
    out = dict(state)
    for key in [k for k in state if re.search(r"\.attn\.q\.(weight|bias)$", k)]:
        kv_key = key.replace(".attn.q.", ".attn.kv.")
        if kv_key not in state:
            raise WeightsError(f"decoder key {key} has no matching {kv_key}: not a prompting decoder we can map")
        out[key.replace(".attn.q.", ".attn.qkv.")] = torch.cat([out.pop(key), out.pop(kv_key)], dim=0)
    return out


# ------------------------------------------------------------------------------------------------
# MAE save_model layout (the MILAN authors', MAE's)
# ------------------------------------------------------------------------------------------------

_MAE_DECODER_RULES = [
    (r"^decoder_embed\.", "embed."),
    (r"^mask_token$", "mask_token"),
    (r"^decoder_pos_embed$", "pos_embed"),
    (r"^decoder_norm\.", "norm."),
    (r"^decoder_pred\.", "head."),
    (r"^decoder_blocks\.(\d+)\.", r"blocks.\1."),
]


def is_mae_layout(raw: dict[str, Any]) -> bool:
    """MAE's `save_model` layout: timm-named encoder keys at the top level (decoder optional)."""
    return "cls_token" in raw and "patch_embed.proj.weight" in raw


def _decoder_kind(decoder: dict[str, Tensor]) -> str | None:
    if not decoder:
        return None
    return "prompting" if any(".attn.kv." in k for k in decoder) else "mae"


def map_mae_layout(raw: dict[str, Tensor], *, use_clip: bool | None = None) -> Mapped:
    """The MILAN authors' / MAE's `model` state dict: encoder as is, decoder renamed (q + kv fused).

    Args:
        use_clip: the authors' `args.use_clip` (their CLIP-target switch), when the file has `args`.
    """
    encoder = {k: v for k, v in raw.items() if not k.startswith(MAE_DECODER_KEYS)}
    decoder = {_rename(k, _MAE_DECODER_RULES) or k: v for k, v in raw.items() if k.startswith(MAE_DECODER_KEYS)}
    kind = _decoder_kind(decoder)
    decoder = _fuse_q_kv(decoder)
    target = None
    if kind is not None:
        # `args.use_clip` (the authors' CLIP-target switch) says it outright; MAE's files have no such
        # switch and predict p²·3 pixels per patch, the CLIP target is the teacher's width.
        pixels = raw["patch_embed.proj.weight"].shape[-1] ** 2 * 3
        predicts_pixels = decoder.get("head.weight", torch.empty(0)).shape[0] == pixels
        target = ("clip" if use_clip else "pixel") if use_clip is not None else ("pixel" if predicts_pixels else "clip")
    return Mapped(encoder, decoder, kind, dropped=sorted(k for k in raw if k.startswith(MAE_DECODER_KEYS)),
                  target=target)


# ------------------------------------------------------------------------------------------------
# mmpretrain
# ------------------------------------------------------------------------------------------------

# One transformer layer of mmpretrain's `TransformerEncoderLayer` (also the decoder's blocks).
_MM_BLOCK = [
    (r"\.ln1\.", ".norm1."),
    (r"\.ln2\.", ".norm2."),
    (r"\.attn\.(qkv|q|kv|proj)\.", r".attn.\1."),
    (r"\.ffn\.layers\.0\.0\.", ".mlp.fc1."),
    (r"\.ffn\.layers\.1\.", ".mlp.fc2."),
]
_MM_ENCODER_RULES = [
    (r"^backbone\.cls_token$", "cls_token"),
    (r"^backbone\.pos_embed$", "pos_embed"),
    (r"^backbone\.patch_embed\.projection\.", "patch_embed.proj."),
    (r"^backbone\.ln1\.", "norm."),  # final norm (final_norm=True)
    (r"^backbone\.ln2\.", "fc_norm."),  # out_type='avg_featmap': the norm after average pooling
]
_MM_NECK_RULES = [
    (r"^neck\.decoder_embed\.", "embed."),
    (r"^neck\.mask_token$", "mask_token"),
    (r"^neck\.decoder_pos_embed$", "pos_embed"),
    (r"^neck\.ln1\.", "norm."),
    (r"^neck\.decoder_pred\.", "head."),
]
# Parts of mmpretrain's ViT that timm's plain ViT (and our encoder) do not compute: refused by name.
_MM_UNSUPPORTED = re.compile(r"^backbone\.(pre_norm\.|patch_embed\.norm\.|.*\.gamma\d?\.|.*\.(w12|w3)\.)")


def is_mmpretrain(raw: dict[str, Any]) -> bool:
    return any(k.startswith("backbone.layers.") for k in raw) and "backbone.cls_token" in raw


def _mm_block(key: str, prefix: str, new_prefix: str) -> str | None:
    """`<prefix>N.<part>` → `<new_prefix>N.<part in timm naming>`, None when `part` is not a known one."""
    m = re.match(rf"^{re.escape(prefix)}(\d+)(\..*)$", key)
    if m is None:
        return None
    rest = _rename(m.group(2), _MM_BLOCK)
    return f"{new_prefix}{m.group(1)}{rest}" if rest is not None else None


def map_mmpretrain(raw: dict[str, Tensor]) -> Mapped:
    """mmpretrain's `state_dict` (MILAN / MAE pretraining, or a ViT classifier) in our names."""
    unsupported = sorted(k for k in raw if _MM_UNSUPPORTED.match(k))
    if unsupported:
        raise WeightsError(
            f"this mmpretrain ViT has parts milan's encoder (timm's plain ViT) does not compute: "
            f"{', '.join(unsupported[:4])}{' ...' if len(unsupported) > 4 else ''} (a pre-norm, patch-embed norm, "
            "layer scale or SwiGLU: a CLIP / EVA / DINOv2-style backbone); use a MAE / MILAN / plain ViT checkpoint"
        )
    encoder: dict[str, Tensor] = {}
    decoder: dict[str, Tensor] = {}
    dropped: list[str] = []
    notes: list[str] = []
    unknown: list[str] = []
    linear_probe = any(k.startswith("neck.bn.") for k in raw)
    for key, value in raw.items():
        if key.startswith("backbone."):
            new = _mm_block(key, "backbone.layers.", "blocks.") or _rename(key, _MM_ENCODER_RULES)
            (unknown.append(key) if new is None else encoder.__setitem__(new, value))
        elif key.startswith("neck.") and not linear_probe:  # the decoder: not encoder weights either
            new = _mm_block(key, "neck.decoder_blocks.", "blocks.") or _rename(key, _MM_NECK_RULES)
            (unknown.append(key) if new is None else decoder.__setitem__(new, value))
            dropped.append(key)
        elif key.startswith(("head.fc.", "head.layers.head.")) and not linear_probe:
            encoder["head." + key.rpartition(".")[2]] = value
        else:
            dropped.append(key)
    if unknown:
        raise WeightsError(f"mmpretrain keys milan cannot map: {', '.join(sorted(unknown)[:6])}; "
                           "expected a MILAN / MAE / ViT checkpoint of mmpretrain's VisionTransformer")
    if any(k.startswith("target_generator.") for k in dropped):
        notes.append("the CLIP teacher (target_generator.*): set teacher.spec / teacher.weights instead")
    if linear_probe:
        notes.append("a linear probe's BatchNorm neck and head (neck.bn, head.*): timm's ViT head has no BN; "
                     "the encoder is kept")
    if any(k.startswith("head.layers.pre_logits.") for k in dropped):
        encoder.pop("head.weight", None)
        encoder.pop("head.bias", None)
        notes.append("a classifier with a hidden pre-logits layer (head.layers.*): timm's ViT head has none")
    kind = _decoder_kind(decoder)
    decoder = _fuse_q_kv(decoder)
    # mmpretrain's MILAN neck predicts the CLIP features, its MAE neck pixels
    target = {"prompting": "clip", "mae": "pixel", None: None}[kind]
    return Mapped(encoder, decoder, kind, dropped=sorted(dropped), notes=notes, target=target)


def mmpretrain_classes(meta: Any) -> list[str]:
    """Class names an mmpretrain checkpoint's `meta['dataset_meta']` records, if any."""
    try:
        classes = meta["dataset_meta"]["classes"]
    except (KeyError, TypeError):
        return []
    return [str(c) for c in classes] if isinstance(classes, (list, tuple)) else []


def map_state(raw: dict[str, Tensor], *, use_clip: bool | None = None) -> Mapped:
    """Any supported peer layout (see the module docstring) in our names."""
    if is_mmpretrain(raw):
        return map_mmpretrain(raw)
    return map_mae_layout(raw, use_clip=use_clip)
