"""Safe reading of weight files: nothing in a file can run code, and a bad file says what it is.

`load_weights(path)` reads .safetensors files, `torch.save` files (with `weights_only=True`) and
TorchScript archives — OpenAI's CLIP release format — through a restricted unpickler that
rebuilds tensors and refuses every other Python object. TorchScript code is never run
(`torch.jit.load` has no safe mode), so OpenAI's `ViT-B-16.pt` loads as plain tensors; its code is
only read as text, to tell which MLP activation the model computes (QuickGELU or GELU).

`read_torch_file(path, ...)` is the one `torch.load` of user files (teacher weights, encoder
weights, checkpoints): it sniffs the file first (`file_kind`) and turns every failure into one
message saying what the file is — empty, truncated, junk, an HTML page, a Git LFS pointer, a
TorchScript archive, pickled Python objects — and what to do. torch's own error text (and its
advice to unpickle with `weights_only=False`) never reaches the user.
"""

from __future__ import annotations

import argparse
import collections
import io
import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from milan.errors import TeacherFileNotFound, UserError, WeightsError

__all__ = ["file_kind", "load_weights", "read_safetensors", "read_torch_file", "unreadable"]

WEIGHTS_FORMATS = ("a torch state dict or checkpoint (torch.save), a .safetensors file or a TorchScript "
                   "archive (e.g. OpenAI's CLIP release)")

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


# --------------------------------------------------------------------------------------------
# What a file is, and what to say when it cannot be read
# --------------------------------------------------------------------------------------------


def file_kind(path: Path) -> str:
    """What `path` holds, from its bytes (never from its name).

    One of: empty, safetensors, torchscript, torch_zip (torch.save), zip (another zip, e.g. .npz),
    truncated_zip, pickle (a pickle stream: legacy torch.save or plain pickle), lfs_pointer, html,
    junk.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(64)
    if size == 0:
        return "empty"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        if not zipfile.is_zipfile(path):
            return "truncated_zip"
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return "truncated_zip"
        if any(n.endswith("/constants.pkl") or "/code/__torch__" in n for n in names):
            return "torchscript"
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "torch_zip"
        return "zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    if size >= 10 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= 100_000_000:
        return "safetensors"
    if head.startswith(b"version https://git-lfs"):
        return "lfs_pointer"
    low = head.lstrip().lower()
    if low[:1] == b"<" and (b"html" in low or low.startswith(b"<!doctype")):
        return "html"
    return "junk"


def _pickle_globals(data: bytes) -> tuple[list[str], str]:
    """The `module.name` globals of the pickle streams at the start of `data`, and how the first parsed.

    Reads consecutive pickles (a legacy torch.save file is several, then raw tensor bytes) and
    returns (globals, status): status is 'ok', 'truncated' (it ends before its STOP) or 'junk'
    (not a pickle). `pickletools.genops` only parses opcodes: nothing is imported or run.
    """
    found: list[str] = []
    stream = io.BytesIO(data)
    for index in range(6):
        if stream.tell() >= len(data):
            break
        strings: list[str] = []
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                    strings.append(str(arg))
                elif op.name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
        except Exception as err:  # not (or no longer) a pickle
            if index == 0:
                return found, "truncated" if "exhausted" in str(err) else "junk"
            break
    return found, "ok"


# Globals a weights-only file may refer to (how torch writes tensors and plain containers).
_SAFE_GLOBAL = re.compile(
    r"^(torch\._utils\._rebuild_\w+|torch\._tensor\._rebuild_from_type_v2|torch\.\w*Storage|torch\.(Size|"
    r"device|dtype|storage\._load_from_bytes|serialization\._get_layout)|torch\.nn\.parameter\.Parameter|"
    r"torch\.(float|bfloat|half|double|int|uint|bool|long|short|complex|cfloat|cdouble)\w*|"
    r"collections\.OrderedDict|_*builtins?_*\.(set|frozenset|slice|complex|bytearray)|_codecs\.encode|"
    r"argparse\.Namespace)$"
)

#: Plain-data classes a weights-only load may rebuild beyond torch's own list, allowed by name: the
#: `args` (an `argparse.Namespace` of strings and numbers) that MAE's, the MILAN authors' and SLIP's
#: training scripts save beside the weights. Rebuilding one sets attributes and runs no code; any
#: other class in the same file is still refused.
SAFE_CLASSES: tuple[type, ...] = (argparse.Namespace,)


def _unsafe_globals(path: Path, kind: str) -> tuple[list[str], str]:
    """(globals that are not tensors or plain containers, parse status) of the pickle in `path`."""
    try:
        if kind in ("torch_zip", "torchscript"):
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl"))
                data = archive.read(name)
        else:
            data = path.read_bytes()
    except Exception:  # a record that cannot be read: damaged
        return [], "junk"
    found, status = _pickle_globals(data)
    return list(dict.fromkeys(g for g in found if not _SAFE_GLOBAL.match(g))), status


def _describe(path: Path, kind: str, expected: str, *, unsafe: list[str] | None = None) -> str:
    """'is ...: <fix>' for a file of `kind` that could not be read as `expected`."""
    size = path.stat().st_size
    again = "copy or download it again, or re-save it"
    if kind == "empty":
        return f"is empty (0 bytes): the copy, download or save never finished; {again}"
    if kind == "truncated":
        return f"is truncated ({size} bytes, cut off before its end): the copy, download or save stopped early; {again}"
    if kind == "truncated_zip":
        return (f"is a truncated or damaged zip archive ({size} bytes, no end-of-archive record): the copy, "
                f"download or save stopped early; {again}")
    if kind == "damaged":
        return f"is damaged (its records cannot be read): {again}"
    if kind == "unsafe":
        what = f" ({', '.join(unsafe[:3])})" if unsafe else ""
        return (f"holds pickled Python objects{what} besides tensors, and loading them could run arbitrary "
                "code, so it is refused. Re-save only the tensors, from a trusted environment: "
                "torch.save(model.state_dict(), 'weights.pt') or safetensors.torch.save_file(state_dict, "
                "'weights.safetensors')")
    if kind == "plain_pickle":
        return (f"is a plain Python pickle, not a torch.save file: expected {expected}; re-save its tensors "
                "with torch.save(state_dict, 'weights.pt') or safetensors")
    if kind == "lfs_pointer":
        return ("is a Git LFS pointer, not the weights (the repository was cloned without git-lfs): run "
                "`git lfs pull` in the clone, or download the file itself")
    if kind == "html":
        return ("is an HTML page, not a weights file (a web page was saved instead of the file): download "
                "the file itself, e.g. `huggingface-cli download <repo id> --local-dir DIR`")
    if kind == "torchscript":
        return (f"is a TorchScript archive (a scripted or traced model, e.g. OpenAI's CLIP release), not "
                f"{expected}")
    if kind in ("torch_zip", "pickle"):
        return f"is a torch.save file, not a safetensors file: expected {expected}"
    if kind == "zip":
        return f"is a zip archive but not a torch.save file (no data.pkl): expected {expected}"
    if kind == "safetensors":
        return (f"is not a valid safetensors file (its header or its tensor data is inconsistent, e.g. cut "
                f"off): {again}; expected {expected}")
    with path.open("rb") as f:
        head = f.read(16)
    return f"is not a weights file (it starts with {head!r}): expected {expected}"


def unreadable(path: Path, kind: str, *, subject: str, expected: str, error: type[UserError] = WeightsError,
               fix: str = "", unsafe: list[str] | None = None) -> UserError:
    """The error for `path` (described by `kind`, see `_describe`): '<subject> <path> is ...'."""
    message = f"{subject} {path} {_describe(path, kind, expected, unsafe=unsafe)}"
    return error(f"{message}. {fix}" if fix else message)


_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"  # pickled magic number of legacy torch.save


def _torch_failure(path: Path, kind: str, err: Exception) -> tuple[str, list[str]]:
    """Why torch.load failed on a `torch_zip` or `pickle` file -> (problem kind, unsafe globals)."""
    unsafe, status = _unsafe_globals(path, kind)
    named = re.search(r"GLOBAL ([\w.]+)", str(err))  # only a name is taken from torch's message
    if named and not unsafe:
        unsafe = [named.group(1)]
    if unsafe or (status == "ok" and isinstance(err, pickle.UnpicklingError) and kind == "torch_zip"):
        return "unsafe", unsafe
    if kind == "torch_zip":
        return "damaged", []
    with path.open("rb") as f:
        legacy = f.read(len(_LEGACY_MAGIC)) == _LEGACY_MAGIC
    if legacy:  # an old-format torch.save file
        cut = isinstance(err, EOFError) or re.search(r"truncated|EOF", str(err))
        return ("truncated" if cut else "damaged"), []
    if status != "ok":
        return status, []  # truncated, or junk that happens to start like a pickle
    return "plain_pickle", []


def read_torch_file(path: str | Path, *, subject: str, expected: str, error: type[UserError] = WeightsError,
                    fix: str = "", map_location: Any = "cpu") -> Any:
    """`torch.load(path, weights_only=True)`, every failure an `error` naming what the file is.

    Args:
        subject: what the file is to the user ("checkpoint", "teacher weights"), starts the message.
        expected: what it should have been, for files that are something else.
        fix: appended to every message (e.g. how to resume from another checkpoint).
    """
    path = Path(path)
    kind = file_kind(path)
    if kind not in ("torch_zip", "pickle"):
        raise unreadable(path, kind, subject=subject, expected=expected, error=error, fix=fix)
    try:
        with path.open("rb") as f, torch.serialization.safe_globals(list(SAFE_CLASSES)):
            # a file object: torch must not pick a reader by the file's name
            return torch.load(f, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types; its messages advise weights_only=False: never shown
        problem, unsafe = _torch_failure(path, kind, err)
        raise unreadable(path, problem, subject=subject, expected=expected, error=error, fix=fix,
                         unsafe=unsafe) from err


def read_safetensors(path: str | Path, *, subject: str, expected: str, error: type[UserError] = WeightsError,
                     fix: str = "") -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, header metadata) of a .safetensors file; any other file is an `error` saying what it is."""
    path = Path(path)
    kind = file_kind(path)
    if kind != "safetensors":
        raise unreadable(path, kind, subject=subject, expected=expected, error=error, fix=fix)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except Exception as err:  # safetensors' own error type: a bad header or data cut short
        raise unreadable(path, "safetensors", subject=subject, expected=expected, error=error, fix=fix) from err


# --------------------------------------------------------------------------------------------
# TorchScript archives: tensors and the MLP activation, no code run
# --------------------------------------------------------------------------------------------


class _ScriptObject:
    """Stand-in for a TorchScript module in an archive: keeps its attributes, runs none of its code."""

    qualname = ""
    attrs: dict[str, object] = {}

    def __setstate__(self, state: object) -> None:
        self.attrs = state if isinstance(state, dict) else {}


_SCRIPT_CLASSES: dict[str, type[_ScriptObject]] = {}


def _script_class(qualname: str) -> type[_ScriptObject]:
    """A `_ScriptObject` subclass that remembers the archive's class name (`__torch__.x.y.Name`)."""
    if qualname not in _SCRIPT_CLASSES:
        _SCRIPT_CLASSES[qualname] = type("_ScriptObject", (_ScriptObject,), {"qualname": qualname})
    return _SCRIPT_CLASSES[qualname]


def _rebuild_tensor(
    storage: Tensor, offset: int, size: tuple[int, ...], stride: tuple[int, ...], *_: object
) -> Tensor:
    return storage.as_strided(size, stride, offset)


def _identity(value: object, *_: object) -> object:
    return value


class _Refused(pickle.UnpicklingError):
    """A global the restricted unpickler does not rebuild."""


class _TorchScriptUnpickler(pickle.Unpickler):
    """Reads `data.pkl` / `constants.pkl` of a TorchScript archive: tensors, dicts, module stand-ins.

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

    def __init__(self, archive: zipfile.ZipFile, root: str, record: str = "data") -> None:
        super().__init__(archive.open(f"{root}/{record}.pkl"))
        self.archive, self.folder = archive, f"{root}/{record}"

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return _script_class(f"{module}.{name}")
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Tensor:
        kind, dtype, key, _location, numel = pid  # ('storage', dtype, '0', 'cpu', numel)
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unsupported record {pid!r}")
        data = bytearray(self.archive.read(f"{self.folder}/{key}"))
        if not data:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype)[:numel]


# Where CLIP-like models keep their MLP activation: OpenAI / open_clip `resblocks.i.mlp.gelu`,
# timm `blocks.i.mlp.act`.
_ACTIVATION_PATH = re.compile(r"(?:^|\.)(?:resblocks|blocks)\.\d+\.mlp\.(?:gelu|act)$")
QUICK_GELU_ALPHA = 1.702  # QuickGELU(x) = x * sigmoid(1.702 x), OpenAI's CLIP activation


def _class_source(archive: zipfile.ZipFile, root: str, qualname: str) -> str | None:
    """The TorchScript source of class `qualname` (`__torch__.a.b.Name` is in code/__torch__/a/b.py)."""
    module, _, name = qualname.rpartition(".")
    try:
        text = archive.read(f"{root}/code/{module.replace('.', '/')}.py").decode("utf-8", "replace")
    except KeyError:
        return None
    match = re.search(rf"^class {re.escape(name)}\(.*?(?=^\S|\Z)", text, flags=re.S | re.M)
    return match.group(0) if match else None


def _activation_of(source: str | None, constants: list[Any] | None, name: str = "") -> str:
    """'quick_gelu', 'gelu', 'gelu_tanh' or 'unknown', from an activation module's TorchScript source.

    QuickGELU is `x * sigmoid(a x)` with a = 1.702, a literal or a tensor constant; when the
    constant cannot be read, a class named QuickGELU with that structure still counts.
    """
    if source is None:
        return "unknown"
    forward = source[source.find("def forward"):] if "def forward" in source else ""
    if "torch.gelu(" in forward:
        return "gelu_tanh" if '"tanh"' in source else "gelu"
    if "torch.sigmoid(" not in forward or "torch.mul(" not in forward:
        return "unknown"
    values = [float(v) for v in re.findall(r"(?<![\w.])\d+\.\d+(?:e-?\d+)?", forward)]
    unread = False
    for index in re.findall(r"CONSTANTS\.c(\d+)", forward):
        value = constants[int(index)] if constants and int(index) < len(constants) else None
        if isinstance(value, Tensor) and value.numel() == 1:
            values.append(float(value))
        else:
            unread = True
    if any(abs(v - QUICK_GELU_ALPHA) < 1e-3 for v in values):
        return "quick_gelu"
    return "quick_gelu" if unread and name == "QuickGELU" else "unknown"


def _read_torchscript(path: Path) -> tuple[dict[str, Tensor], str]:
    """(all tensors by attribute path, the MLP activation) of a TorchScript archive.

    The activation is read from the archive's own code for the class of `...mlp.gelu` (or timm's
    `...mlp.act`): 'quick_gelu' (`x * sigmoid(1.702 * x)`), 'gelu' (`torch.gelu`), 'gelu_tanh',
    'unknown' (another function, no such module, or blocks that disagree).
    """
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        roots = [
            n[: -len("/data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1
        ]
        if not roots:
            raise KeyError("data.pkl")  # load_weights: damaged
        root = roots[0]
        byteorder = f"{root}/byteorder"
        if byteorder in names and archive.read(byteorder).strip() != b"little":
            raise WeightsError(f"{path}: big-endian TorchScript archives are not supported; re-save it as "
                               "safetensors on a little-endian machine")
        root_obj = _TorchScriptUnpickler(archive, root).load()

        out: dict[str, Tensor] = {}
        activations: dict[str, str] = {}  # path -> class qualname

        def walk(obj: object, prefix: str) -> None:
            if isinstance(obj, _ScriptObject) and _ACTIVATION_PATH.search(prefix.rstrip(".")):
                activations[prefix.rstrip(".")] = obj.qualname
            attrs = obj.attrs if isinstance(obj, _ScriptObject) else obj
            if not isinstance(attrs, dict):
                return
            for name, value in attrs.items():
                if isinstance(value, Tensor):
                    out[prefix + name] = value
                elif isinstance(value, _ScriptObject | dict):
                    walk(value, f"{prefix}{name}.")

        walk(root_obj, "")
        visual = {p: q for p, q in activations.items() if p.startswith("visual.")} or activations
        constants = None
        if f"{root}/constants.pkl" in names:
            try:
                loaded = _TorchScriptUnpickler(archive, root, "constants").load()
                constants = list(loaded) if isinstance(loaded, tuple | list) else None
            except Exception:  # constants are only needed to read QuickGELU's 1.702
                constants = None
        kinds = {_activation_of(_class_source(archive, root, q), constants, q.rpartition(".")[2])
                 for q in set(visual.values())}
    activation = kinds.pop() if len(kinds) == 1 else "unknown"
    return out, activation


# --------------------------------------------------------------------------------------------
# Teacher weights
# --------------------------------------------------------------------------------------------


def load_weights(path: str | Path) -> tuple[dict[str, Tensor], str | None]:
    """Read a teacher checkpoint safely -> (flat state dict without `module.` prefixes, activation).

    Accepts .safetensors, TorchScript archives (OpenAI's release format) and torch.save files
    holding a state dict, optionally under "state_dict" / "model"; the format is told from the
    bytes, not the name. `activation` is what the file says about the MLP activation:
    'quick_gelu' for an OpenAI state dict (it carries `input_resolution`; OpenAI trained with
    QuickGELU) or a TorchScript archive whose code computes `x * sigmoid(1.702 x)`; 'gelu' /
    'gelu_tanh' for an archive computing `torch.gelu`; 'unknown' for an archive it cannot tell
    from; None for a state dict, which does not say (the architecture decides).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise TeacherFileNotFound(
            f"teacher weights not found: {path} (build_teacher(..., weights=PATH); on the command line "
            "teacher.weights=PATH, e.g. OpenAI's ViT-B-16.pt or an open_clip checkpoint)"
        )
    subject, expected = "teacher weights", WEIGHTS_FORMATS
    kind = file_kind(path)
    activation: str | None = None
    if kind == "safetensors":
        obj: Any = read_safetensors(path, subject=subject, expected=expected)[0]
    elif kind == "torchscript":
        try:
            obj, activation = _read_torchscript(path)
        except _Refused as err:
            raise unreadable(path, "unsafe", subject=subject, expected=expected, unsafe=[str(err)]) from err
        except (zipfile.BadZipFile, KeyError, EOFError, pickle.UnpicklingError, ValueError, RuntimeError) as err:
            if isinstance(err, UserError):
                raise
            raise unreadable(path, "damaged", subject=subject, expected=expected) from err
    else:
        obj = read_torch_file(path, subject=subject, expected=expected)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(
            f"teacher weights {path} do not hold a state dict (a mapping of names to tensors), got "
            f"{type(obj).__name__}: save model.state_dict() (or give OpenAI's TorchScript release)"
        )
    if activation is None and "input_resolution" in obj:
        activation = "quick_gelu"
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    return state, activation
