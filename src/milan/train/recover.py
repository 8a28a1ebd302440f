"""Pretraining that survives instability: detect a bad step, roll back, skip batches, retry.

    every optimizer step (on device, no sync)   Detector.update(step, loss, grad_norm)
    at check points (a sync paid anyway)        Detector.agree() → (first bad step, cause), on every rank
    a bad step                                  Recovery.fail(...) → an event: roll back to the newest
                                                Snapshot, skip batches, scale the lr down for a while,
                                                maybe leave fp16; or TrainingError after max_retries

Nothing here draws random numbers or changes a tensor the run trains with, so a run that never
meets a bad step is bit-identical with recovery on or off. Everything a resumed run needs to
repeat the same decisions (events so far, data offset, lr window, retries, injections fired,
precision, the detector's loss history) is plain builtins and tensors: `Recovery.state_dict` and
`Detector.state_dict` go into the checkpoint and load with `weights_only=True`.

Data positions. The run's data order is a pure function of (seed, epoch, index); "global batch g"
is the g-th optimizer-step batch of that order (epoch g // steps_per_epoch, batch g % steps_per_epoch
of it: batch_size × accum_steps images per process, from every process). Step s trains on
`Recovery.position(s)`: the (s + offset)-th batch of the order with `debug.skip_batches` removed.
Each rollback raises `offset`, so the skipped batches are never trained on and everything after
them moves up; the events name the global batches skipped.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from milan.errors import TrainingError
from milan.train import distributed as distr
from milan.train.loop import Hook, Loop

_log = logging.getLogger("milan")

__all__ = ["RecoverConfig", "DebugConfig", "RecoveryHook", "non_finite_guard", "CAUSES", "Detector", "Snapshot", "take_snapshot", "restore_snapshot", "snapshot_payload",
           "snapshot_from_payload", "Recovery", "write_events", "append_event", "describe"]

#: Detector cause codes; a larger code wins when two causes hit the same step.
CAUSES = {1: "loss_spike", 2: "grad_spike", 3: "nonfinite_grad", 4: "nonfinite_loss"}
_BIG = 1 << 40  # steps stay far below this; the agreed key is (_BIG - step) · 8 + cause


def describe(cause: str, *, loss_z: float | None = None, grad_z: float | None = None) -> str:
    """What happened, as the start of a sentence ("loss became NaN/inf")."""
    return {
        "nonfinite_loss": "loss became NaN/inf",
        "nonfinite_grad": "gradients became NaN/inf",
        "loss_spike": f"loss spiked above its running mean + {loss_z}·std (recover.loss_spike_z)",
        "grad_spike": f"gradient norm spiked above its running mean + {grad_z}·std (recover.grad_spike_z)",
    }[cause]


class _History:
    """The last `size` values of a per-step scalar, on device; non-finite values are kept out."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.values = torch.zeros(size, device=device)
        self.valid = torch.zeros(size, dtype=torch.bool, device=device)
        self.count = 0  # values pushed so far (host int: the step count is known on the host)

    def above(self, value: torch.Tensor, z: float) -> torch.Tensor:
        """Device bool: `value` > mean + z·std of the window (False while it holds < 2 values)."""
        n = self.valid.sum()
        kept = torch.where(self.valid, self.values, torch.zeros_like(self.values))
        mean = kept.sum() / n.clamp_min(1)
        dev = torch.where(self.valid, self.values - mean, torch.zeros_like(self.values))
        std = (dev.square().sum() / (n - 1).clamp_min(1)).sqrt()
        limit = mean + z * std + 1e-6 * mean.abs()  # (a window of equal values does not flag float noise)
        return (n >= 2) & torch.isfinite(value) & (value > limit)

    def push(self, value: torch.Tensor) -> None:
        i = self.count % self.values.numel()
        ok = torch.isfinite(value)
        self.values[i] = torch.where(ok, value, torch.zeros_like(value))
        self.valid[i] = ok
        self.count += 1

    def state_dict(self) -> dict[str, Any]:
        return {"values": self.values.detach().cpu(), "valid": self.valid.detach().cpu(), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["values"].shape != self.values.shape:  # spike_window changed: start the window afresh
            self.values.zero_(), self.valid.zero_()
            self.count = 0
            return
        self.values.copy_(state["values"]), self.valid.copy_(state["valid"])
        self.count = int(state["count"])


class Detector:
    """Notices the first bad optimizer step without a host sync; `agree` reads it on every rank.

    A step is bad when its loss is NaN/inf; when its gradients are (unless a GradScaler is active:
    then an overflow is the scaler's to handle — it skips that step and lowers its scale); and,
    when turned on, when its loss (`loss_z`) or pre-clip gradient norm (`grad_z`) exceeds the mean
    + z·std of the previous `window` steps, once `warmup` steps have been seen. Losses are this
    rank's (its share of the batch); the gradient norm is the same on every rank.
    """

    def __init__(self, device: torch.device, *, loss_z: float | None = None, grad_z: float | None = None,
                 window: int = 100, warmup: int = 100) -> None:
        self.first = torch.full((), -1, dtype=torch.long, device=device)  # first bad step, or -1
        self.cause = torch.zeros((), dtype=torch.long, device=device)
        self.z = {"loss": loss_z, "grad": grad_z}
        self.warmup = warmup
        self.history = {name: _History(window, device) for name, z in self.z.items() if z is not None}

    def update(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None, *,
               scaler_active: bool = False) -> None:
        loss = loss.detach().float()
        code = torch.where(torch.isfinite(loss), 0, 4)
        if grad_norm is not None:
            grad_norm = grad_norm.detach().float()
            if not scaler_active:
                code = torch.maximum(code, torch.where(torch.isfinite(grad_norm), 0, 3))
        for name, value, spike in (("loss", loss, 1), ("grad", grad_norm, 2)):
            history = self.history.get(name)
            if history is None or value is None:
                continue
            if history.count >= self.warmup:
                code = torch.maximum(code, torch.where(history.above(value, self.z[name]), spike, 0))
            history.push(value)
        new = (self.first < 0) & (code > 0)
        self.first = torch.where(new, step, self.first)
        self.cause = torch.where(new, code, self.cause)

    def agree(self) -> tuple[int, str] | None:
        """(first bad step, cause) over all ranks — the earliest step, the gravest cause at it — or
        None when every rank's steps were good. A collective: every rank calls it at the same steps."""
        key = torch.where(self.first >= 0, (_BIG - self.first) * 8 + self.cause, torch.zeros_like(self.first))
        key = int(distr.all_reduce_max(key))
        if key == 0:
            return None
        return _BIG - key // 8, CAUSES[key % 8]

    def reset(self) -> None:
        self.first.fill_(-1)
        self.cause.zero_()

    def state_dict(self) -> dict[str, Any]:
        """The spike windows (the bad-step marks are not kept: checkpoints follow a good check)."""
        return {name: history.state_dict() for name, history in self.history.items()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        for name, history in self.history.items():
            if state and name in state:
                history.load_state_dict(state[name])


# --- snapshots -------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """An in-memory copy (CPU) of the run at a step verified good: what a rollback returns to."""

    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scaler: dict[str, Any]
    window: dict[str, Any]  # this rank's open log window (loss/grad sums, counts)
    detector: dict[str, Any]  # this rank's spike windows

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in _tensors((self.model, self.optimizer)))


def _tensors(tree: Any):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, list | tuple):
        for value in tree:
            yield from _tensors(value)


def _copy_tree(tree: Any, into: Any = None, *, pin: bool = False) -> Any:
    """A CPU copy of a nested dict/list of tensors and builtins, reusing `into`'s tensors where the
    shapes match (no new allocation at each snapshot). `pin`: page-locked buffers and asynchronous
    copies from the GPU (the caller synchronises once)."""
    if isinstance(tree, torch.Tensor):
        src = tree.detach()
        if (isinstance(into, torch.Tensor) and into.shape == src.shape and into.dtype == src.dtype
                and into.device.type == "cpu"):
            out = into
        else:
            out = torch.empty(src.shape, dtype=src.dtype, device="cpu",
                              pin_memory=pin and src.device.type == "cuda")
        out.copy_(src, non_blocking=pin)
        return out
    if isinstance(tree, dict):
        return {k: _copy_tree(v, into.get(k) if isinstance(into, dict) else None, pin=pin) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        olds = into if isinstance(into, list | tuple) and len(into) == len(tree) else [None] * len(tree)
        return type(tree)(_copy_tree(v, o, pin=pin) for v, o in zip(tree, olds))
    return copy.deepcopy(tree)


def take_snapshot(step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: Any,
                  window: dict[str, Any], detector: Detector, reuse: Snapshot | None = None) -> Snapshot:
    """Copy the run's state at `step` to CPU memory (reusing `reuse`'s buffers). Reads only: no RNG,
    no change to any tensor the run trains with."""
    device = next(model.parameters()).device
    pin = device.type == "cuda"
    snap = Snapshot(
        step=step,
        model=_copy_tree(model.state_dict(), reuse.model if reuse else None, pin=pin),
        optimizer=_copy_tree(optimizer.state_dict(), reuse.optimizer if reuse else None, pin=pin),
        scaler=copy.deepcopy(scaler.state_dict()),
        window=_copy_tree(window),
        detector=detector.state_dict(),
    )
    if pin:
        torch.cuda.synchronize(device)
    return snap


def restore_snapshot(snap: Snapshot, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scaler: Any) -> None:
    """Put `snap`'s weights, optimizer and scaler state back (the snapshot itself stays intact)."""
    model.load_state_dict(snap.model)
    optimizer.load_state_dict(_copy_tree(snap.optimizer))  # a copy: the optimizer updates its state in place
    if scaler.is_enabled() and snap.scaler:
        scaler.load_state_dict(snap.scaler)


def snapshot_payload(snap: Snapshot, windows: list[dict[str, Any]], detectors: list[dict[str, Any]]) -> dict[str, Any]:
    """`snap` as checkpoint payload, with every rank's window and detector state (rank order)."""
    return {"step": snap.step, "model": snap.model, "optimizer": snap.optimizer, "scaler": snap.scaler,
            "windows": windows, "detectors": detectors}


def snapshot_from_payload(payload: dict[str, Any] | None, rank: int, world_size: int) -> Snapshot | None:
    if not payload or len(payload.get("windows") or []) != world_size:
        return None
    return Snapshot(payload["step"], payload["model"], payload["optimizer"], payload["scaler"],
                    payload["windows"][rank], payload["detectors"][rank])


# --- what to do about a bad step -------------------------------------------------------------------


class Recovery:
    """The run's recovery state and decisions (identical on every rank), and the fault injection.

    Args:
        recover: the `recover` config section (`RecoverConfig`).
        debug: the `debug` config section (`DebugConfig`).
        precision: the run's resolved precision (bf16 | fp16 | fp32).
        rank: this process (for `debug.nan_rank`).
    """

    def __init__(self, recover: Any, debug: Any, *, precision: str, rank: int = 0) -> None:
        self.cfg, self.debug, self.rank = recover, debug, rank
        self.events: list[dict[str, Any]] = []
        self.offset = 0  # batches skipped by rollbacks so far (in the order without debug.skip_batches)
        self.lr_factor, self.lr_until = 1.0, 0  # the lr is × lr_factor for steps < lr_until
        self.failures: list[int] = []  # first bad steps of the failures rolled back so far
        self.fired: set[int] = set()  # injection steps that ran
        self.run_precision = precision
        self.fallback: str | None = None  # recover.fallback_precision, once a rollback switched to it
        self._skip = sorted(set(debug.skip_batches))
        self._nan, self._spike = set(debug.nan_at_steps), set(debug.spike_at_steps)

    @property
    def precision(self) -> str:
        """The precision the run trains in now: run.precision until a rollback falls back."""
        return self.fallback or self.run_precision

    # data order
    def _global(self, index: int) -> int:
        """The index-th global batch of the order without debug.skip_batches."""
        for skipped in self._skip:
            if skipped > index:
                break
            index += 1
        return index

    def position(self, step: int) -> int:
        """The global batch optimizer step `step` trains on."""
        return self._global(step + self.offset)

    # lr
    def lr_scale(self, step: int) -> float:
        return self.lr_factor if step < self.lr_until else 1.0

    # fault injection (debug)
    def injection(self, step: int) -> float | None:
        """The factor to multiply this step's loss by (NaN, spike_factor), or None."""
        if step in self.fired and not self.debug.repeat:
            return None
        if step in self._nan and (self.debug.nan_rank is None or self.debug.nan_rank == self.rank):
            return math.nan
        if step in self._spike:
            return self.debug.spike_factor
        return None

    def ran(self, step: int) -> None:
        """Optimizer step `step` was run (an injection listed for it has fired)."""
        if step in self._nan or step in self._spike:
            self.fired.add(step)

    # the decision
    def fail(self, first: int, cause: str, *, detected_at: int, snapshot_step: int,
             last_checkpoint: str | None) -> dict[str, Any]:
        """Record a failure found at `detected_at` (first bad step `first`) and return its event: a
        rollback to `snapshot_step` (the caller restores the snapshot and applies `precision`), or,
        once more than `max_retries` failures fall within `retry_window` steps, a stop (action
        "stop"; its "message" is the TrainingError the caller raises)."""
        cfg = self.cfg
        recent = [f for f in self.failures if abs(first - f) < cfg.retry_window]
        if len(recent) >= cfg.max_retries:
            event = {"step": first, "event": cause, "action": "stop", "detected_at": detected_at,
                     "retry": len(recent) + 1, "last_checkpoint": last_checkpoint,
                     "message": self.give_up_message(first, cause, detected_at, len(recent), last_checkpoint),
                     "time": round(time.time(), 3)}
            self.events.append(event)
            return event
        self.failures.append(first)
        old = self.offset
        new = old + cfg.skip_batches if cfg.skip_batches is not None else first + old + 1 - snapshot_step
        skipped = [self._global(i) for i in range(snapshot_step + old, snapshot_step + new)]
        self.offset = new
        if cfg.lr_scale_steps > 0 and cfg.lr_scale != 1.0:
            self.lr_factor = (self.lr_factor if first < self.lr_until else 1.0) * cfg.lr_scale
            self.lr_until = snapshot_step + cfg.lr_scale_steps
        event: dict[str, Any] = {
            "step": first, "event": cause, "action": "rollback", "detected_at": detected_at,
            "rolled_back_to": snapshot_step, "batches_skipped": skipped, "lr_scale": self.lr_scale(snapshot_step),
            "lr_scale_until": self.lr_until, "retry": len(recent) + 1,
        }
        if cfg.fallback_precision is not None and self.precision != cfg.fallback_precision:
            event["precision"] = [self.precision, cfg.fallback_precision]
            self.fallback = cfg.fallback_precision
        event["time"] = round(time.time(), 3)
        self.events.append(event)
        return event

    def give_up_message(self, first: int, cause: str, detected_at: int, retries: int,
                        last_checkpoint: str | None) -> str:
        cfg = self.cfg
        what = describe(cause, loss_z=cfg.loss_spike_z, grad_z=cfg.grad_spike_z)
        again = (f"after {retries} rollback(s) within {cfg.retry_window} steps (recover.max_retries={cfg.max_retries}, "
                 f"recover.retry_window={cfg.retry_window})" if retries else
                 f"and recover.max_retries={cfg.max_retries} allows no rollback")
        ckpt = last_checkpoint or "none (this run has written none; it would start over)"
        return (f"{what} at step {first} (found at step {detected_at}), {again}; gave up. No checkpoint was written "
                f"after step {first}; the last good checkpoint is {ckpt}. Try: a lower optim.lr (or optim.base_lr), "
                "optim.clip_grad=1.0, run.precision=bf16 or fp32 (or recover.fallback_precision), more "
                "recover.skip_batches, a smaller recover.lr_scale or a larger recover.max_retries; then rerun "
                "the same command to resume from that checkpoint (run.resume=auto)")

    # summary and state
    def summary(self) -> dict[str, int]:
        rollbacks = [e for e in self.events if e["action"] == "rollback"]
        return {"events": len(self.events), "rollbacks": len(rollbacks),
                "batches_skipped": sum(len(e["batches_skipped"]) for e in rollbacks)}

    def state_dict(self) -> dict[str, Any]:
        return {"events": copy.deepcopy(self.events), "offset": self.offset, "lr_factor": self.lr_factor,
                "lr_until": self.lr_until, "failures": list(self.failures), "fired": sorted(self.fired),
                "fallback": self.fallback}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        self.events = copy.deepcopy(state["events"])
        self.offset, self.lr_factor, self.lr_until = state["offset"], state["lr_factor"], state["lr_until"]
        self.failures, self.fired = list(state["failures"]), set(state["fired"])
        self.fallback = state["fallback"]


def write_events(run_dir: str | Path, events: list[dict[str, Any]]) -> Path:
    """(Re)write `run_dir/events.jsonl` with `events` (atomic): a resumed run's file holds exactly
    the events of its checkpoint, then appends its own."""
    path = Path(run_dir) / "events.jsonl"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(e) + "\n" for e in events))
    tmp.replace(path)
    return path


def append_event(run_dir: str | Path, event: dict[str, Any]) -> None:
    with (Path(run_dir) / "events.jsonl").open("a") as f:
        f.write(json.dumps(event) + "\n")


# --- the config sections (pretrain's `recover` and `debug`) ----------------------------------------


@dataclass
class RecoverConfig:
    """Automatic recovery from instability (docs/RECOVERY.md). At check points (a sync the run pays
    anyway) every rank agrees on the first bad step; the run then rolls back to the newest in-memory
    snapshot taken at a step verified good, skips batches, scales the lr down for a while and goes
    on; more than `max_retries` failures within `retry_window` steps stop it with a TrainingError.
    No checkpoint is ever written after a bad step. A run without bad steps is bit-identical with
    `enabled` true or false."""

    enabled: bool = True  # false: the first bad step stops the run (TrainingError), as before
    check_every: int | None = None  # steps between checks (one all-reduce + host sync); None: run.log_every
    snapshot_every: int = 100  # steps between snapshots (CPU copy of model, optimizer, scaler; also at checkpoints)
    skip_batches: int | None = None  # batches skipped after a rollback; None: the snapshot's through the first bad one
    lr_scale: float = 0.5  # lr × this after a rollback (compounding if a step inside the window fails again)
    lr_scale_steps: int = 100  # for this many steps from the snapshot rolled back to (0: never scale)
    fallback_precision: Literal["bf16", "fp32"] | None = None  # switch to it at the first rollback (e.g. from fp16)
    max_retries: int = 3  # rollbacks allowed within retry_window steps; the next failure stops the run
    retry_window: int = 1000  # steps
    loss_spike_z: float | None = None  # flag a loss above mean + z·std of the last spike_window steps (None: off)
    grad_spike_z: float | None = None  # the same test on the pre-clip gradient norm (None: off)
    spike_window: int = 100  # steps in the running mean/std of the spike tests
    spike_warmup: int = 100  # steps seen before the spike tests start


@dataclass
class DebugConfig:
    """Fault injection, to test a recovery set-up (docs/RECOVERY.md); leave empty for real runs. Steps
    count from 0 like the lr schedule: step k is the optimizer step logged as step k + 1."""

    nan_at_steps: list[int] = field(default_factory=list)  # multiply the loss by NaN at these optimizer steps
    nan_rank: int | None = None  # only on this rank (None: every rank)
    spike_at_steps: list[int] = field(default_factory=list)  # multiply the loss by spike_factor at these steps
    spike_factor: float = 1000.0
    repeat: bool = False  # false: a listed step fires once (its replay after a rollback is clean); true: every time
    skip_batches: list[int] = field(default_factory=list)  # global batches the data order passes over



# --- the loop's hook -------------------------------------------------------------------------------


class RecoveryHook(Hook):
    """Instability recovery (and fault injection) as a hook of the training loop.

    on_loss: `debug.*` injections · lr_scale: the window after a rollback · on_step: the detector
    (device only) · on_check: every rank agrees on the first bad step → roll back (or stop) ·
    on_verified: snapshots · checkpoint entry "recover": decisions, detectors, the carried snapshot.
    With `recover.enabled=false` it is the plain non-finite guard: the first bad step raises a
    `TrainingError` naming `fix`, and no checkpoint is ever written after a bad step.

    Args:
        recover: the `recover` config section (`RecoverConfig`).
        debug: the `debug` config section (`DebugConfig`).
        run_dir: the run folder (events.jsonl).
        fix: what the stop message advises.
    """

    def __init__(self, recover: Any, debug: Any, *, run_dir: Path, fix: str, precision: str,
                 info: distr.DistInfo) -> None:
        self.cfg, self.run_dir, self.fix, self.info = recover, Path(run_dir), fix, info
        self.recovery = Recovery(recover, debug, precision=precision, rank=info.rank)
        self.detector = Detector(info.device, loss_z=recover.loss_spike_z, grad_z=recover.grad_spike_z,
                                 window=recover.spike_window, warmup=recover.spike_warmup)
        self.snapshot: Snapshot | None = None  # the newest in-memory snapshot: where a rollback returns to
        self.check_every = recover.check_every or 0
        self._cost_logged = False

    def _is_snapshot_point(self, loop: Loop, step: int) -> bool:  # a function of the step: resumes snapshot alike
        return step % self.cfg.snapshot_every == 0 or loop.checkpoints.regular(step, loop.data.steps_per_epoch)

    def on_start(self, loop: Loop) -> None:
        loop.position = self.recovery.position  # rollbacks and debug.skip_batches move the data order
        if self.info.is_main and (self.cfg.enabled or (self.run_dir / "events.jsonl").is_file()):
            # a resumed run's file: its checkpoint's events, then its own (none on a fresh start, even
            # with recovery off: an earlier attempt's file in this folder is not this run's)
            write_events(self.run_dir, self.recovery.events)
        if self.cfg.enabled and self.snapshot is None:  # the state the run starts from: the first target
            self.snapshot = take_snapshot(loop.step, model=loop.model, optimizer=loop.optimizer, scaler=loop.scaler,
                                          window=loop.meter.state_dict(), detector=self.detector)

    def on_loss(self, loop: Loop, loss: torch.Tensor, micro: int) -> torch.Tensor:
        inject = self.recovery.injection(loop.step)  # debug.nan_at_steps / spike_at_steps
        if inject is None:
            return loss
        if micro == 0:
            _log.warning("debug: step %d: loss × %g on rank %d", loop.step, inject, self.info.rank)
        return loss * inject

    def lr_scale(self, step: int) -> float:
        return self.recovery.lr_scale(step)

    def on_step(self, loop: Loop, loss: torch.Tensor, norm: torch.Tensor) -> None:
        self.detector.update(loop.step, loss, norm, scaler_active=loop.scaler.is_enabled())
        self.recovery.ran(loop.step)

    def wants_check(self, loop: Loop, step: int) -> bool:
        # (snapshot points are regular checkpoints or multiples of snapshot_every: see on_verified)
        return self.cfg.enabled and ((self.check_every and step % self.check_every == 0)
                                     or step % self.cfg.snapshot_every == 0)

    def on_check(self, loop: Loop) -> None:
        bad_step = self.detector.agree()  # the same answer on every rank
        if bad_step is None:
            return
        first, cause = bad_step
        rc = self.cfg
        what = describe(cause, loss_z=rc.loss_spike_z, grad_z=rc.grad_spike_z)
        if not rc.enabled:
            raise TrainingError(f"{what} at step {first}; no checkpoint was written after it. {self.fix}")
        snapshot = self.snapshot
        event = self.recovery.fail(first, cause, detected_at=loop.step, snapshot_step=snapshot.step,
                                   last_checkpoint=loop.last_checkpoint)
        if self.info.is_main:
            loop.metrics.log(first, **{k: v for k, v in event.items() if k not in ("step", "time")})
            append_event(self.run_dir, event)
        if event["action"] == "stop":
            raise TrainingError(event["message"])
        loop.set_precision(self.recovery.precision)  # recover.fallback_precision
        restore_snapshot(snapshot, model=loop.model, optimizer=loop.optimizer, scaler=loop.scaler)
        self.detector.reset()
        self.detector.load_state_dict(snapshot.detector)
        loop.rewind(snapshot.step, snapshot.window)
        if self.info.is_main:
            lr_note = (f", lr × {event['lr_scale']:g} until step {event['lr_scale_until']}"
                       if event["lr_scale"] != 1.0 else "")
            if "precision" in event:
                lr_note += f", precision {' → '.join(event['precision'])}"
            _log.warning("step %d: %s (found at step %d); rolled back to step %d, skipped %d batch(es) %s%s "
                         "(retry %d of %d)", first, what, event["detected_at"], snapshot.step,
                         len(event["batches_skipped"]), _spans(event["batches_skipped"]), lr_note, event["retry"],
                         rc.max_retries)

    def on_verified(self, loop: Loop) -> None:
        if not (self.cfg.enabled and self._is_snapshot_point(loop, loop.step)):
            return
        start = time.perf_counter()  # verified good: the state a checkpoint has
        self.snapshot = take_snapshot(loop.step, model=loop.model, optimizer=loop.optimizer, scaler=loop.scaler,
                                      window=loop.meter.state_dict(), detector=self.detector, reuse=self.snapshot)
        if self.info.is_main and not self._cost_logged:
            self._cost_logged = True
            _log.info("recover: a snapshot holds %.1f MiB of CPU memory per process and took %.1f ms (every %d "
                      "steps and at checkpoints)", self.snapshot.nbytes() / 2**20,
                      1e3 * (time.perf_counter() - start), self.cfg.snapshot_every)

    def _carry(self, loop: Loop) -> bool:
        # a checkpoint between snapshot points (a pause) carries the newest snapshot, so that a
        # resumed run rolls back where an uninterrupted one would
        return self.snapshot is not None and self.snapshot.step != loop.step

    def rank_state(self, loop: Loop) -> Any:
        snap = self.snapshot
        return self.detector.state_dict(), ((snap.window, snap.detector) if self._carry(loop) else None)

    def state_dict(self, loop: Loop, ranks: list[Any]) -> dict[str, Any]:
        carried = self._carry(loop)
        return {"recover": {
            "state": self.recovery.state_dict(), "detector": [r[0] for r in ranks],
            "snapshot": snapshot_payload(self.snapshot, [r[1][0] for r in ranks], [r[1][1] for r in ranks])
            if carried else None,
        }}

    def load_state_dict(self, loop: Loop, checkpoint: dict[str, Any]) -> None:
        rank, world_size = loop.info.rank, loop.info.world_size
        saved = checkpoint.get("recover") or {}
        self.recovery.load_state_dict(saved.get("state"))  # events, data offset, lr window, retries, precision
        loop.set_precision(self.recovery.precision)  # a rollback before the checkpoint fell back from fp16
        detectors = saved.get("detector") or []
        if len(detectors) == world_size:
            self.detector.load_state_dict(detectors[rank])
        if self.cfg.enabled:  # a checkpoint between snapshot points carries the snapshot a rollback would use
            self.snapshot = snapshot_from_payload(saved.get("snapshot"), rank, world_size)


def _spans(batches: list[int]) -> str:
    """[3, 4, 5, 9] → "3–5, 9" (for one log line)."""
    spans: list[list[int]] = []
    for b in batches:
        if spans and b == spans[-1][1] + 1:
            spans[-1][1] = b
        else:
            spans.append([b, b])
    return "[" + ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in spans) + "]"


def non_finite_guard(*, run_dir: Path, info: distr.DistInfo, precision: str, fix: str) -> RecoveryHook:
    """The hook of a recipe without recovery: the first NaN/inf loss or gradient stops the run at the
    next check point (`TrainingError` naming `fix`), before any checkpoint of a later step."""
    return RecoveryHook(RecoverConfig(enabled=False), DebugConfig(), run_dir=run_dir, info=info,
                        precision=precision, fix=fix)
