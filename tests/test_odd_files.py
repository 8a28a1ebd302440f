"""Every command survives the folders and files users bring (issue 16).

One folder of photo-like images in 3 classes (JPEG, PNG, WebP) with every odd kind of file users
have: CMYK, 16-bit, palette+alpha, GIF, multipage TIFF, nested folders, upper-case extensions,
an EXIF-rotated phone photo — all readable — and a truncated JPEG, a zero-byte file, text named
`.jpg`, a decompression-bomb header, a 1×1 and an 8×8 image — bad (the last two only below
`min_size`) — plus `.DS_Store`, `Thumbs.db`, a `.txt` and a loose image beside the class folders
(ignored). Each command runs end to end on it (tiny model, few steps, CPU) and must finish, skip
exactly the bad files (the names in `bad_images.txt`), and see the phone photo upright. (A mostly
broken folder stopping a pretrain run: tests/test_pretrain.py::test_too_many_bad_images_stop_the_run.)
"""

from __future__ import annotations

import json
import logging
import struct
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import milan.data.folder as folder_module
from _pretrain_cli import pretrain_args
from milan.data.folder import ImageFolderDataset, load_rgb
from milan.data.reading import BadFiles, Checked, Samples, Tolerant, collate, too_many_bad
from milan.data.sampler import EpochSampler
from milan.errors import DataError
from milan.tools.cli import main as cli
from milan.train.log import get_logger

CLASSES = ("apple", "bird", "cloud")
PER_CLASS = 6  # 18 photos + 8 odd readable + 6 bad = 32 files: 4 batches of 8
ALWAYS_BAD = {"truncated.jpg", "empty.jpg", "notes.jpg", "bomb.png"}  # unreadable whatever min_size
TINY = {"one.png", "eight.png"}  # 1×1 and 8×8: bad below min_size=16 (pretrain), fine at min_size=1
IGNORED = {".DS_Store", "apple/.DS_Store", "bird/Thumbs.db", "cloud/readme.txt", "loose.jpg"}


def _photo(rng: np.random.Generator, cls: int, w: int, h: int) -> Image.Image:
    """A smooth gradient in the class's colours with a few soft blobs: compresses like a photo."""
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    phase = 2.1 * cls
    img = np.stack([0.5 + 0.4 * np.sin(3 * x + phase + c) * np.cos(2 * y - c) for c in range(3)], -1)
    for _ in range(3):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.3)
        img += rng.uniform(-0.3, 0.3, 3) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / r**2)[..., None]
    img += rng.normal(0, 0.02, img.shape)
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


def _bomb_png(path: Path) -> None:
    """A valid 8×8 PNG whose header claims 20000×20000 pixels (over twice PIL's limit)."""
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", 20000, 20000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


def _phone_photo(path: Path) -> None:
    """A portrait photo (48×64, bright top half) stored sideways with EXIF Orientation=6, as phones do."""
    upright = np.zeros((64, 48, 3), np.uint8)
    upright[:32] = 230
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # 64×48, top half now on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    stored.save(path, quality=95, exif=exif.tobytes())


def _is_upright_phone(img: Image.Image) -> bool:
    arr = np.asarray(img.convert("L"), dtype=np.float64)
    return img.size == (48, 64) and arr[:32].mean() > 200 and arr[32:].mean() < 40


def write_odd_folder(root: Path, *, per_class: int = PER_CLASS) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = _photo(rng, c, int(rng.integers(56, 96)), int(rng.integers(56, 96)))
            ext = ("jpg", "png", "webp")[i % 3]
            img.save(root / name / f"{name}{i:02d}.{ext}")
    a, b, c = (root / n for n in CLASSES)
    # readable odd kinds
    _photo(rng, 0, 70, 64).convert("CMYK").save(a / "cmyk.jpg")
    gray16 = (np.asarray(_photo(rng, 0, 64, 64).convert("L"), np.uint16) * 257).astype(np.uint16)
    Image.fromarray(gray16).save(a / "gray16.png")
    palette = _photo(rng, 0, 64, 64).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    palette.save(a / "palette_alpha.png", transparency=0)
    frames = [_photo(rng, 1, 64, 64).convert("P") for _ in range(2)]
    frames[0].save(b / "anim.gif", save_all=True, append_images=frames[1:])
    pages = [_photo(rng, 1, 64, 64) for _ in range(2)]
    pages[0].save(b / "pages.tiff", save_all=True, append_images=pages[1:])
    (c / "sub" / "deeper").mkdir(parents=True)
    _photo(rng, 2, 64, 64).save(c / "sub" / "deeper" / "nested.png")
    _photo(rng, 2, 64, 64).save(c / "UPPER.JPG", format="JPEG")
    _phone_photo(a / "phone.jpg")
    # bad
    full = (a / "apple00.jpg").read_bytes()
    (b / "truncated.jpg").write_bytes(full[: len(full) // 3])
    (c / "empty.jpg").write_bytes(b"")
    (b / "notes.jpg").write_text("shopping list: not an image\n")
    _bomb_png(c / "bomb.png")
    _photo(rng, 0, 1, 1).save(a / "one.png")
    _photo(rng, 2, 8, 8).save(c / "eight.png")
    # ignored
    for path in (root / ".DS_Store", a / ".DS_Store", b / "Thumbs.db"):
        path.write_bytes(b"\x00\x00\x00\x01Bud1")
    (c / "readme.txt").write_text("photos from the trip")
    _photo(rng, 0, 64, 64).save(root / "loose.jpg")
    return root


@pytest.fixture(scope="module")
def odd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_odd_folder(tmp_path_factory.mktemp("odd") / "photos")


@contextmanager
def captured() -> Iterator[list[str]]:
    """Messages of the `milan` logger in this process (it does not propagate to pytest's caplog)."""
    lines: list[str] = []

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = get_logger()  # its stderr handler and INFO level, as the commands set them up
    handler = Handler()
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


@contextmanager
def phone_spy() -> Iterator[list[Image.Image]]:
    """The images `load_rgb` returns for phone.jpg in this process (commands run with num_workers=0)."""
    seen: list[Image.Image] = []
    original = folder_module.load_rgb

    def spy(source, **kwargs):
        img = original(source, **kwargs)
        if Path(str(source)).name == "phone.jpg":
            seen.append(img)
        return img

    folder_module.load_rgb = spy
    try:
        yield seen
    finally:
        folder_module.load_rgb = original


def bad_names(run_dir: Path) -> list[str]:
    lines = (run_dir / "bad_images.txt").read_text().splitlines()
    return [Path(line.split("\t")[0]).name for line in lines if line and not line.startswith("#")]


def _warned(lines: list[str], name: str) -> int:
    return sum(1 for line in lines if line.startswith("skipping unreadable image") and f"/{name}:" in line)


# --- the folder itself -----------------------------------------------------------------------------


def test_folder_lists_images_and_ignored_files(odd: Path) -> None:
    ds = ImageFolderDataset(odd)
    names = {p.relative_to(odd).as_posix() for p, _ in ds.samples}
    assert "bird/anim.gif" in names and "cloud/UPPER.JPG" in names and "cloud/sub/deeper/nested.png" in names
    assert set(ds.ignored) == IGNORED
    total = len(CLASSES) * PER_CLASS + 8 + len(ALWAYS_BAD) + len(TINY)
    assert len(ds) == total
    assert ds.describe().startswith(f"{total} images in 3 classes; ignored 5 files: ")
    for _, label in ds.samples:
        assert 0 <= label < 3


def test_odd_but_readable_files_become_rgb_and_the_phone_photo_is_upright(odd: Path) -> None:
    for rel in ("apple/cmyk.jpg", "apple/gray16.png", "apple/palette_alpha.png", "bird/anim.gif",
                "bird/pages.tiff", "cloud/UPPER.JPG"):
        img = load_rgb(odd / rel, min_size=16)
        assert img.mode == "RGB" and min(img.size) >= 56, rel
    assert _is_upright_phone(load_rgb(odd / "apple" / "phone.jpg"))
    sideways = load_rgb(odd / "apple" / "phone.jpg", exif_transpose=False)
    assert sideways.size == (64, 48) and not _is_upright_phone(sideways)


def test_decompression_bomb_warning_becomes_one_note_per_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _photo(np.random.default_rng(1), 0, 40, 40).save(tmp_path / "big.png")
    _photo(np.random.default_rng(2), 0, 20, 20).save(tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 pixels: over the limit, under twice it
    registry = BadFiles()
    with warnings.catch_warnings(record=True) as raw, captured() as lines:
        warnings.simplefilter("always")
        ds = ImageFolderDataset(tmp_path)
        for _ in range(3):
            for image, _, reports in map(Checked(ds).__getitem__, range(len(ds))):
                assert image is not None
                registry.add(reports)
    assert not [w for w in raw if issubclass(w.category, Image.DecompressionBombWarning)]
    notes = [line for line in lines if "decompression-bomb limit" in line]
    assert len(notes) == 1 and "big.png" in notes[0] and len(registry) == 0


# --- the threshold and the registry ------------------------------------------------------------------


def test_one_bad_file_in_400_never_stops_and_half_bad_stops_early(tmp_path: Path) -> None:
    for position in (0, 1, 5, 31, 32, 100, 399):  # wherever the bad one comes in the order
        registry = BadFiles(max_fraction=0.01)
        registry.total = 400
        for i in range(400):
            registry.add([(f"f{i}", "bad", True)] if i == position else [])
            registry.seen += i != position
            registry.check()
        assert len(registry) == 1
    assert not any(too_many_bad(1, n, 0.01) for n in range(1, 401))
    registry = BadFiles(max_fraction=0.01, folder=tmp_path)
    registry.total = 400
    with pytest.raises(DataError) as info:
        for i in range(400):
            if i % 2:
                registry.add([(f"f{i}", "cannot identify image file", True)])
            else:
                registry.seen += 1
            registry.check()
    message = str(info.value)
    assert "\n" not in message and "data.max_bad_fraction=0.01" in message
    assert registry.tried() <= 40  # stopped within the first few dozen files
    assert f"the list is in {tmp_path / 'bad_images.txt'}" in message and len(bad_names(tmp_path)) == len(registry)


def test_a_file_skipped_in_three_epochs_counts_once_and_is_warned_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "data" / "x").mkdir(parents=True)
    for i in range(14):
        _photo(rng, 0, 32, 32).save(tmp_path / "data" / "x" / f"{i:02d}.png")
    for name in ("05a.jpg", "05b.jpg"):  # two bad ones next to each other
        (tmp_path / "data" / "x" / name).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    from torchvision import transforms as T

    ds = ImageFolderDataset(tmp_path / "data", T.Compose([T.RandomResizedCrop(8), T.PILToTensor()]))
    registry = BadFiles(max_fraction=0.5, folder=tmp_path / "run")
    registry.total = len(ds)
    sampler = EpochSampler(len(ds), rank=0, world_size=1, seed=0, batch_size=4)
    batches = {}
    with captured() as lines:
        for workers in (2, 0):  # the replacement of a bad image is the same in workers and in-process
            loader = DataLoader(Samples(ds, seed=0), batch_size=4, sampler=sampler, num_workers=workers,
                                collate_fn=collate)
            for epoch in range(3):
                sampler.set_epoch(epoch)
                for i, (images, _, reports) in enumerate(loader):
                    assert images.shape[0] == 4
                    registry.add(reports)
                    batches.setdefault((epoch, i), []).append(images)
    assert all(torch.equal(*pair) for pair in batches.values())
    assert set(registry.bad) == {str(tmp_path / "data" / "x" / n) for n in ("05a.jpg", "05b.jpg")}
    assert _warned(lines, "05a.jpg") == 1 and _warned(lines, "05b.jpg") == 1
    assert registry.summary() == f"skipped 2 unreadable files of 16; list in {tmp_path / 'run' / 'bad_images.txt'}"
    assert sorted(bad_names(tmp_path / "run")) == ["05a.jpg", "05b.jpg"]


def test_tolerant_view_replaces_bad_images_in_process(odd: Path) -> None:
    registry = BadFiles(max_fraction=None)
    view = Tolerant(ImageFolderDataset(odd, min_size=16), registry)
    images = [view[i][0] for i in range(len(view))]
    assert all(img.mode == "RGB" for img in images)
    assert {Path(n).name for n in registry.bad} == ALWAYS_BAD | TINY
    assert "no run folder" in registry.summary()


# --- every command, end to end --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(odd: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`milan pretrain` on the odd folder: one epoch, the kNN monitor on the same folder twice."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    n = len(ImageFolderDataset(odd))
    assert n % 8 == 0  # every file in every epoch (the sampler drops the remainder)
    with captured() as lines, phone_spy() as phones:
        cli(_pretrain_odd(odd, out, n))
    return {"out": out, "lines": lines, "phones": phones, "n": n}


def _pretrain_odd(odd: Path, out: Path, n: int, *extra: str) -> list[str]:
    return pretrain_args(odd, out, "data.kind=imagefolder", "data.max_bad_fraction=0.5", f"optim.steps={n // 8}",
                         "run.log_every=2", "monitor.every=2", "monitor.kind=imagefolder", f"monitor.train_path={odd}",
                         f"monitor.val_path={odd}", "monitor.train_size=64", "monitor.val_size=64", *extra)


def test_pretrain_resumed_between_bad_files_logs_the_same(odd: Path, pretrained: dict, tmp_path: Path) -> None:
    part, n = tmp_path / "part", pretrained["n"]
    with captured() as lines:
        cli(_pretrain_odd(odd, part, n, "run.max_steps=2"))
        cli(_pretrain_odd(odd, part, n))  # resumes at step 2, the registry from the checkpoint

    def records(run: Path) -> list[dict]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in ("time", "img_per_s")} for line in lines]

    assert records(part) == records(pretrained["out"])  # losses, bad-image counts, kNN accuracies
    assert sorted(bad_names(part)) == sorted(ALWAYS_BAD | TINY)
    assert all(_warned(lines, name) == 1 for name in ALWAYS_BAD | TINY)  # before or after the pause, once


def test_pretrain_skips_exactly_the_bad_files_once(pretrained: dict) -> None:
    out, lines, n = pretrained["out"], pretrained["lines"], pretrained["n"]
    assert sorted(bad_names(out)) == sorted(ALWAYS_BAD | TINY)
    for name in ALWAYS_BAD | TINY:
        assert _warned(lines, name) == 1, name  # training + the monitor twice: one warning
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    assert losses[-1]["step"] == n // 8 and losses[-1]["bad_images"] == len(ALWAYS_BAD | TINY)
    assert any("knn_acc" in r for r in records)
    assert any(f"{n} images in 3 classes; ignored 5 files:" in line for line in lines)
    assert f"skipped 6 unreadable files of {n}; list in {out / 'bad_images.txt'}" in lines
    assert not any("DecompressionBomb" in line for line in lines)
    assert pretrained["phones"] and all(_is_upright_phone(img) for img in pretrained["phones"])


def test_knn_and_linprobe_with_workers(odd: Path, random_pretrain_checkpoint: Path, tmp_path: Path) -> None:
    common = [f"model.weights={random_pretrain_checkpoint}", "data.kind=imagefolder", f"data.path={odd}",
              "data.crop_pct=1.0", "data.num_workers=2", "run.device=cpu", "data.max_bad_fraction=0.5"]
    n = len(ImageFolderDataset(odd))
    with captured() as lines:
        cli(["knn", *common, "data.batch_size=16", f"run.out_dir={tmp_path / 'knn'}"])
    result = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert sorted(bad_names(tmp_path / "knn")) == sorted(ALWAYS_BAD)
    # no odd/val: a held-out part is scored against the rest; every file is read by one of them
    assert result["num_val"] + result["num_train"] == n - len(ALWAYS_BAD)
    assert result["scored"]["source"].startswith("held out from")
    for name in ALWAYS_BAD:
        assert _warned(lines, name) == 1, name
    with captured() as lines:
        cli(["linprobe", *common, "optim.batch_size=16", "optim.epochs=2", "optim.warmup_epochs=1",
             "optim.cache_features=false", "run.tensorboard=false", f"run.out_dir={tmp_path / 'lp'}"])
    assert sorted(bad_names(tmp_path / "lp")) == sorted(ALWAYS_BAD)
    assert all(_warned(lines, name) == 1 for name in ALWAYS_BAD)
    assert any(line.startswith("skipped 4 unreadable files of") for line in lines)


def test_finetune_then_eval(odd: Path, random_pretrain_checkpoint: Path, tmp_path: Path) -> None:
    with captured() as lines, phone_spy() as phones:
        cli(["finetune", f"model.weights={random_pretrain_checkpoint}", "data.kind=imagefolder", f"data.path={odd}",
             "data.crop_pct=1.0", "data.num_workers=0", "data.auto_augment=null", "data.reprob=0.0",
             "data.max_bad_fraction=0.5",
             "mixup.mixup=0", "mixup.cutmix=0", "optim.batch_size=2", "optim.epochs=1", "optim.warmup_epochs=0",
             f"run.out_dir={tmp_path / 'ft'}", "run.device=cpu", "run.tensorboard=false"])  # batch 2: reads every file
    assert sorted(bad_names(tmp_path / "ft")) == sorted(ALWAYS_BAD)
    assert all(_warned(lines, name) == 1 for name in ALWAYS_BAD)
    assert phones and all(_is_upright_phone(img) for img in phones)
    with captured():
        cli(["eval", f"model.weights={tmp_path / 'ft' / 'checkpoint-best.pt'}", f"data.paths=[{odd}]",
                       "data.crop_pct=1.0", "data.num_workers=0", "run.device=cpu", f"run.out_dir={tmp_path / 'ev'}",
                       "data.max_bad_fraction=0.5"])
    # the folder it was finetuned on: only the part finetune held out is scored
    from milan.data.split import eval_sets

    held = {p.name for p, _ in eval_sets("imagefolder", odd, val_fraction=0.2, train_transform=None,
                                         val_transform=None, log=False).val.samples}
    assert sorted(bad_names(tmp_path / "ev")) == sorted(ALWAYS_BAD & held)
    (result,) = json.loads((tmp_path / "ev" / "results.json").read_text()).values()
    assert result["count"] == len(held - ALWAYS_BAD) and result["scored"]["source"].startswith("held out from")


def test_viz_masks(odd: Path, pretrained: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cli(["viz", "masks", str(pretrained["out"]), "--data", "imagefolder", "--data-path", str(odd),
         "--num", "3", "--out", str(tmp_path)])
    assert next(tmp_path.glob("masks_*.png")).is_file()


def test_shards_then_pretrain_on_them(odd: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    with captured() as lines:
        cli(["data", "shards", str(odd), str(shards), "--per-shard", "16"])
    assert sorted(bad_names(shards)) == sorted(ALWAYS_BAD | TINY)  # --min-size 16, as pretrain's
    assert all(_warned(lines, name) == 1 for name in ALWAYS_BAD | TINY)
    n = len(ImageFolderDataset(odd)) - len(ALWAYS_BAD | TINY)
    assert json.loads((shards / "sizes.json").read_text()) and sum(json.loads((shards / "sizes.json").read_text())
                                                                    .values()) == n
    from milan.data.wds import ShardStream

    phones = [img for img, label, _ in ShardStream(shards, transform=None, shuffle_buffer=0)
              if img.size == (48, 64) and _is_upright_phone(img)]
    assert len(phones) == 1  # the JPEG bytes are copied; decoding applies the orientation
    out = tmp_path / "run"
    cli(pretrain_args(shards, out, "data.kind=webdataset", "optim.steps=2"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and records[-1]["bad_images"] == 0 and not (out / "bad_images.txt").exists()


def test_segmentation_and_detection_images_keep_stored_pixels(odd: Path) -> None:
    """The dense datasets read with exif_transpose=False: their annotations index the stored pixels."""
    from milan.data.folder import load_rgb

    assert load_rgb(odd / "apple" / "phone.jpg", exif_transpose=False).size == (64, 48)
    assert load_rgb(odd / "apple" / "phone.jpg").size == (48, 64)  # everything else sees it upright
    assert load_rgb(odd / "apple" / "cmyk.jpg", exif_transpose=False).mode == "RGB"


# --- segment / detect: an unreadable image leaves with its annotations ------------------------------


@pytest.fixture(scope="module")
def broken_shapes(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small shapes set (images in {split}/images/NNNNNN.png) with two images broken: the first
    training image of epoch 0 (seed 0) truncated, val image 1 emptied."""
    from milan.data.shapes import generate_shapes

    root = generate_shapes(tmp_path_factory.mktemp("dense") / "shapes", num_train=32, num_val=8, progress=False)
    first = EpochSampler(32, seed=0, batch_size=4).indices()[0]  # read in the first batch of any run
    train_file = root / "train" / "images" / f"{first:06d}.png"
    val_file = root / "val" / "images" / "000001.png"
    data = train_file.read_bytes()
    train_file.write_bytes(data[: len(data) // 3])
    val_file.write_bytes(b"")
    return {"root": root, "bad": sorted([str(train_file), str(val_file)])}


def _listed(run_dir: Path) -> list[str]:
    lines = (run_dir / "bad_images.txt").read_text().splitlines()
    return sorted(line.split("\t")[0] for line in lines if line and not line.startswith("#"))


def _dense_warned(lines: list[str], path: str) -> int:
    return sum(1 for line in lines if line.startswith(f"skipping unreadable image {path}:"))


def test_segment_skips_unreadable_images_with_their_labels(broken_shapes: dict, tmp_path: Path) -> None:
    out = tmp_path / "seg"
    with captured() as lines:
        cli(["segment", "--config", "segment_shapes", f"data.path={broken_shapes['root']}", f"run.out_dir={out}",
             "model.preset=vit_shapes_patch8", "model.channels=16", "model.aux_channels=16", "optim.batch_size=4",
             "optim.iters=3", "optim.warmup_iters=1", "data.val_limit=4", "data.eval_batch_size=2",
             "data.num_workers=2", "run.seed=0", "run.eval_every=0", "run.log_every=1", "run.device=cpu",
             "data.max_bad_fraction=0.5"])
    assert _listed(out) == broken_shapes["bad"]
    assert all(_dense_warned(lines, path) == 1 for path in broken_shapes["bad"])
    results = json.loads((out / "results.json").read_text())
    assert results["num_val"] == 4 and results["last"]["val_images"] == 3  # val 000001.png left out
    assert results["step"] == 3 and results["bad_images"] == 2  # training went on: replaced, not stopped
    assert any(line.endswith("on 3 val images (1 unreadable image left out)") for line in lines)
    assert f"skipped 2 unreadable files of 36; list in {out / 'bad_images.txt'}" in lines
    assert torch.load(out / "checkpoint-last.pt", weights_only=True)["bad_files"].keys() == set(broken_shapes["bad"])


def test_detect_skips_unreadable_images_with_their_annotations(broken_shapes: dict, tmp_path: Path) -> None:
    out = tmp_path / "det"
    with captured() as lines:
        cli(["detect", "--config", "detect_shapes", f"data.path={broken_shapes['root']}", f"run.out_dir={out}",
             "data.num_workers=0", "optim.batch_size=4", "optim.warmup_iters=1", "data.val_limit=4",
             "data.eval_batch_size=2", "optim.epochs=1", "run.max_steps=2", "run.seed=0", "run.device=cpu",
             "data.max_bad_fraction=0.5"])
    assert _listed(out) == broken_shapes["bad"]
    assert all(_dense_warned(lines, path) == 1 for path in broken_shapes["bad"])
    results = json.loads((out / "results.json").read_text())
    assert results["num_val"] == 4 and results["last"]["val_images"] == 3 and results["step"] == 2
    assert any("on 3 val images (1 unreadable image left out)" in line for line in lines)
    assert f"skipped 2 unreadable files of 36; list in {out / 'bad_images.txt'}" in lines


def test_segment_resumed_between_bad_files_is_exact_and_warns_once(broken_shapes: dict, tmp_path: Path) -> None:
    def run(out: Path, *extra: str) -> list[str]:
        with captured() as lines:
            cli(["segment", "--config", "segment_shapes", f"data.path={broken_shapes['root']}", f"run.out_dir={out}",
                 "model.preset=vit_shapes_patch8", "model.channels=16", "model.aux_channels=16",
                 "optim.batch_size=4", "optim.iters=4", "optim.warmup_iters=1", "data.val_limit=4",
                 "data.num_workers=0", "run.seed=0", "run.eval_every=0", "run.log_every=1", "run.device=cpu",
                 "data.max_bad_fraction=0.5", *extra])
        return lines

    straight, split = tmp_path / "straight", tmp_path / "split"
    run(straight)
    first = run(split, "run.max_iters=2")  # reads the bad training image (first batch) and the val one
    second = run(split)  # resume=auto
    assert all(_dense_warned(first, path) == 1 and _dense_warned(second, path) == 0 for path in broken_shapes["bad"])
    assert _listed(split) == _listed(straight) == broken_shapes["bad"]
    a = torch.load(straight / "checkpoint-last.pt", weights_only=True)
    b = torch.load(split / "checkpoint-last.pt", weights_only=True)
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=key)
    assert f"skipped 2 unreadable files of 36; list in {split / 'bad_images.txt'}" in second


@pytest.mark.slow
@pytest.mark.parametrize("command", ["segment", "detect"])
def test_dense_two_processes_share_bad_files(broken_shapes: dict, tmp_path: Path, command: str) -> None:
    """torchrun, 2 CPU processes: the bad val image is rank 1's share, the bad training image rank 0's;
    rank 0 still lists and warns about both (once), and the evaluation leaves out exactly one image."""
    import os
    import subprocess
    import sys

    out = tmp_path / command
    extra = (["model.channels=16", "model.aux_channels=16", "optim.iters=2", "run.eval_every=0"]
             if command == "segment" else ["run.max_steps=2", "data.eval_batch_size=2"])
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={29551 if command == 'segment' else 29552}", "-m", "milan", command, "--config",
         f"{command}_shapes", f"data.path={broken_shapes['root']}", f"run.out_dir={out}", "optim.batch_size=4",
         "optim.warmup_iters=1", "data.val_limit=4", "run.seed=0", "run.device=cpu", "data.num_workers=0",
         "run.tensorboard=false", "data.max_bad_fraction=0.5", *extra],
        env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _listed(out) == broken_shapes["bad"]
    for path in broken_shapes["bad"]:
        assert done.stderr.count(f"skipping unreadable image {path}:") == 1, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["step"] == 2 and results["last"]["val_images"] == 3 and results["bad_images"] == 2
    assert torch.load(out / "checkpoint-last.pt", weights_only=True)["bad_files"].keys() == set(broken_shapes["bad"])
