"""Checkpoint/resume of `milan finetune` and `milan linprobe`: an interrupted run resumed at an epoch
boundary ends bit-identical to one that never stopped; seeds cover numpy and Python `random`; bad
values fail with one line naming the key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from milan.data.shapes import generate_shapes
from milan.errors import CheckpointError, ConfigError
from milan.tools.cli import main as cli


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes") / "data"
    generate_shapes(root, num_train=96, num_val=32, workers=1, progress=False)
    return root


@pytest.fixture(scope="module")
def checkpoint(random_pretrain_checkpoint: Path) -> Path:
    return random_pretrain_checkpoint


# 32 px (a 4×4 grid), 6 steps of 16 per epoch: every source of randomness on, and still quick
def _finetune(root: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", f"model.weights={ckpt}", "data.kind=shapes", f"data.path={root}", "data.label=colour",
            "data.img_size=32", "data.crop_pct=1.0", "data.num_workers=0", "data.crop_scale=[0.5,1.0]",
            "data.auto_augment=rand-m9-mstd0.5-inc1", "data.reprob=0.25", "mixup.mixup=0.8", "mixup.cutmix=1.0",
            "model.drop_path=0.1", "optim.batch_size=16", "optim.epochs=2", "optim.warmup_epochs=1",
            "optim.lr=1e-3", f"run.out_dir={out}", "run.device=cpu", "run.tensorboard=false", "run.log_every=1",
            *extra]


def _linprobe(root: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["linprobe", f"model.weights={ckpt}", "data.kind=shapes", f"data.path={root}", "data.label=colour",
            "data.img_size=32", "data.crop_pct=1.0", "data.num_workers=0", "optim.batch_size=16", "optim.epochs=3",
            "optim.warmup_epochs=1", "optim.solver=lars", "optim.lr=10", f"run.out_dir={out}", "run.device=cpu",
            "run.tensorboard=false", *extra]


def _records(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock field."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in lines]


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def _crash_after_checkpoint(run: Path) -> None:
    """What a run killed mid-epoch leaves behind: records past the checkpoint, a torn last line."""
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 999, "loss": 1.0, "lr": 0.1}\n{"step": 1000, "lo')


@pytest.mark.parametrize("workers", [0, 1])
def test_finetune_resumed_after_an_epoch_equals_the_uninterrupted_run(shapes_root: Path, checkpoint: Path,
                                                                      tmp_path: Path, workers: int) -> None:
    """Mixup (numpy), RandAugment and erasing (`random`), drop path (torch), worker seeds (torch, at each
    epoch's iterator): all continue from the checkpoint's RNG states."""
    full, part = tmp_path / "full", tmp_path / "part"
    args = (f"data.num_workers={workers}",)
    cli(_finetune(shapes_root, checkpoint, full, *args))
    cli(_finetune(shapes_root, checkpoint, part, *args, "run.max_epochs=1"))
    assert [r["epoch"] for r in _records(part) if "epoch" in r] == [1]
    assert json.loads((part / "results.json").read_text())["epoch"] == 1
    _crash_after_checkpoint(part)
    cli(_finetune(shapes_root, checkpoint, part, *args))  # run.resume=auto

    assert _records(part) == _records(full)  # same losses per step, same per-epoch metrics, no duplicates
    assert [r["epoch"] for r in _records(full) if "epoch" in r] == [1, 2]
    a, b = (torch.load(run / "checkpoint-last.pt", weights_only=True) for run in (full, part))
    _assert_same_tensors(a["model"], b["model"])
    assert (a["epoch"], a["step"], a["best"]) == (b["epoch"], b["step"], b["best"]) == (2, 12, a["best"])
    _assert_same_tensors(*(torch.load(run / "checkpoint-best.pt", weights_only=True)["model"] for run in (full, part)))
    results = [json.loads((run / "results.json").read_text()) for run in (full, part)]
    assert results[0]["best"] == results[1]["best"] and results[0]["last"] == results[1]["last"]


def test_two_fresh_finetune_runs_with_mixup_are_identical(shapes_root: Path, checkpoint: Path, tmp_path: Path) -> None:
    """run.seed seeds numpy (timm's mixup) and `random` (RandAugment, erasing) too, not only torch."""
    losses = []
    for name in ("a", "b"):
        cli(_finetune(shapes_root, checkpoint, tmp_path / name, "optim.epochs=1", "optim.warmup_epochs=0"))
        losses.append([r["loss"] for r in _records(tmp_path / name) if "epoch" not in r])
    assert len(losses[0]) == 6 and losses[0] == losses[1]


def test_finetune_resume_keeps_the_better_best_and_a_finished_run_is_not_redone(
        shapes_root: Path, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import milan.recipes.finetune as finetune

    scores = iter([0.5, 0.25])  # epoch 2 is worse than epoch 1

    def scripted(*args, **kwargs):
        top1 = next(scores)
        return {"top1": top1, "top5": 1.0, "loss": 1.0, "count": 32}

    monkeypatch.setattr(finetune, "evaluate", scripted)
    out = tmp_path / "ft"
    quick = ("data.auto_augment=null", "data.reprob=0", "mixup.mixup=0", "mixup.cutmix=0")
    cli(_finetune(shapes_root, checkpoint, out, *quick, "run.max_epochs=1"))
    best_before = torch.load(out / "checkpoint-best.pt", weights_only=True)
    cli(_finetune(shapes_root, checkpoint, out, *quick))
    best_after = torch.load(out / "checkpoint-best.pt", weights_only=True)
    assert best_after["epoch"] == 1 and best_after["top1"] == 0.5
    _assert_same_tensors(best_before["model"], best_after["model"])
    last = torch.load(out / "checkpoint-last.pt", weights_only=True)
    assert last["epoch"] == 2 and last["top1"] == 0.25 and last["best"] == {"top1": 0.5, "top5": 1.0, "epoch": 1}
    result = json.loads((out / "results.json").read_text())
    assert result["best"]["epoch"] == 1 and result["last"]["top1"] == 0.25

    # finished: a rerun reports, trains and evaluates nothing (scores is exhausted), writes no checkpoint
    files = {name: (out / name).read_bytes() for name in ("checkpoint-last.pt", "checkpoint-best.pt", "metrics.jsonl")}
    summary = cli(_finetune(shapes_root, checkpoint, out, *quick))
    assert summary is None  # the CLI returns nothing; the summary is on disk
    assert json.loads((out / "results.json").read_text())["best"] == result["best"]
    assert files == {name: (out / name).read_bytes() for name in files}

    # another class count (data.label=position: 9, not 6): one line naming the fix, the folder untouched
    config = (out / "config.yaml").read_text()
    with pytest.raises(CheckpointError, match=r"checkpoint of another model \(.*num_classes 6; this run: "
                                              r".*num_classes 9\)\. Use a new run\.out_dir, or run\.resume=none") as err:
        cli(_finetune(shapes_root, checkpoint, out, *quick, "data.label=position", "optim.epochs=3"))
    assert "\n" not in str(err.value)
    assert (out / "config.yaml").read_text() == config


@pytest.mark.parametrize("mode", [("optim.cache_features=true",), ("optim.cache_features=false", "data.num_workers=1")])
def test_linprobe_resumed_after_an_epoch_equals_the_uninterrupted_run(shapes_root: Path, checkpoint: Path,
                                                                      tmp_path: Path, mode: tuple[str, ...]) -> None:
    full, part = tmp_path / "full", tmp_path / "part"
    cli(_linprobe(shapes_root, checkpoint, full, *mode))
    cli(_linprobe(shapes_root, checkpoint, part, *mode, "run.max_epochs=1"))
    _crash_after_checkpoint(part)
    cli(_linprobe(shapes_root, checkpoint, part, *mode))

    assert [r["epoch"] for r in _records(full)] == [1, 2, 3]
    assert _records(part) == _records(full)
    a, b = (torch.load(run / "head-last.pt", weights_only=True) for run in (full, part))
    _assert_same_tensors(a["head"], b["head"])
    assert (a["epoch"], a["step"], a["best"]) == (b["epoch"], b["step"], b["best"])
    _assert_same_tensors(*(torch.load(run / "head-best.pt", weights_only=True)["head"] for run in (full, part)))


def test_linprobe_resume_keeps_the_better_best_and_refuses_another_model(
        shapes_root: Path, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import milan.recipes.linprobe as linprobe

    scores = iter([(0.5, 1.0), (0.25, 1.0), (0.375, 1.0), (0.125, 1.0)])
    monkeypatch.setattr(linprobe, "topk_accuracy", lambda logits, targets: next(scores))
    out = tmp_path / "lp"
    cli(_linprobe(shapes_root, checkpoint, out, "optim.cache_features=true", "run.max_epochs=1"))
    best_before = torch.load(out / "head-best.pt", weights_only=True)
    cli(_linprobe(shapes_root, checkpoint, out, "optim.cache_features=true"))
    best_after = torch.load(out / "head-best.pt", weights_only=True)
    assert best_after["epoch"] == 1 and best_after["top1"] == 0.5
    _assert_same_tensors(best_before["head"], best_after["head"])
    result = json.loads((out / "results.json").read_text())
    assert result["best"] == {"top1": 0.5, "top5": 1.0, "epoch": 1} and result["last"]["epoch"] == 3

    before = (out / "head-last.pt").read_bytes()
    cli(_linprobe(shapes_root, checkpoint, out, "optim.cache_features=true"))  # finished: nothing redone
    assert (out / "head-last.pt").read_bytes() == before
    with pytest.raises(CheckpointError, match=r"checkpoint of another model \(encoder 192/6/8/32, .*; this run: "
                                              r"encoder 192/6/8/48, .*\)\. Use a new run\.out_dir, or run\.resume=none"):
        cli(_linprobe(shapes_root, checkpoint, out, "optim.cache_features=true", "data.img_size=48"))
    # a fresh start on purpose
    cli(_linprobe(shapes_root, checkpoint, out, "optim.cache_features=true", "data.img_size=48", "run.resume=none",
                  "optim.epochs=1", "optim.warmup_epochs=0"))
    assert torch.load(out / "head-last.pt", weights_only=True)["encoder"]["img_size"] == 48


@pytest.mark.parametrize("recipe", ["finetune", "linprobe"])
@pytest.mark.parametrize(("override", "message"), [
    ("optim.epochs=0", r"optim\.epochs=0 must be at least 1"),
    ("optim.warmup_epochs=3", r"optim\.warmup_epochs=3 exceeds optim\.epochs=2"),
    ("data.img_size=60", r"data\.img_size=60 is not a multiple of the patch size 8; use e\.g\. 56"),
])
def test_unusable_values_name_the_key(shapes_root: Path, checkpoint: Path, tmp_path: Path, recipe: str,
                                      override: str, message: str) -> None:
    args = (_finetune if recipe == "finetune" else _linprobe)(shapes_root, checkpoint, tmp_path / "run",
                                                               "optim.epochs=2", "optim.warmup_epochs=0", override)
    with pytest.raises(ConfigError, match=message):
        cli(args)
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_finetune_resumes_from_a_given_path(shapes_root: Path, checkpoint: Path, tmp_path: Path) -> None:
    """run.resume=<path> continues from that file into a new run.out_dir."""
    quick = ("data.auto_augment=null", "data.reprob=0", "mixup.mixup=0", "mixup.cutmix=0", "optim.warmup_epochs=0")
    cli(_finetune(shapes_root, checkpoint, tmp_path / "a", *quick, "run.max_epochs=1"))
    shutil.copy(tmp_path / "a" / "checkpoint-last.pt", tmp_path / "start.pt")
    cli(_finetune(shapes_root, checkpoint, tmp_path / "b", *quick, f"run.resume={tmp_path / 'start.pt'}"))
    last = torch.load(tmp_path / "b" / "checkpoint-last.pt", weights_only=True)
    assert last["epoch"] == 2 and last["step"] == 12
