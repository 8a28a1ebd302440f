"""Tests of the built-in shapes dataset: rendering, on-disk format, reading, caching."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import milan.data.shapes as shapes
from milan.data.shapes import (
    COLOURS,
    COUNTS,
    LABELS,
    POSITIONS,
    SHAPES,
    ShapesDataset,
    default_shapes_root,
    generate_shapes,
    load_instances,
    render_scene,
)
from milan.errors import ConfigError, DataError

torch.set_num_threads(1)

NUM_TRAIN, NUM_VAL = 64, 16
CAPTION = re.compile(
    r"^a large (?P<colour>\w+) (?P<shape>\w+) (?:at|on|in) the (?P<position>[a-z ]+?)"
    r"(?: and (?P<small>one|two) small shapes?)?$"
)


def parse_caption(caption: str) -> dict[str, int]:
    m = CAPTION.match(caption)
    assert m is not None, f"caption does not follow the template: {caption!r}"
    small = {None: 0, "one": 1, "two": 2}[m["small"]]
    return {
        "shape": SHAPES.index(m["shape"]),
        "colour": COLOURS.index(m["colour"]),
        "position": POSITIONS.index(m["position"]),
        "count": small,
    }


def scene_rng(seed: int, split_id: int, index: int) -> np.random.Generator:
    """The documented per-image seeding: image i of a split depends on (seed, split, i)."""
    return np.random.default_rng(np.random.SeedSequence([seed, split_id, index]))


def read_rows(split_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (split_dir / "labels.jsonl").read_text().splitlines()]


def read_tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes") / "shapes"
    return generate_shapes(root, num_train=NUM_TRAIN, num_val=NUM_VAL, workers=1, progress=False)


# --- rendering ---------------------------------------------------------------------------


def test_render_scene_is_deterministic() -> None:
    a, b = render_scene(np.random.default_rng(7)), render_scene(np.random.default_rng(7))
    c = render_scene(np.random.default_rng(8))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert (a.caption, a.labels, a.boxes) == (b.caption, b.labels, b.boxes)
    assert not np.array_equal(a.image, c.image)


def test_scenes_are_consistent() -> None:
    seen: dict[str, set[int]] = {name: set() for name in ("shape", "colour", "position", "count")}
    for i in range(200):
        scene = render_scene(np.random.default_rng(i))
        assert scene.image.shape == (64, 64, 3) and scene.image.dtype == np.uint8
        assert scene.mask.shape == (64, 64) and scene.mask.dtype == np.uint8
        k = scene.num_objects
        assert 1 <= k <= 3 and len(scene.boxes) == len(scene.colours) == k
        assert scene.labels["count"] == k - 1
        assert scene.labels["shape"] == scene.classes[0]
        assert scene.labels["colour"] == scene.colours[0]
        assert parse_caption(scene.caption) == scene.labels
        assert set(np.unique(scene.mask)) == set(range(k + 1))

        areas = []
        cells = set()
        for j, (x0, y0, x1, y1) in enumerate(scene.boxes, start=1):
            ys, xs = np.nonzero(scene.mask == j)
            # The box is tight around the instance (x1, y1 exclusive).
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            areas.append(len(xs))
            cells.add(int(ys.mean() // (64 / 3)) * 3 + int(xs.mean() // (64 / 3)))
        # The labelled object is the largest, and each object sits in its own cell.
        assert areas[0] == max(areas) and all(a < areas[0] for a in areas[1:])
        assert len(cells) == k
        ys, xs = np.nonzero(scene.mask == 1)
        centre_cell = int(ys.mean() // (64 / 3)) * 3 + int(xs.mean() // (64 / 3))
        assert centre_cell == scene.labels["position"]
        for name, value in scene.labels.items():
            seen[name].add(value)
    # Every class of every label occurs in 200 scenes.
    assert seen == {
        "shape": set(range(len(SHAPES))),
        "colour": set(range(len(COLOURS))),
        "position": set(range(len(POSITIONS))),
        "count": set(range(len(COUNTS))),
    }


def test_object_colours_match_their_names() -> None:
    scene = render_scene(np.random.default_rng(3))
    for j, colour in enumerate(scene.colours, start=1):
        mean = scene.image[scene.mask == j].mean(axis=0)
        expected = np.array(shapes._RGB[COLOURS[colour]], dtype=float)
        assert np.abs(mean - expected).max() < 30, (COLOURS[colour], mean)


def test_render_scene_scales_with_image_size() -> None:
    scene = render_scene(np.random.default_rng(0), image_size=96)
    assert scene.image.shape == (96, 96, 3) and scene.mask.shape == (96, 96)
    with pytest.raises(ValueError, match="image_size"):
        render_scene(np.random.default_rng(0), image_size=16)


# --- on-disk format ----------------------------------------------------------------------


def test_format(dataset_root: Path) -> None:
    meta = json.loads((dataset_root / "meta.json").read_text())
    assert meta["format"] == "milan-shapes" and meta["format_version"] == shapes.FORMAT_VERSION
    assert meta["milan_version"]
    assert meta["params"] == {
        "image_size": 64,
        "num_train": NUM_TRAIN,
        "num_val": NUM_VAL,
        "seed": 0,
        "generator_version": shapes.GENERATOR_VERSION,
    }
    assert meta["splits"] == {"train": NUM_TRAIN, "val": NUM_VAL}
    assert meta["classes"]["shape"] == list(SHAPES)
    assert meta["classes"]["count"] == list(COUNTS)
    assert len(meta["classes"]["shape_colour"]) == len(SHAPES) * len(COLOURS)
    assert set(meta["classes"]) == set(LABELS)

    for split, n in (("train", NUM_TRAIN), ("val", NUM_VAL)):
        rows = read_rows(dataset_root / split)
        assert len(rows) == n
        assert len(list((dataset_root / split / "images").glob("*.png"))) == n
        assert len(list((dataset_root / split / "masks").glob("*.png"))) == n
        assert rows[5]["image"] == "images/000005.png" and rows[5]["mask"] == "masks/000005.png"
        for row in rows:
            assert parse_caption(row["caption"]) == {
                k: row[k] for k in ("shape", "colour", "position", "count")
            }
            assert len(row["boxes"]) == len(row["classes"]) == row["count"] + 1
        with Image.open(dataset_root / split / rows[0]["image"]) as im:
            assert im.mode == "RGB" and im.size == (64, 64)
        with Image.open(dataset_root / split / rows[0]["mask"]) as im:
            assert im.mode == "L" and im.size == (64, 64)
    assert not any(p.name.startswith(".shapes.tmp") for p in dataset_root.parent.iterdir())


def test_files_hold_the_seeded_scenes(dataset_root: Path) -> None:
    rows = read_rows(dataset_root / "val")
    for i in (0, 9):
        scene = render_scene(scene_rng(0, 1, i))
        with Image.open(dataset_root / "val" / rows[i]["image"]) as im:
            assert np.array_equal(np.asarray(im), scene.image)  # PNG is lossless
        with Image.open(dataset_root / "val" / rows[i]["mask"]) as im:
            assert np.array_equal(np.asarray(im), scene.mask)
        assert rows[i]["caption"] == scene.caption and rows[i]["boxes"] == scene.boxes


def test_generation_is_deterministic_across_workers_and_seeds(
    dataset_root: Path, tmp_path: Path
) -> None:
    kwargs = {"num_train": NUM_TRAIN, "num_val": NUM_VAL, "progress": False}
    two = generate_shapes(tmp_path / "two", workers=2, **kwargs)
    reference = read_tree(dataset_root)
    assert read_tree(two) == reference

    other = read_tree(generate_shapes(tmp_path / "other", seed=1, workers=1, **kwargs))
    assert other.keys() == reference.keys()
    assert other["train/images/000000.png"] != reference["train/images/000000.png"]
    assert other["train/labels.jsonl"] != reference["train/labels.jsonl"]
    # Splits are seeded independently: val image 0 is not train image 0.
    assert reference["val/images/000000.png"] != reference["train/images/000000.png"]


# --- caching and interrupted runs --------------------------------------------------------


def test_cache_hit_does_not_regenerate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = generate_shapes(tmp_path / "d", num_train=8, num_val=4, workers=1, progress=False)
    stamp = (root / "meta.json").stat().st_mtime_ns
    image = root / "train" / "images" / "000000.png"
    os.utime(image, ns=(1, 1))

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("render_scene called on a cache hit")

    monkeypatch.setattr(shapes, "render_scene", fail)
    assert generate_shapes(root, num_train=8, num_val=4, workers=2, progress=False) == root
    assert (root / "meta.json").stat().st_mtime_ns == stamp
    assert image.stat().st_mtime_ns == 1


def test_other_parameters_replace_the_dataset(tmp_path: Path) -> None:
    root = generate_shapes(tmp_path / "d", num_train=8, num_val=4, workers=1, progress=False)
    generate_shapes(root, num_train=5, num_val=3, workers=1, progress=False)
    assert json.loads((root / "meta.json").read_text())["splits"] == {"train": 5, "val": 3}
    assert len(list((root / "train" / "images").iterdir())) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_leftover_temp_dir_is_not_a_dataset(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    # What a killed run leaves behind: a half-written hidden temp folder, even with a meta.
    tmp = tmp_path / ".shapes.tmp-123-deadbeef"
    (tmp / "train" / "images").mkdir(parents=True)
    (tmp / "meta.json").write_text("{}")
    with pytest.raises(DataError, match="milan data shapes --out"):
        ShapesDataset(root)
    generate_shapes(root, num_train=4, num_val=2, workers=1, progress=False)
    assert len(ShapesDataset(root)) == 4


def test_interrupted_generation_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = shapes.render_scene
    calls = []

    def flaky(rng: np.random.Generator, image_size: int = 64) -> shapes.Scene:
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return real(rng, image_size)

    monkeypatch.setattr(shapes, "render_scene", flaky)
    with pytest.raises(KeyboardInterrupt):
        generate_shapes(tmp_path / "shapes", num_train=8, num_val=4, workers=1, progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError):
        ShapesDataset(tmp_path / "shapes")


def test_refuses_to_overwrite_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a milan shapes dataset"):
        generate_shapes(tmp_path / "mine", num_train=2, num_val=1, workers=1, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# --- reading -----------------------------------------------------------------------------


def test_dataset_items(dataset_root: Path) -> None:
    rows = read_rows(dataset_root / "train")
    ds = ShapesDataset(dataset_root, split="train", label="shape")
    assert len(ds) == NUM_TRAIN
    assert ds.classes == list(SHAPES) and ds.num_classes == 6
    image, target = ds[3]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (64, 64)
    assert isinstance(target, int) and target == rows[3]["shape"]
    assert ds.captions[3] == rows[3]["caption"]
    for name in ("shape", "colour", "position", "count"):
        assert ds.labels[name].dtype == torch.long
        assert ds.labels[name].tolist() == [row[name] for row in rows]
    expected = [row["shape"] * 6 + row["colour"] for row in rows]
    assert ds.labels["shape_colour"].tolist() == expected


@pytest.mark.parametrize(
    ("label", "num_classes"), [("colour", 6), ("position", 9), ("count", 3), ("shape_colour", 36)]
)
def test_dataset_labels(dataset_root: Path, label: str, num_classes: int) -> None:
    ds = ShapesDataset(dataset_root, split="val", label=label, transform=np.asarray)
    assert ds.num_classes == num_classes and len(ds) == NUM_VAL
    image, target = ds[2]
    assert isinstance(image, np.ndarray) and image.shape == (64, 64, 3)
    assert target == int(ds.labels[label][2]) and 0 <= target < num_classes
    if label == "shape_colour":
        shape, colour = divmod(target, 6)
        assert ds.classes[target] == f"{COLOURS[colour]} {SHAPES[shape]}"


def test_dataset_errors(dataset_root: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=re.escape(f"milan data shapes --out {missing}")):
        ShapesDataset(missing)
    with pytest.raises(DataError, match="shape_colour"):
        ShapesDataset(dataset_root, label="size")
    with pytest.raises(DataError, match="'train', 'val'"):
        ShapesDataset(dataset_root, split="test")
    with pytest.raises(ConfigError, match="image_size must be >= 32"):
        generate_shapes(tmp_path / "small", image_size=16, num_train=1, num_val=1, progress=False)


def test_load_instances(dataset_root: Path) -> None:
    rows = read_rows(dataset_root / "val")
    for index in range(NUM_VAL):
        inst = load_instances(dataset_root, "val", index)
        k = len(rows[index]["classes"])
        assert inst.masks.shape == (k, 64, 64) and inst.masks.dtype == bool
        assert inst.boxes.shape == (k, 4) and inst.boxes.dtype == np.float32
        assert inst.classes.tolist() == rows[index]["classes"]
        assert inst.classes[0] == rows[index]["shape"]
        for mask, (x0, y0, x1, y1) in zip(inst.masks, inst.boxes, strict=True):
            ys, xs = np.nonzero(mask)
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert not (inst.masks.sum(0) > 1).any()  # instances do not overlap
    ds = ShapesDataset(dataset_root, split="val")
    assert np.array_equal(ds.instances(4).masks, load_instances(dataset_root, "val", 4).masks)


def test_default_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MILAN_CACHE", str(tmp_path))
    assert default_shapes_root() == tmp_path / "shapes"
    monkeypatch.delenv("MILAN_CACHE")
    assert default_shapes_root() == Path.home() / ".cache" / "milan" / "shapes"
