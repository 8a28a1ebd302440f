"""WebDataset shard streaming: exact per-epoch coverage over ranks × workers, determinism,
resume skip, equal per-rank counts for DDP, bad images, errors, shard writing."""

from __future__ import annotations

import io
import json
import logging
import random
import tarfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T
from webdataset import TarWriter

from milan.data import wds
from milan.data.folder import load_rgb
from milan.data.reading import BadFiles, collate
from milan.data.wds import ShardStream, count_samples, decode_rgb, folder_to_shards, write_shards
from milan.errors import DataError

N, PER_SHARD = 48, 6  # 8 shards


def _image(i: int, size: int = 16, mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(((f"{i:06d}", _encode(_image(i)), i) for i in range(N)), out, per_shard=PER_SHARD)
    return out


_crop = T.Compose([T.RandomResizedCrop(8, scale=(0.2, 1.0)), T.RandomHorizontalFlip(), T.PILToTensor()])


def _run(stream: ShardStream, *, workers: int, batch_size: int | None = None) -> list[tuple[int, torch.Tensor, list]]:
    """(label, image, names of the bad files passed over before it) per sample, in the order the
    DataLoader yields them (batched: the batch's bad files go with its first sample)."""
    loader = DataLoader(stream, batch_size=batch_size, num_workers=workers, persistent_workers=False,
                        collate_fn=None if batch_size is None else collate)
    out = []
    for images, labels, reports in loader:
        bad = [name for name, _, is_bad in reports if is_bad]
        if batch_size is None:
            out.append((labels, images, bad))
        else:
            out += [(label, image, bad if i == 0 else []) for i, (label, image) in enumerate(zip(labels.tolist(), images,
                                                                                             strict=True))]
    return out


def _ids(stream: ShardStream, *, workers: int, batch_size: int | None = None) -> list[int]:
    return [label for label, _, _ in _run(stream, workers=workers, batch_size=batch_size)]


def test_every_sample_once_per_epoch_2_ranks_2_workers(shards: Path) -> None:
    orders = []
    for epoch in (0, 1):
        per_rank = []
        for rank in (0, 1):
            stream = ShardStream(shards, transform=T.PILToTensor(), rank=rank, world_size=2, seed=7,
                                 shuffle_buffer=4)
            stream.set_epoch(epoch)
            per_rank.append(_ids(stream, workers=2))
        seen = per_rank[0] + per_rank[1]
        assert len(seen) == N and sorted(seen) == list(range(N)), Counter(seen).most_common(3)
        assert len(per_rank[0]) == len(per_rank[1]) == N // 2  # 8 equal shards over 2 ranks
        orders.append(seen)
    assert orders[0] != orders[1]


def test_same_seed_and_epoch_give_the_same_sequence(shards: Path) -> None:
    def seq(seed: int, epoch: int) -> list[int]:
        stream = ShardStream(shards, transform=T.PILToTensor(), rank=1, world_size=2, seed=seed, shuffle_buffer=5)
        stream.set_epoch(epoch)
        return _ids(stream, workers=2)

    assert seq(0, 3) == seq(0, 3)
    assert seq(0, 3) != seq(1, 3)
    assert seq(0, 3) != seq(0, 4)


def test_crops_depend_on_the_sample_not_the_worker(shards: Path) -> None:
    def crops(world_size: int, workers: int, epoch: int) -> dict[int, torch.Tensor]:
        out = {}
        for rank in range(world_size):
            stream = ShardStream(shards, transform=_crop, rank=rank, world_size=world_size, seed=1)
            stream.set_epoch(epoch)
            out.update({label: image for label, image, _ in _run(stream, workers=workers)})
        assert sorted(out) == list(range(N))
        return out

    single, split = crops(1, 0, epoch=0), crops(2, 2, epoch=0)
    for i in range(N):
        assert torch.equal(single[i], split[i]), i
    later = crops(1, 0, epoch=1)
    assert sum(not torch.equal(single[i], later[i]) for i in range(N)) > N // 2  # new crops each epoch


def test_skip_drops_exactly_the_first_samples(shards: Path) -> None:
    stream = ShardStream(shards, transform=T.PILToTensor(), seed=2, shuffle_buffer=10)
    stream.set_epoch(3)
    full = _ids(stream, workers=0)
    assert sorted(full) == list(range(N))
    stream.set_epoch(3, skip=7)
    assert _ids(stream, workers=0) == full[7:]

    # With workers, skip is split the way the DataLoader interleaves their batches.
    stream = ShardStream(shards, transform=T.PILToTensor(), seed=2, batch_size=2)
    stream.set_epoch(1)
    full = _ids(stream, workers=2, batch_size=2)
    stream.set_epoch(1, skip=6)
    assert _ids(stream, workers=2, batch_size=2) == full[6:]
    with pytest.raises(ValueError, match="multiple of batch_size"):
        stream.set_epoch(1, skip=3)


def test_samples_per_rank_gives_every_rank_the_same_count(tmp_path: Path) -> None:
    write_shards(((f"{i:06d}", _encode(_image(i, 8)), i) for i in range(43)), tmp_path, per_shard=5)  # 8×5 + 3
    assert count_samples(tmp_path) == 43
    per_rank = 43 // 2 // 4 * 4  # 20, as EpochSampler would: whole batches of 4
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            stream = ShardStream(tmp_path, transform=T.PILToTensor(), rank=rank, world_size=2, seed=0,
                                 shuffle_buffer=3, samples_per_rank=per_rank, batch_size=4)
            stream.set_epoch(epoch)
            ids = _ids(stream, workers=2, batch_size=4)
            assert len(ids) == per_rank
            stream.set_epoch(epoch, skip=4 + 8 * epoch)  # an odd and an even number of batches
            assert _ids(stream, workers=2, batch_size=4) == ids[4 + 8 * epoch:]
            seen += ids
        assert max(Counter(seen).values()) <= 2  # a short worker repeats its shards at most once here
    # More than a rank holds: its workers stream their shards again.
    stream = ShardStream(tmp_path, transform=T.PILToTensor(), rank=0, world_size=2,
                         samples_per_rank=40, batch_size=4)
    ids = _ids(stream, workers=2, batch_size=4)
    assert len(ids) == 40 and len(set(ids)) < 40


def _bad_shard(path: Path) -> dict[str, bytes]:
    """One shard of good-but-odd, bad and good images; returns key -> image bytes of the good."""
    jpeg = _encode(_image(1), "JPEG")
    palette = _image(2).convert("P")
    palette.info["transparency"] = 0
    records = [
        ("000000", "png", _encode(_image(0))),
        ("000001", "jpg", b"\xff\xd8\xff\xe0 not really a jpeg"),  # corrupt
        ("000002", "jpg", _encode(_image(3).convert("CMYK"), "JPEG")),
        ("000003", "jpg", jpeg[: len(jpeg) // 2]),  # truncated
        ("000004", "png", _encode(_image(4, size=4))),  # too small for min_size=8
        ("000005", None, b""),  # label only, no image
        ("000006", "png", _encode(_image(6).convert("L"))),
        ("000007", "png", _encode(palette)),
        ("000008", "png", _encode(_image(8).convert("RGBA"))),
        ("000009", "png", _encode(_image(9).convert("LA"))),
    ]
    with TarWriter(str(path), encoder=False) as writer:
        for key, ext, data in records:
            writer.write({"__key__": key, "cls": str(int(key)).encode(), **({ext: data} if ext else {})})
    return {key: data for key, ext, data in records if key in {"000000", "000002", "000006", "000007", "000008",
                                                                "000009"}}


def test_bad_images_are_converted_or_skipped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = _bad_shard(tmp_path / "bad.tar")
    stream = ShardStream(tmp_path / "bad.tar", transform=T.PILToTensor(), shuffle_buffer=0, min_size=8)
    registry = BadFiles()
    with caplog.at_level(logging.WARNING, logger="milan"):
        for _ in range(2):  # two epochs: each bad sample warned about once
            loader = DataLoader(stream, batch_size=2, num_workers=1, collate_fn=collate)
            assert [labels.tolist() for _, labels in registry.track(loader)] == [[0, 2], [6, 7], [8, 9]]
    out = _run(stream, workers=0)
    assert [(label, bad) for label, _, bad in out] == [
        (0, []), (2, ["bad.tar:000001.jpg"]), (6, ["bad.tar:000003.jpg", "bad.tar:000004.png", "bad.tar:000005"]),
        (7, []), (8, []), (9, [])]
    for label, image, _ in out:
        assert image.shape == (3, 16, 16) and image.dtype == torch.uint8, label
    assert list(registry.bad) == ["bad.tar:000001.jpg", "bad.tar:000003.jpg", "bad.tar:000004.png", "bad.tar:000005"]
    for name in registry.bad:
        assert caplog.text.count(f"skipping unreadable image {name}:") == 1
    # The same conversion as the ImageFolder path.
    for key, data in good.items():
        (tmp_path / f"{key}.img").write_bytes(data)
        expected = np.asarray(load_rgb(tmp_path / f"{key}.img"))
        assert np.array_equal(np.asarray(decode_rgb(data, name=key)), expected), key


def test_errors_name_the_problem(shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match="shard-000008.tar"):
        ShardStream(f"{shards}/shard-{{000000..000009}}.tar", transform=None)
    with pytest.raises(DataError, match="no .tar shards"):
        ShardStream(tmp_path, transform=None)
    two = [shards / "shard-000000.tar", shards / "shard-000001.tar"]
    with pytest.raises(DataError, match="2 shard.*3 processes.*use more shards or fewer workers/processes"):
        ShardStream(two, transform=None, rank=0, world_size=3)
    stream = ShardStream(two, transform=T.PILToTensor(), rank=0, world_size=2)
    stream.check_workers(1)
    message = r"2 shard\(s\) for 2 process\(es\) × 2 DataLoader worker\(s\).*use more shards or fewer"
    with pytest.raises(DataError, match=message):
        stream.check_workers(2)
    # The same check inside a worker (a real failing DataLoader takes 10 s to shut down its workers).
    monkeypatch.setattr(wds, "get_worker_info", lambda: SimpleNamespace(id=1, num_workers=2))
    with pytest.raises(ValueError, match=message):
        next(iter(stream))
    with pytest.raises(ValueError, match="multiple of batch_size"):
        ShardStream(two, transform=None, samples_per_rank=10, batch_size=4)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
def test_folder_to_shards_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    expected = Counter()
    for label, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(5):
            img = _image(10 * label + i)
            img.save(root / name / f"{i}.png")
            expected[(label, img.tobytes())] += 1
    _image(99).save(root / "dog" / "odd.bmp")  # re-encoded as PNG
    expected[(1, _image(99).tobytes())] += 1
    (root / "dog" / "broken.tif").write_bytes(b"II*\x00 not a tiff")  # skipped when converting

    paths = folder_to_shards(root, tmp_path / "out", per_shard=4)
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == ["cat", "dog"]
    assert count_samples(tmp_path / "out") == 11
    (tmp_path / "out" / "sizes.json").unlink()
    assert count_samples(f"{tmp_path}/out/shard-{{000000..000002}}.tar") == 11  # from tar headers

    stream = ShardStream(tmp_path / "out", transform=None, shuffle_buffer=0)
    got = Counter((label, image.tobytes()) for image, label, bad in stream)
    assert got == expected
    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
    assert all(n.endswith((".png", ".cls")) for n in names) and len(names) == 8

    with pytest.raises(DataError, match="already holds"):
        write_shards([("a", _encode(_image(0)), 0)], tmp_path / "out", per_shard=2)
    with pytest.raises(DataError, match="contains '.'"):
        write_shards([("a.b", _encode(_image(0)), 0)], tmp_path / "other", per_shard=2)
    with pytest.raises(DataError, match="unknown image format"):
        write_shards([("a", b"GIF89a", 0)], tmp_path / "other", per_shard=2)


def test_shard_split_is_a_partition(shards: Path) -> None:
    """Every shard goes to exactly one (rank, worker), for any epoch."""
    for epoch in range(4):
        taken = []
        for rank in range(2):
            stream = ShardStream(shards, transform=None, rank=rank, world_size=2, seed=random.Random(epoch).random())
            stream.set_epoch(epoch)
            for worker in range(2):
                taken += stream.epoch_shards(worker, 2)
        assert sorted(taken) == sorted(str(p) for p in shards.glob("*.tar"))


def test_damaged_shard_and_all_bad_shards(shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for p in sorted(shards.glob("*.tar"))[:2]:
        (damaged / p.name).write_bytes(p.read_bytes())
    cut = damaged / "shard-000001.tar"
    with tarfile.open(cut) as tar:
        png = tar.getmembers()[3].offset_data  # members: 000006.cls, 000006.png, 000007.cls, 000007.png, ...
    cut.write_bytes(cut.read_bytes()[: png + 100])  # ends inside the second sample's image
    stream = ShardStream(damaged, transform=None, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="milan"):
        ids = sorted(label for _, label, _ in stream)
    assert ids == list(range(PER_SHARD + 1))
    assert "shard-000001.tar is damaged after 2 samples" in caplog.text
    assert "shard-000001.tar:000007: no image member" in caplog.text  # its .cls came before the cut

    with TarWriter(str(tmp_path / "all-bad.tar"), encoder=False) as writer:
        for key in ("a", "b"):
            writer.write({"__key__": key, "jpg": b"\xff\xd8\xff junk"})
    stream = ShardStream(tmp_path / "all-bad.tar", transform=None, samples_per_rank=1)
    with pytest.raises(DataError, match="every sample in .*all-bad.tar is bad"):
        next(iter(stream))
