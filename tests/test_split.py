"""Evaluation never scores its training images: the held-out split and every command that uses it."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from milan.data.split import eval_sets, held_out_mask, resolve_roots
from milan.errors import ConfigError
from milan.tools.cli import main as cli

CLASSES = {"ant": 12, "bee": 7, "cow": 2, "dog": 1}  # uneven on purpose: rounding and tiny classes


def _folder(root: Path, counts: dict[str, int] = CLASSES, size: int = 32) -> Path:
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (size, size), (60 * c % 256, 20 * i % 256, 128)).save(root / name / f"{name}{i}.png")
    return root


def _files(dataset: Any) -> set[str]:
    """The image files of a dataset as a command reads it (through Checked / Subset wrappers)."""
    while not hasattr(dataset, "samples"):
        dataset = dataset.dataset
    return {str(p) for p, _ in dataset.samples}


# --- the split itself -------------------------------------------------------------------------------


def test_held_out_mask_is_stratified_and_keeps_every_class_in_training() -> None:
    files = [f"{c}/{i}.jpg" for c, n in CLASSES.items() for i in range(n)]
    labels = [j for j, n in enumerate(CLASSES.values()) for _ in range(n)]
    held = held_out_mask(files, labels, 0.2)
    per_class = Counter(label for label, h in zip(labels, held) if h)
    # round(0.2 × n) clipped to [1, n-1]; a class of one image stays in training
    assert dict(per_class) == {0: 2, 1: 1, 2: 1}
    held = held_out_mask(files, labels, 0.5)
    assert dict(Counter(label for label, h in zip(labels, held) if h)) == {0: 6, 1: 4, 2: 1}


def test_held_out_mask_depends_on_the_files_alone() -> None:
    """Same files in another order → the same files held out; no seed; a new file moves no other."""
    files = [f"c{i % 3}/img{i:03d}.jpg" for i in range(90)]
    labels = [i % 3 for i in range(90)]
    held = {f for f, h in zip(files, held_out_mask(files, labels, 0.2)) if h}
    order = list(range(90))
    random.Random(1).shuffle(order)
    shuffled = {files[i] for i, h in zip(order, held_out_mask([files[i] for i in order], [labels[i] for i in order],
                                                              0.2)) if h}
    assert shuffled == held and len(held) == 18
    # a held-out set that is not simply the first or last files of each class
    assert held != {f for f in files if int(f[-7:-4]) >= 72} and held != {f for f in files if int(f[-7:-4]) < 18}
    more = files + ["c0/img999.jpg"]
    held_more = {f for f, h in zip(more, held_out_mask(more, labels + [0], 0.2)) if h}
    assert len(held_more ^ held) <= 2  # at most the new file in, one other out of class c0's 31


def test_held_out_mask_rejects_fractions_outside_0_1() -> None:
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ConfigError, match="data.val_fraction"):
            held_out_mask(["a"], [0], bad)


def test_eval_sets_without_val_folder_hold_out_a_disjoint_part(tmp_path: Path) -> None:
    root = _folder(tmp_path / "photos")
    sets = eval_sets("imagefolder", root, val_fraction=0.2, train_transform=None, val_transform=None)
    train, val = _files(sets.train), _files(sets.val)
    assert not train & val and len(train | val) == sum(CLASSES.values()) and len(val) == 4
    assert sets.held_out and sets.val_source == f"held out from {root} (data.val_fraction=0.2)"
    assert sets.record() == {"scored": {"count": 4, "source": sets.val_source},
                             "train": {"count": 18, "source": f"{root} without the held-out images"}}
    # each part reads with its own transform, from the same list of files
    sets = eval_sets("imagefolder", root, val_fraction=0.2, train_transform=lambda im: "train",
                     val_transform=lambda im: "val")
    assert sets.train[0][0] == "train" and sets.val[0][0] == "val"
    assert sets.train.classes == sets.val.classes == list(CLASSES)


def test_eval_sets_with_train_and_val_folders_use_them_whole(tmp_path: Path) -> None:
    _folder(tmp_path / "data" / "train")
    _folder(tmp_path / "data" / "val", {"ant": 3, "bee": 2})
    sets = eval_sets("imagefolder", tmp_path / "data", val_fraction=0.2, train_transform=None, val_transform=None)
    assert not sets.held_out and len(sets.train) == 22 and len(sets.val) == 5
    assert sets.val_source == str(tmp_path / "data" / "val")


def test_a_train_folder_without_val_is_split_not_scored_as_its_parent(tmp_path: Path) -> None:
    """`data/train` alone: the val set must not become `data` (whose only class would be 'train')."""
    _folder(tmp_path / "data" / "train")
    assert resolve_roots(tmp_path / "data") == (tmp_path / "data" / "train", None)
    assert resolve_roots(tmp_path / "data", val_path=tmp_path / "data") == (tmp_path / "data" / "train", None)
    sets = eval_sets("imagefolder", tmp_path / "data", val_fraction=0.2, train_transform=None, val_transform=None)
    assert sets.held_out and sets.val.classes == list(CLASSES)


def test_val_fraction_zero_refuses_a_folder_without_val(tmp_path: Path) -> None:
    root = _folder(tmp_path / "photos")
    with pytest.raises(ConfigError, match=r"no separate val folder and data.val_fraction=0.*train/ and val/.*"
                                          r"data.val_fraction=0.2"):
        eval_sets("imagefolder", root, val_fraction=0.0, train_transform=None, val_transform=None)


# --- every command ------------------------------------------------------------------------------------


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return _folder(tmp_path / "photos", {"ant": 10, "bee": 10, "cow": 10})


def _spy(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[set[str]]:
    """Record the files of the dataset each call of `module.name` receives (first argument or dataset=)."""
    seen: list[set[str]] = []
    real = getattr(module, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        dataset = kwargs.get("dataset", args[1] if name == "extract_features" else args[0] if args else None)
        seen.append(_files(dataset))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen


def test_knn_and_linprobe_score_held_out_images_only(photos: Path, tmp_path: Path, random_pretrain_checkpoint: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from milan.recipes import knn, linprobe

    common = [f"model.weights={random_pretrain_checkpoint}", f"data.path={photos}", "data.img_size=64",
              "data.crop_pct=1.0", "data.num_workers=0", "run.device=cpu"]
    seen = _spy(monkeypatch, knn, "extract_features")
    cli(["knn", *common, f"run.out_dir={tmp_path / 'knn'}"])
    reference, scored = seen
    assert not reference & scored and len(scored) == 6 and len(reference) == 24
    result = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert result["scored"] == {"count": 6, "source": f"held out from {photos} (data.val_fraction=0.2)"}
    assert result["train"]["count"] == 24 and result["num_val"] == 6

    seen = _spy(monkeypatch, linprobe, "extract_features")
    cli(["linprobe", *common, f"run.out_dir={tmp_path / 'lp'}", "run.tensorboard=false"])
    scored_lp, train_lp = seen  # val features first, then the cached training features
    assert scored_lp == scored and train_lp == reference  # the same split as kNN's
    result = json.loads((tmp_path / "lp" / "results.json").read_text())
    assert result["scored"]["count"] == 6 and result["scored"]["source"].startswith("held out from")
    # one L-BFGS solve: the results name the solver and its iterations, no epochs
    assert result["solver"] == "lbfgs" and "epochs" not in result and "epoch" not in result["best"]
    assert result["lbfgs"]["iterations"] >= 1 and result["lbfgs"]["max_iter"] == 1000

    with pytest.raises(ConfigError, match="data.val_fraction=0"):
        cli(["knn", *common, "data.val_fraction=0", f"run.out_dir={tmp_path / 'knn0'}"])


def test_finetune_trains_on_one_part_and_eval_scores_the_other(photos: Path, tmp_path: Path,
                                                               random_pretrain_checkpoint: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from milan.recipes import evaluate, finetune

    seen = _spy(monkeypatch, finetune, "DataLoader")
    out = tmp_path / "ft"
    cli(["finetune", f"model.weights={random_pretrain_checkpoint}", f"data.path={photos}", "data.img_size=64",
         "data.num_workers=0", "data.auto_augment=null", "data.reprob=0.0", "mixup.mixup=0", "mixup.cutmix=0",
         "optim.batch_size=8", "optim.epochs=1", "optim.warmup_epochs=0", f"run.out_dir={out}", "run.device=cpu",
         "run.tensorboard=false"])
    trained, scored = seen
    assert not trained & scored and len(scored) == 6 and len(trained) == 24
    result = json.loads((out / "results.json").read_text())
    assert result["scored"] == {"count": 6, "source": f"held out from {photos} (data.val_fraction=0.2)"}

    seen = _spy(monkeypatch, evaluate, "DataLoader")
    cli(["eval", f"model.weights={out / 'checkpoint-last.pt'}", f"data.paths=[{photos}]", "data.num_workers=0",
         "run.device=cpu", f"run.out_dir={tmp_path / 'ev'}"])
    assert seen == [scored]  # finetune's held-out images, none it trained on
    (result,) = json.loads((tmp_path / "ev" / "results.json").read_text()).values()
    assert result["count"] == 6 and result["scored"]["source"].startswith(f"held out from {photos}")


def test_eval_refuses_the_folder_a_classifier_was_finetuned_on(tmp_path: Path) -> None:
    from timm.models import VisionTransformer

    from milan.encoder import ENCODER_PRESETS
    from milan.io.weights import timm_kwargs

    _folder(tmp_path / "data" / "train", {"ant": 3, "bee": 3})
    _folder(tmp_path / "data" / "val", {"ant": 1, "bee": 1})
    vit = VisionTransformer(**timm_kwargs(ENCODER_PRESETS["vit_shapes_patch8"]), num_classes=2, global_pool="avg")
    ckpt = tmp_path / "ft.pt"
    torch.save({"model": vit.state_dict(), "kind": "finetune", "preset": "vit_shapes_patch8", "classes": ["ant", "bee"],
                "config": {"data": {"kind": "imagefolder", "path": str(tmp_path / "data"), "val_fraction": 0.2}}}, ckpt)
    common = [f"model.weights={ckpt}", "data.num_workers=0", "run.device=cpu", f"run.out_dir={tmp_path / 'ev'}"]
    with pytest.raises(ConfigError, match=f"holds the images .* finetuned on .*evaluate {tmp_path / 'data' / 'val'}"):
        cli(["eval", *common, f"data.paths=[{tmp_path / 'data' / 'train'}]"])
    cli(["eval", *common, f"data.paths=[{tmp_path / 'data'}]"])  # its val/: scored whole
    (result,) = json.loads((tmp_path / "ev" / "results.json").read_text()).values()
    assert result["scored"] == {"count": 2, "source": str(tmp_path / "data" / "val")}
