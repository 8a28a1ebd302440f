"""Shared test setup: CPU only, few threads (CI has 2 cores), deterministic seeds."""

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("MILAN_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
