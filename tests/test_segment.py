"""`milan segment`: UperNet, segmentation metrics, ADE20K/shapes data, the poly schedule and the recipe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from milan.data.shapes import generate_shapes
from milan.dense.backbone import layer_decay_groups
from milan.dense.seg_data import (
    ADE20K_CLASSES,
    SHAPES_SEG_CLASSES,
    ADE20KDataset,
    SegEvalTransform,
    SegSamples,
    SegTrainTransform,
    ShapesSegDataset,
    reduce_zero_label,
)
from milan.dense.seg_metrics import SegMetric, confusion_matrix, segmentation_scores
from milan.dense.upernet import FCNHead, UperNetHead, build_segmenter
from milan.encoder import MaskedViTEncoder
from milan.errors import CheckpointError, ConfigError, DataError
from milan.io.weights import build_encoder
from milan.recipes.segment import predict, seg_loss
from milan.tools.cli import main as cli
from milan.train.schedule import warmup_poly

PRESET = "vit_shapes_patch8"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("seg") / "shapes", num_train=64, num_val=32, progress=False)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random ViT (width 128, depth 4, patch 8) saved as a plain timm-named state dict."""
    torch.manual_seed(0)
    enc = MaskedViTEncoder(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=2)
    path = tmp_path_factory.mktemp("weights") / "tiny_vit.pth"
    torch.save({"model": enc.state_dict()}, path)
    return path


def _small_args(shapes: Path, out: Path, weights: Path, *extra: str) -> list[str]:
    return ["segment", "--config", "segment_shapes", f"data.path={shapes}", f"run.out_dir={out}",
            f"model.weights={weights}", "model.preset=null", "model.channels=16", "model.aux_channels=16",
            "optim.batch_size=4", "optim.warmup_iters=2", "data.val_limit=8", "data.num_workers=0",
            "run.eval_every=0", "run.log_every=1", *extra]


# --- UperNet --------------------------------------------------------------------------------------

def test_upernet_head_output_shape() -> None:
    head = UperNetHead((48, 96, 192, 192), channels=32, num_classes=7).train()
    feats = [torch.randn(2, c, 24 // s, 40 // s) for c, s in zip((48, 96, 192, 192), (1, 2, 4, 8))]
    assert head(feats).shape == (2, 7, 24, 40)
    assert FCNHead(192, 16, 7)(feats[2]).shape == (2, 7, 6, 10)
    with pytest.raises(ValueError, match="4 levels"):
        UperNetHead((48, 96, 192), channels=32, num_classes=7)


@pytest.mark.parametrize("mode", ["intermediate", "simple"])
def test_segmenter_logits_at_input_size(mode: str) -> None:
    model = build_segmenter(build_encoder(None, preset=PRESET)[0], 5, pyramid=mode, out_channels=32,
                            channels=16, aux_channels=8)
    logits, aux = model(torch.randn(2, 3, 48, 64), with_aux=True)  # not the encoder's 64×64
    assert logits.shape == aux.shape == (2, 5, 48, 64)
    model.eval()
    assert model(torch.randn(1, 3, 32, 40)).shape == (1, 5, 32, 40)
    no_aux = build_segmenter(build_encoder(None, preset=PRESET)[0], 5, channels=16, aux=False)
    assert no_aux(torch.randn(2, 3, 32, 32), with_aux=True)[1] is None


def test_layer_decay_groups_cover_the_segmenter() -> None:
    model = build_segmenter(build_encoder(None, preset=PRESET)[0], 7, channels=16, aux_channels=8)
    groups = layer_decay_groups(model, weight_decay=0.05, layer_decay=0.9, num_layers=6)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert len(by_param) == sum(1 for _ in model.parameters())  # every parameter, once
    named = dict(model.named_parameters())
    assert by_param[id(named["backbone.encoder.patch_embed.proj.weight"])]["lr_scale"] == pytest.approx(0.9 ** 7)
    assert by_param[id(named["backbone.encoder.blocks.0.attn.qkv.weight"])]["lr_scale"] == pytest.approx(0.9 ** 6)
    assert by_param[id(named["backbone.encoder.blocks.5.mlp.fc1.weight"])]["lr_scale"] == pytest.approx(0.9)
    head_w = by_param[id(named["decode_head.classifier.weight"])]
    assert head_w["lr_scale"] == 1.0 and head_w["weight_decay"] == 0.05
    assert by_param[id(named["decode_head.fuse.1.weight"])]["weight_decay"] == 0.0  # BatchNorm
    assert by_param[id(named["backbone.necks.0.0.weight"])]["lr_scale"] == 1.0  # necks train at full lr


# --- metrics --------------------------------------------------------------------------------------

def test_miou_and_aacc_by_hand() -> None:
    # 5 classes: 3 is only predicted (IoU 0, counted); 4 appears nowhere (NaN, skipped);
    # the prediction 4 under an ignored pixel does not count.
    target = torch.tensor([[0, 0, 1, 255], [1, 2, 2, 255], [0, 255, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 4], [1, 2, 0, 4], [3, 4, 4, 4]])
    conf = confusion_matrix(pred, target, 5)
    assert conf.tolist() == [[1, 1, 0, 1, 0], [0, 2, 0, 0, 0], [1, 0, 1, 0, 0], [0] * 5, [0] * 5]
    s = segmentation_scores(conf)
    assert s["IoU"][:4] == pytest.approx([1 / 4, 2 / 3, 1 / 2, 0.0]) and s["IoU"][4] is None
    assert s["mIoU"] == pytest.approx((1 / 4 + 2 / 3 + 1 / 2 + 0) / 4)
    assert s["aAcc"] == pytest.approx(4 / 7)
    assert s["mAcc"] == pytest.approx((1 / 3 + 1 + 1 / 2) / 3)
    assert s["Acc"][3] is None and s["pixels"] == 7
    # accumulating in parts gives the same matrix
    metric = SegMetric(5)
    metric.update(pred[:2], target[:2])
    metric.update(pred[2:], target[2:])
    metric.all_reduce()  # no process group: a no-op
    assert torch.equal(metric.conf, conf)
    with pytest.raises(ValueError, match="reduce_zero_label"):
        confusion_matrix(pred, torch.full_like(target, 7), 5)


def test_seg_loss_ignores_255_and_never_nans() -> None:
    logits = torch.randn(2, 4, 3, 3)
    target = torch.randint(0, 4, (2, 3, 3))
    target[0] = 255
    want = nn.functional.cross_entropy(logits[1:], target[1:])
    torch.testing.assert_close(seg_loss(logits, target), want)
    assert seg_loss(logits, torch.full_like(target, 255)).item() == 0.0


# --- data -----------------------------------------------------------------------------------------

def _fake_ade(root: Path, labels: dict[str, dict[str, np.ndarray]]) -> Path:
    for split, items in labels.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for stem, lab in items.items():
            rgb = np.random.default_rng(0).integers(0, 255, (*lab.shape, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(root / "images" / split / f"{stem}.jpg")
            Image.fromarray(lab, mode="L").save(root / "annotations" / split / f"{stem}.png")
    return root


def test_ade20k_folder_and_reduce_zero_label(tmp_path: Path) -> None:
    lab = np.array([[0, 1, 5, 150], [255, 2, 0, 1]], dtype=np.uint8).repeat(8, 0).repeat(8, 1)  # 16×32
    root = _fake_ade(tmp_path / "ade", {"training": {"a": lab, "b": lab}, "validation": {"c": lab}})
    train = ADE20KDataset(root, "train")
    assert len(train) == 2 and len(ADE20KDataset(root, "val")) == 1 and train.classes == ADE20K_CLASSES
    image, label = train[0]
    assert image.size == (32, 16) and image.mode == "RGB"
    assert np.unique(label).tolist() == [0, 1, 4, 149, 255]  # 0 → 255, k → k − 1, 255 stays
    assert label[0, 0] == 255 and label[0, 8] == 0 and label[0, 31] == 149
    _, raw = ADE20KDataset(root, "train", reduce_zero_label=False)[0]
    assert np.array_equal(raw, lab)
    assert reduce_zero_label(np.array([0, 1, 254, 255], dtype=np.uint8)).tolist() == [255, 0, 253, 255]


def test_ade20k_layout_errors(tmp_path: Path) -> None:
    lab = np.ones((8, 8), dtype=np.uint8)
    root = _fake_ade(tmp_path / "ade", {"training": {"a": lab, "b": lab}})
    (root / "annotations" / "training" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) .* have no annotation .*e\.g\. b.*images/\{training"):
        ADE20KDataset(root, "train")
    with pytest.raises(FileNotFoundError, match="validation is missing; expected the ADE20K layout"):
        ADE20KDataset(root, "val")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ADE20KDataset(tmp_path / "nowhere", "train")


def test_shapes_semantic_masks(shapes: Path) -> None:
    from milan.data.shapes import load_instances

    ds = ShapesSegDataset(shapes, "val")
    assert len(ds) == 32 and ds.classes == SHAPES_SEG_CLASSES and len(ds.classes) == 7
    image, label = ds[3]
    inst = load_instances(shapes, "val", 3)
    assert label.shape == (image.height, image.width)
    assert (label == 0).sum() == (~inst.masks.any(0)).sum()
    for mask, cls in zip(inst.masks, inst.classes):
        assert (label[mask] == cls + 1).all()


def test_train_transform_crop_pad_flip_and_determinism(shapes: Path) -> None:
    tf = SegTrainTransform(48, scale=(64, 64), ratio_range=(0.5, 0.5), cat_max_ratio=1.0, hflip=0.0)
    samples = SegSamples(ShapesSegDataset(shapes, "train"), tf, seed=1)
    x, y = samples[(0, 5)]
    assert x.shape == (3, 48, 48) and y.shape == (48, 48) and y.dtype == torch.long
    assert (y[32:] == 255).all() and (y[:, 32:] == 255).all() and (x[:, 32:] == 0).all()  # 64 × 0.5 = 32, padded
    assert (y[:32, :32] != 255).all()
    x2, y2 = samples[(0, 5)]
    assert torch.equal(x, x2) and torch.equal(y, y2)  # (seed, epoch, index) fixes the augmentation
    big = SegSamples(ShapesSegDataset(shapes, "train"), SegTrainTransform(32, scale=(64, 64)), seed=1)
    crops = {tuple(big[(e, 5)][1].flatten()[:64].tolist()) for e in range(4)}
    assert len(crops) > 1  # other epochs, other crops
    xe, ye = SegSamples(ShapesSegDataset(shapes, "val"), SegEvalTransform((32, 32)))[0]
    assert xe.shape == (3, 32, 32) and ye.shape == (64, 64)  # label keeps its size


def test_seg_samples_replace_or_drop_an_unreadable_image_with_its_label(shapes: Path) -> None:
    from milan.data.folder import BadImage

    class Broken(ShapesSegDataset):
        def __getitem__(self, index: int):
            if index == 5:
                raise BadImage("img5.png: truncated", name="img5.png", reason="truncated")
            return super().__getitem__(index)

    tf = SegTrainTransform(32, scale=(64, 64))
    clean = SegSamples(ShapesSegDataset(shapes, "train"), tf, seed=1)
    train = SegSamples(Broken(shapes, "train"), tf, seed=1, bad="replace")
    x, y, reports = train[(2, 5)]  # the next sample, with its own (seed, epoch, index) crop
    want_x, want_y = clean[(2, 6)]
    assert torch.equal(x, want_x) and torch.equal(y, want_y) and reports == [("img5.png", "truncated", True)]
    assert train[(2, 4)][2] == [] and torch.equal(train[(2, 4)][0], clean[(2, 4)][0])
    val = SegSamples(Broken(shapes, "train"), SegEvalTransform((32, 32)), bad="drop")
    assert val[5] == (None, None, [("img5.png", "truncated", True)])
    with pytest.raises(DataError, match=r"unreadable image img5\.png: truncated; replace or remove it"):
        SegSamples(Broken(shapes, "train"), tf)[(0, 5)]


def test_slide_inference_equals_whole_for_a_pointwise_model() -> None:
    model = nn.Conv2d(3, 4, 1)  # pixel-wise: any tiling must give the whole-image logits
    images = torch.randn(2, 3, 40, 56)
    whole = predict(model, images, num_classes=4, patch=8, mode="whole")
    slide = predict(model, images, num_classes=4, patch=8, mode="slide", crop=32, stride=16)
    torch.testing.assert_close(slide, whole)
    padded = predict(model, torch.randn(1, 3, 36, 44), num_classes=4, patch=8, mode="whole")
    assert padded.shape == (1, 4, 36, 44)


# --- schedule -------------------------------------------------------------------------------------

def test_warmup_poly_values() -> None:
    f = warmup_poly
    assert f(0, total=100, warmup=10, peak=1.0) == 0.0
    assert f(5, total=100, warmup=10, peak=1.0) == pytest.approx(0.5 * 0.95)
    assert f(10, total=100, warmup=10, peak=1.0) == pytest.approx(0.9)
    assert f(55, total=100, warmup=10, peak=1.0) == pytest.approx(0.45)
    assert f(100, total=100, warmup=10, peak=1.0) == 0.0
    assert f(50, total=100, warmup=0, peak=2.0, power=2.0) == pytest.approx(0.5)
    assert f(100, total=100, warmup=0, peak=1.0, final=0.1) == pytest.approx(0.1)
    after = [f(s, total=160_000, warmup=1500, peak=3e-5) for s in range(1500, 160_001, 1000)]
    assert all(a > b for a, b in zip(after, after[1:]))


# --- recipe ---------------------------------------------------------------------------------------

def test_cli_runs_writes_results_and_checkpoints(shapes: Path, tiny_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cli(_small_args(shapes, out, tiny_weights, "optim.iters=3", "optim.lr=1e-3", "run.ckpt_every=2"))
    results = json.loads((out / "results.json").read_text())
    assert results["step"] == 3 and results["num_classes"] == 7
    for key in ("mIoU", "mAcc", "aAcc"):
        assert 0.0 <= results["last"][key] <= 1.0 and results["best"][key] >= results["last"][key] - 1e-12
    assert list(results["last"]["IoU"]) == list(SHAPES_SEG_CLASSES)
    assert (out / "config.yaml").is_file() and (out / "checkpoint-best.pt").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert any("mIoU" in r for r in records)

    state = torch.load(out / "checkpoint-last.pt", weights_only=True)
    assert state["step"] == 3 and state["kind"] == "segment" and state["num_classes"] == 7
    # the lr of the last step (step index 2), scaled per group by its layer decay
    lr = warmup_poly(2, total=3, warmup=2, peak=1e-3)
    for group in state["optimizer"]["param_groups"]:
        assert group["lr"] == pytest.approx(lr * group["lr_scale"])
    assert len({g["lr_scale"] for g in state["optimizer"]["param_groups"]}) == 6  # depth 4: 0..5


def test_resume_continues_exactly(shapes: Path, tiny_weights: Path, tmp_path: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    cli(_small_args(shapes, straight, tiny_weights, "optim.iters=4"))
    cli(_small_args(shapes, split, tiny_weights, "optim.iters=4", "run.max_iters=2"))
    assert torch.load(split / "checkpoint-last.pt", weights_only=True)["step"] == 2
    with (split / "metrics.jsonl").open("a") as f:  # a crash after logging iteration 3, before saving it
        f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n")
    cli(_small_args(shapes, split, tiny_weights, "optim.iters=4"))  # run.resume=auto
    a = torch.load(straight / "checkpoint-last.pt", weights_only=True)
    b = torch.load(split / "checkpoint-last.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=key)
    def losses(run: Path) -> list[tuple[int, float]]:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in records if "loss" in r]

    assert [step for step, _ in losses(split)] == [1, 2, 3, 4]  # the crashed run's iteration 3 is gone
    assert losses(split) == losses(straight)


def test_clear_errors(shapes: Path, tiny_weights: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="crop_size=60 is not a multiple of the patch size 8"):
        cli(_small_args(shapes, tmp_path / "a", tiny_weights, "data.crop_size=60"))
    with pytest.raises(ConfigError, match="set data.path"):
        cli(["segment", "--config", "segment_shapes", "data.kind=ade20k", f"run.out_dir={tmp_path / 'b'}"])
    with pytest.raises(DataError, match="expected the ADE20K layout"):
        cli(["segment", "--config", "segment_shapes", "data.kind=ade20k", f"data.path={tmp_path / 'none'}",
             f"run.out_dir={tmp_path / 'c'}"])


def test_resume_refuses_another_models_checkpoint(shapes: Path, tiny_weights: Path, tmp_path: Path) -> None:
    """A checkpoint-last.pt of another class count or of another recipe is refused with one line naming
    the fix (not loaded into a torch traceback); the folder's config.yaml stays as it was."""
    out = tmp_path / "run"
    cli(_small_args(shapes, out, tiny_weights, "optim.iters=1"))
    config = (out / "config.yaml").read_text()
    fix = r"Use a new run\.out_dir, or run\.resume=none to start over in .*"
    with pytest.raises(CheckpointError, match=r"checkpoint-last\.pt is a checkpoint of another model \(encoder "
                                              r"128/4/8/64, num_classes 7, pyramid intermediate; this run: .*"
                                              r"num_classes 8, .*\)\. " + fix) as err:
        cli(_small_args(shapes, out, tiny_weights, "optim.iters=2", "data.num_classes=8"))
    assert "\n" not in str(err.value)
    assert (out / "config.yaml").read_text() == config

    state = torch.load(out / "checkpoint-last.pt", weights_only=True)
    foreign = {"model": state["model"], "optimizer": state["optimizer"], "kind": "finetune", "step": 3, "epoch": 1}
    torch.save(foreign, out / "checkpoint-last.pt")  # e.g. a finetune checkpoint-last.pt copied in
    with pytest.raises(CheckpointError, match=r"is not a resumable segment checkpoint \(kind 'finetune'\)\. " + fix):
        cli(_small_args(shapes, out, tiny_weights, "optim.iters=2"))
    assert (out / "config.yaml").read_text() == config


def test_ade20k_config_is_the_a1_recipe() -> None:
    from milan.recipes.segment import CONFIG
    from milan.train.config import config_path, load_config

    cfg = load_config(CONFIG, config_path("segment_ade20k_vit_base"))
    o, d, m = cfg.optim, cfg.data, cfg.model
    assert (o.iters, o.warmup_iters, o.batch_size, o.lr, o.min_lr, o.power) == (160_000, 1500, 16, 3e-5, 0.0, 1.0)
    assert (o.betas, o.layer_decay, o.weight_decay, m.drop_path) == ((0.9, 0.999), 0.9, 0.05, 0.1)
    assert (d.crop_size, d.kind, d.reduce_zero_label, m.aux_weight) == (512, "ade20k", True, 0.4)


def test_short_training_beats_the_all_background_baseline(shapes: Path, tiny_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "train"
    # Constant lr after warmup (power 0): a poly decay to 0 over so few steps often stops the head
    # just short of out-voting the 90 % background prior (then mIoU == the trivial one, as asserted).
    cli(_small_args(shapes, out, tiny_weights, "optim.iters=150", "optim.warmup_iters=10", "optim.batch_size=8",
                    "optim.lr=1e-2", "optim.power=0", "model.channels=32", "data.val_limit=null", "run.log_every=50"))
    result = json.loads((out / "results.json").read_text())["last"]

    val = ShapesSegDataset(shapes, "val")
    baseline = SegMetric(7)
    for i in range(len(val)):
        target = torch.from_numpy(val[i][1].astype(np.int64))
        baseline.update(torch.zeros_like(target), target)
    trivial = baseline.compute()
    assert trivial["mIoU"] == pytest.approx(trivial["IoU"][0] / 7)  # background IoU / classes present
    assert math.isfinite(result["mIoU"])
    assert result["mIoU"] > trivial["mIoU"] + 0.01, (result, trivial["mIoU"])
    assert sum(v > 0 for v in result["IoU"].values()) >= 2  # some object class is found
