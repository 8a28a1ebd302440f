"""`load_rgb`: every image mode users have on disk becomes faithful 8-bit RGB, or a `BadImage`."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from milan.data.folder import BadImage, ImageFolderDataset, load_rgb
from milan.data.reading import Samples
from milan.errors import DataError


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)  # a 16-bit grayscale PNG
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    rgb = np.asarray(load_rgb(path)).astype(np.int64)
    assert rgb.shape == (64, 64, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    expected = np.rint(ramp / 257.0)
    assert np.abs(rgb[..., 0] - expected).max() <= 1
    assert rgb.min() == 0 and rgb.max() == 255 and abs(rgb.mean() - 127.5) < 1.5  # not saturated white


@pytest.mark.parametrize("mode", ["L", "RGB", "CMYK", "P", "RGBA", "LA"])
def test_common_modes_become_rgb(tmp_path: Path, mode: str) -> None:
    img = Image.new("RGB", (20, 10), (200, 40, 10)).convert(mode)
    path = tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}"
    img.save(path)
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (20, 10)


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width×height (no pixel data needed to trip the size check)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_decompression_bomb_is_a_bad_image_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    _png_header_only(path, 40000, 40000)  # 1.6 Gpx > 2 × PIL's MAX_IMAGE_PIXELS
    with pytest.raises(BadImage, match=r"bomb\.png: .*MAX_IMAGE_PIXELS"):
        load_rgb(path)


def test_empty_and_tiny_files_are_bad(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(BadImage, match="empty.jpg"):
        load_rgb(tmp_path / "empty.jpg")
    Image.new("RGB", (3, 3)).save(tmp_path / "tiny.png")
    with pytest.raises(BadImage, match="smaller than min_size=8"):
        load_rgb(tmp_path / "tiny.png", min_size=8)


def test_unusable_folders_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data path not found"):
        ImageFolderDataset(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images found under"):
        ImageFolderDataset(tmp_path)
    for i in range(3):
        (tmp_path / f"bad{i}.jpg").write_bytes(b"not a jpeg")
    samples = Samples(ImageFolderDataset(tmp_path), seed=0, max_tries=3)
    with pytest.raises(DataError, match="3 consecutive unreadable or too small images") as info:
        samples[(0, 0)]
    assert isinstance(info.value, RuntimeError)  # what it was before it became a DataError
