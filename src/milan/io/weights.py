"""Encoder weights in and out: one reader for every checkpoint format, one strict loader.

    state, meta = encoder_state_dict("runs/pretrain/checkpoint-1000.pt")
    load_encoder(timm_vit, state)      # strict; pos-embed resampled when the grid differs
    init_model(model, "checkpoint-399.pth", init_decoder=True)   # `milan pretrain model.init=`

Formats `encoder_state_dict` reads, always safely (`torch.load(weights_only=True)` or safetensors):
- our pretrain checkpoints: `{"model": {"encoder.*", "decoder.*", ...}, "config": {...}}`;
- our finetune checkpoints: `{"model": timm ViT state dict with head/fc_norm, "kind": "finetune", ...}`;
- our exported `.safetensors` files and `--to hf` folders (`milan export`), metadata in the file header;
- MAE's `save_model` layout: the MILAN authors' training checkpoints (`model` with encoder + prompting
  decoder keys, `optimizer`, `scaler`, `epoch`, `args` Namespace), MAE's (`mae_pretrain_vit_base.pth`:
  encoder only, or encoder + MAE decoder) — format `reference`;
- mmpretrain's MILAN / MAE / ViT checkpoints (`{"meta", "state_dict"}`, `backbone.*` / `neck.*` /
  `target_generator.*`, see `milan.io.formats`) — format `mmpretrain`;
- timm / Hugging Face model folders: `config.json` + `model.safetensors` (or `pytorch_model.bin`, ...)
  with a timm-named ViT — format `timm`.
Any run folder stands for the file a user would expect (`resolve_weights`): a pretrain run its newest
`checkpoint-<step>.pt`, a finetune run its `checkpoint-best.pt` (else `checkpoint-last.pt`), a
linprobe / kNN / eval run the encoder it evaluated. Keys come out in timm's `VisionTransformer`
naming; what was recognised and what was dropped is logged (logger `milan`).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import yaml
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from milan.encoder import ENCODER_PRESETS, EncoderConfig, MaskedViTEncoder
from milan.errors import WeightsError
from milan.io.checkpoint_files import step_checkpoints
from milan.io.formats import (
    MAE_DECODER_KEYS,
    Mapped,
    is_mae_layout,
    is_mmpretrain,
    map_state,
    mmpretrain_classes,
)
from milan.io.safe_load import file_kind, read_safetensors, read_torch_file
from milan.model import MaskedAutoencoder, ModelSpec, build_model, encoder_preset

__all__ = [
    "ENCODER_KEYS", "HEAD_KEYS", "WeightsError", "Pretrained", "load_pretrained", "encoder_state_dict",
    "infer_encoder_config", "load_encoder", "timm_kwargs", "build_encoder", "resolve_weights", "init_model",
]

ENCODER_KEYS = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
HEAD_KEYS = ("head.", "fc_norm.")
#: Weight files of a timm / Hugging Face model folder, in timm's order of preference.
FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
#: The model names MAE's and the MILAN authors' `main_pretrain.py --model` accept.
_AUTHORS_MODELS = ("mae_vit_small_patch16", "mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14")


def _log() -> logging.Logger:
    return logging.getLogger("milan")  # configured by the command (milan.train.log); io does not import train


def _is_encoder_key(key: str) -> bool:
    return key in ("cls_token", "pos_embed") or key.startswith(ENCODER_KEYS[2:])


def _folder_weights(path: Path) -> Path | None:
    return next((path / n for n in FOLDER_WEIGHTS if (path / n).is_file()), None)


def resolve_weights(path: str | Path, *, _seen: tuple[Path, ...] = ()) -> tuple[Path, str | None]:
    """The file (or model folder) that `path` stands for, and why it was chosen (None for a plain file).

    A timm / Hugging Face folder (`config.json` + weights) is itself; a pretrain run folder means its
    newest `checkpoint-<step>.pt`; a finetune run folder its `checkpoint-best.pt`, else
    `checkpoint-last.pt`; a linprobe / kNN / eval run folder the encoder its config.yaml names.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file() and _folder_weights(path) is not None:
            return path, None
        steps = step_checkpoints(path)
        if steps:
            return steps[-1], f"pretrain run folder {path}: its newest checkpoint {steps[-1].name} (of {len(steps)})"
        for name, why in (("checkpoint-best.pt", "best validation checkpoint"),
                          ("checkpoint-last.pt", "last checkpoint (no checkpoint-best.pt)")):
            if (path / name).is_file():
                return path / name, f"run folder {path}: its {why} {name}"
        source = _evaluated_weights(path)
        if source is not None and source not in _seen:
            file, why = resolve_weights(source, _seen=(*_seen, path))
            note = f"run folder {path} evaluated a frozen encoder: its config.yaml names model.weights={source}"
            return file, note + (f"; {why}" if why else "")
        raise WeightsError(
            f"{path} is a folder without weights: give a pretrain run folder (checkpoint-<step>.pt), a finetune "
            "run folder (checkpoint-best.pt / checkpoint-last.pt), a checkpoint file, a `milan export` file or "
            "a timm / Hugging Face folder (config.json + model.safetensors)"
        )
    if not path.is_file():
        raise WeightsError(f"weights not found: {path} (give a run folder, a milan checkpoint, a .safetensors "
                           "export, the MILAN authors' / MAE / mmpretrain checkpoint or a timm model folder)")
    return path, None


def _evaluated_weights(run_dir: Path) -> Path | None:
    """The `model.weights` a linprobe / kNN / eval run folder's config.yaml names, if any."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        return None
    try:
        weights = (yaml.safe_load(config.read_text()) or {}).get("model", {}).get("weights")
    except (yaml.YAMLError, AttributeError):
        return None
    return Path(weights).expanduser() if isinstance(weights, str) and weights else None


def _resolve_file(path: Path) -> Path:
    """`resolve_weights`, saying which file a folder stood for."""
    file, why = resolve_weights(path)
    if why:
        _log().info("weights: %s", why)
    return file


EXPECTED = ("a milan checkpoint or run folder, a `milan export` file, the MILAN authors' / MAE / mmpretrain "
            "checkpoint, or a timm / Hugging Face folder (config.json + model.safetensors)")


def _read(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The raw object in `path` (a resolved file or model folder) and, for safetensors, the header metadata."""
    if path.is_dir():  # a timm / Hugging Face folder: its config rides along as "folder_config"
        weights = _folder_weights(path)
        assert weights is not None  # resolve_weights only returns folders that have one
        try:
            config = json.loads((path / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise WeightsError(f"{path / 'config.json'} is not valid JSON ({err}); download the folder again") from err
        state, header = _read(weights)
        if header.get("milan"):  # our own `--to hf` export: the header says everything
            return state, header
        return {"folder_state": state, "folder_config": config, "folder_file": weights.name}, {}
    # What the file is, from its bytes: every failure names it (truncated, junk, pickled objects, ...).
    if file_kind(path) == "safetensors":
        state, header = read_safetensors(path, subject="weights", expected=EXPECTED)
        return state, header or {"format": "safetensors"}
    obj = read_torch_file(path, subject="weights", expected=EXPECTED)
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


def infer_encoder_config(state: dict[str, Tensor], *, preset: str | None = None,
                         num_heads: int | None = None) -> EncoderConfig:
    """The `EncoderConfig` of a timm-named ViT state dict.

    Widths, depth, patch size and grid come from tensor shapes; the head count is not in the
    weights, so it is `num_heads` when the file's config says it, else taken from `preset` or from the
    preset with the same width (else width/64). The image size follows the position-embedding grid.
    """
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise WeightsError("not a ViT state dict: cls_token / patch_embed.proj.weight missing")
    embed_dim = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    tokens = state["pos_embed"].shape[1] - 1
    grid = int(round(tokens**0.5))
    if grid * grid != tokens:
        raise WeightsError(f"the position embedding has {tokens + 1} rows, not CLS + a square grid: a ViT without "
                           "a class token's position (timm no_embed_class) or with register tokens, which milan's "
                           "encoder does not compute")
    if preset is not None:
        base = ENCODER_PRESETS[preset]
    else:
        same = [c for c in ENCODER_PRESETS.values()
                if (c.embed_dim, c.patch_size, c.depth) == (embed_dim, patch, depth)]
        wide = [c for c in ENCODER_PRESETS.values() if c.embed_dim == embed_dim]
        base = (same or wide or [EncoderConfig(num_heads=max(1, embed_dim // 64), timm_name=None)])[0]
    heads = num_heads or base.num_heads
    same_shape = (base.embed_dim, base.patch_size, base.depth, base.num_heads) == (embed_dim, patch, depth, heads)
    return EncoderConfig(img_size=grid * patch, patch_size=patch, embed_dim=embed_dim, depth=depth,
                         num_heads=heads, mlp_ratio=mlp_ratio, timm_name=base.timm_name if same_shape else None)


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
        meta: `format` (pretrain | finetune | export | reference | mmpretrain | timm), `source` (the
            format in words), `preset` (or None), `encoder` (EncoderConfig as a dict), `num_classes`
            (0 without a head), `global_pool` ('token' or 'avg'), `dropped` (keys that were not encoder
            weights), `decoder` (the kind of pretraining decoder the file holds, or None), `target`.
    """
    file = _resolve_file(Path(path).expanduser())
    obj, header = _read(file)
    state, meta, _ = _recognise(obj, header, file)
    return state, meta


def _namespace_fields(args: Any) -> dict[str, Any]:
    """A training script's `args` (argparse.Namespace, allowed by name in the safe reader) as a dict."""
    return dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args) if isinstance(args, dict) else {}


def _recognise(obj: dict[str, Any], header: dict[str, str], path: Path) -> tuple[dict[str, Tensor], dict[str, Any], Mapped]:
    """(encoder state, meta, everything mapped) of an object read from `path`; logs what was recognised."""
    meta: dict[str, Any] = {"preset": None, "classes": []}
    num_heads = None
    if header:  # a safetensors file: ours (`milan export`) or a bare timm-named state dict
        saved = json.loads(header.get("milan", "{}"))
        meta.update({k: v for k, v in saved.items() if k != "spec"})  # the spec is read by `load_pretrained`
        fmt, source = ("export", "a `milan export` file") if saved else ("timm", "a timm-named safetensors file")
        mapped = Mapped(dict(obj))
    elif "folder_state" in obj:  # a timm / Hugging Face model folder
        config = obj["folder_config"]
        arch = config.get("architecture")
        if not isinstance(arch, str) or not arch.startswith(("vit_", "deit_")):
            raise WeightsError(f"{path}/config.json describes {arch or config.get('model_type') or 'an unknown model'}"
                               ", not a timm ViT (architecture vit_*): milan reads timm ViT folders")
        num_heads = _timm_heads(arch, config.get("model_args") or {})
        fmt, source = "timm", f"a timm model folder ({arch}, {obj['folder_file']})"
        mapped = Mapped(dict(obj["folder_state"]))
        meta["classes"] = [str(c) for c in config.get("label_names") or []]
    else:
        raw = obj.get("model", obj.get("state_dict", obj))
        if not isinstance(raw, dict):
            raise WeightsError(f"{path}: 'model' is not a state dict")
        raw = {k.removeprefix("module."): v for k, v in raw.items()}
        if not all(isinstance(v, Tensor) for v in raw.values()):
            raise WeightsError(f"{path}: the state dict holds non-tensor values")
        args = _namespace_fields(obj.get("args"))
        if any(k.startswith("encoder.") for k in raw):
            fmt, source = "pretrain", "a `milan pretrain` checkpoint"
            mapped = Mapped({k.removeprefix("encoder."): v for k, v in raw.items() if k.startswith("encoder.")},
                            {k.removeprefix("decoder."): v for k, v in raw.items() if k.startswith("decoder.")},
                            dropped=sorted(k for k in raw if not k.startswith("encoder.")))
            spec = _pretrain_spec(obj, obj.get("config") if isinstance(obj.get("config"), dict) else None)
            if spec is not None:
                mapped.decoder_kind, mapped.target = (spec.decoder if mapped.decoder else None), spec.target
        elif is_mmpretrain(raw):
            mapped = map_state(raw)
            what = {"prompting": "MILAN (prompting decoder)", "mae": "MAE (MAE decoder)"}.get(
                mapped.decoder_kind or "", "ViT classifier" if "head.weight" in mapped.encoder else "ViT")
            fmt, source = "mmpretrain", f"an mmpretrain {what} checkpoint"
            meta["classes"] = mmpretrain_classes(obj.get("meta")) if "head.weight" in mapped.encoder else []
            if mapped.decoder_kind is not None:
                meta["decoder_heads"] = _mmpretrain_decoder_heads(obj.get("meta"))
        elif is_mae_layout(raw) and obj.get("kind") is None:
            use_clip = args.get("use_clip")
            mapped = map_state(raw, use_clip=bool(use_clip) if use_clip is not None else None)
            who = {"prompting": "the MILAN authors' training checkpoint (prompting decoder)",
                   "mae": "an MAE training checkpoint (MAE decoder)"}.get(
                mapped.decoder_kind or "", "an MAE-layout ViT (encoder only, e.g. mae_pretrain_vit_base.pth)")
            details = [f"{k} {obj[k]}" for k in ("epoch",) if isinstance(obj.get(k), int)]
            details += [f"args.model {args['model']}"] if isinstance(args.get("model"), str) else []
            fmt, source = "reference", who + (f", {', '.join(details)}" if details else "")
            arch = str(args.get("model", ""))
            meta["preset"] = arch.removeprefix("mae_") if arch.removeprefix("mae_") in ENCODER_PRESETS else None
            if mapped.decoder_kind is not None and arch in _AUTHORS_MODELS:
                meta["decoder_heads"] = 16  # their registered models all have a 512 × 8 decoder with 16 heads
        else:
            fmt = obj.get("kind", "reference")
            source = f"a milan {fmt} checkpoint" if "kind" in obj else "a timm-named ViT state dict"
            mapped = Mapped(raw)
        if fmt in ("pretrain", "finetune") or obj.get("kind"):
            meta["preset"] = obj.get("preset") or _preset_from_config(obj.get("config"))
            meta["classes"] = [str(c) for c in obj.get("classes") or []]  # a finetuned classifier's class names
            if isinstance(obj.get("encoder"), dict):  # our finetune checkpoints record their shape
                meta["encoder"] = obj["encoder"]
    everything = mapped.encoder
    state = {k: v for k, v in everything.items() if _is_encoder_key(k) or k.startswith(HEAD_KEYS)}
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        sample = ", ".join(sorted(everything)[:8])
        raise WeightsError(
            f"{path} holds no ViT encoder in timm naming (cls_token, patch_embed.proj.*, blocks.*); "
            f"its keys start with: {sample}. Expected {EXPECTED}"
        )
    mapped.dropped = sorted(set(mapped.dropped) | (set(everything) - set(state)))
    meta.update(format=fmt, source=source, dropped=mapped.dropped, decoder=mapped.decoder_kind, target=mapped.target)
    if "encoder" not in meta:
        meta["encoder"] = asdict(infer_encoder_config(state, preset=meta["preset"], num_heads=num_heads))
    meta["num_classes"] = int(state["head.weight"].shape[0]) if "head.weight" in state else 0
    meta["global_pool"] = "avg" if "fc_norm.weight" in state else "token"
    kept = "encoder" + (f" + {mapped.decoder_kind} decoder" if mapped.decoder_kind else "") + (
        f" + {meta['num_classes']}-class head" if meta["num_classes"] else "")
    # the decoder's keys are accounted for above (model.init uses them; encoder readers leave them)
    other = [k for k in mapped.dropped if not (mapped.decoder and k.startswith(("decoder.", "neck.", *MAE_DECODER_KEYS)))]
    dropped = "; ".join(mapped.notes) or (", ".join(other[:4]) + (" ..." if len(other) > 4 else ""))
    _log().info("weights: %s is %s: %s%s", path, source, kept, f"; dropped {len(other)} key(s): {dropped}" if other else "")
    return state, meta, mapped


def _timm_heads(arch: str, model_args: dict[str, Any]) -> int:
    """The attention heads of timm model `arch` with `model_args` (built on the meta device: no memory)."""
    if isinstance(model_args.get("num_heads"), int):
        return int(model_args["num_heads"])
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, **model_args)
    except Exception as err:  # an unknown name or arguments timm refuses: the folder is not for this timm
        raise WeightsError(f"timm cannot build {arch!r} with {model_args} ({err}); upgrade timm or check the "
                           "folder's config.json") from err
    return int(model.blocks[0].attn.num_heads)


def _mmpretrain_decoder_heads(meta: Any) -> int | None:
    """`decoder_num_heads` from an mmpretrain checkpoint's config text (16, the default, when not set)."""
    text = meta.get("cfg") if isinstance(meta, dict) else None
    if not isinstance(text, str):
        return None
    found = re.search(r"decoder_num_heads\s*=\s*(\d+)", text)
    return int(found.group(1)) if found else 16


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
    target = model.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(allow_unexpected) or k in target}
    if "pos_embed" in state and "pos_embed" in target and state["pos_embed"].shape != target["pos_embed"].shape:
        old, new = state["pos_embed"].shape[1] - 1, target["pos_embed"].shape[1] - 1
        grid = int(round(new**0.5))
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"].float(), new_size=[grid, grid],
                                                    num_prefix_tokens=1)
        _log().info("resampled pos_embed from %d to %d patches (%dx%d grid)", old, new, grid, grid)
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
        model_state: the whole `MaskedAutoencoder` state of a `milan pretrain` checkpoint.
        decoder_state: the file's pretraining decoder in `MaskedAutoencoder.decoder` names (ours, the
            MILAN authors', MAE's, mmpretrain's neck), kind in `meta["decoder"]`; None without one.
    """

    path: Path
    state: dict[str, Tensor]
    meta: dict[str, Any]
    spec: ModelSpec | None = None
    config: dict[str, Any] | None = None
    step: int | None = None
    model_state: dict[str, Tensor] | None = None  # the whole MaskedAutoencoder (pretrain checkpoints)
    decoder_state: dict[str, Tensor] | None = None  # a pretraining decoder in our names (`model.init`), if any

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
    file = _resolve_file(Path(path).expanduser())
    obj, header = _read(file)
    state, meta, mapped = _recognise(obj, header, file)
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
    return Pretrained(file, state, meta, spec, config, step, model_state, mapped.decoder or None)


def init_model(model: MaskedAutoencoder, path: str | Path, *, init_decoder: bool = True) -> str:
    """Start a pretraining model from published weights (`milan pretrain model.init=PATH`).

    The encoder is loaded strictly (position embedding resampled to the model's grid). The decoder
    too, when the file holds one in a layout milan maps (ours, the MILAN authors' prompting decoder,
    MAE's decoder, mmpretrain's MILAN / MAE neck) — unless `init_decoder` is False. A decoder of
    another kind, target or shape than `model.spec` is refused by name; a file without a decoder leaves
    the model's freshly initialised one.

    Returns:
        what was loaded, in words (for the run's log).

    Raises:
        WeightsError: the encoder does not fit, or the decoder does not match the spec (the message
            names `model.init_decoder=false`).
    """
    pretrained = load_pretrained(path)
    spec, meta = model.spec, pretrained.meta
    if "norm.weight" not in pretrained.state:
        raise WeightsError(f"model.init={path}: {pretrained.path} has no final norm (a finetuned avg-pool "
                           "classifier?); start from a pretraining checkpoint or an encoder")
    load_encoder(model.encoder, pretrained.state, allow_missing=(), allow_unexpected=HEAD_KEYS)
    what = f"encoder from {pretrained.path} ({meta['source']})"
    kind, decoder = meta.get("decoder"), pretrained.decoder_state
    fix = "set model.init_decoder=false to start the decoder from scratch"
    if kind is None or decoder is None:
        return what + "; decoder freshly initialised (the file has none)"
    if not init_decoder:
        return what + f"; decoder freshly initialised (model.init_decoder=false; the file's {kind} decoder unused)"
    if kind != spec.decoder:
        raise WeightsError(f"model.init={path} holds a {kind} decoder but this run's model.decoder={spec.decoder}; "
                           f"{fix}, or set model.decoder={kind}")
    if meta.get("target") is not None and meta["target"] != spec.target:
        raise WeightsError(f"model.init={path}: its decoder predicted {meta['target']} targets, this run's "
                           f"model.target={spec.target}; {fix}")
    heads = meta.get("decoder_heads")
    if pretrained.spec is not None and pretrained.spec.decoder_heads is not None:
        heads = pretrained.spec.decoder_heads
    if heads is not None and spec.decoder_heads is not None and heads != spec.decoder_heads:
        raise WeightsError(f"model.init={path}: its decoder has {heads} attention heads, this run's "
                           f"model.decoder_heads={spec.decoder_heads}; set model.decoder_heads={heads}, or {fix}")
    target = model.decoder.state_dict()
    decoder = dict(decoder)
    notes = []
    if "pos_embed" in decoder and decoder["pos_embed"].shape != target["pos_embed"].shape:
        # a fixed sin-cos table (MAE, the authors, mmpretrain, ours): the model's own is the one for its grid
        decoder["pos_embed"] = target["pos_embed"]
        notes.append("decoder position embedding: the fixed sin-cos table for this grid")
    missing = sorted(set(target) - set(decoder))
    unexpected = sorted(set(decoder) - set(target))
    wrong = [f"decoder.{k} {tuple(decoder[k].shape)} vs {tuple(target[k].shape)}"
             for k in sorted(set(decoder) & set(target)) if decoder[k].shape != target[k].shape]
    if missing or unexpected or wrong:
        head = decoder.get("head.weight")
        hint = ""
        if head is not None and head.shape != target["head.weight"].shape:
            hint = (f" (the file's decoder predicts {head.shape[0]}-d targets, this run's "
                    f"{target['head.weight'].shape[0]}-d: another teacher?)")
        parts = [f"missing {', '.join('decoder.' + k for k in missing[:4])}" if missing else "",
                 f"unexpected {', '.join('decoder.' + k for k in unexpected[:4])}" if unexpected else "",
                 f"shape mismatch {', '.join(wrong[:3])}" if wrong else ""]
        raise WeightsError(f"model.init={path}: its {kind} decoder does not fit this run's "
                           f"({spec.decoder_dim} wide, {spec.decoder_depth} deep): "
                           f"{'; '.join(p for p in parts if p)}{hint}; set model.decoder_dim / decoder_depth to "
                           f"the file's, or {fix}")
    model.decoder.load_state_dict(decoder)  # strict: checked above
    return what + f"; {kind} decoder too" + (f" ({'; '.join(notes)})" if notes else "")


def _pretrain_spec(obj: dict[str, Any], config: dict[str, Any] | None) -> Any:
    """The spec a pretrain checkpoint records (or, in older ones, what its config resolves to)."""
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
