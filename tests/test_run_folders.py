"""Every run folder is a weights argument: the file a user would expect, and the log says which."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from timm.models import VisionTransformer

from milan.encoder import ENCODER_PRESETS
from milan.errors import WeightsError
from milan.io.weights import load_pretrained, resolve_weights, timm_kwargs
from milan.model import build_model
from milan.tools.cli import main as cli
from milan.tools.viz_cli import load_student


def _pretrain_run(run: Path) -> torch.nn.Module:
    run.mkdir(parents=True)
    newest = None
    for step in (2, 10):
        newest = build_model("milan_vit_shapes_patch8", target_dim=32, decoder_depth=1, decoder_dim=64, decoder_heads=2)
        torch.save({"model": newest.state_dict(), "config": {"model": {"name": "milan_vit_shapes_patch8"}},
                    "step": step}, run / f"checkpoint-{step:08d}.pt")
    (run / "config.yaml").write_text("model:\n  name: milan_vit_shapes_patch8\n")
    return newest


def _finetune_run(run: Path, *, best: bool = True) -> None:
    """checkpoint-best.pt always answers 'eel', checkpoint-last.pt 'dog' (classes cat, dog, eel)."""
    run.mkdir(parents=True)
    for name, favourite in (("checkpoint-best.pt", 2), ("checkpoint-last.pt", 1)):
        if name == "checkpoint-best.pt" and not best:
            continue
        vit = VisionTransformer(**timm_kwargs(ENCODER_PRESETS["vit_shapes_patch8"]), num_classes=3, global_pool="avg")
        with torch.no_grad():
            vit.head.weight.zero_()
            vit.head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(favourite), 3).float() * 5)
        torch.save({"model": vit.state_dict(), "kind": "finetune", "preset": "vit_shapes_patch8",
                    "classes": ["cat", "dog", "eel"]}, run / name)


def test_each_run_folder_stands_for_the_file_a_user_expects(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _pretrain_run(tmp_path / "pretrain")
    _finetune_run(tmp_path / "finetune")
    _finetune_run(tmp_path / "finetune_cut", best=False)  # stopped before its first evaluation
    probe = tmp_path / "linprobe"
    probe.mkdir()
    (probe / "head-last.pt").write_bytes(b"")
    (probe / "config.yaml").write_text(f"model:\n  weights: {tmp_path / 'pretrain'}\n")
    cases = {
        "pretrain": ("checkpoint-00000010.pt", "newest checkpoint checkpoint-00000010.pt (of 2)"),
        "finetune": ("checkpoint-best.pt", "best validation checkpoint"),
        "finetune_cut": ("checkpoint-last.pt", "last checkpoint (no checkpoint-best.pt)"),
        "linprobe": ("checkpoint-00000010.pt", "config.yaml names model.weights="),
    }
    for folder, (file, why) in cases.items():
        chosen, said = resolve_weights(tmp_path / folder)
        assert chosen.name == file and why in (said or ""), (folder, said)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="milan"):
            assert load_pretrained(tmp_path / folder).path.name == file
        assert any(why in r.getMessage() for r in caplog.records), folder
    assert resolve_weights(tmp_path / "pretrain" / "checkpoint-00000002.pt") == (
        tmp_path / "pretrain" / "checkpoint-00000002.pt", None)
    assert load_student(tmp_path / "linprobe").path.name == "checkpoint-00000010.pt"  # viz
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="folder without weights"):
        resolve_weights(tmp_path / "empty")


def test_eval_of_a_finetune_run_folder_uses_its_best_checkpoint(tmp_path: Path) -> None:
    for name in ("cat", "eel"):
        (tmp_path / "val" / name).mkdir(parents=True)
        Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "val" / name / "0.png")
    _finetune_run(tmp_path / "finetune")
    cli(["eval", f"model.weights={tmp_path / 'finetune'}", f"data.paths=[{tmp_path / 'val'}]", "data.crop_pct=1.0",
         "data.restrict_logits=never", "data.num_workers=0", "run.device=cpu", f"run.out_dir={tmp_path / 'eval'}"])
    (result,) = json.loads((tmp_path / "eval" / "results.json").read_text()).values()
    assert result["top1"] == pytest.approx(0.5)  # always 'eel': the best checkpoint's head ('dog' would score 0)
    exported = tmp_path / "ft.safetensors"
    cli(["export", str(tmp_path / "finetune"), "--out", str(exported)])
    assert json.loads(exported.with_suffix(".json").read_text())["source"] == str(tmp_path / "finetune")


def test_knn_of_a_linprobe_run_folder_evaluates_the_encoder_it_probed(shapes_root: Path, tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    _pretrain_run(tmp_path / "pretrain")
    probe = tmp_path / "linprobe"
    probe.mkdir()
    (probe / "config.yaml").write_text(f"model:\n  weights: {tmp_path / 'pretrain'}\n")
    with caplog.at_level(logging.INFO, logger="milan"):
        cli(["knn", f"model.weights={probe}", "data.kind=shapes", f"data.path={shapes_root}", "data.crop_pct=1.0",
             "data.num_workers=0", "run.device=cpu", f"run.out_dir={tmp_path / 'knn'}"])
    result = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert result["preset"] == "vit_shapes_patch8" and 0 <= result["knn_top1"] <= 1
    chosen = tmp_path / "pretrain" / "checkpoint-00000010.pt"
    assert any(f"{chosen} is a `milan pretrain` checkpoint" in r.getMessage() for r in caplog.records)
