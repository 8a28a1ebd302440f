"""Typed configs: dataclass defaults ← YAML file ← `key=value` overrides, checked at start.

    cfg = load_config(PretrainConfig, "configs/pretrain_vit_base.yaml", ["optim.epochs=100"])

Sections are nested dataclasses; keys are dotted (`optim.lr=1e-3`). Values are parsed as YAML
scalars and checked against the field's type, so a typo or a wrong type fails before any work
is done, with a message naming the key and the valid choices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from milan.errors import ConfigError

__all__ = ["RunSection", "ConfigError", "load_config", "apply_overrides", "to_dict", "save_config", "from_dict", "CONFIG_DIR",
           "shipped_configs", "config_path", "config_recipe"]

#: The YAML configs shipped with the package (`--config NAME`).
CONFIG_DIR = Path(__file__).parents[1] / "configs"
#: Recipes whose shipped configs carry their name as a prefix; every other shipped config is pretrain's.
_PREFIXED_RECIPES = ("finetune", "linprobe", "segment", "detect")

T = TypeVar("T")


@dataclass
class RunSection:
    """The `run` keys every training recipe shares; each recipe's `RunConfig` subclasses it, sets its
    own `out_dir` default and adds its own keys (precision, intervals, early stops)."""

    out_dir: str = "runs/run"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    resume: str = "auto"  # auto: the run folder's newest good checkpoint, if any; none; or a path
    # Where scalars go (docs/trackers.md); jsonl is always on. wandb / mlflow are extras.
    loggers: tuple[Literal["jsonl", "tensorboard", "wandb", "mlflow"], ...] = ("jsonl", "tensorboard")
    tensorboard: bool | None = None  # the older switch: false drops tensorboard from loggers, true adds it
    project: str | None = None  # W&B project / MLflow experiment (None: WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME, else milan)
    # Preemption (docs/cluster.md): on one of these signals, or when <out_dir>/PREEMPT
    # appears, every process finishes its step, rank 0 checkpoints, and the command exits with 75.
    preempt_signals: list[str] = dataclasses.field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    preempt_every: int = 10  # under torchrun: steps between the ranks' agreement on a stop (one all-reduce)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "None")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp`; convert ints to floats and lists to tuples."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{key}={value!r} is not valid; choose one of: {choices}")
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        real = [o for o in options if o is not type(None)]
        if len(real) == 1:  # Optional[X]: X's own message (e.g. the Literal's choices)
            return _coerce(value, real[0], key)
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        allowed = " or ".join(_type_name(o) for o in options)
        raise ConfigError(f"{key}={value!r} has the wrong type; expected {allowed}")
    if origin in (tuple, list):
        args = get_args(tp)
        variable = origin is list or (len(args) == 2 and args[-1] is Ellipsis)
        item = args[0] if args else Any
        if variable and isinstance(value, str) and (item in (str, Any) or get_origin(item) is Literal):
            value = [value]  # data.paths=/x means [/x]; run.loggers=wandb means [wandb]
        if not isinstance(value, list | tuple):
            example = "[/data/a,/data/b]" if args and args[0] is str else "[0.2,1.0]"
            raise ConfigError(f"{key}={value!r} should be a list, e.g. {key}={example}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key} needs {len(args)} values, got {len(value)}")
            items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}={value!r} should be a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} should be an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} should be true or false")
        return value
    if tp is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} should be a string")
        return str(value)
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


def from_dict(cls: type[T], data: dict[str, Any], *, prefix: str = "") -> T:
    """Build dataclass `cls` from a (possibly partial) nested dict, validating every key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} should be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"in section '{prefix}' " if prefix else ""
        raise ConfigError(
            f"unknown config key {prefix + '.' if prefix else ''}{unknown[0]} {where}"
            f"— valid keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        kwargs[name] = from_dict(tp, value, prefix=key) if _is_dataclass_type(tp) else _coerce(value, tp, key)
    # Sections not mentioned get their defaults.
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) for YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {key}: {part} is not a section")
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Merge `a.b=value` strings into a nested dict; values parse as YAML (`1e-3`, `[0.2,1]`, `null`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} should look like key=value, e.g. optim.lr=1e-3")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({getattr(err, 'problem', None) or err}); "
                              "quote it, e.g. 'data.path=\"/my dir\"', or close its brackets") from None
        # YAML 1.1 reads 1e-3 as a string; accept it as the float it clearly is.
        if isinstance(value, str) and any(c in value for c in ".eE"):
            with contextlib.suppress(ValueError):
                value = float(value)
        _set_dotted(data, key.strip(), value)
    return data


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> T:
    """Defaults of `cls`, then the YAML file at `path` (which may `base:` another YAML), then overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(Path(path))
    data = apply_overrides(data, overrides)
    return from_dict(cls, data)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with path.open() as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"{path}{line}: not a plain YAML config ({getattr(err, 'problem', None) or err}); "
                          "configs hold sections of plain values (no !!python tags or custom types)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level should be a mapping of sections")
    base = data.pop("base", None)
    if base is not None:
        data = _deep_merge(_read_yaml((path.parent / base).resolve()), data)
    return data


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (what the run actually used)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def shipped_configs() -> list[str]:
    """Names of the configs shipped in `milan/configs/`."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def config_path(name_or_path: str | None) -> Path | None:
    """A config file path, or the shipped config of that name."""
    if name_or_path is None:
        return None
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(f"config {name_or_path!r} not found; give a YAML path or one of: {', '.join(shipped_configs())}")


def config_recipe(config_name: str) -> str:
    """The recipe a shipped config is for: `finetune_*` → finetune (likewise linprobe, segment, detect), else pretrain."""
    prefix = config_name.split("_", 1)[0]
    return prefix if prefix in _PREFIXED_RECIPES else "pretrain"
