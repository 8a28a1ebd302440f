"""One reading path for every command: bad image files skipped, counted once, warned once, listed.

Every command reads images through `milan.data.folder.load_rgb` (ImageFolder trees) or
`milan.data.wds.decode_rgb` (shards). A file that cannot be used (corrupt, truncated, empty, too
small, not an image, a decompression bomb) raises `BadImage` there; what happens next depends on
the dataset's role:

* training sets (`Samples` for pretrain, `Checked(dataset, replace=True)` elsewhere) replace the
  bad image by the next good one, deterministically, so batches stay full;
* evaluation sets (`Checked(dataset)`) drop the sample: `collate` leaves it out of the batch, label
  and all, so features and labels stay aligned.

Either way the sample carries *reports* `(file, reason, bad)` — from DataLoader workers to the
main process, through the batch — where one `BadFiles` registry per run keeps each file once
(keyed by its name), warns about it once, writes `bad_images.txt` to the run folder, judges the
threshold (`too_many_bad`) on distinct files and gives the one-line summary at the end. Reports
with `bad=False` are notes about an image that was used (a size over PIL's decompression-bomb
warning limit): warned once, not counted.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset
from torch.utils.data._utils.collate import default_collate

from milan.data.folder import BadImage, UnreadableImages
from milan.errors import DataError

__all__ = ["BAD_IMAGES_FILE", "BadFiles", "Checked", "Samples", "Tolerant", "collate", "collate_lists",
           "first_readable", "read_sample", "too_many_bad", "MIN_FILES"]

_log = logging.getLogger("milan")

BAD_IMAGES_FILE = "bad_images.txt"
MIN_FILES = 32  # distinct files read before the threshold is judged (or all of them, if fewer)
_Z = 3.0  # the threshold's confidence: a 3-sigma Wilson lower bound

Report = tuple[str, str, bool]  # (file, reason, bad)


def too_many_bad(bad: int, tried: int, max_fraction: float, *, total: int | None = None) -> bool:
    """Whether `bad` unreadable files among `tried` distinct files read are too many.

    True when the bad fraction exceeds `max_fraction` by more than chance explains: the lower end of
    a 3-sigma Wilson interval for the fraction is above it, judged once at least `MIN_FILES` files
    were read (or all `total` of them). One bad file in 400 never stops a run; a folder with half of
    its files bad stops within the first few dozen.
    """
    if bad <= 0 or tried <= 0:
        return False
    bad = min(bad, tried)
    if tried < MIN_FILES and (total is None or tried < total):
        return False
    p, n, z2 = bad / tried, tried, _Z * _Z
    low = (p + z2 / (2 * n) - _Z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))) / (1 + z2 / n)
    return low > max_fraction


def read_sample(dataset: Dataset, index: int) -> tuple[Any, Any, list[Report]]:
    """`(image, label, reports)` of sample `index`; `image` is None for a bad file (never raises
    `BadImage`). Looks through `Subset`s for an ImageFolder's `read` (which returns notes too)."""
    base, i = dataset, index
    while isinstance(base, Subset):
        base, i = base.dataset, base.indices[i]
    try:
        if hasattr(base, "read"):
            image, label, notes = base.read(i)
            return image, label, [(name, note, False) for name, note in notes]
        image, label = dataset[index][:2]
        return image, label, []
    except BadImage as err:
        name = err.name or (base.name(i) if hasattr(base, "name") else f"{type(base).__name__}[{i}]")
        label = base.samples[i][1] if hasattr(base, "samples") else None
        return None, label, [(name, err.reason, True)]


class Samples(Dataset):
    """Training view of a dataset: per-sample seeded augmentation and bad-image replacement.

    The augmentation of sample i in epoch e is seeded from (seed, epoch, i) alone, so a resumed run
    sees exactly the crops of an uninterrupted one whatever the worker count.

    `__getitem__((epoch, i))` returns `(image, label, reports)`: `reports` is a tuple of
    `(file, reason, bad)` for the bad files passed over to produce it (and `bad=False` notes on the
    image used), for `BadFiles` in the main process (collate with `collate`). A bad image is
    replaced by the next good one, deterministically. Call `set_epoch` before each epoch (the
    loader's workers see it through the sampler, which passes `(epoch, index)` pairs).
    """

    def __init__(self, dataset: Dataset, *, seed: int, max_tries: int = 16) -> None:
        self.dataset, self.seed, self.max_tries = dataset, seed, max_tries

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, int, tuple[tuple[str, str, bool], ...]]:
        epoch, index = key
        reports: list[tuple[str, str, bool]] = []
        for tries in range(self.max_tries):
            i = (index + tries) % len(self.dataset)
            # Global RNGs are per worker process; seeding them here makes the crop of (epoch, i)
            # independent of which worker (or the main process) draws it.
            seed = hash((self.seed, epoch, i)) & 0x7FFF_FFFF
            torch.manual_seed(seed)
            random.seed(seed)
            image, label, found = read_sample(self.dataset, i)
            reports += found
            if image is not None:
                return image, label, tuple(reports)
        last = reports[-1]
        raise UnreadableImages(
            f"{self.max_tries} consecutive unreadable or too small images from index {index} "
            f"(last: {last[0]}: {last[1]}); check that the data path holds readable images"
        )


class Checked(Dataset):
    """`(image or None, label, reports)` per sample of `dataset`, for a DataLoader with `collate`.

    Args:
        replace: training: a bad image is replaced by the next good one (index + 1, + 2, ...), so
            the sample is never None; after `max_tries` bad ones in a row, `UnreadableImages`.
            False (evaluation): a bad sample is None and `collate` drops it.
    """

    def __init__(self, dataset: Dataset, *, replace: bool = False, max_tries: int = 16) -> None:
        self.dataset, self.replace, self.max_tries = dataset, replace, max_tries
        for name in ("classes", "samples", "targets"):
            if hasattr(dataset, name):
                setattr(self, name, getattr(dataset, name))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any, list[Report]]:
        if not self.replace:
            return read_sample(self.dataset, index)
        reports: list[Report] = []
        for tries in range(self.max_tries):
            image, label, found = read_sample(self.dataset, (index + tries) % len(self.dataset))
            reports += found
            if image is not None:
                return image, label, reports
        last = reports[-1]
        raise UnreadableImages(f"{self.max_tries} consecutive unreadable or too small images from index {index} "
                               f"(last: {last[0]}: {last[1]}); check that the data path holds readable images")


class Tolerant(Dataset):
    """`(image, label)` per sample of `dataset`, a bad image replaced by the next good one and
    reported straight to `bad_files` — for reading in the main process only (`milan viz`); with
    DataLoader workers use `Checked`, whose reports travel through the batch."""

    def __init__(self, dataset: Dataset, bad_files: BadFiles, *, max_tries: int = 16) -> None:
        self.checked, self.bad_files = Checked(dataset, replace=True, max_tries=max_tries), bad_files
        bad_files.expect(dataset)
        for name in ("classes", "samples", "targets"):
            if hasattr(dataset, name):
                setattr(self, name, getattr(dataset, name))

    def __len__(self) -> int:
        return len(self.checked)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, label, reports = self.checked[index]
        self.bad_files.add(reports)
        return image, label


def collate(batch: Sequence[tuple[Any, Any, Iterable[Report]]]) -> tuple[Any, Any, list[Report]]:
    """Collate `(image or None, label, reports)` samples: `(images, labels, reports)` with the bad
    samples left out (`(None, None, reports)` when every one was bad)."""
    reports = [tuple(r) for item in batch for r in item[2]]
    good = [(item[0], item[1]) for item in batch if item[0] is not None]
    if not good:
        return None, None, reports
    images, labels = default_collate(good)
    return images, labels, reports


def collate_lists(batch: Sequence[tuple[Any, Any, Iterable[Report]]]) -> tuple[Any, Any, list[Report]]:
    """`collate` for samples of different sizes (segmentation / detection): `(images, targets,
    reports)` as lists, the bad samples left out (`(None, None, reports)` when every one was bad)."""
    reports = [tuple(r) for item in batch for r in item[2]]
    good = [(item[0], item[1]) for item in batch if item[0] is not None]
    if not good:
        return None, None, reports
    return [g[0] for g in good], [g[1] for g in good], reports


def first_readable(read: Callable[[int], Any], index: int, size: int, *, replace: bool,
                   max_tries: int = 16) -> tuple[Any, int, list[Report]]:
    """`(read(i), i, reports)` for the first `i` of `index, index + 1, ...` (mod `size`) whose image
    is readable — an image with its annotations (`read` raises `BadImage` for a bad image file).

    Args:
        replace: training: try up to `max_tries` samples, then `UnreadableImages`. False
            (evaluation): only `index`; a bad one gives `(None, index, reports)`.
    """
    reports: list[Report] = []
    for tries in range(max_tries if replace else 1):
        i = (index + tries) % size
        try:
            return read(i), i, reports
        except BadImage as err:
            reports.append((err.name or f"sample {i}", err.reason, True))
    if not replace:
        return None, index, reports
    last = reports[-1]
    raise UnreadableImages(f"{max_tries} consecutive unreadable images from index {index} "
                           f"(last: {last[0]}: {last[1]}); check that the data path holds readable images")


class BadFiles:
    """The run's registry of bad image files (main process; one per run, shared by its datasets).

    Args:
        max_fraction: the threshold (`too_many_bad`); None: never stop.
        folder: the run folder, for `bad_images.txt` (None: commands without one).
        verbose: warn about each new file (rank 0 only in a multi-process run).
        key: the config key named in messages.
    """

    def __init__(self, *, max_fraction: float | None = 0.01, folder: str | Path | None = None,
                 verbose: bool = True, key: str = "data.max_bad_fraction") -> None:
        self.max_fraction, self.key, self.verbose = max_fraction, key, verbose
        self.folder = Path(folder) if folder is not None else None
        self.bad: dict[str, str] = {}  # file -> reason, in the order found
        self.noted: set[str] = set()
        self.unsynced: list[Report] = []
        self.seen = 0  # good samples delivered by tracked loaders
        self.total = 0  # distinct files behind the tracked datasets (0: unknown)
        self.attached: list[BadFiles] = []
        self.parent: BadFiles | None = None
        self.elsewhere: dict[str, str] = {}  # files known bad from before a resume, not counted here

    def attach(self, other: BadFiles) -> None:
        """List `other`'s files (e.g. the kNN monitor's) in this one's `bad_images.txt` and summary;
        each judges its own threshold."""
        self.attached.append(other)
        other.parent = self

    def _root(self) -> BadFiles:
        return self if self.parent is None else self.parent._root()

    def _has(self, name: str) -> bool:
        return name in self.bad or name in self.elsewhere or any(other._has(name) for other in self.attached)

    def all_bad(self) -> dict[str, str]:
        out = {**self.elsewhere, **self.bad}
        for other in self.attached:
            for name, reason in other.all_bad().items():
                out.setdefault(name, reason)
        return out

    def __len__(self) -> int:
        return len(self.bad)

    def expect(self, dataset: Any) -> None:
        """Add a dataset's size to `total` (the files the run may read)."""
        self.total += len(dataset)

    def add(self, reports: Iterable[Report]) -> int:
        """Record reports; warns about (and returns the number of) files not seen before."""
        new = 0
        for name, reason, bad in reports:
            if bad and name not in self.bad:
                known = self._root()._has(name)  # warned about by another registry of the run
                self.bad[name] = reason
                new += 1
                if self.verbose and not known:
                    _log.warning("skipping unreadable image %s: %s", name, reason)
            elif not bad and name not in self.noted:
                self.noted.add(name)
                if self.verbose:
                    _log.warning("%s: %s", name, reason)
            else:
                continue
            self.unsynced.append((name, reason, bad))
        return new

    def sync(self, device: torch.device | str = "cpu") -> None:
        """Merge every rank's new reports into every rank's registry (a collective: all ranks call it
        at the same points). One all-reduce of a count; the names travel only when there are any."""
        mine, self.unsynced = self.unsynced, []
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        count = torch.tensor([float(len(mine))], device=device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        if count.item() == 0:
            return
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        for rank, reports in enumerate(gathered):
            if rank != dist.get_rank():
                self.add(reports)
        self.unsynced = []

    def tried(self, seen: int | None = None) -> int:
        """Distinct files read so far: the good samples delivered plus the bad files, at most `total`."""
        n = (self.seen if seen is None else seen) + len(self.bad)
        return min(n, self.total) if self.total else n

    def check(self, seen: int | None = None) -> None:
        """Raise `DataError` (one line; `bad_images.txt` written first) when there are too many bad files."""
        if self.max_fraction is None:
            return
        tried = self.tried(seen)
        if too_many_bad(len(self.bad), tried, self.max_fraction, total=self.total or None):
            where = self.write()
            listed = f"the list is in {where}" if where is not None else "the warnings above name each one"
            raise DataError(
                f"{len(self.bad)} of the {tried} image files read so far are unreadable or too small "
                f"({len(self.bad) / tried:.1%} > {self.key}={self.max_fraction}, beyond chance); {listed}. "
                f"Fix or remove them, or raise {self.key}"
            )

    def track(self, loader: Any, *, check: bool = True) -> _Tracked:
        """Iterate a DataLoader of `collate` batches as `(images, labels)`: reports recorded, all-bad
        batches skipped, the threshold checked after each batch (unless `check` is False)."""
        return _Tracked(self, loader, check)

    def write(self, folder: str | Path | None = None) -> Path | None:
        """Write `bad_images.txt` (file TAB reason per line) to `folder` (default: the run folder) when
        any file was bad; returns its path, or None."""
        folder = Path(folder) if folder is not None else self.folder
        bad = self.all_bad()
        if folder is None or not bad:
            return None
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / BAD_IMAGES_FILE
        lines = [f"{name}\t{' '.join(reason.split())}" for name, reason in bad.items()]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("# unreadable image files skipped (file<TAB>reason)\n" + "\n".join(lines) + "\n")
        tmp.replace(path)
        return path

    def load(self, folder: str | Path | None = None) -> None:
        """Take the files of an existing `bad_images.txt` (a resumed run) without warning again."""
        folder = Path(folder) if folder is not None else self.folder
        path = folder / BAD_IMAGES_FILE if folder is not None else None
        if path is None or not path.is_file():
            return
        for line in path.read_text().splitlines():
            if line and not line.startswith("#"):
                name, _, reason = line.partition("\t")
                self.bad.setdefault(name, reason)

    def summary(self, total: int | None = None) -> str | None:
        """The final line, e.g. "skipped 7 unreadable files of 426; list in runs/x/bad_images.txt"
        (writes the file); None when no file was bad."""
        bad = self.all_bad()
        if not bad:
            return None
        total = total if total is not None else self.total
        where = self.write()
        n = len(bad)
        head = f"skipped {n} unreadable file{'s' if n != 1 else ''}" + (f" of {total}" if total else "")
        if where is not None:
            return f"{head}; list in {where}"
        return f"{head} (no run folder: the warnings above name each one)"

    def log_summary(self, total: int | None = None) -> None:
        line = self.summary(total)
        if line is not None and self.verbose:
            _log.info(line)


class _Tracked:
    def __init__(self, registry: BadFiles, loader: Any, check: bool) -> None:
        self.registry, self.loader, self.check = registry, loader, check

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for images, labels, reports in self.loader:
            self.registry.add(reports)
            if images is not None:
                self.registry.seen += len(images)
            if self.check:
                self.registry.check()
            if images is not None:
                yield images, labels
