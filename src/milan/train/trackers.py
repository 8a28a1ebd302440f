"""Experiment trackers beside metrics.jsonl: Weights & Biases and MLflow (`run.loggers`).

`MetricsLogger` (rank 0) sends every record it writes to metrics.jsonl to each tracker too, so the
loop's log window, evaluations, the kNN monitor and recovery events reach every sink alike.

    record {step, loss, lr, event: "nan", retry: 1, ...}
        numbers (int, float, bool)  ─► scalars at `step` (W&B history, MLflow metrics)
        anything else (str, list)   ─► W&B: the same history row, as text (lists as JSON);
                                       MLflow: run tags `<field>.<step>` (metrics are numbers only)
        None (no value this window) ─► skipped

The resolved config goes in once per run: W&B `config` (nested, as config.yaml), MLflow params
(flattened, `optim.lr`). Which tracker run a run folder writes to is kept in `run_dir/trackers.json`
({"wandb": {"id", "project", "last_step"}, "mlflow": {"run_id", "tracking_uri", "experiment_id",
"last_step"}}), so a resumed run (`resume_from=step`) continues the same W&B run (`id=`,
`resume="allow"`) and the same MLflow run; a run started afresh in that folder gets new ones.

Both trackers hold one value per (name, step) and only append: nothing already sent can be taken
back. So a tracker sends a record only if its step is above every step an earlier attempt of the
run sent (`last_step`, and for MLflow also the highest step its store holds) and not below the
last step this attempt sent; a name sent twice at one step keeps its first value. What that means:
- resumed from the checkpoint of step R after a crash at step C > R: steps R+1…C keep the values
  the crashed attempt sent (a CPU run recomputes them bit for bit; metrics.jsonl and TensorBoard
  drop and rewrite them), the trackers continue at C+1 — one value per step, no duplicates;
- after a recovery rollback (`recover`), the redone steps keep in the trackers the values first
  sent (metrics.jsonl has both; the rollback event itself is sent, at the bad step).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import numbers
import os
import sys
from pathlib import Path
from typing import Any

from milan.errors import ConfigError

__all__ = ["LOGGERS", "TRACKERS", "STATE_FILE", "resolve_loggers", "check_loggers", "flatten", "split_record",
           "Tracker", "WandbTracker", "MlflowTracker", "open_trackers"]

#: The sinks `run.loggers` may name; jsonl is always on.
LOGGERS = ("jsonl", "tensorboard", "wandb", "mlflow")
#: The optional trackers: name → (module to import, pip extra).
TRACKERS: dict[str, tuple[str, str]] = {"wandb": ("wandb", "milan-mim[wandb]"), "mlflow": ("mlflow", "milan-mim[mlflow]")}
#: The run folder's record of its tracker runs.
STATE_FILE = "trackers.json"
#: Project / experiment name when neither run.project nor the tracker's own variable names one.
DEFAULT_PROJECT = "milan"

_log = logging.getLogger("milan")


def resolve_loggers(run: Any) -> tuple[str, ...]:
    """The sinks of a config's `run` section: `run.loggers` (in order, once each) with jsonl always;
    the older `run.tensorboard` switch, where set, drops (false) or adds (true) tensorboard."""
    names = ["jsonl", *getattr(run, "loggers", ("jsonl", "tensorboard"))]
    switch = getattr(run, "tensorboard", None)
    if switch is False:
        names = [n for n in names if n != "tensorboard"]
    elif switch is True:
        names.append("tensorboard")
    return tuple(dict.fromkeys(names))


def check_loggers(run: Any) -> None:
    """Refuse, before any work, a tracker in `run.loggers` that is not installed (one line naming the
    pip install). Every rank calls it, so all of them stop alike."""
    for name in resolve_loggers(run):
        if name in TRACKERS and importlib.util.find_spec(TRACKERS[name][0]) is None:
            raise ConfigError(f"run.loggers includes {name}, which is not installed here: "
                              f"pip install '{TRACKERS[name][1]}' (or drop it from run.loggers)")


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"optim": {"lr": 1e-3}}` → `{"optim.lr": 1e-3}` (MLflow params are flat)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def split_record(metrics: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """(numbers as floats, everything else as text: strings as they are, the rest as JSON); None is
    dropped (e.g. a window whose every step overflowed has no gradient norm)."""
    scalars: dict[str, float] = {}
    text: dict[str, str] = {}
    for key, value in metrics.items():
        if value is None:
            continue
        if isinstance(value, numbers.Real):
            scalars[key] = float(value)
        else:
            text[key] = value if isinstance(value, str) else json.dumps(value)
    return scalars, text


def _read_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATE_FILE
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):  # torn by a crash mid-write: start new tracker runs
        _log.warning("%s is unreadable; the trackers start new runs", path)
        return {}
    return state if isinstance(state, dict) else {}


def _write_state(run_dir: Path, name: str, entry: dict[str, Any]) -> None:
    """Update one tracker's entry of trackers.json (atomic: a crash leaves the old or the new file)."""
    state = _read_state(run_dir)
    state[name] = entry
    path = run_dir / STATE_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    tmp.replace(path)


class Tracker:
    """One tracker run: which steps it accepts (see the module docstring) and its entry in
    trackers.json. Subclasses open the run and `_send` what passes.

    Args:
        run_dir: the run folder (trackers.json lives there).
        entry: this tracker's saved entry (ids), with `last_step` the highest step sent so far.
        floor: steps at or below it are not sent (an earlier attempt sent them).
        continued: the run is one an earlier attempt started (else: new).
    """

    name = ""

    def __init__(self, run_dir: Path, entry: dict[str, Any], floor: int, *, continued: bool) -> None:
        self.continued = continued
        if not continued:
            floor, entry = -1, {k: v for k, v in entry.items() if k != "last_step"}
        floor = max(floor, int(entry.get("last_step", -1)))
        self.run_dir, self.entry, self.floor = run_dir, entry, floor
        self.step = floor  # the step this attempt sends now
        self.sent: set[str] = set()  # the names already sent at `self.step`
        entry["last_step"] = floor
        _write_state(run_dir, self.name, entry)

    def log(self, step: int, metrics: dict[str, Any], *, wall_time: float) -> None:
        if step <= self.floor or step < self.step:
            return
        if step > self.step:
            self.step, self.sent = step, set()
        fresh = {k: v for k, v in metrics.items() if k not in self.sent}
        self.sent.update(fresh)
        scalars, text = split_record(fresh)
        if not scalars and not text:
            return
        try:
            self._send(step, scalars, text, wall_time=wall_time)
        except Exception as err:  # a tracker is a copy: the run goes on, metrics.jsonl has the record
            _log.warning("%s did not take the record of step %d (%s: %s); training goes on",
                         self.name, step, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            return
        if step > self.entry["last_step"]:
            self.entry["last_step"] = step
            _write_state(self.run_dir, self.name, self.entry)

    def _send(self, step: int, scalars: dict[str, float], text: dict[str, str], *, wall_time: float) -> None:
        raise NotImplementedError

    def close(self, *, error: BaseException | None = None) -> None:
        """End this attempt's part of the run; `error`: the exception that stops the run, if any."""


class WandbTracker(Tracker):
    """A W&B run (online, or offline files under `WANDB_DIR`, by default the run folder's `wandb/`).
    `WANDB_MODE`, `WANDB_ENTITY` and the login are W&B's own; the project is `run.project`, else
    `WANDB_PROJECT`, else "milan"."""

    name = "wandb"

    def __init__(self, run_dir: Path, entry: dict[str, Any] | None, *, config: dict[str, Any], floor: int,
                 project: str | None) -> None:
        # lazy: wandb is the optional `wandb` extra
        import wandb

        resume = entry is not None and "id" in entry
        project = (entry or {}).get("project") if resume else (project or os.environ.get("WANDB_PROJECT")
                                                                 or DEFAULT_PROJECT)
        # Read here, not left to W&B: its settings keep the environment of the process's first run. Without
        # WANDB_DIR the offline files stay with the run (`wandb sync run_dir/wandb/offline-run-*`).
        where = os.environ.get("WANDB_DIR") or str(run_dir)
        self.run = wandb.init(project=project, name=run_dir.name, config=config, dir=where,
                              id=entry["id"] if resume else None, resume="allow" if resume else None)
        super().__init__(run_dir, {**(entry or {}), "id": self.run.id, "project": project}, floor, continued=resume)

    def _send(self, step: int, scalars: dict[str, float], text: dict[str, str], *, wall_time: float) -> None:
        self.run.log({**scalars, **text}, step=step)

    def close(self, *, error: BaseException | None = None) -> None:
        self.run.finish(exit_code=0 if error is None else 1)


class MlflowTracker(Tracker):
    """An MLflow run in the store of `MLFLOW_TRACKING_URI` (kept in trackers.json, so a resumed run
    writes where it started), in the experiment `run.project`, else `MLFLOW_EXPERIMENT_NAME`, else
    "milan". Runs through `MlflowClient` (no global active run to leak between runs of one process)."""

    name = "mlflow"

    def __init__(self, run_dir: Path, entry: dict[str, Any] | None, *, config: dict[str, Any], floor: int,
                 project: str | None) -> None:
        # lazy: mlflow is the optional `mlflow` extra
        import mlflow
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = entry["tracking_uri"] if entry is not None and "run_id" in entry else mlflow.get_tracking_uri()
        params = {k: _param_value(v) for k, v in flatten(config).items()}
        try:
            self.client = MlflowClient(tracking_uri=uri)  # (refuses a store this install cannot use)
            found = self._continue(entry, params, floor) if entry is not None and "run_id" in entry else None
            if found is not None:
                run_id, experiment_id, floor = found
            else:
                name = project or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
                experiment = self.client.get_experiment_by_name(name)
                experiment_id = (experiment.experiment_id if experiment is not None
                                 else self.client.create_experiment(name))
                run_id = self.client.create_run(experiment_id, run_name=run_dir.name,
                                                tags={"milan.run_dir": str(run_dir.resolve())}).info.run_id
                self._log_params(run_id, params, tags={})
        except MlflowException as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            first = first if len(first) <= 200 else first[:199] + "…"
            raise ConfigError(f"run.loggers includes mlflow, but its tracking store {uri} refused: {first} "
                              "(set MLFLOW_TRACKING_URI to your server, e.g. http://host:5000; a local ./mlruns "
                              "store needs MLFLOW_ALLOW_FILE_STORE=true in recent MLflow)") from None
        self.run_id = run_id
        super().__init__(run_dir, {**(entry or {}), "run_id": run_id, "tracking_uri": uri,
                                   "experiment_id": experiment_id}, floor, continued=found is not None)

    def _continue(self, entry: dict[str, Any], params: dict[str, str], floor: int) -> tuple[str, str, int] | None:
        """Reopen the recorded run: (run id, experiment id, the floor raised to the highest step its store
        holds), or None where the store no longer has it (deleted: a new run starts)."""
        # lazy: mlflow is the optional `mlflow` extra
        from mlflow.exceptions import MlflowException

        run_id = entry["run_id"]
        try:
            run = self.client.get_run(run_id)
        except MlflowException as err:
            if getattr(err, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise
            _log.warning("mlflow: run %s of %s is gone from %s; starting a new run", run_id, STATE_FILE,
                         entry["tracking_uri"])
            return None
        self.client.update_run(run_id, status="RUNNING")
        old = run.data.params
        new = {k: v for k, v in params.items() if k not in old}
        # MLflow params never change; a value this attempt changed (e.g. run.max_steps) becomes a tag
        changed = {f"resumed.{k}": v for k, v in params.items() if k in old and old[k] != v}
        self._log_params(run_id, new, tags=changed)
        return run_id, run.info.experiment_id, max(floor, self._stored_step(run_id, run.data.metrics))

    def _stored_step(self, run_id: str, metrics: dict[str, float]) -> int:
        """The highest step the store holds for this run (-1: none): exact, even where the attempt that
        sent it died before it could write trackers.json."""
        steps = [m.step for key in metrics for m in self.client.get_metric_history(run_id, key)]
        return max(steps, default=-1)

    def _log_params(self, run_id: str, params: dict[str, str], *, tags: dict[str, str]) -> None:
        # lazy: mlflow is the optional `mlflow` extra
        from mlflow.entities import Param, RunTag

        items = [Param(k, v) for k, v in params.items()]
        tag_items = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, max(len(items), len(tag_items)), 100):  # MLflow takes ≤ 100 params/tags a batch
            self.client.log_batch(run_id, params=items[i:i + 100], tags=tag_items[i:i + 100])

    def _send(self, step: int, scalars: dict[str, float], text: dict[str, str], *, wall_time: float) -> None:
        # lazy: mlflow is the optional `mlflow` extra
        from mlflow.entities import Metric, RunTag

        stamp = int(wall_time * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, stamp, step) for k, v in scalars.items()],
                              tags=[RunTag(f"{k}.{step}", v[:_TAG_LIMIT]) for k, v in text.items()])

    def close(self, *, error: BaseException | None = None) -> None:
        # A stop the run resumes from (Ctrl-C, a preemption's SystemExit) is KILLED; a crash FAILED.
        status = ("FINISHED" if error is None
                  else "KILLED" if isinstance(error, KeyboardInterrupt | SystemExit) else "FAILED")
        self.client.set_terminated(self.run_id, status=status)


_PARAM_LIMIT = 500  # the smallest MLflow param value limit (older servers); longer values are cut
_TAG_LIMIT = 5000


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= _PARAM_LIMIT else text[:_PARAM_LIMIT - 1] + "…"


def open_trackers(run_dir: str | Path, names: tuple[str, ...], *, config: dict[str, Any],
                  resume_from: int | None, project: str | None = None) -> list[Tracker]:
    """The trackers among `names`, on rank 0. `resume_from=step` continues the tracker runs
    trackers.json names (a new one where it names none); None or -1 starts new runs.

    Args:
        run_dir: the run folder.
        names: the resolved `run.loggers`.
        config: the resolved config (a plain nested dict).
        resume_from: the step a resumed run continues from; None or -1 for a new run.
        project: `run.project` (None: each tracker's own variable, else "milan").
    """
    run_dir = Path(run_dir)
    resuming = resume_from is not None and resume_from >= 0
    state = _read_state(run_dir) if resuming else {}
    if not resuming and (run_dir / STATE_FILE).is_file():
        (run_dir / STATE_FILE).unlink()  # a new run: no tracker may continue an earlier run's
    floor = resume_from if resume_from is not None else -1
    opened: list[Tracker] = []
    try:
        for name in names:
            if name == "wandb":
                opened.append(WandbTracker(run_dir, state.get("wandb"), config=config, floor=floor, project=project))
            elif name == "mlflow":
                opened.append(MlflowTracker(run_dir, state.get("mlflow"), config=config, floor=floor,
                                            project=project))
    except BaseException:
        for tracker in opened:
            tracker.close(error=sys.exc_info()[1])
        raise
    for tracker in opened:
        what = "continues" if tracker.continued else "starts"
        _log.info("%s %s run %s (steps after %d)", tracker.name, what,
                  tracker.entry.get("id") or tracker.entry.get("run_id"), tracker.floor)
    return opened
