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


@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
def test_bench_data_quick_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`milan bench data --quick`: every CPU path timed per stage, ratios and cores per GPU present."""
    from milan.tools.bench import data as bench_data
    from milan.tools.cli import main as cli

    speed = tmp_path / "speed.json"
    speed.write_text(json.dumps({"variants": {"mae": {"images_per_s": 10.0}, "milan": {"images_per_s": 500.0}}}))
    out = tmp_path / "data.json"
    cli(["bench", "data", "--quick", "--device", "cpu", "--images", "4", "--batch-size", "2", "--img-size", "32",
         "--max-size", "64", "--rounds", "2", "--step-rate", str(speed), "--workers", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert {"command", "date", "machine", "settings", "sizes", "step_rate", "paths", "workers"} <= result.keys()
    assert result["machine"]["cpu_model"] and result["settings"]["img_size"] == 32
    assert result["step_rate"] == {"images_per_s": 500.0, "source": f"{speed} (milan)"}
    expected = [p for p in bench_data.PATHS if p != "cuda"]
    assert list(result["paths"]) == expected
    assert result["sizes"]["bounded_kb"] < result["sizes"]["original_kb"]  # 500×375 → short side 64
    for name, r in result["paths"].items():
        assert r["images"] == 4 and r["bounded"] == (name in ("bounded", "bounded_draft", "bounded_tensor", "fast"))
        assert r["images_per_s_per_core"] > 0 and len(r["per_round_images_per_s"]) == 2
        assert set(r["ms_per_image"]) == {"decode", "crop", "collate"}
        assert all(v > 0 for v in r["ms_per_image"].values())
        assert r["cores_per_gpu"] == pytest.approx(500.0 / r["images_per_s_per_core"])
        assert (name == "reference") == ("speedup_vs_reference" not in r)
    assert set(result["workers"]["1"]) == set(expected) and all(v > 0 for v in result["workers"]["1"].values())
    assert "| path | images/s per core |" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
def test_bench_data_refuses_bad_settings(tmp_path: Path) -> None:
    from milan.errors import ConfigError
    from milan.tools.bench import data as bench_data

    with pytest.raises(ConfigError, match="--step-rate fast: neither a number nor a file"):
        bench_data.run(images=1, step_rate_source="fast")
    with pytest.raises(ConfigError, match="--paths: unknown warp"):
        bench_data.run(images=1, paths=("reference", "warp"), device="cpu")
    with pytest.raises(ConfigError, match="--paths cuda needs a CUDA device"):
        bench_data.run(images=1, paths=("cuda",), device="cpu")
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(bench_data.imagenet_like_jpegs(1, size=(64, 48))[0])
    result = bench_data.run(data=folder, images=4, img_size=16, rounds=1, paths=("reference", "uint8"),
                            device="cpu", batch_size=1)
    assert result["settings"]["images"] == 1 and result["paths"]["uint8"]["speedup_vs_reference"] > 0
