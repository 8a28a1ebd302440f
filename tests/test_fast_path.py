"""The fast input path (milan.data.fast): bit-identical uint8 + device normalisation, the same crops
as the reference path for the same seed, exact resume with it, bounded-size shards, bf16 on CPU."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from _pretrain_cli import pretrain_args
from milan.data.fast import (
    PretrainCrop,
    TensorCrop,
    collate_plans,
    decode_batch_cuda,
    normalize_on_device,
    pretrain_input,
    to_device,
)
from milan.data.folder import ImageFolderDataset
from milan.data.reading import Samples
from milan.data.transforms import IMAGENET_MEAN, IMAGENET_STD, pretrain_transform
from milan.data.wds import META_KEY, ShardStream, count_samples, folder_to_shards
from milan.errors import ConfigError
from milan.tools.bench.data import imagenet_like_jpegs
from milan.tools.cli import main as cli
from milan.train.checkpoint import latest_checkpoint
from milan.train.run import CPU_BF16_ENV, resolve_precision

# torchvision 0.29 deprecates its image codecs for TorchCodec; data.decode=tensor/cuda use them (they work)
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (GPU JPEG decoding)")


def _jpegs(folder: Path, count: int, size: tuple[int, int], *, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, data in enumerate(imagenet_like_jpegs(count, size=size, seed=seed)):
        (folder / f"{seed}-{k:03d}.jpg").write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def large_jpegs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 JPEGs of 480×360: at 64 px output most crops allow a 1/2 or 1/4 draft decode."""
    return _jpegs(tmp_path_factory.mktemp("jpegs") / "flat", 8, (480, 360))


def _seeded(seed: int, fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
    torch.manual_seed(seed)  # what Samples does before each sample
    return fn(*args, **kwargs)


def _rgb(path: Path) -> Image.Image:
    return Image.open(path).convert("RGB")


def _to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Normalised float → 0..255 float (to compare paths in pixel units)."""
    mean = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(-1, 1, 1)
    return (x * std + mean) * 255


def test_uint8_and_device_normalisation_are_bit_identical(large_jpegs: Path) -> None:
    reference = pretrain_transform(64, scale=(0.2, 1.0), output="float")
    fast = pretrain_input(64, scale=(0.2, 1.0), decode="pil")
    crop = PretrainCrop(64, scale=(0.2, 1.0))  # no draft: the reference pixels, drawn before decoding
    files = sorted(large_jpegs.iterdir())
    ref, new, hooked = [], [], []
    for k, path in enumerate(files):
        img = Image.open(path).convert("RGB")
        ref.append(_seeded(k, reference, img))
        out = _seeded(k, fast, img)
        assert out.dtype == torch.uint8 and out.shape == (64, 64, 3)  # channels last: PIL's layout
        new.append(out)
        hooked.append(_seeded(k, crop.decode, path, name=str(path)))
    batch = normalize_on_device(torch.stack(new))
    assert batch.dtype == torch.float32
    assert torch.equal(batch, torch.stack(ref))
    assert torch.equal(normalize_on_device(torch.stack(hooked)), torch.stack(ref))
    assert torch.equal(to_device(torch.stack(new), torch.device("cpu")), torch.stack(ref))
    # a float batch (an old-style transform) passes through unchanged
    assert normalize_on_device(batch) is batch


def test_shapes_demo_transform_is_bit_identical(shapes_root: Path) -> None:
    """The pretrain_shapes preset (crop_scale [1, 1], no flip, PNG): the same tensors as before."""
    from milan.data import build_dataset

    kw = dict(scale=(1.0, 1.0), hflip=False)
    old = Samples(build_dataset("shapes", shapes_root, transform=pretrain_transform(64, **kw)), seed=0)
    new = Samples(build_dataset("shapes", shapes_root, transform=pretrain_input(64, **kw)), seed=0)
    for key in [(0, 0), (0, 5), (1, 17)]:
        assert torch.equal(normalize_on_device(new[key][0][None]), old[key][0][None])


def test_draft_decoding_keeps_the_crop(large_jpegs: Path) -> None:
    reference = pretrain_transform(64, scale=(0.2, 1.0), output="float")
    draft = PretrainCrop(64, scale=(0.2, 1.0), draft=True)
    reduced = 0
    for k, path in enumerate(sorted(large_jpegs.iterdir())):
        ref = _seeded(k, reference, _rgb(path))
        img, plan = _seeded(k, draft.read, path, name=str(path))
        reduced += img.size != plan["size"]
        out = _seeded(k, draft.decode, path, name=str(path))
        diff = (_to_pixels(normalize_on_device(out[None])[0]) - _to_pixels(ref)).abs()
        # the same box and flip; only the DCT downscale differs (a wrong box or flip would be tens off)
        assert diff.mean() < 4.0, (path.name, float(diff.mean()))
        wrong = (_to_pixels(normalize_on_device(out.flip(1)[None])[0]) - _to_pixels(ref)).abs()
        assert wrong.mean() > 3 * diff.mean()
    assert reduced >= 4  # the draft did decode most images at reduced size


def test_tensor_path_gives_the_reference_crops(large_jpegs: Path) -> None:
    """decode_jpeg + torch's uint8 bicubic antialias kernel: the reference's box, flip and pixels,
    up to rounding (a bilinear resize, or PIL's bicubic on a shifted box, is many levels off)."""
    reference = pretrain_transform(64, scale=(0.2, 1.0), output="uint8")
    tensor = TensorCrop(64, scale=(0.2, 1.0))
    for k, path in enumerate(sorted(large_jpegs.iterdir())):
        ref = _seeded(k, reference, _rgb(path)).permute(2, 0, 1).float()
        out = _seeded(k, tensor.decode, path, name=str(path))
        assert out.dtype == torch.uint8 and out.shape == (3, 64, 64)
        diff = (out.float() - ref).abs()
        assert diff.max() <= 2 and diff.mean() < 0.05, (path.name, float(diff.max()), float(diff.mean()))


def test_resized_crop_uint8_is_pils_bicubic(large_jpegs: Path) -> None:
    from milan.data.fast import resized_crop_uint8

    img = _rgb(sorted(large_jpegs.iterdir())[0])
    pixels = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    for (i, j, h, w), size in [((0, 0, 360, 480), 224), ((10, 20, 40, 30), 96), ((5, 7, 200, 150), 64)]:
        pil = torch.from_numpy(np.array(img.crop((j, i, j + w, i + h)).resize((size, size), Image.BICUBIC)))
        out = resized_crop_uint8(pixels, (i, j, h, w), size)
        assert out.shape == (3, size, size) and out.dtype == torch.uint8
        assert (out.permute(1, 2, 0).float() - pil.float()).abs().max() <= 2  # down- and upsampling


def test_tensor_draft_decoding_keeps_the_crop(large_jpegs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import JpegImagePlugin

    drafts = []
    real = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, *a, **k: drafts.append(a) or real(self, *a, **k))
    reference = pretrain_transform(64, scale=(0.2, 1.0), output="uint8")
    draft = TensorCrop(64, scale=(0.2, 1.0), draft=True)
    for k, path in enumerate(sorted(large_jpegs.iterdir())):
        ref = _seeded(k, reference, _rgb(path)).permute(2, 0, 1).float()
        out = _seeded(k, draft.decode, path, name=str(path))
        assert out.shape == (3, 64, 64)
        diff = (out.float() - ref).abs().mean()
        # the same box (edges within half a pixel of the reduced image) and flip
        assert diff < 8.0, (path.name, float(diff))
        assert (out.flip(-1).float() - ref).abs().mean() > 2 * diff
    assert len(drafts) >= 4  # most images were decoded at reduced size


def test_fast_transforms_reject_bad_images_like_the_reference(tmp_path: Path) -> None:
    from milan.data.folder import BadImage

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    small = tmp_path / "small.jpg"
    Image.new("RGB", (8, 8)).save(small)
    for transform in (PretrainCrop(32, draft=True), TensorCrop(32), TensorCrop(32, draft=True)):
        with pytest.raises(BadImage, match="bad.jpg"):
            transform.decode(bad, name=str(bad))
        with pytest.raises(BadImage, match="smaller than min_size=16"):
            transform.decode(small, name=str(small), min_size=16)


def test_imagefolder_samples_use_the_decoding_transform(large_jpegs: Path) -> None:
    ref = Samples(ImageFolderDataset(large_jpegs, pretrain_transform(64, output="float")), seed=3)
    new = Samples(ImageFolderDataset(large_jpegs, PretrainCrop(64)), seed=3)
    for key in [(0, 1), (2, 6)]:
        assert torch.equal(normalize_on_device(new[key][0][None])[0], ref[key][0])


def test_shard_stream_with_a_decoding_transform_keeps_crops_and_resumes(large_jpegs: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    folder_to_shards(large_jpegs, shards, per_shard=4)
    kw = dict(rank=0, world_size=1, seed=1, shuffle_buffer=4, batch_size=2)
    plain = ShardStream(shards, transform=pretrain_transform(64, output="uint8"), **kw)
    hooked = ShardStream(shards, transform=PretrainCrop(64), **kw)  # draws its box before decoding
    a, b = [x[0] for x in plain], [x[0] for x in hooked]
    assert len(a) == 8 and all(torch.equal(x, y) for x, y in zip(a, b))
    drafted = ShardStream(shards, transform=PretrainCrop(64, draft=True), **kw)
    full = [x[0] for x in drafted]
    drafted.set_epoch(0, skip=4)
    assert all(torch.equal(x, y[0]) for x, y in zip(full[4:], drafted, strict=True))


@pytest.mark.parametrize("options", [("data.draft=true",), ("data.decode=tensor",),
                                     ("data.decode=tensor", "data.draft=true")])
def test_exact_resume_with_the_fast_path(tmp_path: Path, options: tuple[str, ...]) -> None:
    data = _jpegs(tmp_path / "jpegs" / "a", 16, (300, 225), seed=1).parent
    common = ["data.kind=imagefolder", "data.crop_scale=[0.2,1.0]", "data.hflip=true", "optim.steps=4",
              "run.ckpt_every=100", "optim.batch_size=4", *options]
    full, part = tmp_path / "full", tmp_path / "part"
    cli(pretrain_args(data, full, *common))
    cli(pretrain_args(data, part, *common, "run.max_steps=2"))
    cli(pretrain_args(data, part, *common))
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()
               if "loss" in json.loads(line)] for d in (full, part)]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    a, b = latest_checkpoint(full)[1]["model"], latest_checkpoint(part)[1]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_max_size_shards_read_back_at_the_recorded_size(tmp_path: Path) -> None:
    folder = tmp_path / "images" / "cls"
    _jpegs(folder, 3, (120, 90), seed=2)  # short side 90 > 48: resized
    _jpegs(folder, 2, (40, 60), seed=3)  # short side 40 ≤ 48: copied as is
    Image.new("RGB", (100, 70), (200, 10, 10)).save(folder / "png.png")  # a PNG: resized, stored as JPEG
    originals = {p.read_bytes() for p in folder.glob("*.jpg")}
    out = tmp_path / "shards"
    cli(["data", "shards", str(folder.parent), str(out), "--per-shard", "4", "--max-size", "48",
         "--quality", "85"])
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes[META_KEY] == {"max_size": 48, "quality": 85, "format": "jpeg"}
    assert count_samples(out) == 6 == sum(v for k, v in sizes.items() if k != META_KEY)
    stream = ShardStream(out, transform=None, shuffle_buffer=0)
    read = [image.size for image, _, _ in stream]
    assert sorted(read) == sorted([(64, 48)] * 3 + [(40, 60)] * 2 + [(69, 48)])
    from milan.data.wds import _read_shard

    stored = [s["jpg"] for shard in sorted(out.glob("*.tar")) for s in _read_shard(str(shard))]
    assert sum(data in originals for data in stored) == 2  # small JPEGs are not re-encoded
    for data in stored:
        assert Image.open(io.BytesIO(data)).format == "JPEG"
    with pytest.raises(ConfigError, match="max_size=0 must be at least 1"):
        folder_to_shards(folder.parent, tmp_path / "again", max_size=0)


def test_bf16_on_cpu_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch, shapes_root: Path,
                                            tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("bf16", torch.device("cuda")) == "bf16"
    import milan.train.run as run_module

    for native, why in ((False, "no native bf16"), (True, "no faster than fp32")):
        monkeypatch.setattr(run_module, "cpu_has_native_bf16", lambda native=native: native)
        with pytest.raises(ConfigError, match=rf"run\.precision=bf16 on CPU: fp32 is faster here.*{why}.*"
                                              r"use run\.precision=fp32.*MILAN_CPU_BF16=1"):
            resolve_precision("bf16", cpu)
    with pytest.raises(ConfigError, match=r"run\.precision=bf16 on CPU"):
        cli(pretrain_args(shapes_root, tmp_path / "a", "run.precision=bf16"))
    with pytest.raises(ConfigError, match=r"recover\.fallback_precision=bf16 on CPU"):
        cli(pretrain_args(shapes_root, tmp_path / "b", "recover.fallback_precision=bf16"))
    with pytest.raises(ConfigError, match=r"--precision=bf16 on CPU"):
        cli(["bench", "speed", "--quick", "--device", "cpu", "--precision", "bf16"])
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert resolve_precision("bf16", cpu) == "bf16"


def test_cuda_decoding_falls_back_to_the_cpu_without_cuda(large_jpegs: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    if torch.cuda.is_available():
        pytest.skip("tests the CPU fallback")
    data = large_jpegs.parent
    cli(pretrain_args(data, tmp_path / "run", "data.kind=imagefolder", "data.decode=cuda", "optim.steps=1",
                      "optim.batch_size=4"))
    assert "data.decode=cuda needs a CUDA device" in caplog.text


def test_gpu_decoding_plans_give_the_tensor_path_crops_on_cpu(large_jpegs: Path, tmp_path: Path) -> None:
    """decode_batch_cuda's logic (batched decode, per-image box and flip, fallbacks) run with the CPU
    decoder: exactly the tensor path's images, whichever of the two draws the box."""
    from milan.data.fast import CudaJpegPlan

    png = tmp_path / "x.png"
    Image.open(sorted(large_jpegs.iterdir())[0]).save(png)  # not a JPEG: cropped in the worker
    files = [*sorted(large_jpegs.iterdir())[:3], png]
    plan, cpu = CudaJpegPlan(64), TensorCrop(64)
    records = [_seeded(k, plan.decode, p, name=str(p)) for k, p in enumerate(files)]
    assert ["jpeg" in r for r in records] == [True, True, True, False]
    batch, _, _ = collate_plans([(r, 0, ()) for r in records])
    out = decode_batch_cuda(batch, torch.device("cpu"), 64)
    ref = torch.stack([_seeded(k, cpu.decode, p, name=str(p)) for k, p in enumerate(files)])
    assert torch.equal(out, ref)


@needs_cuda
def test_gpu_jpeg_decoding_draws_the_same_crops(large_jpegs: Path) -> None:
    from milan.data.fast import CudaJpegPlan

    plan, cpu = CudaJpegPlan(64), TensorCrop(64)
    files = sorted(large_jpegs.iterdir())
    records = [_seeded(k, plan.decode, p, name=str(p)) for k, p in enumerate(files)]
    gpu = decode_batch_cuda(records, torch.device("cuda"), 64).cpu()
    ref = torch.stack([_seeded(k, cpu.decode, p, name=str(p)) for k, p in enumerate(files)])
    assert gpu.shape == ref.shape and gpu.dtype == torch.uint8
    assert (gpu.float() - ref.float()).abs().mean() < 3.0  # nvJPEG vs libjpeg rounding only
    batch, labels, bad = collate_plans([(r, 1, ()) for r in records])
    out = to_device(batch, torch.device("cuda"), img_size=64)
    assert out.dtype == torch.float32 and out.is_cuda and labels.tolist() == [1] * len(files)


@needs_cuda
def test_gpu_decoding_pretrains_from_shards(large_jpegs: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    folder_to_shards(large_jpegs, shards, per_shard=4)
    out = tmp_path / "run"
    cli(pretrain_args(large_jpegs, out, "data.kind=webdataset", f"data.path={shards}", "data.decode=cuda",
                      "data.num_workers=2", "optim.steps=2", "optim.batch_size=2", "run.device=cuda"))
    assert latest_checkpoint(out)[1]["step"] == 2


def test_jpeg_size_reads_the_frame_header(large_jpegs: Path) -> None:
    from milan.data.fast import _jpeg_size

    for path in sorted(large_jpegs.iterdir())[:2]:
        assert _jpeg_size(path.read_bytes()) == Image.open(path).size
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (123, 77)).save(buffer, "JPEG", progressive=True, exif=exif.tobytes())
    assert _jpeg_size(buffer.getvalue()) == (123, 77)  # stored size (the decoders rotate it)
    assert _jpeg_size(b"\xff\xd8\xff\xe0\x00\x10" + b"junk" * 10) is None  # a segment, then no marker
    data = buffer.getvalue()
    assert _jpeg_size(data[:2] + b"\xff\xff\xff" + data[2:]) == (123, 77)  # fill bytes before a marker


def test_draft_requests_the_largest_reduction_exactly() -> None:
    from milan.data.folder import draft_request
    from milan.data.wds import bounded_draft

    assert draft_request((1366, 1024), 4.0) == (341, 256) and draft_request((1001, 600), 1.99) is None
    for size, max_size, expected in [((1366, 1024), 256, (342, 256)), ((1365, 1024), 256, (342, 256)),
                                     ((1001, 600), 150, (251, 150)), ((640, 480), None, (80, 60))]:
        buffer = io.BytesIO()
        Image.new("RGB", size, (20, 90, 160)).save(buffer, "JPEG")
        with Image.open(buffer) as img:
            bounded_draft(max_size)(img)
            img.load()
            assert img.size == expected, (size, max_size, img.size)


def test_fast_decoders_follow_data_exif_transpose(tmp_path: Path) -> None:
    """A phone photo stored 80×40 with EXIF Orientation=6 (upright: 40×80): every decoding transform
    rotates it by default and keeps the stored pixels with exif_transpose=False."""
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (80, 40), (200, 30, 30)).save(path, exif=exif.tobytes())

    def decoded_size(transform: Any) -> tuple[int, int]:  # (width, height) as decoded
        image, _ = transform.read(path, name=str(path))
        return image.size if isinstance(image, Image.Image) else (image.shape[-1], image.shape[-2])

    for exif_transpose, expected in ((True, (40, 80)), (False, (80, 40))):
        for transform in (PretrainCrop(16, draft=True, exif_transpose=exif_transpose),
                          TensorCrop(16, exif_transpose=exif_transpose),
                          TensorCrop(16, draft=True, exif_transpose=exif_transpose)):
            width, height = decoded_size(transform)  # full size, or 1/2 of it (draft)
            assert (width, height) in (expected, (expected[0] // 2, expected[1] // 2)), (transform, exif_transpose)


def test_shard_writing_decodes_jpegs_only_as_large_as_needed(tmp_path: Path) -> None:
    """bounded_draft: a 640×480 JPEG is decoded at 1/2 for --max-size 200 (short side 240 ≥ 200),
    at 1/8 when only checked; a truncated one still fails the reduced-size check."""
    from milan.data.folder import BadImage, load_rgb
    from milan.data.wds import bounded_draft, reencode_jpeg

    path = _jpegs(tmp_path / "big", 1, (640, 480), seed=4) / "4-000.jpg"
    assert load_rgb(path, draft=bounded_draft(200)).size == (320, 240)
    assert load_rgb(path, draft=bounded_draft(None)).size == (80, 60)
    assert load_rgb(path, draft=bounded_draft(480)).size == (80, 60)  # small enough: bytes copied, only checked
    data = path.read_bytes()
    bounded = reencode_jpeg(data, max_size=200)
    assert Image.open(io.BytesIO(bounded)).size == (267, 200)
    assert reencode_jpeg(data, max_size=480) is data
    checked_only = load_rgb(path, draft=bounded_draft(None))  # 80×60: too small for max_size 200
    assert Image.open(io.BytesIO(reencode_jpeg(data, max_size=200, image=checked_only))).size == (267, 200)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImage, match="broken.jpg"):
        load_rgb(broken, draft=bounded_draft(None))


def test_draft_decoding_of_a_rotated_phone_photo_keeps_the_reference_crop(tmp_path: Path) -> None:
    """EXIF Orientation=6, stored 480×360 (upright 360×480): the box is drawn on the upright size
    before the reduced decode, so draft and full-size decoding crop the same region (drawing it on
    the stored size, then again on the small image, crops elsewhere and upsamples)."""
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(io.BytesIO(imagenet_like_jpegs(1, size=(480, 360), seed=5)[0])).save(path, exif=exif.tobytes())
    from PIL import ImageOps

    reference = pretrain_transform(64, scale=(0.2, 1.0), output="uint8")
    reduced = 0
    for transform in (TensorCrop(64, draft=True), PretrainCrop(64, draft=True)):
        for k in range(8):
            ref = _seeded(k, reference, ImageOps.exif_transpose(_rgb(path))).permute(2, 0, 1).float()
            image, plan = _seeded(k, transform.read, path, name=str(path))
            size = image.size if isinstance(image, Image.Image) else (image.shape[-1], image.shape[-2])
            assert plan["size"] == (360, 480)
            reduced += size != (360, 480)
            out = _seeded(k, transform.decode, path, name=str(path))
            out = out.float() if out.shape[0] == 3 else out.permute(2, 0, 1).float()
            assert (out - ref).abs().mean() < 8.0, (transform, k, float((out - ref).abs().mean()))
    assert reduced >= 4
