"""Shared test setup: CPU only, few threads (CI has 2 cores), deterministic seeds."""

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("MILAN_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def random_pretrain_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pretrain checkpoint in our format with random weights (for plumbing tests, not quality)."""
    from milan.model import build_model

    torch.manual_seed(0)
    model = build_model("milan_vit_shapes_patch8", target_dim=32, decoder_depth=1, decoder_dim=64, decoder_heads=2)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint-2.pt"
    torch.save({"model": model.state_dict(), "config": {"model": {"name": "milan_vit_shapes_patch8"}}}, path)
    return path


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny shapes dataset (64 train / 16 val images) per test module; modules may define their own."""
    from milan.data.shapes import generate_shapes

    root = tmp_path_factory.mktemp("shapes") / "data"
    generate_shapes(root, num_train=64, num_val=16, workers=1, progress=False)
    return root
