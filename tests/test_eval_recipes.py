"""Recipe tests of the evaluation commands (knn, linprobe, finetune, eval) on tiny shapes data."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from milan.data.shapes import generate_shapes
from milan.errors import DataError, TeacherError
from milan.tools.cli import main as cli
from milan.train.probe import knn_classify


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes") / "data"
    generate_shapes(root, num_train=160, num_val=64, workers=1, progress=False)
    return root


@pytest.fixture(scope="module")
def checkpoint(random_pretrain_checkpoint: Path) -> Path:
    return random_pretrain_checkpoint


def _classes(root: Path, label: str) -> int:
    return len(json.loads((root / "meta.json").read_text())["classes"][label])


def test_knn_classify_known_neighbours() -> None:
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    queries = torch.tensor([[2.0, 0.1], [0.05, 3.0], [-1.0, 0.05]])  # scale must not matter (cosine)
    assert knn_classify(train, labels, queries, k=1).tolist() == [0, 1, 2]
    # k=3 for the last query: one close neighbour of class 2 outweighs two far ones (exp(sim/T))
    assert knn_classify(train, labels, queries, k=3, temperature=0.07).tolist() == [0, 1, 2]
    # with a huge temperature the weights are ~uniform and the majority of the 3 wins
    far = torch.tensor([[-1.0, 0.6]])
    assert knn_classify(train, labels, far, k=3, temperature=100.0).tolist() == [1]
    assert knn_classify(train, labels, far, k=3, temperature=0.01).tolist() == [2]


def test_knn_cli_on_shapes(shapes_root: Path, checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "knn"
    cli(["knn", f"model.weights={checkpoint}", "data.kind=shapes", f"data.path={shapes_root}",
         "data.label=colour", "data.crop_pct=1.0", "data.num_workers=0", "data.batch_size=64",
         "model.pool=mean", f"run.out_dir={out}", "run.device=cpu"])
    result = json.loads((out / "results.json").read_text())
    assert result["num_val"] == 64 and result["num_train"] == 160 and result["preset"] == "vit_shapes_patch8"
    assert result["num_classes"] == _classes(shapes_root, "colour") and 0 <= result["knn_top1"] <= 1
    assert (out / "metrics.jsonl").is_file() and (out / "config.yaml").is_file()


def test_knn_cli_finds_its_own_images(shapes_root: Path, checkpoint: Path, tmp_path: Path) -> None:
    """Queries that are also in the reference set must be their own nearest neighbour.

    A random-init encoder does not beat chance on held-out shapes, but any mix-up of features,
    labels or order in extraction would break this exact-match case.
    """
    import shutil

    from milan.data.shapes import ShapesDataset

    shapes = ShapesDataset(shapes_root, split="train", label="colour")
    for i in range(48):
        for split in ("train", "val") if i < 24 else ("train",):
            folder = tmp_path / "folder" / split / shapes.classes[int(shapes.targets[i])]
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(shapes.split_dir / shapes.files[i], folder / f"{i}.png")
    out = tmp_path / "knn"
    cli(["knn", f"model.weights={checkpoint}", "data.kind=imagefolder", f"data.path={tmp_path / 'folder'}",
         "data.img_size=64", "data.crop_pct=1.0", "data.num_workers=0", "knn.k=1",
         f"run.out_dir={out}", "run.device=cpu"])
    result = json.loads((out / "results.json").read_text())
    assert result["num_train"] == 48 and result["num_val"] == 24
    assert result["knn_top1"] == 1.0, result


def test_knn_without_weights_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="model.weights"):
        cli(["knn", "data.kind=shapes", f"run.out_dir={tmp_path}", "run.device=cpu"])


def _linprobe_args(root: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["linprobe", f"model.weights={ckpt}", "data.kind=shapes", f"data.path={root}", "data.label=colour",
            "data.crop_pct=1.0", "data.num_workers=0", "optim.batch_size=32", "optim.epochs=4",
            "optim.warmup_epochs=1", "optim.solver=lars", f"run.out_dir={out}", "run.device=cpu", "run.tensorboard=false",
            *extra]


def test_linprobe_cached_beats_chance(shapes_root: Path, checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "lp"
    cli(_linprobe_args(shapes_root, checkpoint, out, "optim.cache_features=true", "optim.epochs=30",
                       "optim.lr=100"))  # LARS steps are lr × 0.001 × |w| / |g|: tiny batches need a big lr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, 31))
    assert all(0 <= r["top1"] <= r["top5"] <= 1 for r in records)
    result = json.loads((out / "results.json").read_text())
    assert result["best"]["top1"] > 2 / _classes(shapes_root, "colour"), result
    best = torch.load(out / "head-best.pt", weights_only=True)
    assert best["top1"] == result["best"]["top1"] and set(best["head"]) >= {"1.weight", "1.bias"}
    assert (out / "head-last.pt").is_file()


@pytest.fixture
def milan_log(caplog: pytest.LogCaptureFixture):
    """caplog for the `milan` logger, which does not propagate to the root logger once configured."""
    from milan.train.log import get_logger

    logger = get_logger()
    logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.INFO)
    yield caplog
    logger.removeHandler(caplog.handler)


def test_linprobe_small_data_defaults_to_lbfgs_and_learns(shapes_root: Path, checkpoint: Path, tmp_path: Path,
                                                          milan_log: pytest.LogCaptureFixture) -> None:
    """Issue 16: batch 32 scales A.1's lr to 0.00625, where LARS cannot move the head; auto picks L-BFGS."""
    import milan.recipes.linprobe as linprobe

    out = tmp_path / "lp"
    cli(_linprobe_args(shapes_root, checkpoint, out, "optim.solver=auto"))
    assert "solver: lbfgs (optim.solver=auto: 160 training images < optim.lbfgs_max_images" in milan_log.text
    result = json.loads((out / "results.json").read_text())
    assert result["solver"] == "lbfgs" and result["lbfgs"]["converged"]
    assert result["best"]["top1"] > 3 / _classes(shapes_root, "colour"), result  # chance is 1/6
    assert result["lbfgs"]["train_loss"] < 0.5 * result["lbfgs"]["chance_loss"]
    assert "not clearly above chance" not in milan_log.text and "at chance" not in milan_log.text
    # head-best.pt loads into a ProbeHead (BN statistics + linear), as a LARS run's does
    saved = torch.load(out / "head-best.pt", weights_only=True)
    head = linprobe.ProbeHead(saved["head"]["1.weight"].shape[1], result["num_classes"])
    head.load_state_dict(saved["head"])
    assert saved["top1"] == result["best"]["top1"] and saved["solver"] == "lbfgs"
    assert not (out / "head-last.pt").exists()
    # training features are centre crops whether or not optim.cache_features is set (no random crops)
    cli(_linprobe_args(shapes_root, checkpoint, tmp_path / "cached", "optim.solver=auto", "optim.cache_features=true"))
    assert json.loads((tmp_path / "cached" / "results.json").read_text())["best"] == result["best"]


def test_linprobe_warns_when_it_cannot_have_learned(shapes_root: Path, checkpoint: Path, tmp_path: Path,
                                                     milan_log: pytest.LogCaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import milan.recipes.linprobe as linprobe

    # LARS with the A.1 rule at batch 32 (lr 0.00625): the loss stays at the label entropy
    cli(_linprobe_args(shapes_root, checkpoint, tmp_path / "lars", "optim.cache_features=true"))
    assert "still at chance" in milan_log.text and "optim.solver=lbfgs" in milan_log.text
    milan_log.clear()
    # features without signal (noise): L-BFGS runs, and says the result means nothing
    monkeypatch.setattr(linprobe, "_feature_fn", lambda *_: lambda images: torch.randn(len(images), 192))
    cli(_linprobe_args(shapes_root, checkpoint, tmp_path / "noise", "optim.solver=lbfgs"))
    assert "not clearly above chance" in milan_log.text
    assert json.loads((tmp_path / "noise" / "results.json").read_text())["solver"] == "lbfgs"


def test_linprobe_a1_configs_keep_lars_at_scale() -> None:
    from milan.recipes import linprobe
    from milan.train.config import config_path, load_config

    for name in ("linprobe_vit_base", "linprobe_vit_large"):
        optim = load_config(linprobe.CONFIG, config_path(name)).optim
        assert optim.solver == "auto" and optim.batch_size == 16384
        assert linprobe.choose_solver(optim, 1_281_167)[0] == "lars"  # ImageNet-1K train: A.1 exactly
        assert linprobe.choose_solver(optim, 5_000)[0] == "lbfgs"
        optim.solver = "lars"
        assert linprobe.choose_solver(optim, 5_000)[0] == "lars"


def test_linprobe_leaves_encoder_frozen(shapes_root: Path, checkpoint: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import milan.recipes.linprobe as linprobe
    from milan.io.weights import build_encoder

    built = []

    def spy(*args, **kwargs):
        encoder, meta = build_encoder(*args, **kwargs)
        built.append(encoder)
        return encoder, meta

    monkeypatch.setattr(linprobe, "build_encoder", spy)
    cli(_linprobe_args(shapes_root, checkpoint, tmp_path / "lp", "optim.epochs=1", "data.train_limit=64"))
    reference, _ = build_encoder(checkpoint)
    assert not any(p.requires_grad for p in built[0].parameters())
    for key, value in reference.state_dict().items():
        assert torch.equal(built[0].state_dict()[key], value), key


def test_semantic_aware_linprobe_runs(shapes_root: Path, checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "lp"
    cli(_linprobe_args(shapes_root, checkpoint, out, "optim.cache_features=true", "optim.epochs=2",
                       "model.semantic_topk=0.5", "teacher.spec=builtin:shapes"))
    result = json.loads((out / "results.json").read_text())
    assert result["semantic_topk"] == 0.5 and 0 <= result["last"]["top1"] <= 1


def test_semantic_topk_without_teacher_names_the_fix(shapes_root: Path, checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(TeacherError, match="teacher.spec"):
        cli(_linprobe_args(shapes_root, checkpoint, tmp_path / "lp", "model.semantic_topk=0.5"))


def _finetune_args(root: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", f"model.weights={ckpt}", "data.kind=shapes", f"data.path={root}", "data.label=colour",
            "data.crop_pct=1.0", "data.num_workers=0", "data.auto_augment=null", "data.reprob=0.0",
            "data.hflip=0.0", "data.crop_scale=[1.0,1.0]", "mixup.mixup=0", "mixup.cutmix=0",
            "mixup.label_smoothing=0", "model.drop_path=0", "optim.batch_size=32",
            "optim.warmup_epochs=0", "optim.lr=1e-3", "optim.layer_decay=0.75", "optim.epochs=5", f"run.out_dir={out}",
            "run.device=cpu", "run.tensorboard=false", "run.log_every=1", *extra]


def test_finetune_cli_beats_chance_and_exports(shapes_root: Path, checkpoint: Path, tmp_path: Path) -> None:
    import safetensors.torch
    import timm

    out = tmp_path / "ft"
    cli(_finetune_args(shapes_root, checkpoint, out))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "epoch" in r]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4, 5]
    result = json.loads((out / "results.json").read_text())
    assert result["best"]["top1"] > 1.5 / _classes(shapes_root, "colour"), result
    best = torch.load(out / "checkpoint-best.pt", weights_only=True)
    assert best["kind"] == "finetune" and best["num_classes"] == _classes(shapes_root, "colour")
    assert "optimizer" in torch.load(out / "checkpoint-last.pt", weights_only=True)
    # the finetuned classifier exports with its head and runs in timm unchanged
    exported = tmp_path / "ft.safetensors"
    cli(["export", str(out / "checkpoint-best.pt"), "--out", str(exported)])
    sidecar = json.loads(exported.with_suffix(".json").read_text())
    vit = timm.models.VisionTransformer(**sidecar["vision_transformer_kwargs"]).eval()
    vit.load_state_dict(safetensors.torch.load_file(exported))
    assert sidecar["create_model_kwargs"]["num_classes"] == best["num_classes"]


def test_finetune_full_recipe_at_higher_resolution(shapes_root: Path, checkpoint: Path, tmp_path: Path) -> None:
    """Mixup/cutmix, RandAugment, erasing, drop path and pos-embed resampling all run together."""
    out = tmp_path / "ft"
    cli(_finetune_args(shapes_root, checkpoint, out, "mixup.mixup=0.8", "mixup.cutmix=1.0",
                       "mixup.label_smoothing=0.1", "data.auto_augment=rand-m9-mstd0.5-inc1", "data.reprob=0.25",
                       "model.drop_path=0.1", "data.img_size=80", "optim.epochs=1", "data.crop_scale=[0.5,1.0]"))
    best = torch.load(out / "checkpoint-best.pt", weights_only=True)
    assert best["model"]["pos_embed"].shape == (1, 1 + 10 * 10, 192)
    assert best["encoder"]["img_size"] == 80


def test_imagenet_r_and_a_class_index_matches_timm() -> None:
    """Our wnid → 1000-way index mapping equals timm's published ImageNet-A/-R index lists."""
    import importlib.resources

    from milan.recipes.evaluate import class_index, imagenet_classes

    info = importlib.resources.files("timm.data") / "_info"
    classes = imagenet_classes()
    assert len(classes) == 1000 and classes[0] == "n01440764"
    for subset in ("imagenet_r", "imagenet_a"):
        synsets = (info / f"{subset}_synsets.txt").read_text().split()
        indices = [int(i) for i in (info / f"{subset}_indices.txt").read_text().split()]
        assert len(synsets) == 200
        assert class_index(sorted(synsets), classes).tolist() == [indices[synsets.index(s)] for s in sorted(synsets)]


def test_eval_restricts_logits_to_the_folder_classes(tmp_path: Path) -> None:
    """A rigged 1000-way head: class 0 wins overall, class 4 (n01491361) wins among the folder's."""
    from PIL import Image
    from timm.models import VisionTransformer

    from milan.encoder import ENCODER_PRESETS
    from milan.io.weights import timm_kwargs

    wnids = ["n01443537", "n01484850", "n01491361"]  # indices 1, 2, 4 of ImageNet-1k
    for wnid in wnids:
        (tmp_path / "imagenet-r" / wnid).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (64, 64), (40 * i, 90, 160)).save(tmp_path / "imagenet-r" / wnid / f"{i}.png")
    (tmp_path / "bad" / "cat").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(tmp_path / "bad" / "cat" / "0.png")
    vit = VisionTransformer(**timm_kwargs(ENCODER_PRESETS["vit_shapes_patch8"]), num_classes=1000, global_pool="avg")
    with torch.no_grad():
        vit.head.weight.zero_()
        vit.head.bias.zero_()
        vit.head.bias[0], vit.head.bias[4], vit.head.bias[2], vit.head.bias[1] = 10.0, 5.0, 4.0, -1.0
    ckpt = tmp_path / "ft.pt"
    torch.save({"model": vit.state_dict(), "kind": "finetune", "preset": "vit_shapes_patch8"}, ckpt)
    common = [f"model.weights={ckpt}", "data.crop_pct=1.0", "data.num_workers=0", "run.device=cpu"]
    restricted = cli(["eval", *common, f"data.paths=[{tmp_path / 'imagenet-r'}]", f"run.out_dir={tmp_path / 'a'}"])
    result = json.loads((tmp_path / "a" / "results.json").read_text())["imagenet-r"]
    assert result["restricted"] and result["num_classes"] == 3 and result["count"] == 6
    assert result["top1"] == pytest.approx(1 / 3) and result["top5"] == 1.0  # always predicts n01491361
    assert restricted is None  # the CLI returns nothing; results are on disk
    cli(["eval", *common, f"data.paths=[{tmp_path / 'imagenet-r'}]", "data.restrict_logits=never",
         f"run.out_dir={tmp_path / 'b'}"])
    result = json.loads((tmp_path / "b" / "results.json").read_text())["imagenet-r"]
    assert result["top1"] == 0.0 and result["top5"] == pytest.approx(2 / 3)  # class 0 wins; 4 and 2 in top-5, 1 not
    with pytest.raises(DataError, match="bad: none of the folder's classes .*WordNet id"):
        cli(["eval", *common, f"data.paths=[{tmp_path / 'bad'}]", f"run.out_dir={tmp_path / 'c'}"])


def test_randaugment_posterize_at_top_magnitude_keeps_a_bit() -> None:
    """timm asks Pillow for 0 posterize bits at magnitude 10, which Pillow >= 10 rejects."""
    from PIL import Image
    from timm.data import create_transform
    from timm.data.auto_augment import RandAugment

    from milan.train.classify import keep_posterize_bits

    tf = create_transform(64, is_training=True, auto_augment="rand-m10-inc1")
    keep_posterize_bits(tf)
    ra = next(t for t in tf.transforms if isinstance(t, RandAugment))
    op = next(o for o in ra.ops if o.name == "PosterizeIncreasing")
    op.prob = 1.0
    image = Image.new("RGB", (64, 64), (200, 100, 50))
    assert op(image).getpixel((0, 0)) == (128, 0, 0)  # 1 bit (the MSB) kept, not a crash


def test_subset_labels_are_read_once_not_per_index() -> None:
    """data.train_limit wraps the dataset in a Subset; its labels must not be recomputed per index."""
    from milan.recipes.linprobe import _targets

    class Labelled(torch.utils.data.Dataset):
        reads = 0

        def __len__(self) -> int:
            return 5000

        @property
        def targets(self) -> list[int]:
            Labelled.reads += 1
            return [i % 7 for i in range(5000)]

    subset = torch.utils.data.Subset(Labelled(), range(10, 1010))
    assert _targets(subset) == [i % 7 for i in range(10, 1010)]
    assert Labelled.reads <= 2


def test_eval_reads_class_names_from_a_finetune_checkpoint_and_its_export(tmp_path: Path) -> None:
    """Class names recorded by finetune survive export; eval matches folders to them by name."""
    from PIL import Image
    from timm.models import VisionTransformer

    from milan.encoder import ENCODER_PRESETS
    from milan.io.weights import timm_kwargs

    for name in ("eel", "cat"):  # a subset of the model's classes, in another order
        (tmp_path / "val" / name).mkdir(parents=True)
        Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "val" / name / "0.png")
    vit = VisionTransformer(**timm_kwargs(ENCODER_PRESETS["vit_shapes_patch8"]), num_classes=3, global_pool="avg")
    with torch.no_grad():
        vit.head.weight.zero_()
        vit.head.bias.copy_(torch.tensor([1.0, 5.0, 3.0]))  # dog > eel > cat
    ckpt = tmp_path / "ft.pt"
    torch.save({"model": vit.state_dict(), "kind": "finetune", "preset": "vit_shapes_patch8",
                "classes": ["cat", "dog", "eel"]}, ckpt)
    exported = tmp_path / "ft.safetensors"
    cli(["export", str(ckpt), "--out", str(exported)])
    for i, weights in enumerate((ckpt, exported)):
        cli(["eval", f"model.weights={weights}", f"data.paths=[{tmp_path / 'val'}]", "data.crop_pct=1.0",
             "data.num_workers=0", "run.device=cpu", f"run.out_dir={tmp_path / f'run{i}'}"])
        (result,) = json.loads((tmp_path / f"run{i}" / "results.json").read_text()).values()
        assert result["restricted"] and result["num_classes"] == 2
        assert result["top1"] == pytest.approx(0.5)  # restricted to {cat, eel}: always eel
