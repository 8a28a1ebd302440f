"""MaskedAutoencoder = encoder + decoder + objective, and the named presets.

The paper's ablations (Table 5: target × decoder × masking; Table 9: no decoder) are
configurations of one model, chosen at build time:

    target   clip  → predict the teacher's tokens, `feature_loss` over CLS + all patches (eq. 1)
             pixel → predict normalised pixels, MAE's loss on masked patches
    decoder  prompting (MILAN) | mae (MAE) | none (KD baseline: linear head on visible tokens)
    masking  semantic (teacher attention) | random   — used by the recipe, not by the model
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from milan.decoder import MAEDecoder, PromptingDecoder, VisibleHead
from milan.encoder import ENCODER_PRESETS, EncoderConfig, MaskedViTEncoder
from milan.loss import feature_loss, pixel_loss
from milan.masking import Mask, gather_tokens

__all__ = [
    "Variant",
    "TABLE5",
    "KD_BASELINE",
    "ModelOutput",
    "MaskedAutoencoder",
    "build_model",
    "model_names",
    "parse_name",
]

TargetKind = Literal["clip", "pixel"]
DecoderKind = Literal["prompting", "mae", "none"]
MaskingKind = Literal["semantic", "random"]


@dataclass(frozen=True)
class Variant:
    """One row of the paper's ablation: what is predicted, by which decoder, from which mask."""

    target: TargetKind
    decoder: DecoderKind
    masking: MaskingKind


#: Table 5, rows #1–#8 (#1 is MAE, #8 is MILAN).
TABLE5: dict[int, Variant] = {
    1: Variant("pixel", "mae", "random"),
    2: Variant("clip", "mae", "random"),
    3: Variant("pixel", "prompting", "random"),
    4: Variant("pixel", "mae", "semantic"),
    5: Variant("pixel", "prompting", "semantic"),
    6: Variant("clip", "mae", "semantic"),
    7: Variant("clip", "prompting", "random"),
    8: Variant("clip", "prompting", "semantic"),
}
#: Table 9's knowledge-distillation baseline: MILAN without its decoder — the encoder itself
#: regresses the teacher's tokens of the (semantically sampled) visible patches, "a semantic aware
#: knowledge distillation method" (appendix A.2, Table 9).
KD_BASELINE = Variant("clip", "none", "semantic")

# Model-name prefix → default variant.
_PREFIXES: dict[str, Variant] = {"milan": TABLE5[8], "mae": TABLE5[1], "kd": KD_BASELINE}
# Decoder shape by encoder preset (MAE's 512 × 8 × 16 unless a CPU-sized student says otherwise).
_DECODER_DEFAULTS: dict[str, dict[str, int]] = {
    "vit_shapes_patch8": dict(dim=128, depth=2, num_heads=4),
}
_DECODERS = {"prompting": PromptingDecoder, "mae": MAEDecoder, "none": VisibleHead}


class ModelOutput(NamedTuple):
    loss: Tensor  # scalar
    pred: Tensor  # [B, 1+N, D] (or [B, 1+K, D] without a decoder)


class FeatureObjective:
    """Eq. 1 against the teacher's tokens, on every token the decoder predicts."""

    def __init__(self, *, visible_only: bool) -> None:
        self.visible_only = visible_only

    def __call__(self, pred: Tensor, images: Tensor, mask: Mask, targets: Tensor | None) -> Tensor:
        if targets is None:
            raise ValueError("target='clip' needs the teacher's tokens: model(images, mask, targets)")
        if self.visible_only:  # KD baseline: CLS + visible tokens, in the encoder's order
            targets = torch.cat([targets[:, :1], gather_tokens(targets[:, 1:], mask.keep)], dim=1)
        return feature_loss(pred, targets)


class PixelObjective:
    """MAE's normalised-pixel loss on masked patches (the CLS prediction is unused)."""

    def __init__(self, *, patch_size: int) -> None:
        self.patch_size = patch_size

    def __call__(self, pred: Tensor, images: Tensor, mask: Mask, targets: Tensor | None) -> Tensor:
        return pixel_loss(pred[:, 1:], images, mask.masked, patch_size=self.patch_size)


class MaskedAutoencoder(nn.Module):
    """Encoder on visible patches → decoder → objective.

    Args:
        encoder: the ViT being pretrained (what users keep).
        decoder: `PromptingDecoder`, `MAEDecoder` or `VisibleHead`.
        objective: `FeatureObjective` or `PixelObjective`.
        variant: the configuration this model was built as (recorded in checkpoints).
    """

    def __init__(
        self,
        encoder: MaskedViTEncoder,
        decoder: nn.Module,
        objective: FeatureObjective | PixelObjective,
        *,
        variant: Variant,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.objective = objective
        self.variant = variant

    @property
    def num_patches(self) -> int:
        return self.encoder.num_patches

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    def forward(self, images: Tensor, mask: Mask, targets: Tensor | None = None) -> ModelOutput:
        """One pretraining forward.

        Args:
            images: `[B, 3, H, W]` normalised student crops.
            mask: from `milan.masking` for `N = self.num_patches`.
            targets: `[B, 1+N, Dt]` teacher tokens (needed for target='clip').
        """
        latent = self.encoder(images, mask.keep)  # [B, 1+K, De]
        pred = self.decoder(latent, mask)  # [B, 1+N, Dt] (or [B, 1+K, Dt])
        return ModelOutput(self.objective(pred, images, mask, targets), pred)


def parse_name(name: str) -> tuple[Variant, EncoderConfig]:
    """`milan_vit_base_patch16` → (the prefix's default variant, the encoder preset)."""
    prefix, _, preset = name.partition("_")
    if prefix not in _PREFIXES or preset not in ENCODER_PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(model_names())}")
    return _PREFIXES[prefix], ENCODER_PRESETS[preset]


def model_names() -> list[str]:
    """All names `build_model` accepts."""
    return [f"{prefix}_{enc}" for prefix in _PREFIXES for enc in ENCODER_PRESETS]


def build_model(
    name: str,
    *,
    target_dim: int | None = None,
    target: TargetKind | None = None,
    decoder: DecoderKind | None = None,
    masking: MaskingKind | None = None,
    decoder_dim: int | None = None,
    decoder_depth: int | None = None,
    decoder_heads: int | None = None,
    drop_path_rate: float = 0.0,
) -> MaskedAutoencoder:
    """Build a pretraining model by name, e.g. `milan_vit_base_patch16` or `mae_vit_large_patch16`.

    Args:
        name: `<milan|mae|kd>_<encoder preset>`; the prefix picks the default target/decoder
            (milan: clip + prompting, mae: pixel + mae, kd: clip + none).
        target_dim: the teacher's token width `teacher.dim` (required for target='clip').
        target, decoder: override the prefix's choice (any Table 5 combination).
        masking: the masking the recipe will use with this model (recorded in `model.variant`).
        decoder_dim, decoder_depth, decoder_heads: override the decoder shape.
        drop_path_rate: stochastic depth in the encoder.
    """
    default, config = parse_name(name)
    preset = name.partition("_")[2]
    target = target or default.target
    decoder = decoder or default.decoder
    if target not in ("clip", "pixel"):
        raise ValueError(f"target must be 'clip' or 'pixel', got {target!r}")
    if decoder not in _DECODERS:
        raise ValueError(f"decoder must be one of {sorted(_DECODERS)}, got {decoder!r}")

    encoder = MaskedViTEncoder.from_config(config, drop_path_rate=drop_path_rate)
    if target == "clip":
        if not target_dim:
            raise ValueError("target='clip' needs target_dim=teacher.dim (e.g. 512 for CLIP B/16)")
        out_dim = target_dim
        objective: FeatureObjective | PixelObjective = FeatureObjective(
            visible_only=decoder == "none"
        )
    else:
        if decoder == "none":
            raise ValueError("target='pixel' needs a decoder ('mae' or 'prompting'), not 'none'")
        out_dim = config.patch_size**2 * 3
        objective = PixelObjective(patch_size=config.patch_size)

    shape = dict(_DECODER_DEFAULTS.get(preset, {}))
    overrides = dict(dim=decoder_dim, depth=decoder_depth, num_heads=decoder_heads)
    shape.update({k: v for k, v in overrides.items() if v is not None})
    common = dict(encoder_dim=config.embed_dim, num_patches=encoder.num_patches, out_dim=out_dim)
    head = _DECODERS[decoder](**common) if decoder == "none" else _DECODERS[decoder](**common, **shape)
    masking = masking or default.masking
    if masking not in ("semantic", "random"):
        raise ValueError(f"masking must be 'semantic' or 'random', got {masking!r}")
    variant = Variant(target, decoder, masking)
    return MaskedAutoencoder(encoder, head, objective, variant=variant)
