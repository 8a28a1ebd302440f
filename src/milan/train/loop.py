"""The one training loop every recipe runs, its state on one object, its concerns as hooks.

    for each optimizer step s (data position p = loop.position(s)):
        for each micro-batch of p:   loss = train_step(batch)  ─► hooks.on_loss  ─► scale(loss/accum).backward()
                                     (DDP no_sync on all but the last micro-batch)
        lr = schedule(s) × hooks.lr_scale ─► unscale ─► clip / grad norm ─► optimizer step ─► hooks.on_step
        s += 1
        check point?   hooks.on_check          (one sync paid anyway: bad files, NaN/spike agreement, rollback)
        log step?      meter ─► metrics        (hooks.on_log add their fields)
        check point?   hooks.on_verified       (the step is known good: snapshots)
                       hooks.on_step_end       (own cadence: kNN monitor, evaluation every n steps)
        epoch end?     hooks.on_epoch_end      (evaluation per epoch)
        checkpoint?    save (atomic) ─► hooks.on_checkpoint
    hooks.on_end

What a recipe supplies: the model (and its DDP wrapper), the optimizer, a `train_step(batch, step=,
micro=) → loss` (pretrain: `milan.MILAN`; finetune: the classifier and its criterion; segment /
detect: the dense model), the data (`Data`), the lr schedule, the checkpoint policy
(`Checkpoints`), and its hooks. What the loop owns: accumulation with `no_sync`, the GradScaler,
clipping and the gradient norm, the lr, the log window (`Meter`), the progress bar, checkpoint
cadence and the atomic save, exact resume. Exact resume is `Loop.state_dict` saved and
`Loop.load_state_dict` read back: the step, every rank's RNG and open log window, the model,
optimizer and scaler, and what every hook keeps.

Nothing here syncs the host per step: the loss, the gradient norm and the window sums stay on the
device until a check or log point, where the run pays one collective anyway.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from milan.train import distributed as distr
from milan.train.checkpoint import CheckpointRecord, prune_checkpoints, save_checkpoint
from milan.train.log import MetricsLogger, progress
from milan.train.run import AMP_DTYPES, grad_norm, restore_rng, rng_state, set_lr

__all__ = ["Hook", "Data", "Checkpoints", "Meter", "Loop", "EpochLoader", "Preempted", "EXIT_PREEMPTED"]

#: The exit status of a command stopped by preemption after its checkpoint: rerun it to resume
#: (EX_TEMPFAIL: "try again later"; the SLURM script requeues on it).
EXIT_PREEMPTED = 75


class Preempted(Exception):  # noqa: N818 (not an error: the run stopped on request, resumable)
    """The loop stopped on request (a preemption signal) after writing the checkpoint of `step`."""

    exit_status = EXIT_PREEMPTED

    def __init__(self, step: int, checkpoint: str, reason: str) -> None:
        super().__init__(f"{reason}: stopped at step {step} after writing {checkpoint}; rerun the same command to "
                         "resume from it")
        self.step, self.checkpoint, self.reason = step, checkpoint, reason


class Hook:
    """A concern that is not the training algorithm, called at the loop's named events.

    Every method is optional. A hook keeps its own state; what a resumed run needs of it goes into
    the checkpoint through `rank_state` (small, gathered from every rank) and `state_dict` (rank 0,
    top-level checkpoint entries the hook owns), and comes back through `load_state_dict`.
    Events that run on every rank must do the same collectives on every rank.
    """

    def on_start(self, loop: Loop) -> None:
        """Before the first step (after a resume)."""

    def on_loss(self, loop: Loop, loss: torch.Tensor, micro: int) -> torch.Tensor:
        """Each micro-batch's loss, on device, before backward (fault injection multiplies it)."""
        return loss

    def lr_scale(self, step: int) -> float:
        """A factor on the scheduled lr of optimizer step `step` (recovery lowers it for a while)."""
        return 1.0

    def on_step(self, loop: Loop, loss: torch.Tensor, norm: torch.Tensor) -> None:
        """After each optimizer step `loop.step` (not yet counted): its summed loss and pre-clip gradient
        norm as device scalars. No host sync here."""

    def wants_check(self, loop: Loop, step: int) -> bool:
        """Whether step `step` (counted) must be a check point for this hook."""
        return False

    def on_check(self, loop: Loop) -> None:
        """At check points, on every rank (a collective is allowed). May call `loop.rewind`."""

    def on_log(self, loop: Loop, record: dict[str, Any]) -> None:
        """At log points: add this hook's fields to the metrics record (rank 0 writes it)."""

    def on_verified(self, loop: Loop) -> None:
        """At check points that passed: every step so far is known good."""

    def on_step_end(self, loop: Loop) -> None:
        """After each optimizer step's checks and log, before the epoch end and the checkpoint."""

    def on_epoch_end(self, loop: Loop, epoch: int) -> None:
        """After the last step of data epoch `epoch` (0-based), before that step's checkpoint."""

    def on_checkpoint(self, loop: Loop, path: Path) -> None:
        """After the loop wrote a checkpoint (rank 0 wrote `path`; every rank is called)."""

    def on_end(self, loop: Loop) -> None:
        """After the last step, or when the loop stops on an error (in a `finally`)."""

    def rank_state(self, loop: Loop) -> Any:
        """This rank's part of the hook's state, gathered from every rank at a checkpoint."""
        return None

    def state_dict(self, loop: Loop, ranks: list[Any]) -> dict[str, Any]:
        """The checkpoint entries this hook owns (rank 0; `ranks` = every rank's `rank_state`)."""
        return {}

    def load_state_dict(self, loop: Loop, checkpoint: dict[str, Any]) -> None:
        """Read this hook's entries back from a whole checkpoint (before the model, optimizer and scaler)."""


class Data(Protocol):
    """The training data as the loop sees it: `steps_per_epoch` optimizer steps per epoch, and the
    micro-batches of an epoch from one of its optimizer steps on. A batch is a tuple whose first item
    holds the images (the log counts them)."""

    steps_per_epoch: int

    def epoch(self, epoch: int, start: int) -> Iterable[Any]: ...


class EpochLoader:
    """`Data` from a sampler with `set_epoch(epoch, start_batch=, batch_size=)` (or a stream's
    `set_epoch(epoch, skip=)`) and its DataLoader."""

    def __init__(self, loader: Iterable[Any], set_epoch: Callable[[int, int], None], steps_per_epoch: int) -> None:
        self.loader, self.set_epoch, self.steps_per_epoch = loader, set_epoch, steps_per_epoch

    def epoch(self, epoch: int, start: int) -> Iterable[Any]:
        self.set_epoch(epoch, start)
        return self.loader


class Meter:
    """The open log window of this rank: loss and gradient-norm sums on the device (no sync per step),
    steps and images counted on the host. Saved in every checkpoint, so a resumed run logs the same
    averages as an uninterrupted one."""

    def __init__(self, device: torch.device, *, world_size: int = 1) -> None:
        self.world_size = world_size  # 1: no collective (also inside a process group, e.g. rank 0 alone)
        self.loss_sum = torch.zeros((), device=device)
        self.grad_sum = torch.zeros((), device=device)  # pre-clip norms of the window's finite steps
        self.grad_count = torch.zeros((), device=device)
        self.steps = 0
        self.seen = 0  # images this rank trained on, all run long (the bad-file threshold reads it)
        self.timed_steps = 0  # steps of the window run by this process (a resumed window's first part is not)
        self.start = time.perf_counter()
        self.extras: dict[str, torch.Tensor] = {}  # sums of the step's other scalars (loss terms), by name

    def add_loss(self, loss: torch.Tensor, extras: dict[str, torch.Tensor] | None = None) -> None:
        self.loss_sum += loss
        for name, value in (extras or {}).items():
            if name in self.extras:
                self.extras[name] += value
            else:
                self.extras[name] = value.detach().float().clone()

    def add_step(self, norm: torch.Tensor) -> None:
        finite = torch.isfinite(norm)  # not a scaler's overflow step
        self.grad_sum += torch.where(finite, norm, torch.zeros_like(norm))
        self.grad_count += finite
        self.steps += 1
        self.timed_steps += 1

    def reduce(self) -> tuple[float, float | None, dict[str, float]]:
        """(mean loss, mean pre-clip gradient norm or None, the extras' means) of the window over every
        rank (one collective)."""
        extras = [v / self.steps for v in self.extras.values()]
        stats = torch.stack([self.loss_sum / self.steps, self.grad_sum, self.grad_count, *extras])
        if self.world_size > 1:
            stats = distr.all_reduce_mean(stats)
        mean_loss, norm_sum, norm_count, *rest = (float(v) for v in stats)
        return mean_loss, (norm_sum / norm_count if norm_count > 0 else None), dict(zip(self.extras, rest))

    def reset(self) -> None:
        for value in self.extras.values():
            value.zero_()
        self.loss_sum.zero_()
        self.grad_sum.zero_()
        self.grad_count.zero_()
        self.steps, self.timed_steps, self.start = 0, 0, time.perf_counter()

    def pause(self) -> Callable[[], None]:
        """Time from now until the returned function is called is not training time (throughput)."""
        paused = time.perf_counter()

        def resume() -> None:
            self.start += time.perf_counter() - paused
        return resume

    def state_dict(self, *, cpu: bool = False) -> dict[str, Any]:
        sums = {k: getattr(self, k) for k in ("loss_sum", "grad_sum", "grad_count")}
        extras = dict(self.extras)
        if cpu:
            sums = {k: v.detach().cpu() for k, v in sums.items()}
            extras = {k: v.detach().cpu() for k, v in extras.items()}
        return {**sums, "extras": extras, "steps": self.steps, "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_sum.copy_(state["loss_sum"])
        if "grad_sum" in state:
            self.grad_sum.copy_(state["grad_sum"])
            self.grad_count.copy_(state["grad_count"])
        self.extras = {k: v.to(self.loss_sum.device).clone() for k, v in (state.get("extras") or {}).items()}
        self.steps, self.seen = state["steps"], state["seen"]
        self.timed_steps, self.start = 0, time.perf_counter()


@dataclass
class Checkpoints:
    """Where and when the loop saves, and what a recipe adds to every checkpoint.

    Args:
        run_dir: the run folder.
        kind: the recipe ("pretrain", "finetune", ...), recorded and checked on resume.
        config: the resolved config (a plain dict), recorded.
        identity: what must match to resume (model name, shapes), recorded.
        every: save every this many optimizer steps (0: never by count).
        at_epoch_end: also save after the last step of every epoch.
        at_last: also save after the run's last step.
        name: "step" → `checkpoint-<step>.pt` (pruned to `keep_last`, every `keep_every`-th kept);
            anything else is a fixed file name (e.g. "checkpoint-last.pt").
        extra: the recipe's own entries (spec, classes, evaluation results), called on rank 0.
        model_key: the entry that holds the trained module's state dict (linprobe: "head").
    """

    run_dir: Path
    kind: str
    config: dict[str, Any]
    identity: dict[str, Any]
    every: int = 0
    at_epoch_end: bool = True
    at_last: bool = True
    name: str = "step"
    keep_last: int = 2
    keep_every: int = 0
    extra: Callable[[], dict[str, Any]] | None = None
    model_key: str = "model"

    def path(self, step: int) -> Path:
        return self.run_dir / (f"checkpoint-{step:08d}.pt" if self.name == "step" else self.name)

    def regular(self, step: int, steps_per_epoch: int) -> bool:
        """A checkpoint every run writes at `step`, wherever it stops."""
        return bool(self.every and step % self.every == 0) or (self.at_epoch_end and step % steps_per_epoch == 0)


class Loop:
    """One training run's loop: its state (`step`, `meter`, the model/optimizer/scaler, the hooks')
    and `run()`.

    Args:
        info: this process (rank, world size, device); a world size of 1 runs no collective (a recipe
            whose rank 0 trains alone passes that).
        model: the trained module (unwrapped: its state dict and gradients).
        optimizer: its optimizer (param groups may carry a layer-decay `lr_scale`).
        train_step: `(batch, *, step, micro) → loss` (a device scalar; autocast inside), or
            `(loss, {name: term})` to log the terms' window means beside the loss.
        data: the training data (`Data`).
        schedule: optimizer step → lr (a pure function of the step).
        total_steps: the steps the schedule spans.
        last_step: where this run stops (≤ total_steps; `run.max_steps`).
        checkpoints: the checkpoint policy.
        metrics: the metrics logger (rank 0 writes; inactive elsewhere); may be set after a resume.
        ddp: the DDP wrapper of `model` (for `no_sync`), or None.
        accum_steps: micro-batches per optimizer step.
        clip_grad: max gradient norm, or None (the norm is still measured and logged).
        precision: bf16 | fp16 | fp32 (fp16 runs a GradScaler).
        batch_size: images per micro-batch per process (throughput in the log).
        log_every: steps between log points (also at the last step); 0: the recipe logs (per epoch).
        hooks: the run's hooks, called in this order at every event.
        on_precision: called with the new autocast dtype when a hook changes the precision.
        desc: the progress bar's label.
        log_epoch: put the data epoch in every log record (pretrain; finetune's epoch records are its
            evaluations).
        log_throughput: put images/s in every log record.
    """

    def __init__(self, *, info: distr.DistInfo, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 train_step: Callable[..., torch.Tensor], data: Data, schedule: Callable[[int], float],
                 total_steps: int, last_step: int, checkpoints: Checkpoints, metrics: MetricsLogger | None = None,
                 ddp: torch.nn.Module | None = None, accum_steps: int = 1, clip_grad: float | None = None,
                 precision: str = "fp32", batch_size: int, log_every: int, hooks: Sequence[Hook] = (),
                 on_precision: Callable[[torch.dtype | None], None] | None = None, desc: str = "train",
                 log_epoch: bool = False, log_throughput: bool = True) -> None:
        self.info, self.device = info, info.device
        self.model, self.optimizer, self.ddp = model, optimizer, ddp
        self.train_step, self.data, self.schedule = train_step, data, schedule
        self.total_steps, self.last_step = total_steps, last_step
        self.checkpoints = checkpoints
        self.metrics = metrics if metrics is not None else MetricsLogger("", active=False)
        self.accum_steps, self.clip_grad = accum_steps, clip_grad
        self.batch_size, self.log_every, self.desc = batch_size, log_every, desc
        self.log_epoch, self.log_throughput = log_epoch, log_throughput
        self.hooks = list(hooks)
        self.on_precision = on_precision
        self.precision = precision
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.meter = Meter(self.device, world_size=info.world_size)
        self.step = 0  # optimizer steps done
        self.lr = 0.0
        self.last_loss = float("nan")  # the last logged window mean
        self.last_checkpoint: str | None = None  # this run's newest checkpoint
        self.resumed = False
        self._rng: list[dict[str, Any]] | None = None  # a resumed checkpoint's RNG states, put back at run()
        self._restart = False
        self._stop: str | None = None  # why the loop must stop after this step (a preemption)
        self.position: Callable[[int], int] = lambda step: step  # the data position of optimizer step s

    # --- precision -------------------------------------------------------------------------------------------

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return AMP_DTYPES[self.precision]

    def set_precision(self, precision: str) -> None:
        """Train in `precision` from now on (a fresh GradScaler for fp16)."""
        if precision == self.precision:
            return
        self.precision = precision
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        if self.on_precision is not None:
            self.on_precision(self.amp_dtype)

    # --- state ---------------------------------------------------------------------------------------------

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.accum_steps * self.info.world_size

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint of the run at `self.step` (a collective: every rank calls it; rank 0's return
        value is complete, the others' hold only their own parts)."""
        mine = (rng_state(), self.meter.state_dict(cpu=True), [hook.rank_state(self) for hook in self.hooks])
        ranks = distr.all_gather_object(mine) if self.info.world_size > 1 else [mine]
        if not self.info.is_main:
            return {}
        ck = self.checkpoints
        record = CheckpointRecord(ck.kind, self.step, ck.config, ck.identity,
                                  epoch=self.step // self.data.steps_per_epoch, world_size=self.info.world_size,
                                  rng=[r[0] for r in ranks])
        state = record.state(**{ck.model_key: self.model.state_dict()}, optimizer=self.optimizer.state_dict(),
                             scaler=self.scaler.state_dict(), log_window=[r[1] for r in ranks],
                             total_steps=self.total_steps)
        for i, hook in enumerate(self.hooks):
            state.update(hook.state_dict(self, [r[2][i] for r in ranks]))
        if ck.extra is not None:
            state.update(ck.extra())
        return state

    def load_state_dict(self, state: dict[str, Any], *, path: str | Path | None = None) -> None:
        """Continue from a checkpoint written by `state_dict` (every rank calls it with the same file).
        Hooks read theirs first: one may change the precision (and so the scaler) the run resumes in."""
        info = self.info
        for hook in self.hooks:
            hook.load_state_dict(self, state)
        self.model.load_state_dict(state[self.checkpoints.model_key])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        windows = state.get("log_window") or []
        if len(windows) == info.world_size:
            self.meter.load_state_dict(windows[info.rank])
        self._rng = state.get("rng")
        self.resumed = True
        self.last_checkpoint = str(path) if path is not None else None

    def open_metrics(self, run_dir: str | Path, config: Any) -> None:
        """Start the run's metrics (rank 0 writes): a resumed run first drops the records a crashed
        attempt wrote after its checkpoint; a fresh start keeps none of an earlier attempt's."""
        self.metrics = MetricsLogger(run_dir, active=self.info.is_main, config=config,
                                     resume_from=self.step if self.resumed else -1)

    def save(self) -> Path:
        """Write the checkpoint of this step (atomic; rank 0), prune older ones; every rank calls it."""
        path = self.checkpoints.path(self.step)
        state = self.state_dict()
        if self.info.is_main:
            save_checkpoint(state, path)
            if self.checkpoints.name == "step":
                prune_checkpoints(self.checkpoints.run_dir, keep_last=self.checkpoints.keep_last,
                                  keep_every=self.checkpoints.keep_every)
        self.last_checkpoint = str(path)
        for hook in self.hooks:
            hook.on_checkpoint(self, path)
        return path

    # --- what hooks may do ---------------------------------------------------------------------------------

    def rewind(self, step: int, window: dict[str, Any]) -> None:
        """Continue from `step` with this log window (a hook restored the model, optimizer and scaler);
        the data restarts at `position(step)` and the rest of the current step's events are skipped."""
        self.meter.load_state_dict(window)
        self.step = step
        self.bar.n = step
        self.bar.refresh()
        self._restart = True

    @property
    def stopping(self) -> str | None:
        """Why the loop stops after this step (a requested stop), or None."""
        return self._stop

    def request_stop(self, reason: str) -> None:
        """Stop after the current step's checks: write its checkpoint, then raise `Preempted` (every
        rank must request it at the same step)."""
        self._stop = reason

    # --- the loop ------------------------------------------------------------------------------------------

    def is_log(self, step: int) -> bool:
        return bool(self.log_every) and (step % self.log_every == 0 or step == self.last_step)

    def is_checkpoint(self, step: int) -> bool:
        return (self.checkpoints.regular(step, self.data.steps_per_epoch)
                or (self.checkpoints.at_last and step == self.last_step))

    def is_check(self, step: int) -> bool:
        """Check points: where every rank agrees that the steps so far were good (one sync). Log and
        checkpoint steps always (no checkpoint follows a bad step), and where a hook asks."""
        return self.is_log(step) or self.is_checkpoint(step) or any(h.wants_check(self, step) for h in self.hooks)

    def run(self) -> None:
        """Train from `self.step` to `self.last_step` (the model in train mode), then close the metrics.
        A KeyboardInterrupt leaves with `err.step` set; a requested stop with `Preempted`."""
        restore_rng(self._rng, self.info)  # last: building the model and data drew from the RNGs
        self.bar = progress(self.last_step, initial=self.step, desc=self.desc, active=self.info.is_main)
        self.model.train()
        try:
            for hook in self.hooks:
                hook.on_start(self)
            self.meter.start = time.perf_counter()
            while self.step < self.last_step:
                self._run_from(self.position(self.step))
        except KeyboardInterrupt as err:
            err.step = self.step  # the CLI's one line names it
            raise
        finally:
            self.bar.close()
            for hook in self.hooks:
                hook.on_end(self)
            self.metrics.close()

    def _run_from(self, position: int) -> None:
        """Train from data position `position` until the run ends or the data must restart (a rollback,
        or a hook that moves the data order)."""
        epoch, in_epoch = divmod(position, self.data.steps_per_epoch)
        accum, ddp = self.accum_steps, self.ddp
        micro, step_loss = 0, None
        for batch in self.data.epoch(epoch, in_epoch * accum):
            self.meter.seen += len(batch[0])
            sync = micro == accum - 1
            with ddp.no_sync() if ddp is not None and not sync else contextlib.nullcontext():
                loss = self.train_step(batch, step=self.step, micro=micro)
                extras = None
                if isinstance(loss, tuple):  # (loss, {name: a term to log})
                    loss, extras = loss
                    extras = {k: v.detach() / accum for k, v in extras.items()}
                for hook in self.hooks:
                    loss = hook.on_loss(self, loss, micro)
                self.scaler.scale(loss / accum).backward()
            part = loss.detach() / accum
            self.meter.add_loss(part, extras)
            step_loss = part if step_loss is None else step_loss + part
            micro += 1
            if not sync:
                continue
            micro = 0
            self._optimizer_step(step_loss)
            step_loss = None
            self._after_step()
            if self._restart:
                self._restart = False
                return
            if self.step >= self.last_step:
                return
            position += 1
            if position % self.data.steps_per_epoch == 0:  # the epoch is done (a ragged tail is not trained)
                return
            if self.position(self.step) != position:  # a hook moved the data order past the next batch
                return

    def _optimizer_step(self, step_loss: torch.Tensor) -> None:
        step = self.step
        lr = self.schedule(step)
        for hook in self.hooks:
            scale = hook.lr_scale(step)
            if scale != 1.0:  # the window after a rollback
                lr = lr * scale
        self.lr = lr
        set_lr(self.optimizer, lr)
        self.scaler.unscale_(self.optimizer)  # (what scaler.step would do; a no-op without fp16)
        if self.clip_grad is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        else:
            norm = grad_norm(self.model.parameters())
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.meter.add_step(norm)
        for hook in self.hooks:
            hook.on_step(self, step_loss, norm)
        self.step += 1
        self.bar.update(1)

    def _after_step(self) -> None:
        step = self.step
        checked = self.is_check(step)
        if checked:
            for hook in self.hooks:
                hook.on_check(self)
                if self._restart:  # rolled back: the rest of this step's events are for another step
                    return
        if self.is_log(step):
            self._log()
        if self._stop is not None:  # checked and good: save it and leave (no evaluation, no epoch end)
            path = self.save()
            raise Preempted(step, str(path), self._stop)
        resume_clock = self.meter.pause()  # evaluation and checkpoint time is not training throughput
        if checked:
            for hook in self.hooks:
                hook.on_verified(self)
        for hook in self.hooks:
            hook.on_step_end(self)
        epoch, in_epoch = divmod(self.position(step - 1) + 1, self.data.steps_per_epoch)
        if in_epoch == 0:
            for hook in self.hooks:
                hook.on_epoch_end(self, epoch - 1)
        if self.is_checkpoint(step):
            self.save()
        resume_clock()

    def _log(self) -> None:
        mean_loss, norm_mean, extras = self.meter.reduce()
        elapsed = time.perf_counter() - self.meter.start
        img_s = self.meter.timed_steps * self.effective_batch / max(elapsed, 1e-9)
        self.last_loss = mean_loss
        record: dict[str, Any] = {"loss": mean_loss, "lr": self.lr, **extras}
        if self.log_throughput:
            record["img_per_s"] = img_s
        if self.log_epoch:
            record["epoch"] = self.position(self.step - 1) // self.data.steps_per_epoch
        for hook in self.hooks:
            hook.on_log(self, record)
        record["grad_norm"] = norm_mean
        self.metrics.log(self.step, **record)
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{self.lr:.2e}",
                             gnorm="-" if norm_mean is None else f"{norm_mean:.3g}", img_s=f"{img_s:.1f}")
        self.meter.reset()
