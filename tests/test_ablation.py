"""`benchmarks/ablation.py --quick`: every Table 5 row and KD run, and the results are well formed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("ablation", ROOT / "benchmarks" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_ablation_writes_well_formed_results(ablation, tmp_path: Path) -> None:
    out = tmp_path / "abl"
    summary = ablation.main(["--quick", "--out", str(out), "--data", str(tmp_path / "shapes")])
    rows = list(ablation.VARIANTS)
    assert rows == [f"#{i}" for i in range(1, 10)] + ["KD"]
    lines = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["row"], r["seed"]) for r in lines) == sorted((r, s) for r in rows for s in (0, 1))
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["table"] == summary["table"] and set(on_disk["table"]) == set(rows)
    for metrics in on_disk["table"].values():
        for lab in ablation.LABELS:
            for kind in ("linear", "knn"):
                mean, std = metrics[f"{kind} {lab}"]
                assert 0.0 <= mean <= 1.0 and std >= 0.0
    table = (out / "results.md").read_text().splitlines()
    assert len(table) == 2 + len(rows) and table[2].startswith("| #1 | pixel | mae | random |")
    assert table[-1].startswith("| KD | clip | none | semantic |")
    assert not list(out.glob("runs/*/checkpoint-*.pt"))  # deleted unless --keep-checkpoints

    # A rerun finds every pair done, trains nothing and rewrites the same table.
    again = ablation.main(["--quick", "--out", str(out), "--data", str(tmp_path / "shapes")])
    assert again["table"] == summary["table"]
    assert len((out / "results.jsonl").read_text().splitlines()) == len(lines)


def test_summary_mean_and_std(ablation) -> None:
    done = {("#1", 0): {"linear shape": 0.5}, ("#1", 1): {"linear shape": 0.7}, ("#8", 0): {"linear shape": 0.9}}
    table = ablation.summarise(done, ["#1", "#8", "KD"], [0, 1])
    assert table["#1"]["linear shape"] == pytest.approx((0.6, 0.1414213562))
    assert table["#8"]["linear shape"] == (0.9, 0.0) and "KD" not in table


def test_torn_results_line_is_ignored(ablation, tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"row": "#2", "seed": 1, "metrics": {"a": 1.0}}) + '\n{"row": "#3", "se')
    assert ablation.load_done(path) == {("#2", 1): {"a": 1.0}}
