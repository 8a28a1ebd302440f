"""WebDataset tar shards streamed for pretraining at scale.

Layout: standard webdataset tars. Each sample is consecutive tar members sharing a key,
`<key>.jpg` (or `.jpeg`, `.png`, `.webp`) plus an optional `<key>.cls` holding the integer
label as text; other members are ignored. `write_shards` and `folder_to_shards` write this layout
and a `sizes.json` (`{shard name: samples}`, the open_clip convention) that `count_samples` reads.

Sharding. Each epoch the shard list is shuffled from (seed, epoch) alone, identically on every
rank; rank r takes `shards[r::world_size]` and DataLoader worker w of that rank takes
`rank_shards[w::num_workers]`. Every shard is therefore read by exactly one (rank, worker) per
epoch and every sample is seen exactly once per epoch across all ranks. The *order* of samples
depends on the number of ranks and workers (each worker streams its own shards through its own
shuffle buffer, seeded from (seed, epoch, rank, worker)), but each sample's augmentation is
seeded from (seed, epoch, shard name, key) and so is the same whoever reads it.

Equal steps on every rank. Ranks hold different numbers of samples (shards differ in size and
are dealt out afresh each epoch), which DDP cannot run: all ranks must take the same number of
steps. `samples_per_rank` gives every rank exactly that many samples per epoch, split over its
workers in whole batches (`batch_size`, the DataLoader's) so the DataLoader's round-robin over
workers always yields full batches. A worker whose shards hold more stops early (the unread tail
differs each epoch); one whose shards hold fewer streams them again (repeats get new crops), as
webdataset's `.repeat().with_epoch(n)` does. Without `samples_per_rank` coverage is exact but
the count per rank varies.

Resume. `set_epoch(epoch, skip=k)` drops the first k samples of this rank's epoch stream
without decoding them (the tar bytes are still read). With workers, k is split the way the
DataLoader interleaves them (batch j comes from worker j % num_workers), so k must be a multiple of
`batch_size`; this is exact with `samples_per_rank`, and without it as long as no worker ran out
of samples within the first k. Bad images among the skipped samples are not known without
decoding, so after a resume up to that many samples from before the interruption repeat.

Dataset size. A stream has no length: the recipe needs the number of samples to size its
schedule and `samples_per_rank` (config key `data.num_samples`; `count_samples` reads
`sizes.json` or counts the keys in local shards).

Bad images (corrupt, truncated, too small, no image member) are skipped and reported, as
`(shard:key.ext, reason, True)`, in the `reports` of the next sample yielded, for the main
process's `milan.data.reading.BadFiles` to warn about once and count (bad samples at the very end
of a worker's stream are only logged); EXIF orientation is applied; CMYK, grayscale, palette and alpha images are
converted to RGB, as in `milan.data.folder`. A shard that cannot be read to the end is warned
about and the rest of it skipped.

Use (per rank; `per_rank` as `EpochSampler.per_rank`, the loader's `in_order` left True)::

    stream = ShardStream(urls, transform=t, rank=rank, world_size=world, seed=seed,
                         samples_per_rank=per_rank, batch_size=batch)
    stream.check_workers(num_workers)
    loader = DataLoader(stream, batch_size=batch, num_workers=num_workers, persistent_workers=False)
    stream.set_epoch(epoch, skip=batches_done * batch)
    for images, labels, reports in loader: ...   # collate_fn=milan.data.reading.collate
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import count, islice
from pathlib import Path
from typing import Any

import braceexpand
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset import TarWriter
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from milan.data.folder import (
    BadImage,
    ImageFolderDataset,
    UnreadableImages,
    draft_request,
    load_rgb,
)
from milan.data.reading import BadFiles
from milan.errors import ConfigError, DataError, DataNotFound

_log = logging.getLogger("milan")

__all__ = ["ShardStream", "count_samples", "decode_rgb", "expand_shards", "folder_to_shards", "write_shards"]

SIZES_FILE = "sizes.json"
META_KEY = "__meta__"  # sizes.json: how the shards were written (max_size, quality), beside {shard: samples}
_RAW_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def expand_shards(urls: str | Path | Sequence[str | Path]) -> list[str]:
    """A brace pattern, a directory (its `*.tar`, sorted), one path or a list of them -> shard list.

    Raises:
        DataNotFound: a local shard is missing, or a directory holds no `.tar` (a `DataError` and a
            `FileNotFoundError`).
    """
    if isinstance(urls, (str, Path)):
        path = Path(urls).expanduser()
        if path.is_dir():
            shards = [str(p) for p in sorted(path.glob("*.tar"))]
            if not shards:
                raise DataNotFound(f"no .tar shards in {path}; write some with `folder_to_shards`")
            return shards
        shards = list(braceexpand.braceexpand(str(urls)))
    else:
        shards = [str(u) for u in urls]
    if not shards:
        raise DataNotFound("empty shard list")
    for shard in shards:
        if _is_local(shard) and not Path(shard).expanduser().is_file():
            raise DataNotFound(f"shard not found: {shard} (of {len(shards)} shards)")
    return [str(Path(s).expanduser()) if _is_local(s) else s for s in shards]


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _seed(*parts: Any) -> int:
    """A seed from `parts` that is the same in every process (`hash` of a str is not)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def decode_rgb(data: bytes, *, name: str, min_size: int = 1, exif_transpose: bool = True,
               notes: list[tuple[str, str]] | None = None) -> Image.Image:
    """`milan.data.folder.load_rgb` for in-memory bytes; `name` goes into `BadImage` reasons."""
    return load_rgb(io.BytesIO(data), min_size=min_size, name=name, exif_transpose=exif_transpose, notes=notes)


def _share(total: int, *, batch_size: int, worker: int, num_workers: int) -> int:
    """Worker `worker`'s part of `total` samples (a multiple of `batch_size`) when the DataLoader
    takes batch j from worker j % num_workers."""
    return len(range(worker, total // batch_size, num_workers)) * batch_size


class ShardStream(IterableDataset):
    """Stream `(image, label, reports)` from webdataset tar shards, split over ranks and workers.

    Args:
        urls: a brace pattern (`/data/train-{000000..000127}.tar`), a directory of `.tar`, or a list.
        transform: applied to each RGB PIL image (seeded per sample, see the module docstring).
        rank, world_size: this process and how many there are.
        seed: shard order, shuffle buffers and augmentation derive from (seed, epoch).
        shuffle_buffer: samples held per worker for shuffling; 0 or 1 keeps shard order.
        min_size: images whose short side is below this are bad.
        image_keys: member extensions tried, in order, for the image.
        label_key: member extension holding the integer label; None (or a missing member): -1.
        samples_per_rank: yield exactly this many samples per epoch on each rank (DDP); None:
            every sample once, however many that is.
        batch_size: the DataLoader's batch size, for splitting `samples_per_rank` and `skip`
            over workers in whole batches.
        exif_transpose: apply each image's EXIF Orientation (see `load_rgb`).

    Yields `(image, label, reports)`: `reports` are the `(name, reason, bad)` of the bad samples
    passed over before this one (and notes on this one), for `milan.data.reading.BadFiles`; batch
    with `milan.data.reading.collate`.
    """

    def __init__(
        self,
        urls: str | Path | Sequence[str | Path],
        *,
        transform: Callable[[Image.Image], Any] | None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        min_size: int = 1,
        image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
        label_key: str | None = "cls",
        samples_per_rank: int | None = None,
        batch_size: int = 1,
        exif_transpose: bool = True,
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.shards = expand_shards(urls)
        if len(self.shards) < world_size:
            raise DataError(
                f"{len(self.shards)} shard(s) for {world_size} processes; every process needs at least "
                "one shard: use more shards or fewer workers/processes"
            )
        if samples_per_rank is not None and (samples_per_rank <= 0 or samples_per_rank % batch_size):
            raise ValueError(
                f"samples_per_rank={samples_per_rank} must be a positive multiple of batch_size={batch_size}"
            )
        self.transform, self.rank, self.world_size, self.seed = transform, rank, world_size, seed
        self.shuffle_buffer, self.min_size = shuffle_buffer, min_size
        self.image_keys, self.label_key = tuple(image_keys), label_key
        self.samples_per_rank, self.batch_size = samples_per_rank, batch_size
        self.exif_transpose = exif_transpose
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch; skip this rank's first `skip` samples of it (resume).

        DataLoader workers copy the dataset when an epoch's iteration starts, so call this
        before `iter(loader)` and keep `persistent_workers=False`.
        """
        if skip < 0 or skip % self.batch_size:
            raise ValueError(f"skip={skip} must be a non-negative multiple of batch_size={self.batch_size}")
        self.epoch, self.skip = epoch, skip

    def check_workers(self, num_workers: int) -> None:
        """Raise `DataError` unless every (rank, worker) gets a shard; `__iter__` checks too, but
        inside a worker, so call this before building the DataLoader to fail fast."""
        readers = self.world_size * max(num_workers, 1)
        if len(self.shards) < readers:
            raise DataError(
                f"{len(self.shards)} shard(s) for {self.world_size} process(es) × {max(num_workers, 1)} "
                f"DataLoader worker(s) = {readers} readers; every reader needs at least one shard: use more "
                "shards or fewer workers/processes"
            )

    def epoch_shards(self, worker: int = 0, num_workers: int = 1) -> list[str]:
        """The shards read by (this rank, `worker`) in the current epoch, in reading order."""
        shards = list(self.shards)
        random.Random(_seed(self.seed, self.epoch)).shuffle(shards)  # same on all ranks
        return shards[self.rank::self.world_size][worker::num_workers]

    def __iter__(self) -> Iterator[tuple[Any, int, tuple[tuple[str, str, bool], ...]]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self.check_workers(num_workers)
        # The DataLoader takes batch j from worker j % num_workers, restarting at worker 0 each
        # `iter(loader)`. After skipping k batches, worker w plays the part that worker
        # (w + k) % num_workers had in the uninterrupted epoch, so the order continues unchanged.
        worker = (worker + self.skip // self.batch_size) % num_workers
        shards = self.epoch_shards(worker, num_workers)
        rng = random.Random(_seed(self.seed, self.epoch, self.rank, worker))
        split = dict(batch_size=self.batch_size, worker=worker, num_workers=num_workers)
        quota = None if self.samples_per_rank is None else _share(self.samples_per_rank, **split)
        skip = _share(self.skip, **split)
        per_pass: list[int] = []
        raw: Iterator[tuple[int, str, dict[str, Any]]] = self._raw(shards, rng, repeat=quota is not None,
                                                                   per_pass=per_pass)
        if self.shuffle_buffer > 1:
            raw = _shuffled(raw, self.shuffle_buffer, rng)
        for _ in islice(raw, skip):  # resume: no decoding
            pass
        done, bad = skip, 0
        reports: list[tuple[str, str, bool]] = []
        while quota is None or done < quota:
            item = next(raw, None)
            if item is None:
                left = [f"{n}: {r}" for n, r, b in reports if b]
                if left:  # no sample left to carry them to the main process: log here (in the worker)
                    _log.warning("skipping bad sample(s) at the end of the stream: %s", "; ".join(left))
                return
            epoch_pass, shard, sample = item
            name = f"{Path(shard).name}:{sample['__key__']}"
            notes: list[tuple[str, str]] = []
            # Global RNGs are per worker process; seeding them here makes the crop of a sample
            # independent of which rank and worker read it (before decoding: a transform that
            # decodes itself draws its crop first).
            seed = _seed(self.seed, self.epoch, epoch_pass, Path(shard).name, sample["__key__"])
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                image, label = self._decode(sample, name, notes)
            except BadImage as err:
                bad += 1
                reports.append((err.name or name, err.reason, True))
                if per_pass and bad > per_pass[0]:
                    raise UnreadableImages(
                        f"every sample in {', '.join(shards)} is bad (last: {err}); check the shards"
                    ) from err
                continue
            reports += [(n, note, False) for n, note in notes]
            if self.transform is not None and not hasattr(self.transform, "decode"):
                image = self.transform(image)
            yield image, label, tuple(reports)
            done, bad, reports = done + 1, 0, []

    def _raw(self, shards: list[str], rng: random.Random, *, repeat: bool,
             per_pass: list[int]) -> Iterator[tuple[int, str, dict[str, Any]]]:
        """Undecoded samples `(pass, shard, {ext: bytes})`; with `repeat`, passes over `shards` forever."""
        for epoch_pass in count():
            n = 0
            for shard in shards:
                for sample in _read_shard(shard):
                    n += 1
                    yield epoch_pass, shard, sample
            if not per_pass:
                per_pass.append(n)
            if not repeat:
                return
            if n == 0:
                raise DataError(f"no samples in {', '.join(shards)}; check the shards")
            rng.shuffle(shards)

    def _decode(self, sample: dict[str, Any], name: str,
                notes: list[tuple[str, str]] | None = None) -> tuple[Image.Image, int]:
        ext = next((k for k in self.image_keys if k in sample), None)
        if ext is None:
            reason = f"no image member (looked for {', '.join(self.image_keys)})"
            raise BadImage(f"{name}: {reason}", name=name, reason=reason)
        label = -1
        if self.label_key is not None and self.label_key in sample:
            try:
                label = int(sample[self.label_key].decode().strip())
            except ValueError as err:
                reason = f"label is not an integer: {err}"
                raise BadImage(f"{name}.{self.label_key}: {reason}", name=f"{name}.{self.label_key}",
                               reason=reason) from err
        decode = getattr(self.transform, "decode", None)  # a transform that decodes itself (milan.data.fast)
        if decode is not None:
            return decode(io.BytesIO(sample[ext]), name=f"{name}.{ext}", min_size=self.min_size), label
        return decode_rgb(sample[ext], name=f"{name}.{ext}", min_size=self.min_size,
                          exif_transpose=self.exif_transpose, notes=notes), label


def _read_shard(shard: str) -> Iterator[dict[str, Any]]:
    """Samples `{"__key__": key, ext: bytes, ...}` of one shard; a damaged tail is warned about."""
    damage: list[Exception] = []

    def files(stream: Any) -> Iterator[dict[str, Any]]:
        # End the member stream at the damage instead of raising through `group_by_keys`, which
        # would drop the complete sample it holds.
        try:
            for member in tar_file_iterator(stream):
                yield {**member, "__url__": shard}
        except (tarfile.TarError, OSError, ValueError, EOFError) as err:
            damage.append(err)

    n = 0
    try:
        with gopen(shard, "rb") as stream:
            for sample in group_by_keys(files(stream)):
                n += 1
                yield sample
    except (OSError, ValueError) as err:  # unreadable, or a member name repeated within a sample
        damage.append(err)
    if damage:
        _log.warning("shard %s is damaged after %d samples (%s); skipping the rest of it", shard, n, damage[0])


def _shuffled(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream through a buffer of `size` items."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        k = rng.randrange(size)
        yield buffer[k]
        buffer[k] = item
    rng.shuffle(buffer)
    yield from buffer


def count_samples(urls: str | Path | Sequence[str | Path]) -> int:
    """Samples in the shards: from `sizes.json` beside them when it lists them all, else by
    reading the tar headers of local shards (no image data)."""
    shards = expand_shards(urls)
    total, unknown = 0, []
    sizes: dict[Path, dict[str, int]] = {}
    for shard in shards:
        folder = Path(shard).parent
        if folder not in sizes:
            file = folder / SIZES_FILE
            sizes[folder] = json.loads(file.read_text()) if _is_local(shard) and file.is_file() else {}
        n = sizes[folder].get(Path(shard).name)
        if n is None:
            unknown.append(shard)
        else:
            total += int(n)
    for shard in unknown:
        if not _is_local(shard):
            raise DataError(f"cannot count the samples of {shard}; set data.num_samples")
        with tarfile.open(shard, "r:*") as tar:
            keys = {base_plus_ext(m.name)[0] for m in tar if m.isreg()}
        total += len(keys - {None})
    return total


def _image_ext(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise ValueError("unknown image format (not JPEG, PNG or WEBP); re-encode it, e.g. as PNG")


def write_shards(samples: Iterable[tuple[str, bytes, int]], out_dir: str | Path, *, per_shard: int,
                 meta: dict[str, Any] | None = None) -> list[Path]:
    """Write `(key, image bytes, label)` samples to `out_dir/shard-000000.tar`, ... and `sizes.json`.

    `meta` goes into `sizes.json` under the key `__meta__` (not a shard name: readers look shards up by
    name), e.g. the bounded size and quality of `folder_to_shards(max_size=...)`.

    The image member's extension follows the bytes (JPEG, PNG or WEBP); label -1 writes no `.cls`.
    Keys must be unique and must not contain '.' (webdataset splits the extension at the first dot).
    """
    if per_shard < 1:
        raise ConfigError(f"per_shard={per_shard} must be at least 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.tar")):
        raise DataError(f"{out} already holds .tar shards; write to an empty folder")
    paths: list[Path] = []
    sizes: dict[str, int] = {}
    writer: TarWriter | None = None
    try:
        for i, (key, data, label) in enumerate(samples):
            if "." in key.rsplit("/", 1)[-1]:
                raise DataError(f"sample key {key!r} contains '.'; webdataset keys cannot")
            try:
                ext = _image_ext(data)
            except ValueError as err:
                raise DataError(f"sample {key!r}: {err}") from None
            if i % per_shard == 0:
                if writer is not None:
                    writer.close()
                paths.append(out / f"shard-{len(paths):06d}.tar")
                writer = TarWriter(str(paths[-1]), encoder=False, mtime=0.0)
                sizes[paths[-1].name] = 0
            record = {"__key__": key, ext: data}
            if label >= 0:
                record["cls"] = str(label).encode()
            writer.write(record)
            sizes[paths[-1].name] += 1
    finally:
        if writer is not None:
            writer.close()
    (out / SIZES_FILE).write_text(json.dumps({**sizes, **({META_KEY: meta} if meta else {})}, indent=1) + "\n")
    return paths


def bounded_draft(max_size: int | None) -> Any:
    """A `load_rgb` draft hook for writing shards: a JPEG whose short side is over `max_size` is
    decoded at the smallest 1/2, 1/4 or 1/8 scale that keeps it ≥ `max_size` (libjpeg's DCT
    scaling does the first part of the reduction); any other JPEG — or every JPEG without
    `max_size` — at 1/8, because its pixels are only checked (every coefficient is still read, so a
    truncated or corrupt file still fails), its bytes are copied."""
    def hook(img: Image.Image) -> None:
        if img.format not in ("JPEG", "MPO"):
            return
        short = min(img.size)
        request = draft_request(img.size, 8 if max_size is None or short <= max_size else short / max_size)
        if request is not None:
            img.draft(img.mode, request)
    return hook


def reencode_jpeg(data: bytes, *, max_size: int, quality: int = 90, name: str = "image",
                  image: Image.Image | None = None) -> bytes | None:
    """Image bytes with the short side bounded to `max_size`, as a JPEG of `quality`.

    An image whose short side is already ≤ `max_size` and that is a JPEG is returned as it is (no
    second lossy encode); a larger one is resized (PIL bicubic with antialias: a reduction, after
    the DCT-scaled decode of `bounded_draft`) and encoded as baseline JPEG, 4:2:0. `image`: the file
    already decoded with `bounded_draft(max_size)` (not decoded again). Returns None for an
    unreadable image (it is logged by the caller). Non-JPEG images are re-encoded as JPEG too (the
    point is a fast, uniform format).
    """
    try:
        with warnings.catch_warnings():  # load_rgb below (or the caller's) reports a large image once
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as header:  # the stored size (`image` may be decoded smaller)
                short = min(header.size)
        if short <= max_size and data[:3] == b"\xff\xd8\xff":  # a JPEG already small enough
            return data
        if image is None or min(image.size) < min(short, max_size):  # not decoded as bounded_draft does
            image = load_rgb(io.BytesIO(data), name=name, draft=bounded_draft(max_size))
    except (BadImage, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    w, h = image.size
    if min(w, h) > max_size:
        scale = max_size / min(w, h)
        size = (max_size, round(h * scale)) if w <= h else (round(w * scale), max_size)
        image = image.resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling="4:2:0")
    return buffer.getvalue()


def folder_to_shards(image_folder: str | Path, out_dir: str | Path, per_shard: int = 1000,
                     *, seed: int = 0, max_size: int | None = None, quality: int = 90, min_size: int = 16,
                     bad_files: Any = None) -> list[Path]:
    """Convert an ImageFolder tree (or flat folder) to shuffled tar shards.

    Samples are shuffled before writing so every shard mixes classes (the stream only shuffles
    within a buffer). Every file is decoded once to check it (a JPEG at reduced size: see
    `bounded_draft`): unreadable ones and those with a
    short side under `min_size` are left out, warned about once each and listed in
    `out_dir/bad_images.txt` (through `bad_files`, a `milan.data.reading.BadFiles`; by default a
    new one writing there). JPEG, PNG and WEBP files are then copied byte for byte (EXIF
    orientation included, applied when decoded); other formats (GIF's first frame, TIFF, BMP, ...)
    are re-encoded upright as PNG. Class names go to `classes.json` (index = label).

    `max_size` bounds the short side (`reencode_jpeg`): larger images are resized to it
    and every image is stored as JPEG of `quality` (JPEGs already small enough are copied); `sizes.json`
    records `{"__meta__": {"max_size": ..., "quality": ...}}`.
    """
    if max_size is not None and max_size < 1:
        raise ConfigError(f"max_size={max_size} must be at least 1")
    if not 1 <= quality <= 100:
        raise ConfigError(f"quality={quality} must be in 1..100")
    folder = ImageFolderDataset(image_folder)
    _log.info("%s: %s", folder.root, folder.describe())
    if bad_files is None:
        bad_files = BadFiles(max_fraction=None, folder=out_dir)
    bad_files.expect(folder)
    order = list(range(len(folder.samples)))
    random.Random(seed).shuffle(order)

    draft = bounded_draft(max_size)  # JPEGs: decoded only as large as the shard needs (1/8 to check)

    def records() -> Iterator[tuple[str, bytes, int]]:
        for i in order:
            path, label = folder.samples[i]
            notes: list[tuple[str, str]] = []
            try:
                image = load_rgb(path, min_size=min_size, notes=notes, draft=draft)
            except BadImage as err:
                bad_files.add([(err.name or str(path), err.reason, True)])
                continue
            bad_files.add([(name, note, False) for name, note in notes])
            data = path.read_bytes()
            if max_size is not None:
                bounded = reencode_jpeg(data, max_size=max_size, quality=quality, name=str(path), image=image)
                if bounded is None:  # (load_rgb read it above: not expected)
                    bad_files.add([(str(path), "could not be re-encoded", True)])
                    continue
                yield f"{i:09d}", bounded, label
                continue
            try:
                _image_ext(data)
            except ValueError:
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                data = buffer.getvalue()
            yield f"{i:09d}", data, label

    meta = {"max_size": max_size, "quality": quality, "format": "jpeg"} if max_size is not None else None
    paths = write_shards(records(), out_dir, per_shard=per_shard, meta=meta)
    if folder.classes:
        (Path(out_dir) / "classes.json").write_text(json.dumps(folder.classes, indent=1) + "\n")
    bad_files.write(out_dir)
    return paths
