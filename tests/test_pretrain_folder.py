"""`--config pretrain_folder`: the small recipe for a user's own folder of photos."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from milan.tools.cli import main as cli
from milan.train.config import config_path, load_config


def test_pretrain_folder_student_and_teacher_grids_match() -> None:
    import milan
    from milan.recipes import pretrain

    cfg = load_config(pretrain.CONFIG, config_path("pretrain_folder"), ["data.path=photos"])
    spec = cfg.model.spec()
    assert cfg.data.kind == "imagefolder" and cfg.data.img_size == spec.encoder.img_size == 64
    assert (spec.decoder_dim, spec.decoder_depth) == (128, 2) and cfg.optim.steps <= 500
    teacher = milan.build_teacher(cfg.teacher.spec, weights=cfg.teacher.weights,
                                  student_patch_size=spec.encoder.patch_size)
    out = teacher(torch.randn(2, 3, 64, 64))
    assert out.cls_attn.shape == (2, (64 // spec.encoder.patch_size) ** 2)  # the student's 8×8 grid


def test_pretrain_folder_runs_on_photos_and_its_monitor_never_queries_references(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import milan.recipes.pretrain as pretrain

    for c, name in enumerate(("sea", "sky")):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (120, 90), (100 * c, 12 * i, 200)).save(tmp_path / "photos" / name / f"{i}.jpg")
    seen: list[set[str]] = []
    real = pretrain.extract_features

    def spy(encode, dataset, **kwargs):
        seen.append({str(p) for p, _ in dataset.samples})
        return real(encode, dataset, **kwargs)

    monkeypatch.setattr(pretrain, "extract_features", spy)  # the name the kNN monitor calls
    out = tmp_path / "run"
    cli(["pretrain", "--config", "pretrain_folder", f"data.path={tmp_path / 'photos'}", f"run.out_dir={out}",
         "optim.batch_size=4", "optim.steps=2", "optim.warmup_steps=1", "data.num_workers=0", "run.tensorboard=false",
         "monitor.every=2", f"monitor.train_path={tmp_path / 'photos'}"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and "knn_acc" in records[-1]
    reference, queries = seen
    assert not reference & queries and len(queries) == 4 and len(reference) == 12
