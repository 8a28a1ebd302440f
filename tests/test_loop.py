"""The one training loop (milan.train.loop): its events in the documented order, what hooks may do at
each, and exact resume of the loop's state and the hooks' (interrupted == uninterrupted)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from milan.train.checkpoint import load_checkpoint
from milan.train.distributed import DistInfo
from milan.train.log import MetricsLogger
from milan.train.loop import Checkpoints, EpochLoader, Hook, Loop

INFO = DistInfo(0, 1, 0, torch.device("cpu"))
STEPS_PER_EPOCH = 3


class Recorder(Hook):
    """Records every event it receives; keeps a running sum of the step losses as its state."""

    def __init__(self, *, check_at: tuple[int, ...] = ()) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.loss_sum = 0.0
        self.losses: list[float] = []  # per step (not part of the state)
        self.check_at = check_at

    def on_start(self, loop: Loop) -> None:
        self.calls.append(("start", loop.step))

    def on_loss(self, loop: Loop, loss: torch.Tensor, micro: int) -> torch.Tensor:
        self.calls.append(("loss", loop.step, micro))
        return loss

    def lr_scale(self, step: int) -> float:
        self.calls.append(("lr_scale", step))
        return 1.0

    def on_step(self, loop: Loop, loss: torch.Tensor, norm: torch.Tensor) -> None:
        self.calls.append(("step", loop.step))
        self.losses.append(float(loss))
        self.loss_sum += self.losses[-1]

    def wants_check(self, loop: Loop, step: int) -> bool:
        return step in self.check_at

    def on_check(self, loop: Loop) -> None:
        self.calls.append(("check", loop.step))

    def on_log(self, loop: Loop, record: dict[str, Any]) -> None:
        self.calls.append(("log", loop.step))
        record["recorded"] = self.loss_sum

    def on_verified(self, loop: Loop) -> None:
        self.calls.append(("verified", loop.step))

    def on_step_end(self, loop: Loop) -> None:
        self.calls.append(("step_end", loop.step))

    def on_epoch_end(self, loop: Loop, epoch: int) -> None:
        self.calls.append(("epoch_end", loop.step, epoch))

    def on_checkpoint(self, loop: Loop, path: Path) -> None:
        self.calls.append(("checkpoint", loop.step, path.name))

    def on_end(self, loop: Loop) -> None:
        self.calls.append(("end", loop.step))

    def rank_state(self, loop: Loop) -> Any:
        return {"loss_sum": self.loss_sum}

    def state_dict(self, loop: Loop, ranks: list[Any]) -> dict[str, Any]:
        return {"recorder": ranks}

    def load_state_dict(self, loop: Loop, checkpoint: dict[str, Any]) -> None:
        self.loss_sum = checkpoint["recorder"][0]["loss_sum"]


def _data(accum: int) -> EpochLoader:
    """Epoch e's micro-batches from step `start` on: a pure function of (e, index), as the samplers."""
    state = {"epoch": 0, "start": 0}

    class Batches:
        def __iter__(self):
            for i in range(state["start"], STEPS_PER_EPOCH * accum):
                g = torch.Generator().manual_seed(1000 * state["epoch"] + i)
                x = torch.randn(4, 3, generator=g)
                yield x, x.sum(1, keepdim=True) * 0.5

    def set_epoch(epoch: int, start: int) -> None:
        state.update(epoch=epoch, start=start)

    return EpochLoader(Batches(), set_epoch, STEPS_PER_EPOCH)


def _loop(run_dir: Path, hooks: list[Hook], *, last_step: int = 6, accum: int = 1, seed: int = 0) -> Loop:
    torch.manual_seed(seed)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)

    def train_step(batch: tuple[torch.Tensor, torch.Tensor], *, step: int, micro: int) -> torch.Tensor:
        return nn.functional.mse_loss(model(batch[0]), batch[1])

    return Loop(info=INFO, model=model, optimizer=optimizer, train_step=train_step, data=_data(accum),
                schedule=lambda s: 0.1 * (1 - s / 6), total_steps=6, last_step=last_step,
                checkpoints=Checkpoints(run_dir, "test", {}, {}, every=2), metrics=MetricsLogger(run_dir, tensorboard=False),
                accum_steps=accum, batch_size=4, log_every=2, hooks=hooks, log_throughput=False)


def _documented_order(first: int, last: int, *, accum: int, checks: set[int], logs: set[int], saves: set[int],
                      epoch_ends: dict[int, int]) -> list[tuple[Any, ...]]:
    """The events docs/ARCHITECTURE.md lists, for steps first+1 .. last."""
    calls: list[tuple[Any, ...]] = [("start", first)]
    for s in range(first + 1, last + 1):
        calls += [("loss", s - 1, m) for m in range(accum)]
        calls += [("lr_scale", s - 1), ("step", s - 1)]
        if s in checks:
            calls.append(("check", s))
        if s in logs:
            calls.append(("log", s))
        if s in checks:
            calls.append(("verified", s))
        calls.append(("step_end", s))
        if s in epoch_ends:
            calls.append(("epoch_end", s, epoch_ends[s]))
        if s in saves:
            calls.append(("checkpoint", s, f"checkpoint-{s:08d}.pt"))
    return calls + [("end", last)]


@pytest.mark.parametrize("accum", [1, 2])
def test_hooks_see_the_events_in_the_documented_order(tmp_path: Path, accum: int) -> None:
    rec = Recorder(check_at=(5,))
    loop = _loop(tmp_path, [rec], accum=accum)
    loop.run()
    saves = {2, 3, 4, 6}  # every=2, every epoch end (3 steps), the last step
    logs = {2, 4, 6}
    expected = _documented_order(0, 6, accum=accum, checks=saves | logs | {5}, logs=logs, saves=saves,
                                 epoch_ends={3: 0, 6: 1})
    assert rec.calls == expected
    assert loop.step == 6 and loop.meter.seen == 6 * accum * 4


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path: Path) -> None:
    """The loop's state (step, log window, RNG, model, optimizer) and a hook's state come back from
    the checkpoint: the same weights, the same hook state, the same metrics records."""
    full = Recorder()
    a = _loop(tmp_path / "full", [full])
    a.run()
    a.metrics.close()

    first = Recorder()
    b = _loop(tmp_path / "part", [first], last_step=5)  # stops after step 5: its newest checkpoint is step 4
    b.run()
    b.metrics.close()
    path = tmp_path / "part" / "checkpoint-00000004.pt"
    state = load_checkpoint(path)
    assert state["step"] == 4 and state["recorder"][0]["loss_sum"] == sum(full.losses[:4])

    again = Recorder()
    c = _loop(tmp_path / "part", [again], seed=123)  # other initial weights: all must come from the file
    c.load_state_dict(state, path=path)
    c.metrics = MetricsLogger(tmp_path / "part", tensorboard=False, resume_from=c.step)
    c.run()
    c.metrics.close()
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, c.model.state_dict()[key]), key
    assert again.loss_sum == full.loss_sum
    assert again.calls[0] == ("start", 4)

    def records(run: str) -> list[dict[str, Any]]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in lines]
    assert records("part") == records("full") and [r["step"] for r in records("full")] == [2, 4, 6]


def test_on_loss_changes_what_is_backpropagated(tmp_path: Path) -> None:
    class Zero(Hook):
        def on_loss(self, loop: Loop, loss: torch.Tensor, micro: int) -> torch.Tensor:
            return loss * 0.0  # no gradient: AdamW's update is then only weight decay

    plain, zeroed = _loop(tmp_path / "a", []), _loop(tmp_path / "b", [Zero()])
    before = {k: v.clone() for k, v in zeroed.model.state_dict().items()}
    plain.run()
    zeroed.run()
    decay = torch.prod(torch.tensor([1 - 0.1 * (1 - s / 6) * 0.01 for s in range(6)]))
    assert torch.allclose(zeroed.model.weight, before["weight"] * decay)
    assert not torch.allclose(plain.model.weight, zeroed.model.weight)


def test_lr_scale_multiplies_the_schedule(tmp_path: Path) -> None:
    class Half(Hook):
        def lr_scale(self, step: int) -> float:
            return 0.5 if step >= 3 else 1.0

    lrs = []

    class Lrs(Hook):
        def on_step(self, loop: Loop, loss: torch.Tensor, norm: torch.Tensor) -> None:
            lrs.append(loop.optimizer.param_groups[0]["lr"])

    _loop(tmp_path, [Half(), Lrs()]).run()
    assert lrs == pytest.approx([0.1 * (1 - s / 6) * (0.5 if s >= 3 else 1.0) for s in range(6)])


def test_rewind_restarts_the_data_and_skips_the_rest_of_the_step(tmp_path: Path) -> None:
    """A hook that rewinds at a check point (as recovery does) sends the loop back: the steps after it
    are trained again from the same data position, and no checkpoint is written for the bad step."""
    class Rewind(Hook):
        def __init__(self) -> None:
            self.saved: dict[str, Any] | None = None
            self.done = False
            self.seen_steps: list[int] = []

        def on_step(self, loop: Loop, loss: torch.Tensor, norm: torch.Tensor) -> None:
            self.seen_steps.append(loop.step)

        def on_verified(self, loop: Loop) -> None:
            if loop.step == 2:
                self.saved = {"model": {k: v.clone() for k, v in loop.model.state_dict().items()},
                              "optimizer": copy.deepcopy(loop.optimizer.state_dict()), "window": loop.meter.state_dict(cpu=True)}

        def on_check(self, loop: Loop) -> None:
            if loop.step == 4 and not self.done:
                self.done = True
                loop.model.load_state_dict(self.saved["model"])
                loop.optimizer.load_state_dict(self.saved["optimizer"])
                loop.rewind(2, self.saved["window"])

    hook = Rewind()
    rec = Recorder()
    loop = _loop(tmp_path / "r", [hook, rec])
    loop.run()
    assert hook.seen_steps == [0, 1, 2, 3, 2, 3, 4, 5]
    assert ("log", 4) in rec.calls and rec.calls.count(("check", 4)) == 1  # the rewinding hook ran first
    plain = _loop(tmp_path / "p", [])
    plain.run()
    assert torch.equal(plain.model.weight, loop.model.weight)  # the replay trains the same batches


def test_an_error_at_a_check_point_leaves_no_checkpoint_of_that_step(tmp_path: Path) -> None:
    class Stop(Hook):
        def on_check(self, loop: Loop) -> None:
            if loop.step == 4:
                raise RuntimeError("bad step")

    rec = Recorder()
    with pytest.raises(RuntimeError, match="bad step"):
        _loop(tmp_path, [Stop(), rec]).run()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*.pt")) == ["checkpoint-00000002.pt",
                                                                      "checkpoint-00000003.pt"]
    assert rec.calls[-1] == ("end", 4)  # on_end runs in a finally


def test_keyboard_interrupt_carries_the_step(tmp_path: Path) -> None:
    class CtrlC(Hook):
        def on_step_end(self, loop: Loop) -> None:
            if loop.step == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as err:
        _loop(tmp_path, [CtrlC()]).run()
    assert err.value.step == 3


@pytest.mark.parametrize(("warmup", "total", "fitted"), [(40, 400, 40), (4, 8, 4), (5, 8, 1), (880, 8, 1),
                                                          (1500, 300, 30), (3, 1, 0)])
def test_a_warmup_longer_than_half_the_run_is_fitted(warmup: int, total: int, fitted: int,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from milan.train.schedule import fit_warmup

    log = logging.getLogger("milan.test")
    with caplog.at_level(logging.WARNING, logger="milan.test"):
        assert fit_warmup(warmup, total, key="optim.warmup_epochs", log=log) == fitted
    assert ("optim.warmup_epochs gives a warm-up of" in caplog.text) == (fitted != warmup)


def test_a_short_pretrain_run_reaches_the_peak_lr(shapes_root: Path, tmp_path: Path) -> None:
    """The issue's case: a recipe's 40-epoch warm-up kept for an 8-step run. The lr reaches its peak."""
    from _pretrain_cli import pretrain_args
    from milan.tools.cli import main as cli

    out = tmp_path / "run"
    cli(pretrain_args(shapes_root, out, "optim.steps=8", "optim.warmup_steps=null", "optim.warmup_epochs=40",
                      "optim.lr=1e-3"))
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(lrs) == pytest.approx(1e-3, rel=0.05)


def test_no_host_sync_between_check_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between check points the loop (and the hooks every recipe runs) reads no tensor value on the
    host: losses, gradient norms and window sums stay on the device until a check or log point (on a
    GPU each read would wait for the step to finish)."""
    from types import SimpleNamespace

    from milan.train.hooks import Preemption
    from milan.train.recover import DebugConfig, RecoverConfig, RecoveryHook

    reads: list[int] = []
    holder: dict[str, Loop] = {}

    def counting(name: str):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename  # milan's code, not torch's (AdamW reads its CPU step count)
            if "loop" in holder and not holder["loop"].is_check(holder["loop"].step) and "/milan/" in caller:
                reads.append((holder["loop"].step, caller, sys._getframe(1).f_lineno))
            return original(self, *args, **kwargs)
        return read

    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    run = SimpleNamespace(preempt_signals=["SIGTERM"], preempt_every=10)
    hooks = [RecoveryHook(RecoverConfig(), DebugConfig(), run_dir=tmp_path, fix="", precision="fp32", info=INFO),
             Preemption.of_run(run, tmp_path)]
    loop = _loop(tmp_path, hooks)
    loop.log_every, loop.checkpoints.every, loop.checkpoints.at_epoch_end = 6, 0, False
    holder["loop"] = loop
    loop.run()
    assert loop.step == 6 and reads == []
