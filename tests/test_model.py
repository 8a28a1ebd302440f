"""Tests for milan.model: every ablation variant trains one step; build_model validation."""

from __future__ import annotations

import pytest
import torch

from _mae_reference import mae_pixel_loss
from milan.decoder import MAEDecoder, PromptingDecoder, VisibleHead
from milan.encoder import ENCODER_PRESETS
from milan.loss import feature_loss
from milan.masking import Mask, random_masking, semantic_masking
from milan.model import KD_BASELINE, TABLE5, MaskedAutoencoder, Variant, build_model, model_names

PRESET = "vit_shapes_patch8"  # 64 px, 8x8 grid of 8 px patches
TARGET_DIM = 16
BATCH = 2
# keep the CPU cost down: a 1-block, 64-wide decoder is enough to exercise every path
SMALL_DECODER = dict(decoder_dim=64, decoder_depth=1, decoder_heads=4)


def _build(variant: Variant, **kwargs) -> MaskedAutoencoder:
    return build_model(
        f"milan_{PRESET}",
        target_dim=TARGET_DIM,
        target=variant.target,
        decoder=variant.decoder,
        masking=variant.masking,
        **SMALL_DECODER,
        **kwargs,
    )


def _make_mask(variant: Variant, num_patches: int, seed: int = 0) -> Mask:
    g = torch.Generator().manual_seed(seed)
    if variant.masking == "semantic":
        # stand-in for the teacher's cls_attn: a softmax over patches
        cls_attn = torch.softmax(3 * torch.randn(BATCH, num_patches, generator=g), dim=-1)
        return semantic_masking(cls_attn, 0.75, generator=g)
    return random_masking(BATCH, num_patches, 0.75, generator=g)


def _batch(num_patches: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(BATCH, 3, 64, 64, generator=g)
    targets = torch.randn(BATCH, 1 + num_patches, TARGET_DIM, generator=g)
    return images, targets


def _run_variant(variant: Variant):
    model = _build(variant).train()
    n = model.num_patches
    mask = _make_mask(variant, n)
    images, targets = _batch(n)
    out = model(images, mask, targets)
    out.loss.backward()
    return model, mask, images, targets, out


def _check_grads(model: MaskedAutoencoder) -> None:
    for name, p in model.named_parameters():
        assert p.requires_grad
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize("row", sorted(TABLE5))
def test_table5_variant_forward_backward(row):
    variant = TABLE5[row]
    model, mask, images, targets, out = _run_variant(variant)
    n = model.num_patches
    assert n == 64
    assert model.patch_size == 8
    assert model.variant.target == variant.target
    assert model.variant.decoder == variant.decoder
    assert isinstance(
        model.decoder, {"prompting": PromptingDecoder, "mae": MAEDecoder}[variant.decoder]
    )
    out_dim = TARGET_DIM if variant.target == "clip" else 8 * 8 * 3
    assert out.pred.shape == (BATCH, 1 + n, out_dim)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    with torch.no_grad():
        if variant.target == "clip":
            expected = feature_loss(out.pred, targets)
        else:
            expected = mae_pixel_loss(images, out.pred[:, 1:], mask.is_masked().float(), 8)
    torch.testing.assert_close(out.loss.detach(), expected)
    _check_grads(model)


def test_kd_baseline_forward_backward():
    model, mask, images, targets, out = _run_variant(KD_BASELINE)
    assert isinstance(model.decoder, VisibleHead)
    k = mask.num_keep
    assert out.pred.shape == (BATCH, 1 + k, TARGET_DIM)
    # loss on CLS + visible tokens, targets taken in keep order
    picked = torch.stack(
        [torch.cat([targets[b, :1], targets[b, 1 + mask.keep[b]]]) for b in range(BATCH)]
    )
    torch.testing.assert_close(out.loss.detach(), feature_loss(out.pred.detach(), picked))
    _check_grads(model)


def test_kd_prefix_builds_visible_head():
    model = build_model(f"kd_{PRESET}", target_dim=TARGET_DIM)
    assert isinstance(model.decoder, VisibleHead)
    assert model.variant == KD_BASELINE


def test_prefix_defaults():
    milan = build_model(f"milan_{PRESET}", target_dim=TARGET_DIM, **SMALL_DECODER)
    assert milan.variant == TABLE5[8]
    assert isinstance(milan.decoder, PromptingDecoder)
    assert milan.decoder.head.out_features == TARGET_DIM
    mae = build_model(f"mae_{PRESET}", **SMALL_DECODER)
    assert mae.variant == TABLE5[1]
    assert isinstance(mae.decoder, MAEDecoder)
    assert mae.decoder.head.out_features == 8 * 8 * 3


def test_decoder_shape_defaults_and_overrides():
    model = build_model(f"milan_{PRESET}", target_dim=TARGET_DIM)
    dec = model.decoder
    assert (dec.embed.out_features, len(dec.blocks), dec.blocks[0].attn.num_heads) == (128, 2, 4)
    assert dec.embed.in_features == ENCODER_PRESETS[PRESET].embed_dim
    model = build_model(
        f"milan_{PRESET}", target_dim=TARGET_DIM, decoder_dim=32, decoder_depth=3, decoder_heads=2
    )
    dec = model.decoder
    assert (dec.embed.out_features, len(dec.blocks), dec.blocks[0].attn.num_heads) == (32, 3, 2)


def test_clip_target_needs_targets_at_forward():
    model = _build(TABLE5[8])
    mask = _make_mask(TABLE5[8], model.num_patches)
    images, _ = _batch(model.num_patches)
    with pytest.raises(ValueError):
        model(images, mask)


def test_pixel_target_needs_no_targets():
    model = _build(TABLE5[1])
    mask = _make_mask(TABLE5[1], model.num_patches)
    images, _ = _batch(model.num_patches)
    assert torch.isfinite(model(images, mask).loss)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("foo_vit_shapes_patch8", dict(target_dim=16)),  # unknown prefix
        ("milan_vit_nonexistent", dict(target_dim=16)),  # unknown encoder preset
        ("milan", dict(target_dim=16)),  # no preset at all
        ("milan_vit_shapes_patch8", dict()),  # clip target without target_dim
        ("milan_vit_shapes_patch8", dict(target_dim=0)),
        ("kd_vit_shapes_patch8", dict()),
        ("mae_vit_shapes_patch8", dict(target="clip")),
        ("milan_vit_shapes_patch8", dict(target="pixel", decoder="none")),  # pixel + no decoder
        ("mae_vit_shapes_patch8", dict(decoder="none")),
        ("milan_vit_shapes_patch8", dict(target_dim=16, target="depth")),
        ("milan_vit_shapes_patch8", dict(target_dim=16, decoder="linear")),
    ],
)
def test_build_model_errors(name, kwargs):
    with pytest.raises(ValueError):
        build_model(name, **kwargs)


def test_model_names_cover_prefixes_and_presets():
    names = model_names()
    assert len(names) == 3 * len(ENCODER_PRESETS) == len(set(names))
    for prefix in ("milan", "mae", "kd"):
        for preset in ENCODER_PRESETS:
            assert f"{prefix}_{preset}" in names
    assert "milan_vit_base_patch16" in names


def test_token_loss_is_eq1_per_token_and_averages_to_the_loss():
    model = _build(TABLE5[8])
    mask = _make_mask(TABLE5[8], model.num_patches)
    images, targets = _batch(model.num_patches)
    out = model(images, mask, targets)
    assert out.token_loss.shape == (BATCH, 1 + model.num_patches) and not torch.isnan(out.token_loss).any()
    torch.testing.assert_close(out.token_loss, feature_loss(out.pred, targets, reduction="none"))
    torch.testing.assert_close(out.token_loss.mean(), out.loss)


def test_token_loss_of_kd_scores_cls_and_visible_tokens_only():
    model = build_model(f"kd_{PRESET}", target_dim=TARGET_DIM)
    mask = _make_mask(KD_BASELINE, model.num_patches)
    images, targets = _batch(model.num_patches)
    out = model(images, mask, targets)
    scored = ~torch.isnan(out.token_loss)  # [B, 1+N]
    assert scored[:, 0].all() and scored[:, 1:].sum(1).tolist() == [mask.num_keep] * BATCH
    assert scored[:, 1:].gather(1, mask.keep).all()
    torch.testing.assert_close(out.token_loss.nanmean(), out.loss)


def test_token_loss_of_pixels_scores_masked_patches_only():
    model = _build(TABLE5[1])
    mask = _make_mask(TABLE5[1], model.num_patches)
    images, _ = _batch(model.num_patches)
    out = model(images, mask)
    hidden = mask.is_masked()
    assert torch.isnan(out.token_loss[:, 0]).all() and torch.isnan(out.token_loss[:, 1:][~hidden]).all()
    assert not torch.isnan(out.token_loss[:, 1:][hidden]).any()
    torch.testing.assert_close(out.token_loss.nanmean(), out.loss)
    torch.testing.assert_close(out.loss, mae_pixel_loss(images, out.pred[:, 1:], mask.is_masked().float(), 8))


def test_encoder_preset_accepts_a_model_name_or_a_preset() -> None:
    """`milan info` and pretrain configs show model names; every model.preset key takes them too."""
    from milan.errors import ConfigError
    from milan.io.weights import build_encoder
    from milan.model import encoder_preset

    for prefix in ("milan", "mae", "kd"):
        assert encoder_preset(f"{prefix}_vit_shapes_patch8") == "vit_shapes_patch8"
    assert encoder_preset("vit_shapes_patch8") == "vit_shapes_patch8"
    with pytest.raises(ConfigError, match=r"model\.preset='vit_nope'.*vit_shapes_patch8.*milan_vit_base_patch16"):
        encoder_preset("vit_nope")
    encoder, meta = build_encoder(None, preset="milan_vit_shapes_patch8")
    assert meta["preset"] == "vit_shapes_patch8" and encoder.pos_embed.shape[1] == 1 + 8 * 8
