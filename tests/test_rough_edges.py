"""Rough edges of a first run: DataLoader workers on a small machine, batch-size messages."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import milan.data
from milan.data import loader_workers
from milan.data.sampler import EpochSampler
from milan.errors import DataError


@pytest.fixture
def two_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process may use 2 CPUs (as a 2-core job on a bigger machine): what torch counts too."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(milan.data, "_capped", set())


def test_workers_are_capped_at_the_usable_cpus_with_one_log_line(two_cpus: None,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    from milan.train.log import get_logger

    logger = get_logger()
    logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.INFO)
    try:
        assert [loader_workers(n) for n in (0, 1, 2, 8, 8, 16)] == [0, 1, 2, 2, 2, 2]
    finally:
        logger.removeHandler(caplog.handler)
    lines = [r.getMessage() for r in caplog.records if "capped" in r.getMessage()]
    assert lines == ["data.num_workers=8 capped at 2: this process may use 2 CPUs",
                     "data.num_workers=16 capped at 2: this process may use 2 CPUs"]  # once per value


def test_a_capped_loader_makes_torch_silent(two_cpus: None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DataLoader(list(range(4)), num_workers=loader_workers(8))
    with pytest.warns(UserWarning, match="worker processes"):  # the warning the cap avoids
        DataLoader(list(range(4)), num_workers=8)


def test_feature_extraction_uses_the_capped_count(two_cpus: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import milan.train.probe as probe

    built: list[int] = []
    real = probe.DataLoader

    def spy(*args, **kwargs):
        built.append(kwargs["num_workers"])
        return real(*args, **{**kwargs, "num_workers": 0})  # no processes in a unit test

    monkeypatch.setattr(probe, "DataLoader", spy)
    data = [(torch.zeros(3, 4, 4), i % 2) for i in range(4)]
    probe.extract_features(lambda x: x.flatten(1), data, num_workers=8)
    assert built == [2]


def test_too_small_names_batch_accum_and_processes_as_configured() -> None:
    with pytest.raises(DataError, match=r"100 images is too small for batch_size=16 × accum_steps=4 × 2 process\(es\) "
                                        r"= 128 images per step"):
        EpochSampler(100, world_size=2, batch_size=16, accum_steps=4)
    sampler = EpochSampler(100, batch_size=8, accum_steps=4)
    assert sampler.per_rank == 96  # whole optimizer steps of 32 images


def test_pretrain_too_small_states_the_configs_numbers(shapes_root: Path, tmp_path: Path) -> None:
    from milan.tools.cli import main

    with pytest.raises(DataError, match=r"batch_size=32 × accum_steps=4 × 1 process\(es\) = 128 images per step"):
        main(["pretrain", "--config", "pretrain_shapes", f"data.path={shapes_root}", f"run.out_dir={tmp_path}",
              "data.num_workers=0", "optim.batch_size=32", "optim.accum_steps=4", "optim.steps=1",
              "optim.warmup_steps=0", "monitor.every=0"])
