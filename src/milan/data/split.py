"""Which images an evaluation scores: a separate val folder, or a part held out of the training folder.

kNN, the linear probe and finetuning score a val set against (or after learning from) a train set;
`milan eval` scores what a finetuned classifier was not trained on. An ImageFolder `data.path` with
`train/` and `val/` gives both. Without a separate val folder the val set is *held out* of the
training folder, so that no image is ever scored by a model or a reference set that contains it:

- per class (stratified), the files are ranked by a keyed hash of their path relative to the root,
  and the first `round(val_fraction × n)` are held out (at least one and never all of a class
  with two or more images; a class of one image stays in training);
- the key is fixed (not `run.seed`): every command, every seed and every machine split a folder
  alike, and adding a file moves no other file across the split.

`data.val_fraction=0` refuses a folder without a separate val folder instead (one line naming the fix).
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, Subset

from milan.data import _is_main, build_dataset
from milan.data.folder import ImageFolderDataset
from milan.errors import ConfigError

__all__ = ["EvalSets", "HeldOut", "SPLIT_KEY", "classifier_sets", "eval_sets", "held_out_mask", "resolve_roots",
           "split_source"]

#: The hash key of the held-out split; fixed so that every command splits a folder the same way.
SPLIT_KEY = b"milan-val-split-v1"

_log = logging.getLogger("milan")


def _rank(rel: str) -> bytes:
    return hashlib.blake2b(rel.encode(), key=SPLIT_KEY, digest_size=16).digest()


def held_out_mask(files: Sequence[str], labels: Sequence[int], fraction: float, *,
                  key: str = "data.val_fraction") -> list[bool]:
    """For each file (its path relative to the root), whether it is held out for evaluation.

    Stratified: of each label's `n` files, `round(fraction × n)` clipped to [1, n − 1] are held out
    (none when n = 1), chosen by the keyed hash of the relative path (`SPLIT_KEY`), so the result
    does not depend on the order of `files` or on any seed.
    """
    if not 0 < fraction < 1:
        raise ConfigError(f"{key}={fraction} must be in (0, 1), e.g. 0.2")
    by_label: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_label[int(label)].append(i)
    held = [False] * len(files)
    for members in by_label.values():
        n = len(members)
        take = 0 if n < 2 else min(n - 1, max(1, round(fraction * n)))
        for i in sorted(members, key=lambda i: _rank(files[i]))[:take]:
            held[i] = True
    return held


class HeldOut(Subset):
    """Part of an `ImageFolderDataset` (the training or the held-out files): a `Subset` that keeps
    the folder's `classes`, `root` and its own `samples`, and forwards `transform`."""

    def __init__(self, dataset: Any, indices: Sequence[int]) -> None:
        super().__init__(dataset, list(indices))
        self.classes = dataset.classes
        self.root = dataset.root
        self.samples = [dataset.samples[i] for i in self.indices]

    @property
    def transform(self) -> Callable | None:
        return self.dataset.transform

    @transform.setter
    def transform(self, value: Callable | None) -> None:
        self.dataset.transform = value


@dataclass
class EvalSets:
    """The train (reference) set and the scored set of an evaluation, and where each came from.

    `train_source` / `val_source` are what the start line and `results.json` say:
    `"/photos/val"`, or `"held out from /photos (data.val_fraction=0.2)"`.
    """

    train: Dataset
    val: Dataset
    train_source: str
    val_source: str
    held_out: bool

    def record(self, *, train_count: int | None = None, val_count: int | None = None) -> dict[str, Any]:
        """The `results.json` entry: which images were scored (counts after limits and bad files when
        given) and which formed the train / reference set."""
        return {"scored": {"count": len(self.val) if val_count is None else val_count, "source": self.val_source},
                "train": {"count": len(self.train) if train_count is None else train_count,
                          "source": self.train_source}}


def resolve_roots(path: str | Path, *, val_path: str | Path | None = None) -> tuple[Path, Path | None]:
    """(train root, separate val root or None) of an ImageFolder `data.path` (and `val_path`).

    `path/train` is the train root when it exists, else `path`. The val root is `val_path` (or its
    `val/`), else `path/val`; None when there is none, or when it overlaps the train root (one holds
    the other: e.g. `path` itself when only `path/train` exists), i.e. when scoring it would score
    training images.
    """
    root = Path(path).expanduser()
    train = root / "train" if (root / "train").is_dir() else root
    if val_path is not None:
        given = Path(val_path).expanduser()
        val: Path | None = given / "val" if (given / "val").is_dir() else given
    else:
        val = root / "val" if (root / "val").is_dir() else None
    if val is not None:
        a, b = train.resolve(), val.resolve()
        if a == b or a.is_relative_to(b) or b.is_relative_to(a):
            val = None
    return train, val


def split_source(root: Path, fraction: float, *, key: str = "data.val_fraction") -> str:
    """The scored set's description for a held-out split (start line, results.json, figure titles)."""
    return f"held out from {root} ({key}={fraction:g})"


def eval_sets(kind: str, path: str | Path | None, *, val_fraction: float, train_transform: Callable | None,
              val_transform: Callable | None, label: str = "shape", exif_transpose: bool = True,
              val_path: str | Path | None = None, log: bool = True, key: str = "data.val_fraction") -> EvalSets:
    """Open the train and scored sets of an evaluation command (kNN, linprobe, finetune).

    Args:
        kind: 'imagefolder' or 'shapes' (whose own train and val splits are used).
        path: `data.path`: a root with `train/` and `val/`, or one ImageFolder to hold a part out of.
        val_fraction: `data.val_fraction`: the stratified part held out when there is no separate
            val folder; 0 refuses such a folder instead.
        train_transform, val_transform: for the train and the scored images.
        label, exif_transpose: as `milan.data.build_dataset`.
        val_path: a separate val folder (kNN's `data.val_path`).
        log: log where the scored images come from (rank 0).
        key: the config key of `val_fraction`, for messages.
    """
    if kind != "imagefolder":
        train = build_dataset(kind, path, split="train", transform=train_transform, label=label, log=log)
        val = build_dataset(kind, val_path or path, split="val", transform=val_transform, label=label, log=log)
        where = getattr(train, "root", path)
        return EvalSets(train, val, f"{kind} {where} (train split)", f"{kind} {where} (val split)", held_out=False)
    if not path:
        raise ConfigError("data.path is required for data.kind=imagefolder (a folder of images)")
    train_root, val_root = resolve_roots(path, val_path=val_path)
    log = log and _is_main()

    def folder(root: Path, transform: Callable | None) -> Any:
        dataset = ImageFolderDataset(root, transform, exif_transpose=exif_transpose)
        if log:
            _log.info("%s: %s", root, dataset.describe())
        return dataset

    if val_root is not None:
        train, val = folder(train_root, train_transform), folder(val_root, val_transform)
        sets = EvalSets(train, val, str(train_root), str(val_root), held_out=False)
        if log:
            _log.info("scoring the %d images of %s (the separate val folder) against the %d of %s",
                      len(val), val_root, len(train), train_root)
        return sets
    if val_fraction <= 0:
        raise ConfigError(
            f"{train_root} has no separate val folder and {key}=0, so the scored images would be training "
            f"images; give a root with train/ and val/ folders, or set {key}=0.2 to hold out a stratified part")
    full = folder(train_root, train_transform)
    scored_view = copy.copy(full)  # the same file list, its own transform
    scored_view.transform = val_transform
    files = [p.relative_to(full.root).as_posix() for p, _ in full.samples]
    held = held_out_mask(files, [lbl for _, lbl in full.samples], val_fraction, key=key)
    train = HeldOut(full, [i for i, h in enumerate(held) if not h])
    val = HeldOut(scored_view, [i for i, h in enumerate(held) if h])
    source = split_source(train_root, val_fraction, key=key)
    if log:
        _log.info("no separate val folder: scoring %d images %s, stratified per class; the other %d are the "
                  "train / reference set (the same split in every command; a %s folder is used instead when "
                  "it exists)", len(val), source, len(train), Path(path).expanduser() / "val")
    return EvalSets(train, val, f"{train_root} without the held-out images", source, held_out=True)


def classifier_sets(path: str | Path, *, trained: dict[str, Any] | None, transform: Callable | None,
                    exif_transpose: bool = True, weights: str = "the checkpoint") -> tuple[Any, str]:
    """`milan eval`: the images of one `data.paths` entry that the classifier was not trained on.

    `trained` is the finetune config recorded in the checkpoint (None when it has none: an export,
    another trainer's weights). A folder that is not the finetune's training folder is scored whole
    (its `val/` when it has one). The finetune's training folder itself is scored only through the part
    finetune held out (the same `data.val_fraction`, the same split); when finetune had a separate val
    folder, or held nothing out (an older milan), it is refused with one line.

    Returns (dataset, source): the source as `EvalSets` describes it.
    """
    given = Path(path).expanduser()
    root = given / "val" if (given / "val").is_dir() else given
    data = (trained or {}).get("data") or {}
    if data.get("kind", "imagefolder") != "imagefolder" or not data.get("path"):
        return ImageFolderDataset(root, transform, exif_transpose=exif_transpose), str(root)
    train_root, val_root = resolve_roots(data["path"])
    a, b = root.resolve(), train_root.resolve()
    if not (a == b or a.is_relative_to(b) or b.is_relative_to(a)):
        return ImageFolderDataset(root, transform, exif_transpose=exif_transpose), str(root)
    fraction = data.get("val_fraction")
    if val_root is not None or not fraction or a != b:
        instead = f"evaluate {val_root}" if val_root is not None else "evaluate a folder it was not trained on"
        raise ConfigError(f"data.paths entry {path} holds the images {weights} was finetuned on "
                          f"({train_root}); scoring them measures memorisation, not accuracy: {instead}")
    full = ImageFolderDataset(root, transform, exif_transpose=exif_transpose)
    files = [p.relative_to(full.root).as_posix() for p, _ in full.samples]
    held = held_out_mask(files, [lbl for _, lbl in full.samples], float(fraction))
    return HeldOut(full, [i for i, h in enumerate(held) if h]), split_source(root, float(fraction)) + \
        ", as finetune held it out"
