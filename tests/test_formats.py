"""Published weights in the peers' layouts: each read, mapped and exported to timm with the peer's own
features (its forward written out in `_peers.py`), and the decoders mapped with the peer's outputs."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from _evil import Evil
from _peers import AuthorsMAE, MMClassifier, MMDecoder, MMViT, ids_from, perturb
from milan.errors import WeightsError
from milan.io.weights import encoder_state_dict, init_model, load_pretrained
from milan.masking import Mask
from milan.model import build_model
from milan.tools.cli import main as cli

# A tiny ViT for the export round trips: width 192 (3 heads, as vit_tiny), 2 blocks, 32 px in 8 px patches.
VIT = dict(img_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3)
ARGS = argparse.Namespace(model="mae_vit_tiny_toy", use_clip=True, blr=1.5e-4, mask_ratio=0.75, epochs=400)


def _authors(path: Path, *, prompting: bool = True, **shape: int) -> AuthorsMAE:
    """The MILAN authors' (or MAE's) training checkpoint, as MAE's `save_model` writes it."""
    shape = {**VIT, "decoder_dim": 64, "decoder_depth": 1, "decoder_heads": 4, "out_dim": 32, **shape}
    model = AuthorsMAE(**shape, prompting=prompting).eval()
    args = argparse.Namespace(**{**vars(ARGS), "use_clip": prompting})
    torch.save({"model": model.state_dict(), "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
                "epoch": 399, "scaler": {"scale": 65536.0}, "args": args}, path)
    return model


def _mmpretrain(path: Path, *, prompt: bool = True, **shape: int) -> tuple[MMViT, MMDecoder]:
    """An mmpretrain MILAN (or MAE) pretraining checkpoint: backbone, neck, CLIP target generator, meta."""
    vit = {**VIT, **shape}
    backbone = perturb(MMViT(img_size=vit["img_size"], patch_size=vit["patch_size"], dim=vit["embed_dim"],
                             depth=vit["depth"], num_heads=vit["num_heads"])).eval()
    neck = perturb(MMDecoder(num_patches=(vit["img_size"] // vit["patch_size"]) ** 2, embed_dim=vit["embed_dim"],
                             dim=64, depth=1, num_heads=4, out_dim=32 if prompt else vit["patch_size"] ** 2 * 3,
                             prompt=prompt)).eval()
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state.update({f"neck.{k}": v for k, v in neck.state_dict().items()})
    if prompt:  # MILAN's CLIP teacher rides along in the checkpoint
        state.update({"target_generator.tokenizer.visual.proj": torch.randn(64, 32),
                      "target_generator.tokenizer.visual.conv1.weight": torch.randn(64, 3, 8, 8)})
    cfg = "model = dict(type='MILAN', neck=dict(type='MILANPretrainDecoder', decoder_num_heads=4))"
    torch.save({"meta": {"cfg": cfg, "epoch": 400, "mmengine_version": "0.7.0", "seed": 0}, "state_dict": state}, path)
    return backbone, neck


# Each format: (write the file(s) at this path and return the peer's features fn, what format meta says)
def _fmt_authors(path: Path) -> Callable:
    return _authors(path).forward_encoder


def _fmt_mae_full(path: Path) -> Callable:
    return _authors(path, prompting=False, out_dim=8 * 8 * 3).forward_encoder


def _fmt_mae_encoder(path: Path) -> Callable:
    """`mae_pretrain_vit_base.pth`: `{'model': encoder}` only."""
    model = AuthorsMAE(**VIT, decoder_dim=64, decoder_depth=1, decoder_heads=4, out_dim=32).eval()
    torch.save({"model": {k: v for k, v in model.state_dict().items() if not k.startswith(("decoder", "mask_"))}},
               path)
    return model.forward_encoder


def _fmt_mm_milan(path: Path) -> Callable:
    return _mmpretrain(path)[0]


def _fmt_mm_mae(path: Path) -> Callable:
    return _mmpretrain(path, prompt=False)[0]


def _fmt_mm_classifier(path: Path) -> Callable:
    model = perturb(MMClassifier(num_classes=5, img_size=32, patch_size=8, dim=192, depth=2, num_heads=3)).eval()
    state = {k: v for k, v in model.state_dict().items()}
    torch.save({"meta": {"dataset_meta": {"classes": ("a", "b", "c", "d", "e")}}, "state_dict": state}, path)
    return model


def _fmt_timm_folder(path: Path) -> Callable:
    """A timm model folder, written by timm's own `save_for_hf` (config.json + model.safetensors)."""
    model = perturb(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=0))
    timm.models.save_for_hf(model.eval(), str(path), safe_serialization=True)
    return model.forward_features


def _fmt_timm_folder_bin(path: Path) -> Callable:
    """The same with `pytorch_model.bin` and 4 heads in `model_args` (not the vit_tiny default of 3)."""
    model = perturb(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_heads=4,
                                      embed_dim=128, num_classes=0))
    timm.models.save_for_hf(model.eval(), str(path), safe_serialization=False, model_args={"num_heads": 4,
                                                                                         "embed_dim": 128})
    return model.forward_features


FORMATS = {
    "authors_milan": (_fmt_authors, "reference", "MILAN authors' training checkpoint (prompting decoder)"),
    "mae_full": (_fmt_mae_full, "reference", "MAE training checkpoint (MAE decoder)"),
    "mae_encoder": (_fmt_mae_encoder, "reference", "MAE-layout ViT (encoder only"),
    "mmpretrain_milan": (_fmt_mm_milan, "mmpretrain", "mmpretrain MILAN (prompting decoder)"),
    "mmpretrain_mae": (_fmt_mm_mae, "mmpretrain", "mmpretrain MAE (MAE decoder)"),
    "mmpretrain_classifier": (_fmt_mm_classifier, "mmpretrain", "mmpretrain ViT classifier"),
    "timm_folder": (_fmt_timm_folder, "timm", "timm model folder (vit_tiny_patch16_224, model.safetensors)"),
    "timm_folder_bin": (_fmt_timm_folder_bin, "timm", "timm model folder (vit_tiny_patch16_224, pytorch_model.bin)"),
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_export_to_timm_gives_the_peers_features(tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture) -> None:
    """`milan export FILE --to timm`, then plain timm (strict load): the original model's outputs."""
    write, fmt, words = FORMATS[name]
    path = tmp_path / ("folder" if "folder" in name else "weights.pth")
    peer = write(path)
    with caplog.at_level(logging.INFO, logger="milan"):
        state, meta = encoder_state_dict(path)
    assert meta["format"] == fmt and words in meta["source"]
    assert any(words in r.getMessage() for r in caplog.records)  # the start line names the format
    out = tmp_path / "enc.safetensors"
    cli(["export", str(path), "--to", "timm", "--out", str(out)])
    sidecar = json.loads(out.with_suffix(".json").read_text())
    vit = timm.models.VisionTransformer(**sidecar["vision_transformer_kwargs"]).eval()
    vit.load_state_dict(safetensors.torch.load_file(out))  # strict
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = peer(images)  # [B, 1+N, D] tokens, or [B, 5] logits for the classifier
        got = vit(images) if name == "mmpretrain_classifier" else vit.forward_features(images)
    diff = (got - expected).abs().max().item()
    print(f"{name}: max |diff| {diff:.2e}")
    assert got.shape == expected.shape and diff <= 1e-5, diff


def test_what_is_dropped_is_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _mmpretrain(tmp_path / "milan.pth")
    with caplog.at_level(logging.INFO, logger="milan"):
        pretrained = load_pretrained(tmp_path / "milan.pth")
    assert pretrained.meta["decoder"] == "prompting" and pretrained.meta["target"] == "clip"
    assert "target_generator.tokenizer.visual.proj" in pretrained.meta["dropped"]
    line = next(r.getMessage() for r in caplog.records if "mmpretrain" in r.getMessage())
    assert "CLIP teacher (target_generator.*)" in line and "prompting decoder" in line
    _fmt_mm_classifier(tmp_path / "cls.pth")
    assert load_pretrained(tmp_path / "cls.pth").meta["classes"] == ["a", "b", "c", "d", "e"]


def _our_mask(ids_keep: torch.Tensor, ids_dump: torch.Tensor, ids_restore: torch.Tensor) -> Mask:
    return Mask(ids_keep, ids_dump, ids_restore)


@pytest.mark.parametrize("peer", ["authors_milan", "mae", "mmpretrain_milan", "mmpretrain_mae"])
def test_decoder_mapping_gives_the_peers_predictions(tmp_path: Path, peer: str) -> None:
    """`init_model` from the peer's pretraining checkpoint: our masked encoder and decoder compute the
    peer's forward (same mask), so continued pretraining starts where the peer stopped."""
    shape = dict(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3)  # the shapes preset
    path = tmp_path / "ckpt.pth"
    prompting = peer.endswith("milan")
    if peer.startswith("mmpretrain"):
        enc, dec = _mmpretrain(path, prompt=prompting, **shape)
        encode, decode = enc.forward_masked, dec
    else:
        model = _authors(path, prompting=prompting, **shape, out_dim=32 if prompting else 8 * 8 * 3)
        encode, decode = model.forward_encoder, model.forward_decoder
    ours = build_model("milan_vit_shapes_patch8", target_dim=32, target="clip" if prompting else "pixel",
                       decoder="prompting" if prompting else "mae", decoder_dim=64, decoder_depth=1,
                       decoder_heads=4).eval()
    said = init_model(ours, path, init_decoder=True)
    assert ("prompting" if prompting else "mae") + " decoder too" in said
    images = torch.randn(2, 3, 64, 64)
    ids_keep, ids_dump, ids_restore = ids_from(torch.rand(2, 64), 16)
    mask = _our_mask(ids_keep, ids_dump, ids_restore)
    with torch.no_grad():
        latent = encode(images, ids_keep)
        torch.testing.assert_close(ours.encoder(images, mask.keep), latent, rtol=0, atol=1e-5)
        expected = decode(latent, ids_restore, ids_keep, ids_dump)
        got = ours.decoder(latent, mask)
    got = got if prompting else got[:, 1:]  # MAE's decoder drops its CLS prediction
    diff = (got - expected).abs().max().item()
    print(f"{peer} decoder: max |diff| {diff:.2e}")
    assert diff <= 1e-5, diff


def test_a_malicious_pickle_beside_the_namespace_is_still_refused(tmp_path: Path) -> None:
    """The authors' layout with `args` (allowed by name) and one more object: refused unrun, by every reader."""
    model = AuthorsMAE(**VIT, decoder_dim=64, decoder_depth=1, decoder_heads=4, out_dim=32)
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint-399.pth"
    torch.save({"model": model.state_dict(), "epoch": 399, "args": ARGS, "x": Evil(str(marker))}, path)
    for read in (encoder_state_dict, load_pretrained,
                 lambda p: cli(["export", str(p), "--out", str(tmp_path / "x.safetensors")])):
        with pytest.raises(WeightsError, match=r"pickled Python objects \((io|builtins)\.open\)"):
            read(path)
    assert not marker.exists()


def test_mmpretrain_parts_timm_cannot_compute_are_refused_by_name(tmp_path: Path) -> None:
    backbone = MMViT(img_size=32, patch_size=8, dim=192, depth=1, num_heads=3)
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state["backbone.pre_norm.weight"] = torch.ones(192)  # a CLIP-style ViT
    torch.save({"meta": {}, "state_dict": state}, tmp_path / "clip_vit.pth")
    with pytest.raises(WeightsError, match=r"backbone\.pre_norm\.weight.*pre-norm"):
        encoder_state_dict(tmp_path / "clip_vit.pth")
