"""MaskedAutoencoder = encoder + decoder + objective; `ModelSpec`, what a pretraining model is.

The paper's ablations (Table 5: target × decoder × masking; Table 9: no decoder) are
configurations of one model, chosen at build time:

    target   clip  → predict the teacher's tokens, `feature_loss` over CLS + all patches (eq. 1)
             pixel → predict normalised pixels, MAE's loss on masked patches
    decoder  prompting (MILAN) | mae (MAE) | none (KD baseline: linear head on visible tokens)
    masking  semantic (teacher attention) | random   — drawn by `milan.MILAN`, not by the model

`ModelSpec.resolve` decides all three in one place, in one order: the name's prefix (`milan_`
→ Table 5 #8, `mae_` → #1, `kd_` → Table 9's KD), then a Table 5 row (`variant=1..8`), then
explicit `target` / `decoder` / `masking`. An explicit value that contradicts a given row is an
error naming both.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from milan.decoder import MAEDecoder, PromptingDecoder, VisibleHead
from milan.encoder import ENCODER_PRESETS, EncoderConfig, MaskedViTEncoder
from milan.errors import ConfigError
from milan.loss import feature_loss, pixel_errors
from milan.masking import Mask, gather_tokens

__all__ = [
    "Variant",
    "TABLE5",
    "KD_BASELINE",
    "PREFIXES",
    "ModelSpec",
    "ModelOutput",
    "MaskedAutoencoder",
    "build_model",
    "model_names",
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

#: Model-name prefix → the variant it means unless told otherwise.
PREFIXES: dict[str, Variant] = {"milan": TABLE5[8], "mae": TABLE5[1], "kd": KD_BASELINE}
# Decoder shape (dim, depth, heads): MAE's 512 × 8 × 16 unless a CPU-sized student says otherwise.
_DECODER_SHAPES: dict[str, tuple[int, int, int]] = {"vit_shapes_patch8": (128, 2, 4)}
_DEFAULT_DECODER_SHAPE = (512, 8, 16)


@dataclass(frozen=True)
class ModelSpec:
    """Everything that decides what a pretraining model is, fully resolved (build with `resolve`).

    Attributes:
        name: `<milan|mae|kd>_<encoder preset>`, e.g. `milan_vit_base_patch16`.
        target, decoder, masking: the variant (Table 5 / Table 9).
        mask_ratio: fraction of patches masked, in (0, 1).
        decoder_dim, decoder_depth, decoder_heads: the decoder's shape (None without a decoder).
    """

    name: str
    target: TargetKind
    decoder: DecoderKind
    masking: MaskingKind
    mask_ratio: float = 0.75
    decoder_dim: int | None = None
    decoder_depth: int | None = None
    decoder_heads: int | None = None

    @property
    def preset(self) -> str:
        """The encoder preset, e.g. `vit_base_patch16`."""
        return self.name.partition("_")[2]

    @property
    def encoder(self) -> EncoderConfig:
        return ENCODER_PRESETS[self.preset]

    @property
    def variant(self) -> Variant:
        return Variant(self.target, self.decoder, self.masking)

    @property
    def row(self) -> int | None:
        """The Table 5 row this spec is, if any."""
        return next((i for i, v in TABLE5.items() if v == self.variant), None)

    @property
    def needs_teacher(self) -> bool:
        """Feature targets and semantic-aware masking both come from the teacher."""
        return self.target == "clip" or self.masking == "semantic"

    @classmethod
    def resolve(
        cls,
        name: str,
        *,
        variant: int | None = None,
        target: str | None = None,
        decoder: str | None = None,
        masking: str | None = None,
        mask_ratio: float = 0.75,
        decoder_dim: int | None = None,
        decoder_depth: int | None = None,
        decoder_heads: int | None = None,
    ) -> ModelSpec:
        """Resolve name prefix → Table 5 row → explicit values (see the module docstring).

        Raises:
            ConfigError: an unknown name, row or value; a contradiction between `variant` and an
                explicit value; a combination no model implements (pixel target without decoder).
        """
        prefix, _, preset = name.partition("_")
        if prefix not in PREFIXES or preset not in ENCODER_PRESETS:
            raise ConfigError(f"model.name={name!r} is not a model; choose one of: {', '.join(model_names())}")
        chosen = PREFIXES[prefix]
        if variant is not None:
            if variant not in TABLE5:
                raise ConfigError(f"model.variant={variant} is not a Table 5 row; choose 1–8 (8 is MILAN, 1 is MAE)")
            chosen = TABLE5[variant]
        explicit = {"target": target, "decoder": decoder, "masking": masking}
        allowed = {"target": ("clip", "pixel"), "decoder": ("prompting", "mae", "none"),
                   "masking": ("semantic", "random")}
        for key, value in explicit.items():
            if value is not None and value not in allowed[key]:
                raise ConfigError(f"model.{key}={value!r} is not valid; choose one of: "
                                  + ", ".join(repr(a) for a in allowed[key]))
            if value is not None and variant is not None and value != getattr(chosen, key):
                raise ConfigError(
                    f"model.variant={variant} (Table 5: {getattr(chosen, key)} {key}) and model.{key}={value} "
                    f"contradict each other; drop one of them"
                )
        chosen = replace(chosen, **{k: v for k, v in explicit.items() if v is not None})
        if chosen.target == "pixel" and chosen.decoder == "none":
            raise ConfigError("model.target=pixel needs a decoder (model.decoder=mae or prompting), not 'none'")
        config = ENCODER_PRESETS[preset]
        num_patches = (config.img_size // config.patch_size) ** 2
        if not 0.0 < mask_ratio < 1.0 or int(num_patches * (1.0 - mask_ratio)) < 1:
            raise ConfigError(f"model.mask_ratio={mask_ratio} must be in (0, 1) and leave at least one of the "
                              f"{num_patches} patches visible; the paper uses 0.75")
        if chosen.decoder == "none":
            shape: tuple[int | None, ...] = (None, None, None)
        else:
            dims = _DECODER_SHAPES.get(preset, _DEFAULT_DECODER_SHAPE)
            shape = tuple(v if v is not None else d for v, d in zip((decoder_dim, decoder_depth, decoder_heads), dims))
        return cls(name, chosen.target, chosen.decoder, chosen.masking, float(mask_ratio), *shape)


def model_names() -> list[str]:
    """All names `build_model` accepts."""
    return [f"{prefix}_{enc}" for prefix in PREFIXES for enc in ENCODER_PRESETS]


def encoder_preset(name: str, key: str = "model.preset") -> str:
    """The encoder preset a name means: `vit_base_patch16`, or a model name such as
    `milan_vit_base_patch16` (what `milan info` and pretrain configs show) → `vit_base_patch16`.

    Raises:
        ConfigError: naming `key` and the accepted names.
    """
    prefix, _, rest = name.partition("_")
    preset = rest if prefix in PREFIXES and rest in ENCODER_PRESETS else name
    if preset not in ENCODER_PRESETS:
        raise ConfigError(f"{key}={name!r} is not an encoder preset; choose one of: {', '.join(ENCODER_PRESETS)} "
                          "(a model name such as milan_vit_base_patch16 works too)")
    return preset


class ModelOutput(NamedTuple):
    loss: Tensor  # scalar: the objective, averaged over the tokens it scores
    pred: Tensor  # [B, 1+N, D] (or [B, 1+K, D] without a decoder)
    token_loss: Tensor  # [B, 1+N] per token, CLS first then patches in patch order; NaN where not scored
    target: Tensor  # what `pred` is scored against (see each objective)


class FeatureObjective:
    """Eq. 1 against the teacher's tokens, on every token the decoder predicts.

    `target` is the teacher's tokens in `pred`'s layout: `[B, 1+N, Dt]`, or `[B, 1+K, Dt]` (CLS
    and visible tokens in the encoder's order) without a decoder.
    """

    def __init__(self, *, visible_only: bool) -> None:
        self.visible_only = visible_only

    def __call__(self, pred: Tensor, images: Tensor, mask: Mask, targets: Tensor | None) -> ModelOutput:
        if targets is None:
            raise ValueError("target='clip' needs the teacher's tokens: model(images, mask, targets)")
        if self.visible_only:  # KD baseline: CLS + visible tokens, in the encoder's order
            targets = torch.cat([targets[:, :1], gather_tokens(targets[:, 1:], mask.keep)], dim=1)
        scored = feature_loss(pred, targets, reduction="none")  # [B, T]
        per_token = scored
        if self.visible_only:  # back to token order, NaN on the masked patches it does not predict
            per_token = scored.new_full((scored.shape[0], 1 + mask.num_patches), float("nan"))
            per_token[:, 0] = scored[:, 0]
            per_token = per_token.scatter(1, mask.keep + 1, scored[:, 1:])
        return ModelOutput(scored.mean(), pred, per_token, targets)


class PixelObjective:
    """MAE's normalised-pixel loss on masked patches (the CLS prediction is unused).

    `target` is the normalised pixels of the masked patches, `[B, M, p·p·3]` in `mask.masked` order.
    """

    def __init__(self, *, patch_size: int) -> None:
        self.patch_size = patch_size

    def __call__(self, pred: Tensor, images: Tensor, mask: Mask, targets: Tensor | None) -> ModelOutput:
        errors, target = pixel_errors(pred[:, 1:], images, mask.masked, patch_size=self.patch_size)  # [B, M, P]
        per_token = errors.new_full((errors.shape[0], 1 + mask.num_patches), float("nan"))
        per_token = per_token.scatter(1, mask.masked + 1, errors.mean(-1))
        return ModelOutput(errors.mean(), pred, per_token, target)


class MaskedAutoencoder(nn.Module):
    """Encoder on visible patches → decoder → objective.

    Args:
        encoder: the ViT being pretrained (what users keep).
        decoder: `PromptingDecoder`, `MAEDecoder` or `VisibleHead`.
        objective: `FeatureObjective` or `PixelObjective`.
        spec: what this model was built as (recorded in checkpoints).
    """

    def __init__(
        self,
        encoder: MaskedViTEncoder,
        decoder: nn.Module,
        objective: FeatureObjective | PixelObjective,
        *,
        spec: ModelSpec,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.objective = objective
        self.spec = spec

    @property
    def variant(self) -> Variant:
        return self.spec.variant

    @property
    def num_patches(self) -> int:
        return self.encoder.num_patches

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing over the encoder's and the decoder's blocks (`model.grad_checkpointing`)."""
        self.encoder.set_grad_checkpointing(enable)
        if hasattr(self.decoder, "set_grad_checkpointing"):  # VisibleHead (no decoder) has no blocks
            self.decoder.set_grad_checkpointing(enable)

    def forward(self, images: Tensor, mask: Mask, targets: Tensor | None = None) -> ModelOutput:
        """One pretraining forward.

        Args:
            images: `[B, 3, H, W]` normalised student crops.
            mask: from `milan.masking` for `N = self.num_patches`.
            targets: `[B, 1+N, Dt]` teacher tokens (needed for target='clip').
        """
        latent = self.encoder(images, mask.keep)  # [B, 1+K, De]
        pred = self.decoder(latent, mask)  # [B, 1+N, Dt] (or [B, 1+K, Dt])
        return self.objective(pred, images, mask, targets)


_DECODERS = {"prompting": PromptingDecoder, "mae": MAEDecoder, "none": VisibleHead}


def build_model(
    name: str | ModelSpec, *, target_dim: int | None = None, drop_path_rate: float = 0.0, **choices: Any
) -> MaskedAutoencoder:
    """Build a pretraining model by name (e.g. `milan_vit_base_patch16`) or from a `ModelSpec`.

    Args:
        name: `<milan|mae|kd>_<encoder preset>`, or a resolved `ModelSpec` (then no `choices`).
        target_dim: the teacher's token width `teacher.dim` (required for target='clip').
        drop_path_rate: stochastic depth in the encoder.
        **choices: `ModelSpec.resolve`'s keywords: variant, target, decoder, masking, mask_ratio,
            decoder_dim, decoder_depth, decoder_heads.
    """
    if isinstance(name, ModelSpec) and choices:
        raise ValueError(f"build_model got a resolved ModelSpec and choices {sorted(choices)}; give one or the other")
    spec = name if isinstance(name, ModelSpec) else ModelSpec.resolve(name, **choices)
    config = spec.encoder
    encoder = MaskedViTEncoder.from_config(config, drop_path_rate=drop_path_rate)
    if spec.target == "clip":
        if not target_dim:
            raise ValueError("target='clip' needs target_dim=teacher.dim (e.g. 512 for CLIP B/16)")
        out_dim = target_dim
        objective: FeatureObjective | PixelObjective = FeatureObjective(visible_only=spec.decoder == "none")
    else:
        out_dim = config.patch_size**2 * 3
        objective = PixelObjective(patch_size=config.patch_size)
    common = dict(encoder_dim=config.embed_dim, num_patches=encoder.num_patches, out_dim=out_dim)
    if spec.decoder == "none":
        head = VisibleHead(**common)
    else:
        head = _DECODERS[spec.decoder](**common, dim=spec.decoder_dim, depth=spec.decoder_depth,
                                       num_heads=spec.decoder_heads)
    return MaskedAutoencoder(encoder, head, objective, spec=spec)
