"""`milan export --to hf` (a timm / Hub model folder) and the preprocessing every export carries."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import safetensors.torch
import timm
import timm.data
import torch
from PIL import Image

from milan.data.transforms import eval_transform
from milan.io.export import timm_crop_pct
from milan.model import build_model
from milan.tools.cli import main as cli


def _pretrain_run(run: Path, name: str = "milan_vit_shapes_patch8") -> torch.nn.Module:
    """A pretrain run folder: two checkpoints with config (random weights)."""
    run.mkdir(parents=True)
    model = build_model(name, target_dim=32, decoder_depth=1, decoder_dim=64, decoder_heads=2).eval()
    config = {"model": {"name": name, "decoder_depth": 1, "decoder_dim": 64, "decoder_heads": 2},
              "teacher": {"spec": "openclip:ViT-B-16", "weights": "ViT-B-16.pt"},
              "data": {"kind": "imagefolder", "path": "/data/photos", "img_size": 64}, "optim": {"steps": 400}}
    torch.save({"model": build_model(name, target_dim=32, decoder_depth=1, decoder_dim=64,
                                     decoder_heads=2).state_dict(), "config": config, "step": 200},
               run / "checkpoint-00000200.pt")
    torch.save({"model": model.state_dict(), "config": config, "step": 400}, run / "checkpoint-00000400.pt")
    return model


def _image(width: int = 101, height: int = 83) -> Image.Image:
    gen = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def test_hf_folder_loads_in_timm_strictly_with_identical_features(tmp_path: Path) -> None:
    model = _pretrain_run(tmp_path / "runs" / "pretrain")
    knn = tmp_path / "runs" / "knn"  # an evaluation of the run, found beside it for the model card
    knn.mkdir()
    (knn / "config.yaml").write_text(f"model:\n  weights: {tmp_path / 'runs' / 'pretrain'}\n")
    (knn / "results.json").write_text(json.dumps({"knn_top1": 0.8125, "k": 20, "temperature": 0.07, "num_val": 48}))
    out = tmp_path / "hf"
    cli(["export", str(tmp_path / "runs" / "pretrain"), "--to", "hf", "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 0
    assert config["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406] and config["pretrained_cfg"]["crop_pct"] == 0.875
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        diff = (loaded(images) - model.encoder(images)[:, 0]).abs().max().item()
    print(f"local-dir export: max |diff| {diff:.2e}")
    assert diff <= 1e-5
    card = (out / "README.md").read_text()
    for said in ("library_name: timm", "openclip:ViT-B-16", "/data/photos", "steps: 400 (of 400)",
                 "milan_vit_shapes_patch8", "prompting", "| kNN (k=20, T=0.07) | 81.25 | 48 images | `knn` |"):
        assert said in card, said
    # strict: a weight missing from the folder is an error, not a silent random init
    state = safetensors.torch.load_file(out / "model.safetensors")
    del state["blocks.1.mlp.fc2.weight"]
    safetensors.torch.save_file(state, out / "model.safetensors")
    with pytest.raises(RuntimeError, match=r"blocks\.1\.mlp\.fc2\.weight"):
        timm.create_model(f"local-dir:{out}", pretrained=True)


def test_hf_folder_of_a_classifier_keeps_its_head_and_class_names(tmp_path: Path) -> None:
    from milan.encoder import ENCODER_PRESETS
    from milan.io.weights import timm_kwargs

    vit = timm.models.VisionTransformer(**timm_kwargs(ENCODER_PRESETS["vit_shapes_patch8"]), num_classes=3,
                                        global_pool="avg").eval()
    run = tmp_path / "finetune"
    run.mkdir()
    torch.save({"model": vit.state_dict(), "kind": "finetune", "preset": "vit_shapes_patch8",
                "classes": ["circle", "square", "triangle"], "config": {"data": {"crop_pct": 0.9}}},
               run / "checkpoint-best.pt")
    cli(["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf")])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["label_names"] == ["circle", "square", "triangle"] and config["pretrained_cfg"]["crop_pct"] == 0.9
    loaded = timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), vit(images), rtol=0, atol=1e-5)


@pytest.mark.parametrize("to", ["hf", "timm"])
def test_timms_data_config_on_the_export_is_milans_eval_transform(tmp_path: Path, to: str) -> None:
    """resolve_data_config(model=...) on the loaded export + create_transform: milan's eval input and
    features on the same image (timm's own vit_* config would use mean = std = 0.5, crop 0.9)."""
    model = _pretrain_run(tmp_path / "run")
    if to == "hf":
        cli(["export", str(tmp_path / "run"), "--to", "hf", "--out", str(tmp_path / "hf")])
        loaded = timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True).eval()
    else:  # the call `milan export --to timm` prints, from its sidecar
        out = tmp_path / "enc.safetensors"
        cli(["export", str(tmp_path / "run"), "--to", "timm", "--out", str(out)])
        sidecar = json.loads(out.with_suffix(".json").read_text())
        loaded = timm.create_model(sidecar["architecture"], pretrained=True, **sidecar["vision_transformer_kwargs"],
                                   pretrained_cfg_overlay=dict(file=str(out), num_classes=0,
                                                               **sidecar["pretrained_cfg"])).eval()
    timm_tf = timm.data.create_transform(**timm.data.resolve_data_config(model=loaded))
    image = _image()
    ours, theirs = eval_transform(64)(image), timm_tf(image)
    input_diff = (ours - theirs).abs().max().item()
    with torch.no_grad():
        feature_diff = (loaded(theirs[None]) - model.encoder(ours[None])[:, 0]).abs().max().item()
    print(f"--to {to}: timm data config vs milan eval transform: input max |diff| {input_diff:.2e}, "
          f"features {feature_diff:.2e}")
    assert ours.shape == theirs.shape and input_diff <= 1e-6 and feature_diff <= 1e-5
    # what an export without them would feed the encoder: timm's own config for the name (0.5 / 0.5, crop 0.9)
    default = timm.data.resolve_data_config(model=timm.create_model("vit_tiny_patch16_224", num_classes=0))
    default = timm.data.create_transform(**{**default, "input_size": (3, 64, 64)})
    assert (default(image) - ours).abs().max() > 0.1


def test_crop_pct_makes_timm_resize_like_milan() -> None:
    """timm floors img_size / crop_pct, milan rounds: the exported ratio gives milan's size for every case."""
    for crop in (0.875, 0.9, 0.95, 0.8, 1.0):
        for size in range(16, 1025, 8):
            assert math.floor(size / timm_crop_pct(size, crop)) == int(round(size / crop)), (size, crop)
    assert timm_crop_pct(224, 0.875) == 0.875 and timm_crop_pct(96, 0.875) != 0.875  # 109.7: floor 109, round 110
