"""The run log: metrics.jsonl and TensorBoard read as one uninterrupted run after a resume."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from milan.train.log import MetricsLogger

pytest.importorskip("tensorboard")


def _tb_scalars(tb_dir: Path) -> list[tuple[str, int, float]]:
    """Every scalar event in every event file, read raw (no TensorBoard purging)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out = []
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                out.append((value.tag, event.step, value.simple_value if value.HasField("simple_value")
                            else float(value.tensor.float_val[0])))
    return out


def test_resume_drops_later_steps_from_metrics_and_tensorboard(tmp_path: Path) -> None:
    crashed = MetricsLogger(tmp_path)
    for step in range(1, 9):  # the run that crashed logged up to step 8; its last checkpoint was step 4
        crashed.log(step, loss=float(step))
    crashed.close()
    resumed = MetricsLogger(tmp_path, resume_from=4)
    for step in range(5, 11):
        resumed.log(step, loss=100.0 + step)
    resumed.close()

    scalars = _tb_scalars(tmp_path / "tb")
    counts = Counter((tag, step) for tag, step, _ in scalars)
    assert sorted(step for _, step in counts) == list(range(1, 11))
    assert set(counts.values()) == {1}, "a step appears twice in TensorBoard"
    by_step = {step: value for _, step, value in scalars}
    assert by_step[4] == 4.0 and by_step[5] == 105.0  # before the checkpoint: old run; after: the resumed one
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11))


def test_fresh_run_keeps_earlier_tensorboard_files_untouched(tmp_path: Path) -> None:
    first = MetricsLogger(tmp_path)
    first.log(1, loss=1.0)
    first.close()
    before = {p.name: p.read_bytes() for p in (tmp_path / "tb").iterdir()}
    second = MetricsLogger(tmp_path, resume_from=1)  # nothing later than step 1 to drop
    second.close()
    assert all((tmp_path / "tb" / name).read_bytes() == data for name, data in before.items())


def test_a_fresh_start_keeps_nothing_of_an_earlier_attempt(tmp_path: Path) -> None:
    """resume_from=-1: a run starting from scratch where a killed attempt left records."""
    killed = MetricsLogger(tmp_path)
    for step in (1, 2, 3):
        killed.log(step, loss=99.0)
    killed.close()
    fresh = MetricsLogger(tmp_path, resume_from=-1)
    fresh.log(1, loss=1.0)
    fresh.close()
    assert [(tag, step, value) for tag, step, value in _tb_scalars(tmp_path / "tb")] == [("loss", 1, 1.0)]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0)]


def test_pretrain_started_over_in_a_used_folder_logs_only_its_own_steps(shapes_root: Path, tmp_path: Path) -> None:
    from _pretrain_cli import pretrain_args
    from milan.tools.cli import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 99.0}) + "\n" for s in (1, 2, 3, 4)))
    main(pretrain_args(shapes_root, out, "optim.steps=2", "run.log_every=1"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert all(r["loss"] != 99.0 for r in records if "loss" in r)
