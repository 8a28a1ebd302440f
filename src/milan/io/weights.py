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
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from milan.encoder import ENCODER_PRESETS, EncoderConfig
from milan.errors import WeightsError

if TYPE_CHECKING:
    from milan.model import ModelSpec

__all__ = [
    "ENCODER_KEYS", "HEAD_KEYS", "WeightsError", "Pretrained", "load_pretrained", "encoder_state_dict",
    "infer_encoder_config", "load_encoder", "timm_kwargs", "build_encoder",
]

ENCODER_KEYS = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
HEAD_KEYS = ("head.", "fc_norm.")


def _is_encoder_key(key: str) -> bool:
    return key in ("cls_token", "pos_embed") or key.startswith(ENCODER_KEYS[2:])


def _resolve_file(path: Path) -> Path:
    """A pretraining run folder stands for its newest `checkpoint-<step>.pt`."""
    if path.is_dir():
        from milan.io.checkpoint_files import step_checkpoints

        found = step_checkpoints(path)
        if not found:
            raise WeightsError(f"{path} is a folder without checkpoint-<step>.pt files; give a checkpoint file")
        path = found[-1]
    if not path.is_file():
        raise WeightsError(f"weights not found: {path} (give a milan checkpoint, a .safetensors export "
                           "or an authors' MILAN/MAE checkpoint)")
    return path


def _read(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The raw object in `path` (file or run folder) and, for safetensors, the header metadata."""
    from milan.io.safe_load import file_kind, read_safetensors, read_torch_file

    path = _resolve_file(path)
    # What the file is, from its bytes: every failure names it (truncated, junk, pickled objects, ...).
    expected = ("a milan checkpoint (checkpoint-<step>.pt), a `milan export` .safetensors file or an "
                "authors' MILAN/MAE checkpoint")
    if file_kind(path) == "safetensors":
        return read_safetensors(path, subject="weights", expected=expected)
    obj = read_torch_file(path, subject="weights", expected=expected)
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
    return _encoder_from(obj, header, path)


def _encoder_from(obj: dict[str, Any], header: dict[str, str], path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """`encoder_state_dict` of an object already read from `path`."""
    meta: dict[str, Any] = {"preset": None}
    if header:
        meta.update(json.loads(header.get("milan", "{}")))
        raw, fmt = obj, "export"
        meta.pop("spec", None)  # read by `load_pretrained`
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
        meta["classes"] = [str(c) for c in obj.get("classes") or []]  # a finetuned classifier's class names
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
    meta.setdefault("classes", [])
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
        logging.getLogger("milan").info("resampled pos_embed from %d to %d patches (%dx%d grid)", old, new, grid, grid)
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


@dataclass
class Pretrained:
    """What a weights file holds, read once: `load_pretrained(path)`.

    Attributes:
        path: the file read (for a run folder, its newest checkpoint).
        state: the encoder in timm `VisionTransformer` naming (plus `head.*` / `fc_norm.*` of a
            finetuned classifier).
        meta: what `encoder_state_dict` reports (format, preset, encoder shape, head, dropped keys).
        spec: the `ModelSpec` it was pretrained as (our pretrain checkpoints and their exports),
            else None.
        config: the resolved config of the run that wrote it, if it carries one.
        step: the optimizer step it was saved at, if known.
    """

    path: Path
    state: dict[str, Tensor]
    meta: dict[str, Any]
    spec: ModelSpec | None = None
    config: dict[str, Any] | None = None
    step: int | None = None
    model_state: dict[str, Tensor] | None = None  # the whole MaskedAutoencoder (pretrain checkpoints)

    @property
    def encoder_config(self) -> EncoderConfig:
        return EncoderConfig(**self.meta["encoder"])

    @property
    def label(self) -> str:
        """`run-folder/file @ step N`, for figure titles and logs."""
        step = f" @ step {self.step}" if self.step is not None else ""
        return f"{self.path.parent.name}/{self.path.stem}{step}"

    def encoder(self, *, img_size: int | None = None, drop_path_rate: float = 0.0) -> nn.Module:
        """A `MaskedViTEncoder` with these weights, loaded strictly (eval mode, gradients on).

        Args:
            img_size: resolution to run at (position embedding resampled); default the file's.
            drop_path_rate: stochastic depth (linear from 0 to the last block), for transfer.
        """
        from milan.encoder import MaskedViTEncoder

        if "norm.weight" not in self.state:
            raise WeightsError(f"{self.path} has no final norm (a finetuned avg-pool classifier?); "
                               "use a pretrain checkpoint or an encoder export")
        fields = timm_kwargs(self.encoder_config)
        fields.update(img_size=img_size or self.encoder_config.img_size)
        encoder = MaskedViTEncoder(**fields, drop_path_rate=drop_path_rate)
        load_encoder(encoder, self.state, allow_missing=(), allow_unexpected=HEAD_KEYS)
        return encoder.eval()

    def model(self) -> nn.Module:
        """The whole `MaskedAutoencoder` (encoder, decoder, objective) of a pretrain checkpoint, eval mode."""
        from milan.model import build_model

        if self.spec is None or self.model_state is None:
            raise WeightsError(f"{self.path} is a {self.meta['format']} file, not a `milan pretrain` checkpoint: it "
                               "holds an encoder only (use .encoder()), no decoder to rebuild the pretraining model")
        target_dim = None
        if self.spec.target == "clip":  # the teacher's width, read off the output layer: no teacher needed
            head = self.model_state.get("decoder.head.weight")
            if head is None or head.dim() != 2:
                raise WeightsError(f"{self.path}: cannot infer the teacher width, no 'decoder.head.weight'")
            target_dim = int(head.shape[0])  # [Dt, D_dec]
        model = build_model(self.spec, target_dim=target_dim)
        model.load_state_dict(self.model_state)  # strict: a mismatch is a real error, not noise
        return model.eval()


def load_pretrained(path: str | Path) -> Pretrained:
    """Read a run folder (its newest checkpoint), a checkpoint or an export, once, safely.

    Every format `encoder_state_dict` reads is accepted; pretrain checkpoints also give back their
    `ModelSpec`, config and step, and `Pretrained.model()` rebuilds the whole pretraining model.
    """
    from milan.model import ModelSpec

    file = _resolve_file(Path(path).expanduser())
    obj, header = _read(file)
    state, meta = _encoder_from(obj, header, file)
    spec = config = step = model_state = None
    if header:
        saved = json.loads(header.get("milan", "{}")).get("spec")
        spec = ModelSpec(**saved) if saved else None
    else:
        config = obj.get("config") if isinstance(obj.get("config"), dict) else None
        step = obj.get("step")
        if meta["format"] == "pretrain":
            model_state = {k.removeprefix("module."): v for k, v in obj["model"].items()}
            spec = _pretrain_spec(obj, config)
    return Pretrained(file, state, meta, spec, config, step, model_state)


def _pretrain_spec(obj: dict[str, Any], config: dict[str, Any] | None) -> Any:
    """The spec a pretrain checkpoint records (or, in older ones, what its config resolves to)."""
    from milan.model import ModelSpec

    if isinstance(obj.get("spec"), dict):
        return ModelSpec(**obj["spec"])
    model = (config or {}).get("model")
    if not isinstance(model, dict) or "name" not in model:
        return None
    keys = ("variant", "target", "decoder", "masking", "mask_ratio", "decoder_dim", "decoder_depth", "decoder_heads")
    return ModelSpec.resolve(model["name"], **{k: model[k] for k in keys if model.get(k) is not None})


def build_encoder(
    weights: str | Path | None, *, preset: str | None = None, img_size: int | None = None,
    drop_path_rate: float = 0.0,
) -> tuple[nn.Module, dict[str, Any]]:
    """A `MaskedViTEncoder` with the weights in `weights` (any `load_pretrained` source), loaded strictly.

    Args:
        weights: run folder, checkpoint or export to load; None gives a randomly initialised
            `preset` (a baseline).
        preset: encoder preset; needed without weights, else checked against the file's shape.
        img_size: resolution to run at (position embedding resampled); default the file's.
        drop_path_rate: stochastic depth of the last block (linear from 0), for transfer.

    Returns:
        the encoder (eval mode, gradients on; freeze it yourself if needed) and the file's meta.
    """
    from milan.encoder import MaskedViTEncoder
    from milan.model import encoder_preset

    if preset is not None:
        preset = encoder_preset(preset)
    if weights is None:
        if preset is None:
            raise WeightsError(f"give model.weights=<checkpoint>, or model.preset=<one of: "
                               f"{', '.join(ENCODER_PRESETS)}> for a random-init baseline")
        config = ENCODER_PRESETS[preset]
        fields = timm_kwargs(config)
        fields.update(img_size=img_size or config.img_size)
        encoder = MaskedViTEncoder(**fields, drop_path_rate=drop_path_rate)
        return encoder.eval(), {"format": None, "preset": preset, "encoder": asdict(config)}
    pretrained = load_pretrained(weights)
    config = pretrained.encoder_config
    if preset is not None and preset != pretrained.meta["preset"]:
        want = ENCODER_PRESETS[preset]
        if (want.embed_dim, want.depth, want.patch_size) != (config.embed_dim, config.depth, config.patch_size):
            raise WeightsError(f"{weights} holds a {pretrained.meta['preset'] or 'different'} encoder "
                               f"(width {config.embed_dim}, depth {config.depth}), not {preset}")
    return pretrained.encoder(img_size=img_size, drop_path_rate=drop_path_rate), pretrained.meta
