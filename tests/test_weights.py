"""Encoder weights: reading every checkpoint format, strict loading, export → timm round trips."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from milan.encoder import ENCODER_PRESETS, MaskedViTEncoder
from milan.io.weights import WeightsError, encoder_state_dict, load_encoder, timm_kwargs
from milan.model import build_model
from milan.tools.cli import main as cli


def _pretrain_ckpt(path: Path, name: str = "milan_vit_shapes_patch8") -> torch.nn.Module:
    model = build_model(name, target_dim=32, decoder_depth=1, decoder_dim=64, decoder_heads=2)
    torch.save({"model": model.state_dict(), "config": {"model": {"name": name}}, "step": 2}, path)
    return model


def test_pretrain_checkpoint_reads_as_timm_encoder(tmp_path: Path) -> None:
    model = _pretrain_ckpt(tmp_path / "ckpt.pt")
    state, meta = encoder_state_dict(tmp_path / "ckpt.pt")
    assert meta["format"] == "pretrain" and meta["preset"] == "vit_shapes_patch8"
    assert meta["encoder"]["num_heads"] == 3 and meta["encoder"]["img_size"] == 64
    assert all(not k.startswith(("decoder", "encoder.")) for k in state)
    encoder = MaskedViTEncoder.from_config(ENCODER_PRESETS["vit_shapes_patch8"])
    assert load_encoder(encoder, state) == []
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(encoder.state_dict()[key], value), key


def test_run_folder_means_its_newest_checkpoint(tmp_path: Path) -> None:
    _pretrain_ckpt(tmp_path / "checkpoint-00000002.pt")
    newest = _pretrain_ckpt(tmp_path / "checkpoint-00000010.pt")
    state, _ = encoder_state_dict(tmp_path)
    assert torch.equal(state["cls_token"], newest.encoder.state_dict()["cls_token"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="folder without weights"):
        encoder_state_dict(tmp_path / "empty")


def test_reference_checkpoint_drops_decoder(tmp_path: Path) -> None:
    enc = MaskedViTEncoder.from_config(ENCODER_PRESETS["vit_shapes_patch8"])
    raw = dict(enc.state_dict())
    raw.update({"mask_token": torch.zeros(1, 1, 64), "decoder_embed.weight": torch.zeros(64, 192),
                "decoder_pos_embed": torch.zeros(1, 65, 64)})
    torch.save({"model": raw, "epoch": 399}, tmp_path / "milan_ref.pth")
    state, meta = encoder_state_dict(tmp_path / "milan_ref.pth")
    assert meta["format"] == "reference"
    assert meta["dropped"] == ["decoder_embed.weight", "decoder_pos_embed", "mask_token"]
    assert set(state) == set(enc.state_dict())


def test_missing_and_unexpected_keys_fail_loudly(tmp_path: Path) -> None:
    enc = MaskedViTEncoder.from_config(ENCODER_PRESETS["vit_shapes_patch8"])
    state = dict(enc.state_dict())
    del state["blocks.3.attn.qkv.weight"]
    with pytest.raises(WeightsError, match=r"missing: blocks\.3\.attn\.qkv\.weight"):
        load_encoder(enc, state)
    state = dict(enc.state_dict(), **{"blocks.9.norm1.weight": torch.ones(192)})
    with pytest.raises(WeightsError, match=r"unexpected: blocks\.9\.norm1\.weight"):
        load_encoder(enc, state)


def test_unsafe_pickle_is_refused(tmp_path: Path) -> None:
    torch.save({"model": {"cls_token": torch.zeros(1)}, "args": Path("x")}, tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match=r"holds pickled Python objects \(pathlib\.\w*Path\).*arbitrary code.*"
                                           r"Re-save only the tensors") as info:
        encoder_state_dict(tmp_path / "bad.pt")
    assert "weights_only" not in str(info.value)


def test_pos_embed_is_resampled_for_another_grid() -> None:
    small = MaskedViTEncoder.from_config(ENCODER_PRESETS["vit_shapes_patch8"])
    big = MaskedViTEncoder(img_size=96, patch_size=8, embed_dim=192, depth=6, num_heads=3)
    load_encoder(big, small.state_dict())
    assert big.pos_embed.shape == (1, 1 + 12 * 12, 192)
    assert torch.equal(big.blocks[0].attn.qkv.weight, small.blocks[0].attn.qkv.weight)


def test_export_round_trip_through_timm_pretrained_cfg_overlay(tmp_path: Path) -> None:
    """The documented timm call (offline, strict) gives the encoder's own CLS features."""
    model = _pretrain_ckpt(tmp_path / "ckpt.pt").eval()
    out = tmp_path / "enc.safetensors"
    cli(["export", str(tmp_path / "ckpt.pt"), "--to", "timm", "--out", str(out)])
    sidecar = json.loads(out.with_suffix(".json").read_text())
    kwargs = sidecar["vision_transformer_kwargs"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # readable by others, like the checkpoints
    assert not out.with_name(out.name + ".tmp").exists()
    assert sidecar["timm_name"] is None and kwargs["patch_size"] == 8 and kwargs["num_classes"] == 0
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.encoder(images)[:, 0]
        # no timm name: VisionTransformer(**kwargs) + a strict load_state_dict
        vit = timm.models.VisionTransformer(**kwargs).eval()
        vit.load_state_dict(safetensors.torch.load_file(out))
        torch.testing.assert_close(vit(images), expected, rtol=0, atol=1e-5)
        # timm's file overlay path on a registered name with the same shape (what the sidecar of
        # a timm-named preset describes); num_classes in the overlay makes timm load strictly
        via_timm = timm.create_model(
            "vit_tiny_patch16_224", pretrained=True, num_classes=0, img_size=64, patch_size=8, depth=6,
            pretrained_cfg_overlay=dict(file=str(out), num_classes=0),
        ).eval()
        torch.testing.assert_close(via_timm(images), expected, rtol=0, atol=1e-5)


def test_timm_named_preset_sidecar(tmp_path: Path) -> None:
    _pretrain_ckpt(tmp_path / "ckpt.pt", "milan_vit_tiny_patch16")
    out = tmp_path / "tiny.safetensors"
    cli(["export", str(tmp_path / "ckpt.pt"), "--out", str(out)])
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["timm_name"] == "vit_tiny_patch16_224"
    assert sidecar["create_model_kwargs"] == {"num_classes": 0, "global_pool": "token"}
    state, meta = encoder_state_dict(out)
    assert meta["format"] == "export" and meta["preset"] == "vit_tiny_patch16"


def test_finetuned_classifier_exports_with_head(tmp_path: Path) -> None:
    kwargs = timm_kwargs(ENCODER_PRESETS["vit_shapes_patch8"])
    vit = timm.models.VisionTransformer(**kwargs, num_classes=5, global_pool="avg").eval()
    torch.save({"model": vit.state_dict(), "kind": "finetune", "preset": "vit_shapes_patch8"},
               tmp_path / "ft.pt")
    state, meta = encoder_state_dict(tmp_path / "ft.pt")
    assert meta["num_classes"] == 5 and meta["global_pool"] == "avg" and "head.weight" in state
    out = tmp_path / "ft.safetensors"
    cli(["export", str(tmp_path / "ft.pt"), "--out", str(out)])
    sidecar = json.loads(out.with_suffix(".json").read_text())
    again = timm.models.VisionTransformer(**sidecar["vision_transformer_kwargs"]).eval()
    again.load_state_dict(safetensors.torch.load_file(out))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(images), vit(images), rtol=0, atol=1e-5)


def test_export_cli_errors_name_the_problem(tmp_path: Path) -> None:
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="no ViT encoder"):
        cli(["export", str(tmp_path / "other.pt"), "--out", str(tmp_path / "x.safetensors")])


def test_timm_overlay_needs_num_classes_to_load_strictly(tmp_path: Path) -> None:
    """timm 1.0 drops the head and loads with strict=False when num_classes differs from the
    pretrained cfg's (1000); putting num_classes=0 in the overlay keeps the load strict."""
    kwargs = dict(num_classes=0, img_size=64, patch_size=8, depth=2)
    state = timm.create_model("vit_tiny_patch16_224", **kwargs).state_dict()
    del state["blocks.1.attn.qkv.weight"]
    path = tmp_path / "broken.safetensors"
    safetensors.torch.save_file(state, path)
    timm.create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    with pytest.raises(RuntimeError, match=r"blocks\.1\.attn\.qkv\.weight"):
        timm.create_model("vit_tiny_patch16_224", pretrained=True, **kwargs,
                          pretrained_cfg_overlay=dict(file=str(path), num_classes=0))
