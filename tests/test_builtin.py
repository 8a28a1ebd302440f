"""The shipped built-in teacher: loads, matches its card, learned from language, and retrains."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import transforms as T

import milan
from milan.data.shapes import COLOURS, SHAPES, ShapesDataset, generate_shapes
from milan.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from milan.teacher.builtin import (
    CARD_FILE,
    WEIGHTS_FILE,
    ZEROSHOT_FILE,
    load_zero_shot,
    read_card,
    sha256_file,
)
from milan.tools.train_shapes_teacher import train, zero_shot


@pytest.fixture(scope="module")
def fresh_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A different seed than the teacher was trained on: these images are new to it.
    root = tmp_path_factory.mktemp("fresh") / "shapes"
    generate_shapes(root, num_train=16, num_val=600, seed=12345, workers=1, progress=False)
    return root


def test_shipped_files_match_the_card() -> None:
    card = read_card()
    assert WEIGHTS_FILE.stat().st_size < 10e6
    assert sha256_file(WEIGHTS_FILE) == card["sha256"]
    assert sha256_file(ZEROSHOT_FILE) == card["zeroshot_sha256"]
    assert card["command"].startswith("milan teacher train-shapes")
    assert card["metrics"]["zero_shot_colour"] > 0.9


def test_builtin_teacher_loads_and_outputs_targets() -> None:
    teacher = milan.build_teacher("builtin:shapes", student_patch_size=8)
    out = teacher(torch.randn(2, 3, 64, 64))
    assert out.tokens.shape == (2, 65, teacher.dim) and out.cls_attn.shape == (2, 64)
    assert teacher.dim == read_card()["config"]["embed_dim"] and teacher.patch_size == 8
    assert (out.cls_attn >= 0).all() and (out.cls_attn.sum(1) <= 1 + 1e-5).all()
    assert not any(p.requires_grad for p in teacher.parameters())


@torch.no_grad()
def test_zero_shot_on_fresh_images_is_far_above_chance(fresh_shapes: Path) -> None:
    tf = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ds = ShapesDataset(fresh_shapes, "val", transform=tf)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    teacher = milan.build_teacher("builtin:shapes")
    pooled = teacher(images).tokens[:, 0]  # ln_post + proj of CLS = CLIP's image embedding
    acc = zero_shot(pooled, load_zero_shot(), ds.labels)
    assert acc["zero_shot_colour"] > 0.6, acc  # chance: 1/6
    assert acc["zero_shot_shape"] > 2 / len(SHAPES), acc
    assert len(COLOURS) == 6


@torch.no_grad()
def test_attention_finds_objects(fresh_shapes: Path) -> None:
    from milan.tools.train_shapes_teacher import attention_on_objects

    teacher = milan.build_teacher("builtin:shapes")
    stats = attention_on_objects(teacher, fresh_shapes, "val", 200)
    # semantic-aware sampling only helps if attention prefers object patches over their area share
    assert stats["attention_on_objects"] > 1.5 * stats["object_patch_share"], stats


def test_a_few_training_steps_reduce_the_loss(fresh_shapes: Path, tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    generate_shapes(root, num_train=256, num_val=32, workers=1, progress=False)
    # one fixed batch of 32 captioned images: contrastive learning must at least fit it
    card = train(data=root, out=tmp_path / "out", steps=40, batch_size=32, warmup=2,
                 num_train=32, eval_size=32, threads=2)
    assert card["train"]["final_loss"] < card["train"]["first_loss"] - 0.1, card["train"]
    out = tmp_path / "out"
    assert sha256_file(out / WEIGHTS_FILE.name) == json.loads((out / CARD_FILE.name).read_text())["sha256"]
    # the retrained tower loads as a teacher through the public API
    teacher = milan.build_teacher("builtin:shapes", weights=out / WEIGHTS_FILE.name)
    assert teacher(torch.zeros(1, 3, 64, 64)).tokens.shape[-1] == card["config"]["embed_dim"]
    assert np.isfinite(card["metrics"]["attention_on_objects"])
