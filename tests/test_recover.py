"""Automatic recovery in `milan pretrain` (docs/RECOVERY.md): detect, roll back, skip, retry — on CPU,
tiny runs, faults injected with the `debug` section."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from _pretrain_cli import pretrain_args as _args
from milan.data.sampler import EpochSampler
from milan.errors import TrainingError
from milan.tools.cli import main as cli
from milan.train.checkpoint import latest_checkpoint, step_checkpoints
from milan.train.recover import Detector, Recovery, restore_snapshot, take_snapshot


def _run(args: list[str]) -> dict:
    """`milan pretrain` in this process, returning main's summary (the CLI prints it)."""
    from milan.recipes.pretrain import CONFIG, main
    from milan.train.config import config_path, load_config

    assert args[:3] == ["pretrain", "--config", "pretrain_shapes"]
    return main(load_config(CONFIG, config_path("pretrain_shapes"), args[3:]))


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in _records(run) if "loss" in r]


def _events(run: Path) -> list[dict]:
    path = run / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _untimed(events: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "time"} for e in events]


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return latest_checkpoint(run)[1]["model"]


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- 1. a NaN: roll back, skip the recorded batches, finish ----------------------------------------


def test_nan_rolls_back_and_skips_exactly_the_recorded_batches(shapes_root: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """NaN at step 3 (checks and snapshots every 2 steps): found at step 4, rolled back to the
    snapshot of step 2, global batches 2 and 3 skipped (the snapshot's through the first bad one).
    The run ends with the weights of a run that never saw a NaN and was told to skip batches 2, 3."""
    from milan.data.reading import Samples

    loaded: list[tuple[int, int]] = []
    getitem = Samples.__getitem__
    monkeypatch.setattr(Samples, "__getitem__", lambda self, key: (loaded.append(key), getitem(self, key))[1])
    common = ["optim.steps=8", "run.log_every=2", "recover.snapshot_every=2", "run.ckpt_every=100",
              "recover.lr_scale=1.0"]
    hit, told = tmp_path / "hit", tmp_path / "told"
    result = _run(_args(shapes_root, hit, *common, "debug.nan_at_steps=[3]"))
    hit_loaded, loaded[:] = list(loaded), []
    [event] = _events(hit)
    assert {k: event[k] for k in ("step", "event", "action", "detected_at", "rolled_back_to", "batches_skipped")} == {
        "step": 3, "event": "nonfinite_loss", "action": "rollback", "detected_at": 4, "rolled_back_to": 2,
        "batches_skipped": [2, 3]}
    assert [r for r in _records(hit) if "event" in r][0]["batches_skipped"] == [2, 3]  # in metrics.jsonl too
    assert (result["events"], result["rollbacks"], result["batches_skipped"]) == (1, 1, 2)
    assert result["step"] == 8 and math.isfinite(result["loss"])

    # the data: batches 0–3, then (after the rollback to step 2) batches 4–9; 2 and 3 never again
    sampler = EpochSampler(64, seed=0, batch_size=8)

    def batch(g: int) -> list[tuple[int, int]]:
        sampler.set_epoch(g // 8)
        return [(g // 8, i) for i in sampler.indices()[(g % 8) * 8: (g % 8 + 1) * 8]]

    assert hit_loaded == [key for g in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] for key in batch(g)]

    cli(_args(shapes_root, told, *common, "debug.skip_batches=[2,3]"))
    assert loaded == [key for g in [0, 1, 4, 5, 6, 7, 8, 9] for key in batch(g)]
    assert _events(told) == []
    assert _losses(hit) == _losses(told)
    assert _same_weights(_final_weights(hit), _final_weights(told))


# --- 2. spikes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("detect", [True, False])
def test_loss_spike_rolls_back_only_when_detection_is_on(shapes_root: Path, tmp_path: Path, detect: bool) -> None:
    out = tmp_path / "run"
    spike = ["recover.loss_spike_z=6", "recover.spike_window=4", "recover.spike_warmup=3"] if detect else []
    result = _run(_args(shapes_root, out, "optim.steps=6", "run.log_every=2", "recover.snapshot_every=2",
                       "debug.spike_at_steps=[4]", *spike))
    events = _events(out)
    if detect:
        assert [(e["step"], e["event"], e["action"], e["rolled_back_to"]) for e in events] == [
            (4, "loss_spike", "rollback", 4)]
        assert result["rollbacks"] == 1
        assert all(r["loss"] < 10 for r in _records(out) if "loss" in r)  # the spiked window was never logged
    else:
        assert events == [] and result["events"] == 0
        assert max(r["loss"] for r in _records(out) if "loss" in r) > 100  # trained through, logged
    assert result["step"] == 6


# --- 3. failing again and again: give up ------------------------------------------------------------


@pytest.mark.parametrize(("nan", "bad", "found"), [
    (["debug.nan_at_steps=[2,3,4,5,6,7,8,9]"], 4, 5),  # each step from 2 fails once: a new failure per retry
    (["debug.nan_at_steps=[2]", "debug.repeat=true"], 2, 3),  # step 2 fails every time it runs
])
def test_repeated_failure_gives_up_with_one_message(shapes_root: Path, tmp_path: Path, nan: list[str], bad: int,
                                                    found: int) -> None:
    out = tmp_path / "run"
    with pytest.raises(TrainingError) as err:
        cli(_args(shapes_root, out, "optim.steps=10", "recover.max_retries=2", "recover.snapshot_every=1",
                  "run.ckpt_every=1", "run.keep_last=100", *nan))
    last = out / f"checkpoint-{bad:08d}.pt"
    assert str(err.value) == (
        f"loss became NaN/inf at step {bad} (found at step {found}), after 2 rollback(s) within 1000 steps "
        f"(recover.max_retries=2, recover.retry_window=1000); gave up. No checkpoint was written after step {bad}; "
        f"the last good checkpoint is {last}. Try: a lower optim.lr (or optim.base_lr), optim.clip_grad=1.0, "
        "run.precision=bf16 or fp32 (or recover.fallback_precision), more recover.skip_batches, a smaller "
        "recover.lr_scale or a larger recover.max_retries; then rerun the same command to resume from that "
        "checkpoint (run.resume=auto)")
    paths = step_checkpoints(out)
    assert paths[-1] == last  # nothing after the bad step
    for path in paths:
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    events = _events(out)
    assert [e["action"] for e in events] == ["rollback", "rollback", "stop"]
    assert events[-1]["step"] == bad and events[-1]["message"] == str(err.value)


def test_max_retries_zero_stops_at_the_first_failure(shapes_root: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"^loss became NaN/inf at step 1 \(found at step 2\), and "
                                             r"recover\.max_retries=0 allows no rollback; gave up"):
        cli(_args(shapes_root, tmp_path / "run", "recover.max_retries=0", "debug.nan_at_steps=[1]"))


def test_recovery_off_stops_as_before(shapes_root: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"^loss became NaN/inf at step 1; no checkpoint was written after it\. "
                                             r"Lower optim\.lr"):
        cli(_args(shapes_root, tmp_path / "run", "recover.enabled=false", "debug.nan_at_steps=[1]"))
    assert not (tmp_path / "run" / "events.jsonl").exists()


# --- 4. two processes agree ---------------------------------------------------------------------------


@pytest.mark.slow
def test_nan_on_one_rank_rolls_back_both(shapes_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29547",
         "-m", "milan", *_args(shapes_root, out, "optim.steps=6", "run.log_every=2", "recover.snapshot_every=2",
                               "optim.batch_size=4", "run.device=cpu", "debug.nan_at_steps=[3]",
                               "debug.nan_rank=1")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loss × nan on rank 1" in done.stderr and "on rank 0" not in done.stderr  # only rank 1 was hit
    [event] = _events(out)
    assert (event["step"], event["action"], event["rolled_back_to"], event["batches_skipped"]) == (3, "rollback", 2, [2, 3])
    assert [r["step"] for r in _records(out) if "loss" in r] == [2, 4, 6]
    assert all(math.isfinite(r["loss"]) for r in _records(out) if "loss" in r)
    assert all(torch.isfinite(v).all() for v in _final_weights(out).values() if v.is_floating_point())


# --- 5. fp16: the scaler's overflow steps are not failures ---------------------------------------------


def test_scaler_overflow_is_not_a_failure_but_a_nan_loss_is() -> None:
    """The counting rule, with a found-inf we control: a non-finite gradient norm is the GradScaler's
    business while one is active (it skips the step and lowers its scale); without one it is a bad
    step; a NaN loss is bad either way."""
    finite, inf, nan = torch.tensor(1.5), torch.tensor(math.inf), torch.tensor(math.nan)
    scaled = Detector(torch.device("cpu"), grad_z=3.0, window=4, warmup=2)
    for step in range(4):
        scaled.update(step, finite, inf if step % 2 else torch.tensor(2.0), scaler_active=True)
    assert scaled.agree() is None
    assert int(scaled.history["grad"].valid.sum()) == 2  # overflow norms stay out of the spike window
    scaled.update(4, nan, torch.tensor(2.0), scaler_active=True)
    assert scaled.agree() == (4, "nonfinite_loss")

    plain = Detector(torch.device("cpu"))
    plain.update(0, finite, torch.tensor(2.0))
    plain.update(1, finite, inf)
    plain.update(2, nan, nan)  # a later bad step does not replace the first
    assert plain.agree() == (1, "nonfinite_grad")
    plain.reset()
    assert plain.agree() is None


def test_fp16_overflow_steps_are_left_to_the_scaler(shapes_root: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16 autocast + GradScaler on CPU, with an initial scale so large that the first step's
    gradients overflow: the scaler skips that step and lowers its scale (by 2^30 here, so that the
    next steps fit); no recovery event, and the overflow's norm is kept out of the logged one."""
    scaler_cls = torch.amp.GradScaler

    class HugeScale(scaler_cls):
        def __init__(self, device: str = "cuda", **kwargs) -> None:
            super().__init__(device, init_scale=2.0**40, backoff_factor=2.0**-30, **kwargs)

    monkeypatch.setattr(torch.amp, "GradScaler", HugeScale)
    out = tmp_path / "run"
    result = _run(_args(shapes_root, out, "run.precision=fp16"))
    assert result["events"] == 0 and _events(out) == []
    state = latest_checkpoint(out)[1]
    assert state["scaler"]["scale"] == 2.0**10  # exactly one overflow step, skipped by the scaler
    records = [r for r in _records(out) if "loss" in r]
    assert len(records) == 4 and all(math.isfinite(r["loss"]) for r in records)
    assert records[0]["grad_norm"] is None  # step 1's only norm was the overflow: not averaged in
    assert all(math.isfinite(r["grad_norm"]) for r in records[1:])


# --- 6. interrupted and resumed across rollbacks == uninterrupted ------------------------------------


def test_resume_across_rollbacks_is_exact(shapes_root: Path, tmp_path: Path) -> None:
    """NaN at steps 5 and 7, snapshots every 4 steps: the uninterrupted run rolls back to step 4
    twice. The other run pauses at step 6 — after the first rollback, between snapshot points, so
    its checkpoint carries the step-4 snapshot — and resumes: its second rollback returns to the
    same snapshot, and everything matches bit for bit."""
    common = ["optim.steps=10", "run.log_every=2", "recover.snapshot_every=4", "run.ckpt_every=100",
              "debug.nan_at_steps=[5,7]"]
    full, part = tmp_path / "full", tmp_path / "part"
    cli(_args(shapes_root, full, *common))
    cli(_args(shapes_root, part, *common, "run.max_steps=6"))
    paused = latest_checkpoint(part)[1]
    assert paused["step"] == 6 and paused["recover"]["snapshot"]["step"] == 4
    assert paused["recover"]["state"]["offset"] == 2 and paused["recover"]["state"]["fired"] == [5]
    result = _run(_args(shapes_root, part, *common))

    events = _untimed(_events(full))
    assert [(e["step"], e["rolled_back_to"], e["batches_skipped"], e["lr_scale"]) for e in events] == [
        (5, 4, [4, 5], 0.5), (7, 4, [6, 7, 8, 9], 0.25)]
    assert _untimed(_events(part)) == events
    assert _losses(part) == _losses(full)
    assert [r["lr"] for r in _records(part) if "loss" in r] == [r["lr"] for r in _records(full) if "loss" in r]
    assert _same_weights(_final_weights(part), _final_weights(full))
    assert (result["events"], result["rollbacks"], result["batches_skipped"]) == (2, 2, 6)


# --- 7. no events: recovery on == recovery off ---------------------------------------------------------


def test_recovery_without_events_is_bit_identical_to_none(shapes_root: Path, tmp_path: Path) -> None:
    on, off = tmp_path / "on", tmp_path / "off"
    cli(_args(shapes_root, on, "recover.snapshot_every=1", "recover.check_every=1"))  # a snapshot at every step
    cli(_args(shapes_root, off, "recover.enabled=false"))
    assert _losses(on) == _losses(off) and len(_losses(on)) == 4
    assert _same_weights(_final_weights(on), _final_weights(off))
    assert _events(on) == [] and not (off / "events.jsonl").exists()
    (off / "events.jsonl").write_text('{"step": 3, "kind": "nan", "from": "an earlier attempt"}\n')
    cli(_args(shapes_root, off, "recover.enabled=false", "run.resume=none"))  # a fresh start in the used folder
    assert _events(off) == []


# --- units -------------------------------------------------------------------------------------------


def _recovery(**over) -> Recovery:
    cfg = dict(skip_batches=None, lr_scale=0.5, lr_scale_steps=10, fallback_precision=None, max_retries=3,
               retry_window=100, loss_spike_z=None, grad_spike_z=None)
    debug = dict(nan_at_steps=[], nan_rank=None, spike_at_steps=[], spike_factor=1e3, repeat=False, skip_batches=[])
    for key, value in over.items():  # debug_skip_batches: the debug section's key
        (debug if key.startswith("debug_") or key not in cfg else cfg)[key.removeprefix("debug_")] = value
    return Recovery(SimpleNamespace(**cfg), SimpleNamespace(**debug), precision="fp16")


def test_positions_skips_and_lr_window() -> None:
    rec = _recovery()
    assert [rec.position(s) for s in range(4)] == [0, 1, 2, 3]
    event = rec.fail(7, "loss_spike", detected_at=8, snapshot_step=4, last_checkpoint=None)
    assert event["batches_skipped"] == [4, 5, 6, 7] and rec.position(4) == 8
    assert (rec.lr_scale(4), rec.lr_scale(13), rec.lr_scale(14)) == (0.5, 0.5, 1.0)
    # failing again inside the window, from the same snapshot: skip on from where the last attempt began
    event = rec.fail(5, "nonfinite_loss", detected_at=6, snapshot_step=4, last_checkpoint=None)
    assert event["batches_skipped"] == [8, 9] and rec.position(4) == 10 and rec.lr_scale(4) == 0.25

    fixed = _recovery(skip_batches=3, fallback_precision="fp32")
    assert fixed.fail(9, "nonfinite_loss", detected_at=10, snapshot_step=6, last_checkpoint=None)["batches_skipped"] \
        == [6, 7, 8]
    assert fixed.precision == "fp32" and fixed.events[0]["precision"] == ["fp16", "fp32"]

    listed = _recovery(debug_skip_batches=[1, 2, 5])
    assert [listed.position(s) for s in range(4)] == [0, 3, 4, 6]


def test_injection_fires_once_unless_repeat() -> None:
    once, again = _recovery(nan_at_steps=[2], spike_at_steps=[3]), _recovery(nan_at_steps=[2], repeat=True)
    assert math.isnan(once.injection(2)) and once.injection(3) == 1e3 and once.injection(1) is None
    once.ran(2)
    again.ran(2)
    assert once.injection(2) is None and math.isnan(again.injection(2))
    other_rank = Recovery(SimpleNamespace(), SimpleNamespace(nan_at_steps=[2], nan_rank=1, spike_at_steps=[],
                                                             spike_factor=1e3, repeat=False, skip_batches=[]),
                          precision="fp32", rank=0)
    assert other_rank.injection(2) is None


def test_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    rec = _recovery(nan_at_steps=[3])
    rec.ran(3)
    rec.fail(3, "nonfinite_loss", detected_at=4, snapshot_step=2, last_checkpoint=None)
    torch.save(rec.state_dict(), tmp_path / "s.pt")
    back = _recovery(nan_at_steps=[3])
    back.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert back.state_dict() == rec.state_dict() and back.position(2) == rec.position(2)


def test_snapshot_restores_without_aliasing() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    detector = Detector(torch.device("cpu"), loss_z=3.0, window=4, warmup=2)

    def train() -> None:
        model(torch.randn(2, 4)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    train()
    snap = take_snapshot(1, model=model, optimizer=optimizer, scaler=scaler, window={"steps": 1}, detector=detector)
    before = {k: v.clone() for k, v in model.state_dict().items()}, optimizer.state_dict()["state"][0]["exp_avg"].clone()
    train()
    restore_snapshot(snap, model=model, optimizer=optimizer, scaler=scaler)
    assert _same_weights(model.state_dict(), before[0])
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], before[1])
    train()  # training on after a restore leaves the snapshot as it was
    assert _same_weights(snap.model, before[0]) and torch.equal(snap.optimizer["state"][0]["exp_avg"], before[1])
    assert int(snap.optimizer["state"][0]["step"]) == 1


def test_spike_tests_wait_for_warmup_and_flag_only_spikes() -> None:
    det = Detector(torch.device("cpu"), loss_z=4.0, grad_z=4.0, window=4, warmup=3)
    losses = [2.0, 1.9, 1.8, 1.85, 1.7, 1.75]  # noisy descent: no spike
    for step, loss in enumerate(losses):
        det.update(step, torch.tensor(loss), torch.tensor(1.0 + 0.1 * (step % 2)))
    assert det.agree() is None and det.history["loss"].count == 6
    det.update(6, torch.tensor(1.7), torch.tensor(50.0))  # the gradient norm jumps
    det.update(7, torch.tensor(40.0), torch.tensor(1.0))  # then the loss
    assert det.agree() == (6, "grad_spike")
    early = Detector(torch.device("cpu"), loss_z=4.0, window=4, warmup=3)
    early.update(0, torch.tensor(2.0), None)
    early.update(1, torch.tensor(2.0), None)
    early.update(2, torch.tensor(100.0), None)  # inside the warm-up: not judged
    assert early.agree() is None
    early.update(3, torch.tensor(1e4), None)
    assert early.agree() == (3, "loss_spike")


def test_fallback_precision_survives_a_resume(shapes_root: Path, tmp_path: Path) -> None:
    """fp16 + a NaN at step 1 with recover.fallback_precision=fp32: the rollback switches the run to
    fp32 (scaler off); a run paused after it and resumed stays in fp32."""
    out = tmp_path / "run"
    common = ["run.precision=fp16", "recover.fallback_precision=fp32", "recover.snapshot_every=1",
              "debug.nan_at_steps=[1]"]
    _run(_args(shapes_root, out, *common, "run.max_steps=3"))
    [event] = _events(out)
    assert event["precision"] == ["fp16", "fp32"] and event["rolled_back_to"] == 1
    paused = latest_checkpoint(out)[1]
    assert paused["recover"]["state"]["fallback"] == "fp32" and paused["scaler"] == {}
    result = _run(_args(shapes_root, out, *common))
    assert result["step"] == 4 and result["rollbacks"] == 1
    assert latest_checkpoint(out)[1]["scaler"] == {}
