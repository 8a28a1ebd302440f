"""Tests for milan.encoder: timm compatibility, visible-token path, sin-cos position embedding."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import timm
import torch
from timm.models import VisionTransformer

from milan.encoder import ENCODER_PRESETS, MaskedViTEncoder, sincos_pos_embed_2d
from milan.masking import random_masking


def _small_encoder(**kwargs) -> MaskedViTEncoder:
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    args.update(kwargs)
    return MaskedViTEncoder(**args).eval()


def _perturb_(module: torch.nn.Module, seed: int = 0) -> None:
    """Make every parameter non-trivial (init leaves biases 0 and LN weights 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------- sin-cos position embedding


def _mae_sincos_reference(embed_dim: int, grid: int) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed convention, written elementwise from its description.

    Token t = 1 + row * grid + col (CLS at 0, all zeros). Channels [0, D/2) encode the column
    x, channels [D/2, D) the row y; each half is [sin(pos*omega_i) for i], [cos(pos*omega_i)]
    with omega_i = 1 / 10000^(i / (D/4)).
    """
    quarter = embed_dim // 4
    out = np.zeros((1 + grid * grid, embed_dim), dtype=np.float64)
    for row in range(grid):
        for col in range(grid):
            t = 1 + row * grid + col
            for i in range(quarter):
                omega = 1.0 / 10000.0 ** (i / quarter)
                out[t, i] = math.sin(col * omega)
                out[t, quarter + i] = math.cos(col * omega)
                out[t, 2 * quarter + i] = math.sin(row * omega)
                out[t, 3 * quarter + i] = math.cos(row * omega)
    return out


@pytest.mark.parametrize(("dim", "grid"), [(16, 4), (32, 3), (192, 8), (8, 14)])
def test_sincos_matches_mae_reference(dim, grid):
    emb = sincos_pos_embed_2d(dim, grid)
    assert emb.shape == (1, 1 + grid * grid, dim)
    assert emb.dtype == torch.float32
    ref = _mae_sincos_reference(dim, grid)
    np.testing.assert_allclose(emb[0].numpy(), ref, atol=1e-6, rtol=0)
    assert torch.equal(emb[0, 0], torch.zeros(dim))


def test_sincos_without_cls_and_column_row_layout():
    dim, grid = 16, 5
    emb = sincos_pos_embed_2d(dim, grid, cls_token=False)[0]
    assert emb.shape == (grid * grid, dim)
    tok = emb.reshape(grid, grid, dim)  # [row, col, D]
    # first half depends only on the column, second half only on the row
    assert torch.allclose(tok[:, :, : dim // 2], tok[:1, :, : dim // 2].expand(grid, -1, -1))
    assert torch.allclose(tok[:, :, dim // 2 :], tok[:, :1, dim // 2 :].expand(-1, grid, -1))
    assert not torch.allclose(tok[0, 0, : dim // 2], tok[0, 1, : dim // 2])


def test_sincos_rejects_dim_not_divisible_by_4():
    with pytest.raises(ValueError):
        sincos_pos_embed_2d(18, 4)


def test_encoder_pos_embed_is_fixed_buffer():
    enc = _small_encoder()
    names = {n for n, _ in enc.named_parameters()}
    assert "pos_embed" not in names
    assert not enc.pos_embed.requires_grad
    assert "pos_embed" in enc.state_dict()  # persistent: needed to load into timm strictly
    assert enc.pos_embed.shape == (1, 1 + 16, 32)
    assert torch.equal(enc.pos_embed[0, 0], torch.zeros(32))
    np.testing.assert_allclose(enc.pos_embed[0].numpy(), _mae_sincos_reference(32, 4), atol=1e-6)
    # an optimizer step over parameters() cannot move it
    before = enc.pos_embed.clone()
    opt = torch.optim.SGD(enc.parameters(), lr=1.0)
    enc.train()
    enc(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    assert torch.equal(enc.pos_embed, before)


# ---------------------------------------------------------------- timm compatibility


def test_tiny_preset_loads_into_timm_and_matches_forward_features():
    enc = MaskedViTEncoder.from_config(ENCODER_PRESETS["vit_tiny_patch16"]).eval()
    _perturb_(enc, seed=1)
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=0, pretrained=False).eval()
    ref.load_state_dict(enc.state_dict(), strict=True)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = enc(images)
        theirs = ref.forward_features(images)
    assert ours.shape == (2, 197, 192)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_shapes_preset_timm_kwargs_round_trip():
    enc = MaskedViTEncoder.from_config(ENCODER_PRESETS["vit_shapes_patch8"]).eval()
    _perturb_(enc, seed=2)
    ref = VisionTransformer(**enc.timm_kwargs()).eval()
    ref.load_state_dict(enc.state_dict(), strict=True)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(enc(images), ref.forward_features(images), atol=1e-5, rtol=0)

    # and the other direction: timm weights load strictly into the encoder
    other = VisionTransformer(**enc.timm_kwargs()).eval()
    _perturb_(other, seed=3)
    fresh = MaskedViTEncoder.from_config(ENCODER_PRESETS["vit_shapes_patch8"]).eval()
    fresh.load_state_dict(other.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), other.forward_features(images), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(ENCODER_PRESETS))
def test_presets_have_timm_shapes(name):
    """Each preset's parameters have the shapes of its timm model (one block built on CPU)."""
    config = ENCODER_PRESETS[name]
    one_block = MaskedViTEncoder.from_config(dataclasses.replace(config, depth=1))
    grid = config.img_size // config.patch_size
    assert one_block.num_patches == grid * grid
    assert one_block.embed_dim == config.embed_dim
    assert one_block.blocks[0].attn.num_heads == config.num_heads
    assert one_block.blocks[0].mlp.fc1.out_features == int(config.embed_dim * config.mlp_ratio)
    assert one_block.pos_embed.shape == (1, 1 + grid * grid, config.embed_dim)

    with torch.device("meta"):
        if config.timm_name is not None:
            ref = timm.create_model(config.timm_name, num_classes=0, pretrained=False)
        else:
            ref = VisionTransformer(**one_block.timm_kwargs() | {"depth": config.depth})
    assert len(ref.blocks) == config.depth
    ref_shapes = {
        k: tuple(v.shape)
        for k, v in ref.state_dict().items()
        if not k.startswith("blocks.") or k.startswith("blocks.0.")
    }
    ours = {k: tuple(v.shape) for k, v in one_block.state_dict().items()}
    assert ours == ref_shapes


def test_timm_kwargs_fields():
    enc = _small_encoder(mlp_ratio=2.0)
    kw = enc.timm_kwargs()
    assert kw["embed_dim"] == 32 and kw["depth"] == 2 and kw["num_heads"] == 2
    assert kw["patch_size"] == 8 and kw["mlp_ratio"] == 2.0 and kw["num_classes"] == 0
    VisionTransformer(**kw).load_state_dict(enc.state_dict(), strict=True)


# ---------------------------------------------------------------- visible-token path


def _reference_visible_forward(enc: MaskedViTEncoder, images, keep):
    """patch_embed + pos, gather the kept tokens, prepend CLS(+pos), blocks, norm — by hand."""
    x = enc.patch_embed(images) + enc.pos_embed[:, 1:]
    rows = []
    for b in range(images.shape[0]):
        cls = enc.cls_token[0] + enc.pos_embed[0, :1]
        rows.append(torch.cat([cls, x[b, keep[b]]], dim=0))
    x = torch.stack(rows)
    for blk in enc.blocks:
        x = blk(x)
    return enc.norm(x)


def test_encoder_on_visible_tokens_matches_reference():
    enc = _small_encoder(img_size=32, patch_size=4)  # 64 patches
    _perturb_(enc, seed=4)
    images = torch.randn(3, 3, 32, 32)
    mask = random_masking(3, enc.num_patches, 0.75, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = enc(images, mask.keep)
        ref = _reference_visible_forward(enc, images, mask.keep)
        full = enc(images)
    assert out.shape == (3, 1 + 16, 32)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # keep=None is the full token set in patch order
    all_idx = torch.arange(enc.num_patches).expand(3, -1)
    torch.testing.assert_close(
        full, _reference_visible_forward(enc, images, all_idx), atol=1e-5, rtol=0
    )
    # dropping tokens really changes the features (visible-only attention, not masking after)
    assert not torch.allclose(
        out[:, 1:], full[:, 1:][torch.arange(3)[:, None], mask.keep], atol=1e-3
    )


def test_encoder_is_equivariant_to_keep_order():
    enc = _small_encoder()
    _perturb_(enc, seed=5)
    images = torch.randn(2, 3, 32, 32)
    keep = torch.tensor([[0, 5, 9, 14], [3, 2, 15, 7]])
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        a = enc(images, keep)
        b = enc(images, keep[:, perm])
    torch.testing.assert_close(a[:, 0], b[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(a[:, 1:][:, perm], b[:, 1:], atol=1e-5, rtol=0)


def test_encoder_drop_path_schedule():
    enc = _small_encoder(depth=3, drop_path_rate=0.2)
    probs = [getattr(blk.drop_path1, "drop_prob", 0.0) for blk in enc.blocks]
    assert probs == pytest.approx([0.0, 0.1, 0.2])


def test_encoder_gradients_reach_all_parameters():
    enc = _small_encoder().train()
    keep = torch.tensor([[1, 4, 6, 10], [0, 3, 8, 15]])
    enc(torch.randn(2, 3, 32, 32), keep).pow(2).mean().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
