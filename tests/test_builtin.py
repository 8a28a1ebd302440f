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


# --------------------------------------------------------------------------------------------
# builtin:shapes-slip: the same model trained the SLIP way (CLIP loss + SimCLR loss)
# --------------------------------------------------------------------------------------------


def test_shipped_slip_teacher_matches_its_card_and_loads() -> None:
    from milan.teacher.builtin import builtin_files

    weights, card_file, zeroshot = builtin_files("shapes-slip")
    card = read_card(card_file)
    assert card["name"] == "builtin:shapes-slip" and card["method"] == "slip"
    assert card["command"].startswith("milan teacher train-shapes --method slip")
    assert weights.stat().st_size < 10e6
    assert sha256_file(weights) == card["sha256"] and sha256_file(zeroshot) == card["zeroshot_sha256"]
    teacher = milan.build_teacher("builtin:shapes-slip", student_patch_size=8)
    images = torch.randn(2, 3, 64, 64)
    out = teacher(images)
    assert out.tokens.shape == (2, 65, card["config"]["embed_dim"]) and out.cls_attn.shape == (2, 64)
    clip = milan.build_teacher("builtin:shapes", student_patch_size=8)(images)
    assert (out.tokens - clip.tokens).abs().max() > 0.1  # its own tower, not builtin:shapes' again


def test_simclr_loss_is_nt_xent_over_both_views() -> None:
    """SimCLR's NT-Xent written out: for each of the 2B embeddings, -log of its positive's share
    among all 2B - 1 others (itself excluded), averaged over all 2B."""
    from milan.tools.train_shapes_teacher import simclr_loss

    torch.manual_seed(0)
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    z = torch.nn.functional.normalize(torch.cat([a, b]), dim=-1)  # [2B, E]
    sim = z @ z.T / 0.1
    terms = []
    for i in range(10):
        pos = (i + 5) % 10
        others = [k for k in range(10) if k != i]
        terms.append(-(sim[i, pos] - torch.logsumexp(sim[i, others], dim=0)))
    torch.testing.assert_close(simclr_loss(a, b, 0.1), torch.stack(terms).mean())
    # two identical views of well-separated images: the positives win by far
    assert simclr_loss(torch.eye(5) * 10, torch.eye(5) * 10, 0.1) < 1e-3


def test_simclr_views_are_per_image_augmentations() -> None:
    from milan.tools.train_shapes_teacher import simclr_views

    images = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8)
    torch.manual_seed(0)
    one = simclr_views(images)
    torch.manual_seed(0)
    assert torch.equal(one, simclr_views(images))  # seeded: a run repeats
    assert one.shape == images.shape and one.dtype == torch.uint8
    assert not torch.equal(one, simclr_views(images))  # a second draw differs
    assert all(not torch.equal(v, x) for v, x in zip(one, images))  # every image is augmented


def test_slip_training_steps_reduce_both_losses_and_load_as_builtin(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    generate_shapes(root, num_train=64, num_val=32, workers=1, progress=False)
    out = tmp_path / "out"
    card = train(data=root, out=out, steps=30, batch_size=32, warmup=2, num_train=32, eval_size=32,
                 threads=2, method="slip", ssl_mlp_dim=64, ssl_emb_dim=32)
    run = card["train"]
    assert card["name"] == "builtin:shapes-slip" and card["method"] == "slip"
    assert run["final_loss"] < run["first_loss"] - 0.5, run
    assert run["final_loss"] == pytest.approx(run["final_clip_loss"] + run["final_ssl_loss"], abs=1e-3)
    weights = out / "shapes_slip_visual.safetensors"
    assert sha256_file(weights) == json.loads((out / "shapes_slip.json").read_text())["sha256"]
    teacher = milan.build_teacher("builtin:shapes-slip", weights=weights)
    assert teacher(torch.zeros(1, 3, 64, 64)).tokens.shape[-1] == card["config"]["embed_dim"]
