"""The ViT pyramid backbone and layer-wise lr decay groups used by `milan segment` / `milan detect`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from milan.dense.backbone import (
    ViTPyramid,
    default_out_indices,
    layer_decay_groups,
    resample_pos_embed,
)
from milan.encoder import MaskedViTEncoder, sincos_pos_embed_2d
from milan.io.weights import build_encoder

PRESET = "vit_shapes_patch8"  # 64 px, patch 8, width 192, depth 6


def _encoder(**kw) -> MaskedViTEncoder:
    return build_encoder(None, preset=PRESET, **kw)[0]


@pytest.mark.parametrize("mode", ["intermediate", "simple"])
def test_pyramid_strides_channels_and_sizes(mode: str) -> None:
    pyramid = ViTPyramid(_encoder(), mode=mode, out_channels=64)
    assert pyramid.strides == (2, 4, 8, 16)
    want_channels = (48, 96, 192, 192) if mode == "intermediate" else (64,) * 4
    assert pyramid.channels == want_channels
    out = pyramid(torch.randn(2, 3, 64, 96))  # not the pretraining size, not square
    assert list(out) == ["p2", "p3", "p4", "p5"]
    for (name, fmap), stride, ch in zip(out.items(), pyramid.strides, want_channels):
        assert fmap.shape == (2, ch, 64 // stride, 96 // stride), name


def test_default_out_indices_match_the_transfer_recipes() -> None:
    assert default_out_indices(12) == (3, 5, 7, 11)  # MAE/BEiT ViT-B: blocks 4, 6, 8, 12
    assert default_out_indices(24) == (7, 11, 15, 23)  # ViT-L
    assert default_out_indices(6) == (1, 2, 3, 5)


def test_pyramid_at_pretraining_size_taps_the_encoder_blocks() -> None:
    """At the native grid the tapped tokens are exactly the encoder's (norm aside)."""
    enc = _encoder().eval()
    reference = [None] * len(enc.blocks)
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: reference.__setitem__(k, o)) for k, b in enumerate(enc.blocks)]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        enc(x)
    for h in hooks:
        h.remove()
    pyramid = ViTPyramid(enc).eval()
    with torch.no_grad():
        taps, grid = pyramid.tokens(x)
    assert grid == (8, 8)
    for tap, idx in zip(taps, pyramid.out_indices):
        want = reference[idx][:, 1:].transpose(1, 2).reshape(2, -1, 8, 8)
        torch.testing.assert_close(tap, want)
    assert isinstance(enc.norm, nn.Identity)  # final norm unused → removed (no unused DDP params)


def test_resampled_sincos_pos_embed_matches_the_table_at_fractional_positions() -> None:
    """Bicubic 8→16 resampling places new cell j at old coordinate j/2 − 1/4 (align_corners=False);
    on the smooth (low-frequency) channels, away from the border, it equals sin/cos there."""
    dim, quarter = 64, 16
    small = sincos_pos_embed_2d(dim, 8)
    big = resample_pos_embed(small, (8, 8), (16, 16))
    assert big.shape == (1, 1 + 256, dim)
    torch.testing.assert_close(big[:, :1], small[:, :1])  # CLS untouched
    assert resample_pos_embed(small, (8, 8), (8, 8)) is small

    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    smooth = omega < 0.15
    grid = big[0, 1:].reshape(16, 16, dim).double()
    for j in range(3, 13):  # interior columns; row fixed
        x = j / 2 - 0.25
        want = torch.cat([(x * omega).sin(), (x * omega).cos()])
        got = grid[5, j, : 2 * quarter]
        keep = torch.cat([smooth, smooth])
        torch.testing.assert_close(got[keep], want[keep], atol=8e-3, rtol=0)


def test_input_not_a_multiple_of_the_patch_is_refused() -> None:
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        ViTPyramid(_encoder())(torch.randn(1, 3, 60, 64))


def test_bad_out_indices_are_refused() -> None:
    with pytest.raises(ValueError, match="4 block indices"):
        ViTPyramid(_encoder(), out_indices=(0, 1, 9, 5))


def test_drop_path_reaches_the_blocks() -> None:
    enc = _encoder(drop_path_rate=0.1)
    rates = [b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0 for b in enc.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)


def test_layer_decay_groups() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = ViTPyramid(_encoder())
            self.head = nn.Conv2d(192, 3, 1)

    net = Net()
    depth = net.backbone.num_layers
    groups = layer_decay_groups(net, weight_decay=0.05, layer_decay=0.5, num_layers=depth)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(net.named_parameters())
    assert len(by_param) == len(named)  # every trainable parameter exactly once
    scale = lambda name: by_param[id(named[name])]["lr_scale"]
    wd = lambda name: by_param[id(named[name])]["weight_decay"]
    assert scale("backbone.encoder.patch_embed.proj.weight") == pytest.approx(0.5 ** (depth + 1))
    assert scale("backbone.encoder.cls_token") == pytest.approx(0.5 ** (depth + 1))
    assert scale("backbone.encoder.blocks.0.attn.qkv.weight") == pytest.approx(0.5**depth)
    assert scale(f"backbone.encoder.blocks.{depth - 1}.mlp.fc2.weight") == pytest.approx(0.5)
    assert scale("head.weight") == 1.0 and scale("backbone.necks.0.0.weight") == 1.0
    assert wd("head.weight") == 0.05 and wd("head.bias") == 0.0
    assert wd("backbone.encoder.cls_token") == 0.0 and wd("backbone.encoder.blocks.0.norm1.weight") == 0.0
    with pytest.raises(ValueError, match=f"num_layers=12 but the encoder under backbone.encoder. has {depth} blocks"):
        layer_decay_groups(net, weight_decay=0.05, layer_decay=0.5, num_layers=12)
    with pytest.raises(ValueError, match="pass backbone= the encoder's prefix"):
        layer_decay_groups(net, weight_decay=0.05, layer_decay=0.5, num_layers=depth, backbone="encoder.")
