"""W&B and MLflow beside metrics.jsonl (`run.loggers`), for real: W&B offline (its run files read back
through its own protobuf records) and MLflow's file store (read back with `MlflowClient`)."""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _pretrain_cli import pretrain_args
from milan.errors import ConfigError
from milan.recipes.pretrain import PretrainConfig
from milan.tools.cli import main as cli
from milan.tools.cli import run as cli_run
from milan.train.config import load_config, to_dict
from milan.train.log import MetricsLogger
from milan.train.trackers import STATE_FILE, check_loggers, flatten, resolve_loggers

wandb = pytest.importorskip("wandb")
mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

LOGGERS = "run.loggers=[jsonl,wandb,mlflow]"


@pytest.fixture()
def trackers_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """W&B offline with its files in tmp, MLflow's file store in tmp; the names both default to."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    (tmp_path / "wandb_dir").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # recent MLflow (3.18) asks for it to use ./mlruns
    for name in ("WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


# --- reading W&B's offline run files ---------------------------------------------------------------------------
# W&B ≥ 0.2x no longer ships a Python reader for its `.wandb` files (the datastore moved into wandb-core).
# The file is a LevelDB-style log ("…:W&B" header, 32 KiB blocks of CRC'd chunks) of W&B's own protobuf
# `Record`s; we undo the framing and let W&B's `wandb_internal_pb2.Record` decode each record.

def _wandb_records(path: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, parts = 7, b""  # the header: ":W&B", a 2-byte magic, a version byte
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding to the block's end
            pos += (block - pos % block) % block
        elif kind == 1:  # a whole record
            yield pb.Record.FromString(chunk)
        elif kind in (2, 3):  # first / middle part
            parts += chunk
        elif kind == 4:  # last part
            yield pb.Record.FromString(parts + chunk)
            parts = b""


def _wandb_run(wandb_dir: Path, run_id: str) -> tuple[list[dict[str, Any]], dict[str, Any], int]:
    """(history rows of every attempt of the run, its config as last set, the number of attempts)."""
    files = sorted(wandb_dir.glob(f"wandb/offline-run-*-{run_id}*/run-{run_id}.wandb"))
    rows, config = [], {}
    for path in files:
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                rows.append({item.key or ".".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
            elif kind == "run":
                assert record.run.run_id == run_id
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in record.config.update})
    return sorted(rows, key=lambda r: r["_step"]), config, len(files)


def _mlflow_run(tmp: Path, run_id: str) -> tuple[Any, dict[str, list[tuple[int, float]]]]:
    client = MlflowClient(tracking_uri=f"file:{tmp / 'mlruns'}")
    run = client.get_run(run_id)
    history = {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in run.data.metrics}
    return run, history


def _cfg(run_dir: Path, *extra: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, [LOGGERS, f"run.out_dir={run_dir}", *extra])


# --- config --------------------------------------------------------------------------------------------------

def test_loggers_key_and_the_older_tensorboard_switch() -> None:
    def sinks(*overrides: str) -> tuple[str, ...]:
        return resolve_loggers(load_config(PretrainConfig, None, list(overrides)).run)

    assert sinks() == ("jsonl", "tensorboard")
    assert sinks("run.tensorboard=false") == ("jsonl",)  # what existing configs and tests say
    assert sinks("run.loggers=wandb") == ("jsonl", "wandb")  # jsonl always; one name is a list of one
    assert sinks("run.loggers=[mlflow,wandb,mlflow]", "run.tensorboard=true") == ("jsonl", "mlflow", "wandb",
                                                                                  "tensorboard")
    with pytest.raises(ConfigError, match="choose one of: 'jsonl', 'tensorboard', 'wandb', 'mlflow'"):
        load_config(PretrainConfig, None, ["run.loggers=[comet]"])


def test_a_tracker_that_is_not_installed_is_one_line_before_anything_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # Python's own "this module cannot be imported"
    with pytest.raises(ConfigError, match=r"^run.loggers includes mlflow, which is not installed here: "
                                          r"pip install 'milan-mim\[mlflow\]'"):
        check_loggers(_cfg(tmp_path).run)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        cli_run(["pretrain", "--config", "pretrain_shapes", f"run.out_dir={out}", "run.loggers=[mlflow]",
                 "data.path=/nonexistent"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == ("milan pretrain: error: run.loggers includes mlflow, which is not installed here: "
                      "pip install 'milan-mim[mlflow]' (or drop it from run.loggers)")
    assert not out.exists()  # refused before the run folder was made


# --- the logger: one run per tracker, one value per step ---------------------------------------------------------

def test_resumed_logger_continues_both_runs_without_duplicate_steps(trackers_env: Path) -> None:
    tmp, run_dir = trackers_env, trackers_env / "run"
    cfg = _cfg(run_dir)
    first = MetricsLogger(run_dir, config=cfg, resume_from=-1)
    ids = json.loads((run_dir / STATE_FILE).read_text())
    for step in range(1, 6):
        first.log(step, loss=1 / step, lr=0.1 * step, grad_norm=None if step == 2 else 2.0)
    first.log(5, knn_acc=0.5)  # a second record of step 5 (the kNN monitor after the log window)
    first.log(5, loss=99.0)  # a name twice at one step: trackers keep the first value
    # a recovery event at the bad step 6, then the rolled-back steps 4, 5 are redone: not sent again
    first.log(6, event="nan", action="rollback", detected_at=6, batches_skipped=[5, 6], retry=1)
    first.log(4, loss=-4.0)
    first.log(5, loss=-5.0)
    first.log(6, loss=1 / 6)
    first.log(7, loss=1 / 7)
    with pytest.raises(RuntimeError):  # the run dies after step 7's records
        try:
            raise RuntimeError("killed")
        finally:
            first.close()
    assert _mlflow_run(tmp, ids["mlflow"]["run_id"])[0].info.status == "FAILED"

    resumed = MetricsLogger(run_dir, config=cfg, resume_from=4)  # its newest checkpoint was step 4's
    for step in range(5, 10):  # steps 5-7 were sent by the first attempt: not again
        resumed.log(step, loss=100.0 + step)
    resumed.close()

    assert json.loads((run_dir / STATE_FILE).read_text())["wandb"]["id"] == ids["wandb"]["id"]
    expected = {1: 1.0, 2: 0.5, 3: 1 / 3, 4: 0.25, 5: 0.2, 6: 1 / 6, 7: 1 / 7, 8: 108.0, 9: 109.0}

    rows, config, attempts = _wandb_run(tmp / "wandb_dir", ids["wandb"]["id"])
    assert attempts == 2
    assert [r["_step"] for r in rows] == list(range(1, 10))  # one row per step
    assert {r["_step"]: r["loss"] for r in rows} == expected
    assert rows[4]["knn_acc"] == 0.5
    assert "grad_norm" not in rows[1] and rows[2]["grad_norm"] == 2.0
    assert (rows[5]["event"], rows[5]["action"], rows[5]["batches_skipped"], rows[5]["retry"]) == (
        "nan", "rollback", "[5, 6]", 1)
    plain = to_dict(cfg)
    assert {k: config[k] for k in plain} == plain  # the resolved config, nested

    run, history = _mlflow_run(tmp, ids["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert history["loss"] == sorted(expected.items())  # one value per step
    assert history["knn_acc"] == [(5, 0.5)] and [s for s, _ in history["grad_norm"]] == [1, 3, 4, 5]
    assert history["retry"] == [(6, 1.0)] and history["detected_at"] == [(6, 6.0)]
    assert (run.data.tags["event.6"], run.data.tags["batches_skipped.6"]) == ("nan", "[5, 6]")
    flat = {k: v if isinstance(v, str) else json.dumps(v) for k, v in flatten(plain).items()}
    assert run.data.params == flat
    client = MlflowClient(tracking_uri=f"file:{tmp / 'mlruns'}")
    assert len(client.search_runs([run.info.experiment_id])) == 1

    # run.resume=none in the same folder, MLflow only: a new MLflow run, and no W&B id left to continue later
    fresh = MetricsLogger(run_dir, config=_cfg(run_dir, "run.loggers=[mlflow]"), resume_from=-1)
    fresh.log(1, loss=3.0)
    fresh.close()
    new = json.loads((run_dir / STATE_FILE).read_text())
    assert "wandb" not in new and new["mlflow"]["run_id"] != ids["mlflow"]["run_id"]
    assert len(client.search_runs([run.info.experiment_id])) == 2
    assert _mlflow_run(tmp, new["mlflow"]["run_id"])[1]["loss"] == [(1, 3.0)]


@pytest.mark.parametrize("recipe", ["pretrain", "finetune", "segment", "detect", "linprobe"])
def test_every_training_recipe_has_the_key_and_its_whole_config_fits_mlflow(
        recipe: str, trackers_env: Path) -> None:
    import importlib

    config_cls = importlib.import_module(f"milan.recipes.{recipe}").CONFIG
    run_dir = trackers_env / recipe
    cfg = load_config(config_cls, None, ["run.loggers=[mlflow]", f"run.out_dir={run_dir}"])
    logger = MetricsLogger(run_dir, config=cfg, resume_from=-1)
    logger.log(1, loss=0.5, epoch=0)
    logger.close()
    run, history = _mlflow_run(trackers_env, json.loads((run_dir / STATE_FILE).read_text())["mlflow"]["run_id"])
    flat = flatten(to_dict(cfg))
    assert len(flat) > 30 and set(run.data.params) == set(flat)  # every key of the resolved config
    assert history["loss"] == [(1, 0.5)] and run.data.tags["mlflow.runName"] == recipe


# --- a real run: interrupted, crashed after a checkpoint, resumed -------------------------------------------------

@pytest.mark.slow
def test_pretrain_interrupted_and_resumed_is_one_run_per_tracker(trackers_env: Path, shapes_root: Path) -> None:
    tmp = trackers_env
    full, part = tmp / "full", tmp / "part"
    small = ("optim.batch_size=4",)
    cli(pretrain_args(shapes_root, full, *small))  # uninterrupted, metrics.jsonl only
    # stopped by run.max_steps at 3 (checkpoints at 2 and 3); then step 3's checkpoint is lost, as if the
    # run had died after step 3's records: the rerun resumes from step 2 and redoes step 3
    cli(pretrain_args(shapes_root, part, *small, LOGGERS, "run.ckpt_every=2", "run.max_steps=3"))
    (part / "checkpoint-00000003.pt").unlink()
    cli(pretrain_args(shapes_root, part, *small, LOGGERS, "run.ckpt_every=2"))

    losses = {r["step"]: r["loss"] for r in map(json.loads, (full / "metrics.jsonl").read_text().splitlines())
              if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4]
    ids = json.loads((part / STATE_FILE).read_text())

    rows, config, attempts = _wandb_run(tmp / "wandb_dir", ids["wandb"]["id"])
    assert attempts == 2
    assert {r["_step"]: r["loss"] for r in rows} == losses and len(rows) == 4  # the uninterrupted losses, once
    assert config["optim"]["steps"] == 4 and config["run"]["max_steps"] is None  # as the resumed run set it

    run, history = _mlflow_run(tmp, ids["mlflow"]["run_id"])
    assert dict(history["loss"]) == losses and len(history["loss"]) == 4
    assert {s for s, _ in history["lr"]} == {1, 2, 3, 4}
    assert run.data.params["optim.steps"] == "4" and run.data.params["model.decoder_depth"] == "1"
    assert run.data.params["run.max_steps"] == "3"  # params never change; the resumed value is a tag
    assert run.data.tags["resumed.run.max_steps"] == "null"
    assert run.info.status == "FINISHED"
    client = MlflowClient(tracking_uri=f"file:{tmp / 'mlruns'}")
    assert len(client.search_runs([run.info.experiment_id])) == 1
