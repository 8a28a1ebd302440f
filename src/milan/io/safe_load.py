"""Safe reading of weight files: nothing in a checkpoint can run code.

`load_weights(path)` reads .safetensors files, `torch.save` files (with `weights_only=True`) and
TorchScript archives — OpenAI's CLIP release format — through a restricted unpickler that
rebuilds tensors and refuses every other Python object. TorchScript code is never run
(`torch.jit.load` has no safe mode), so OpenAI's `ViT-B-16.pt` loads as plain tensors.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from milan.errors import TeacherFileNotFound, WeightsError

__all__ = ["load_weights"]


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _ScriptObject:
    """Stand-in for a TorchScript module in an archive: keeps its attributes, runs none of its code."""

    attrs: dict[str, object] = {}

    def __setstate__(self, state: object) -> None:
        self.attrs = state if isinstance(state, dict) else {}


def _rebuild_tensor(
    storage: Tensor, offset: int, size: tuple[int, ...], stride: tuple[int, ...], *_: object
) -> Tensor:
    return storage.as_strided(size, stride, offset)


def _identity(value: object, *_: object) -> object:
    return value


class _TorchScriptUnpickler(pickle.Unpickler):
    """Reads `data.pkl` of a TorchScript archive, allowing tensors, dicts and module stand-ins only.

    Every global goes through `find_class`, so an unknown callable is refused before it can run.
    """

    _allowed = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("collections", "OrderedDict"): collections.OrderedDict,
        **{("torch", name): dtype for name, dtype in _STORAGE_DTYPES.items()},
        # typed containers written by older TorchScript picklers
        **{
            ("torch.jit._pickle", name): _identity
            for name in (
                "build_intlist",
                "build_doublelist",
                "build_boollist",
                "build_tensorlist",
                "restore_type_tag",
            )
        },
    }

    def __init__(self, archive: zipfile.ZipFile, root: str) -> None:
        super().__init__(archive.open(f"{root}/data.pkl"))
        self.archive, self.root = archive, root

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a tensor or module")

    def persistent_load(self, pid: Any) -> Tensor:
        kind, dtype, key, _location, numel = pid  # ('storage', dtype, '0', 'cpu', numel)
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unsupported record {pid!r}")
        data = bytearray(self.archive.read(f"{self.root}/data/{key}"))
        if not data:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype)[:numel]


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def _read_torchscript(path: Path) -> dict[str, Tensor]:
    """All tensors of a TorchScript archive by attribute path (the module's state_dict keys)."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        roots = [
            n[: -len("/data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1
        ]
        if not roots:
            raise WeightsError(f"{path} looks like a TorchScript archive but has no data.pkl")
        byteorder = f"{roots[0]}/byteorder"
        if byteorder in names and archive.read(byteorder).strip() != b"little":
            raise WeightsError(f"{path}: big-endian TorchScript archives are not supported")
        root_obj = _TorchScriptUnpickler(archive, roots[0]).load()

    out: dict[str, Tensor] = {}

    def walk(obj: object, prefix: str) -> None:
        attrs = obj.attrs if isinstance(obj, _ScriptObject) else obj
        if not isinstance(attrs, dict):
            return
        for name, value in attrs.items():
            if isinstance(value, Tensor):
                out[prefix + name] = value
            elif isinstance(value, _ScriptObject | dict):
                walk(value, f"{prefix}{name}.")

    walk(root_obj, "")
    return out


def load_weights(path: str | Path) -> tuple[dict[str, Tensor], bool]:
    """Read a checkpoint safely -> (flat state dict without `module.` prefixes, is_openai).

    Accepts .safetensors, TorchScript archives (OpenAI's release format) and torch.save files
    holding a state dict, optionally under "state_dict" / "model". `is_openai` is True for a
    TorchScript archive or an OpenAI state dict (it carries `input_resolution`): those models were
    trained with QuickGELU.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise TeacherFileNotFound(
            f"teacher weights not found: {path} (build_teacher(..., weights=PATH); on the command line "
            "teacher.weights=PATH, e.g. OpenAI's ViT-B-16.pt or an open_clip checkpoint)"
        )
    is_openai = False
    unreadable = (f"cannot read teacher weights {path}: expected a .safetensors file, OpenAI's TorchScript "
                  "release (e.g. ViT-B-16.pt) or a torch.save'd state dict")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path))
        except Exception as e:  # safetensors' own error type
            raise WeightsError(f"{unreadable} ({e})") from e
    else:
        try:
            if _is_torchscript(path):
                obj, is_openai = _read_torchscript(path), True
            else:
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            refused = "Weights only load failed" in str(e) or str(e).startswith("refusing to load")
            if not refused:  # not a pickle at all: garbage or another format
                raise WeightsError(f"{unreadable} ({str(e).strip().splitlines()[0]})") from e
            raise WeightsError(
                f"refused to load {path}: it holds Python objects other than tensors, and "
                "unpickling them could run arbitrary code. Re-save only the state dict "
                "(torch.save(model.state_dict(), ...) or safetensors) from a trusted environment."
                f"\n({str(e).strip().splitlines()[0]})"
            ) from e
        except ValueError:  # our own refusals (e.g. the restricted TorchScript unpickler)
            raise
        except Exception as e:  # truncated zip, garbage bytes: torch raises many different types
            raise WeightsError(f"{unreadable} ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]})") from e
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    is_openai = is_openai or "input_resolution" in obj
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    return state, is_openai
