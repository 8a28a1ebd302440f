"""`milan bench speed --quick` runs end to end on CPU and writes well-formed JSON (no timing checks)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from milan.tools import bench


def test_quick_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--quick", "--device", "cpu", "--out", str(out)])
    returned = bench.run_from_args(args)

    result = json.loads(out.read_text())
    assert result == json.loads(json.dumps(returned))
    assert {"command", "date", "machine", "settings", "peak", "memory_kind", "variants",
            "teacher_forward", "comparisons"} <= result.keys()
    machine = result["machine"]
    assert machine["device"] == "cpu" and machine["torch"] and machine["cpu_model"]
    assert machine["threads"] >= 1
    assert result["settings"]["model"] == bench.QUICK_MODEL and result["settings"]["steps"] == 2
    assert result["peak"]["flops_per_s"] > 0

    assert list(result["variants"]) == ["mae", "milan", "milan_mae_decoder"]
    for name, v in result["variants"].items():
        assert v["images_per_s"] > 0 and v["step_ms"] > 0, name
        assert set(v["phases_ms"]) == set(bench.PHASES), name
        assert all(v["phases_ms"][p] > 0 for p in ("masking", "forward", "backward", "optimizer"))
        assert v["flops"]["forward"] > 0 and v["flops"]["backward"] > v["flops"]["forward"]
        assert v["flops"]["decoder_forward"] > 0 and v["flops"]["encoder_forward"] > 0
        assert v["achieved_flops_per_s"] > 0 and v["mfu"] > 0
        assert v["peak_memory_mib"] > 0
    assert result["variants"]["mae"]["flops"]["teacher"] == 0  # the baseline has no teacher
    assert result["variants"]["milan"]["flops"]["teacher"] > 0
    assert result["variants"]["milan"]["variant"] == {
        "target": "clip", "decoder": "prompting", "masking": "semantic"}

    teacher = result["teacher_forward"]
    for name in ("with_cls_attn", "plain"):
        assert teacher[name]["ms"] > 0 and teacher[name]["flops"] > 0
    # cls_attn adds the last layer's K projection and one query row: a little more, never less.
    assert teacher["with_cls_attn"]["flops"] > teacher["plain"]["flops"]
    assert set(result["comparisons"]) >= {
        "milan_over_mae_step_time", "prompting_over_mae_decoder_step_time",
        "prompting_over_mae_decoder_forward_flops", "teacher_cls_attn_overhead"}
    assert "| variant |" in capsys.readouterr().out


def test_matmul_peak_is_the_best_size() -> None:
    import torch

    peak = bench.matmul_peak(torch.device("cpu"), torch.float32, (64, 128), repeats=2)
    assert set(peak["per_size"]) == {"64", "128"}
    assert peak["flops_per_s"] == max(peak["per_size"].values())
    assert peak["per_size"][str(peak["n"])] == peak["flops_per_s"]
