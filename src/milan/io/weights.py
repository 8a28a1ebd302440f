"""Encoder weights in and out: one reader for every checkpoint format, one strict loader.

    state, meta = encoder_state_dict("runs/pretrain/checkpoint-1000.pt")
    load_encoder(timm_vit, state)      # strict; pos-embed resampled when the grid differs

Formats `encoder_state_dict` reads, always safely (`torch.load(weights_only=True)` or safetensors):
- our pretrain checkpoints: `{"model": {"encoder.*", "decoder.*", ...}, "config": {...}}`;
- our finetune checkpoints: `{"model": timm ViT state dict with head/fc_norm, "kind": "finetune", ...}`;
- our exported `.safetensors` files (`milan export`), metadata in the file header;
- the authors' released MILAN/MAE checkpoints: `{"model": {cls_token, pos_embed, patch_embed.proj.*,
  blocks.*, norm.*, decoder_*, mask_token}}` (the decoder part is dropped).
Keys come out in timm's `VisionTransformer` naming.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from milan.encoder import ENCODER_PRESETS, EncoderConfig
from milan.errors import WeightsError
from milan.train.log import get_logger

__all__ = [
    "ENCODER_KEYS", "HEAD_KEYS", "WeightsError", "encoder_state_dict", "infer_encoder_config",
    "load_encoder", "timm_kwargs", "build_encoder",
]

ENCODER_KEYS = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
HEAD_KEYS = ("head.", "fc_norm.")


def _is_encoder_key(key: str) -> bool:
    return key in ("cls_token", "pos_embed") or key.startswith(ENCODER_KEYS[2:])


def _read(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The raw object in `path` and, for safetensors, the header metadata.

    A pretraining run folder stands for its newest `checkpoint-<step>.pt`.
    """
    if path.is_dir():
        from milan.train.checkpoint import step_checkpoints

        found = step_checkpoints(path)
        if not found:
            raise WeightsError(f"{path} is a folder without checkpoint-<step>.pt files; give a checkpoint file")
        path = found[-1]
    if not path.is_file():
        raise WeightsError(f"weights not found: {path} (give a milan checkpoint, a .safetensors export "
                           "or an authors' MILAN/MAE checkpoint)")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(
            f"cannot read {path} safely (weights_only=True): {str(err).strip().splitlines()[0]}. "
            "If it holds pickled Python objects, re-save only its state dict from a trusted environment."
        ) from err
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} does not hold a dict of weights (got {type(obj).__name__})")
    return obj, {}


def _preset_from_config(config: Any) -> str | None:
    """The encoder preset named by a pretrain/finetune config dict (`model.name`), if any."""
    try:
        name = config["model"]["name"]
    except (KeyError, TypeError):
        return None
    for candidate in (name, name.partition("_")[2]):
        if candidate in ENCODER_PRESETS:
            return candidate
    return None


def infer_encoder_config(state: dict[str, Tensor], *, preset: str | None = None) -> EncoderConfig:
    """The `EncoderConfig` of a timm-named ViT state dict.

    Widths, depth, patch size and grid come from tensor shapes; the head count is not in the
    weights, so it is taken from `preset` or from the preset with the same width (else width/64).
    The image size follows the state's position-embedding grid.
    """
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise WeightsError("not a ViT state dict: cls_token / patch_embed.proj.weight missing")
    embed_dim = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    grid = int(round((state["pos_embed"].shape[1] - 1) ** 0.5))
    if preset is not None:
        base = ENCODER_PRESETS[preset]
    else:
        same = [c for c in ENCODER_PRESETS.values()
                if (c.embed_dim, c.patch_size, c.depth) == (embed_dim, patch, depth)]
        wide = [c for c in ENCODER_PRESETS.values() if c.embed_dim == embed_dim]
        base = (same or wide or [EncoderConfig(num_heads=max(1, embed_dim // 64), timm_name=None)])[0]
    timm_name = base.timm_name if (base.embed_dim, base.patch_size, base.depth) == (embed_dim, patch, depth) else None
    return EncoderConfig(img_size=grid * patch, patch_size=patch, embed_dim=embed_dim, depth=depth,
                         num_heads=base.num_heads, mlp_ratio=mlp_ratio, timm_name=timm_name)


def timm_kwargs(config: EncoderConfig) -> dict[str, Any]:
    """Keyword arguments of `timm.models.VisionTransformer` for an encoder of this shape."""
    fields = asdict(config)
    fields.pop("timm_name")
    return fields


def encoder_state_dict(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read encoder weights (timm names) and what is known about them from any supported file.

    Returns:
        state: `cls_token`, `pos_embed`, `patch_embed.*`, `blocks.*`, `norm.*` (and `head.*`,
            `fc_norm.*` for finetuned classifiers).
        meta: `format` (pretrain | finetune | export | reference), `preset` (or None),
            `encoder` (EncoderConfig as a dict), `num_classes` (0 without a head),
            `global_pool` ('token' or 'avg'), `dropped` (keys that were not encoder weights).
    """
    path = Path(path).expanduser()
    obj, header = _read(path)
    meta: dict[str, Any] = {"preset": None}
    if header:
        meta.update(json.loads(header.get("milan", "{}")))
        raw, fmt = obj, "export"
    else:
        raw = obj.get("model", obj.get("state_dict", obj))
        if not isinstance(raw, dict):
            raise WeightsError(f"{path}: 'model' is not a state dict")
        if any(k.startswith("encoder.") for k in raw):
            fmt = "pretrain"
            raw = {k.removeprefix("encoder."): v for k, v in raw.items() if k.startswith("encoder.")}
        else:
            fmt = obj.get("kind", "reference")
        meta["preset"] = obj.get("preset") or _preset_from_config(obj.get("config"))
        if isinstance(obj.get("encoder"), dict):  # our finetune checkpoints record their shape
            meta["encoder"] = obj["encoder"]
    raw = {k.removeprefix("module."): v for k, v in raw.items()}
    if not all(isinstance(v, Tensor) for v in raw.values()):
        raise WeightsError(f"{path}: the state dict holds non-tensor values")
    state = {k: v for k, v in raw.items() if _is_encoder_key(k) or k.startswith(HEAD_KEYS)}
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        sample = ", ".join(sorted(raw)[:8])
        raise WeightsError(
            f"{path} holds no ViT encoder in timm naming (cls_token, patch_embed.proj.*, blocks.*); "
            f"its keys start with: {sample}"
        )
    meta["format"] = fmt
    meta["dropped"] = sorted(set(raw) - set(state))
    if "encoder" not in meta:
        meta["encoder"] = asdict(infer_encoder_config(state, preset=meta["preset"]))
    meta["num_classes"] = int(state["head.weight"].shape[0]) if "head.weight" in state else 0
    meta["global_pool"] = "avg" if "fc_norm.weight" in state else "token"
    return state, meta


def load_encoder(
    model: nn.Module,
    state: dict[str, Tensor],
    *,
    allow_missing: tuple[str, ...] = HEAD_KEYS,
    allow_unexpected: tuple[str, ...] = (),
) -> list[str]:
    """Load timm-named encoder weights into a `MaskedViTEncoder` or timm `VisionTransformer`.

    Every model key must be in `state` (except those starting with `allow_missing`) and every
    state key must be in the model (except `allow_unexpected`); otherwise a `WeightsError`
    lists them. A position embedding for another grid is resampled (bicubic, timm).

    Returns:
        the model keys left at their initial values (the allowed missing ones).
    """
    from timm.layers import resample_abs_pos_embed

    target = model.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(allow_unexpected) or k in target}
    if "pos_embed" in state and "pos_embed" in target and state["pos_embed"].shape != target["pos_embed"].shape:
        old, new = state["pos_embed"].shape[1] - 1, target["pos_embed"].shape[1] - 1
        grid = int(round(new**0.5))
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"].float(), new_size=[grid, grid],
                                                    num_prefix_tokens=1)
        get_logger().info("resampled pos_embed from %d to %d patches (%dx%d grid)", old, new, grid, grid)
    missing = sorted(k for k in target if k not in state and not k.startswith(allow_missing))
    unexpected = sorted(k for k in state if k not in target)
    wrong = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
                   for k in state if k in target and state[k].shape != target[k].shape)
    if missing or unexpected or wrong:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")

        parts = [f"missing: {show(missing)}" if missing else "",
                 f"unexpected: {show(unexpected)}" if unexpected else "",
                 f"shape mismatch: {show(wrong)}" if wrong else ""]
        raise WeightsError(
            "encoder weights do not fit the model; " + "; ".join(p for p in parts if p)
            + ". Check that the checkpoint's encoder preset matches the model (model.name)."
        )
    model.load_state_dict(state, strict=False)  # strictness checked above, with the allowances
    return sorted(k for k in target if k not in state)


def build_encoder(
    weights: str | Path | None, *, preset: str | None = None, img_size: int | None = None,
    drop_path_rate: float = 0.0,
) -> tuple[nn.Module, dict[str, Any]]:
    """A `MaskedViTEncoder` with the weights in `weights` (any supported file), loaded strictly.

    Args:
        weights: checkpoint or export to load; None gives a randomly initialised `preset`
            (a baseline).
        preset: encoder preset; needed without weights, else checked against the file's shape.
        img_size: resolution to run at (position embedding resampled); default the file's.
        drop_path_rate: stochastic depth of the last block (linear from 0), for transfer.

    Returns:
        the encoder (eval mode, gradients on; freeze it yourself if needed) and the file's meta.
    """
    from milan.encoder import MaskedViTEncoder

    if weights is None:
        if preset not in ENCODER_PRESETS:
            raise WeightsError(f"give model.weights=<checkpoint>, or model.preset=<one of: "
                               f"{', '.join(ENCODER_PRESETS)}> for a random-init baseline")
        config = ENCODER_PRESETS[preset]
        meta: dict[str, Any] = {"format": None, "preset": preset, "encoder": asdict(config)}
        state = None
    else:
        state, meta = encoder_state_dict(weights)
        if "norm.weight" not in state:
            raise WeightsError(f"{weights} has no final norm (a finetuned avg-pool classifier?); "
                               "use a pretrain checkpoint or an encoder export")
        config = EncoderConfig(**meta["encoder"])
        if preset is not None and preset != meta["preset"]:
            want = ENCODER_PRESETS[preset]
            if (want.embed_dim, want.depth, want.patch_size) != (config.embed_dim, config.depth, config.patch_size):
                raise WeightsError(f"{weights} holds a {meta['preset'] or 'different'} encoder "
                                   f"(width {config.embed_dim}, depth {config.depth}), not {preset}")
    fields = timm_kwargs(config)
    fields.update(img_size=img_size or config.img_size)
    encoder = MaskedViTEncoder(**fields, drop_path_rate=drop_path_rate)
    if state is not None:
        load_encoder(encoder, state, allow_missing=(), allow_unexpected=HEAD_KEYS)
    return encoder.eval(), meta
