"""`milan detect`: Mask R-CNN on the ViT pyramid, COCO / shapes data, COCO AP, the recipe end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from milan.dense.backbone import layer_decay_groups
from milan.dense.coco_eval import coco_evaluate, evaluate_results, to_coco_results
from milan.dense.det_data import (
    CocoDetection,
    DetSamples,
    ShapesDetection,
    collate,
    hflip,
    load_coco,
    shapes_coco_gt,
)
from milan.dense.detection import ENCODER_PREFIX, LEVELS, ViTFPNBackbone, build_mask_rcnn
from milan.errors import CheckpointError, DataError, UserError
from milan.io.weights import build_encoder
from milan.recipes.detect import warmup_step_lr

PRESET = "vit_shapes_patch8"  # 64 px, patch 8, width 192, depth 6
TINY_HEADS = dict(fpn_channels=32, min_size=64, max_size=64, anchor_sizes=((8,), (16,), (32,), (64,), (128,)),
                  box_head_dim=64, mask_head_channels=16, mask_head_layers=1, rpn_pre_nms_top_n=(100, 50),
                  rpn_post_nms_top_n=(50, 20), box_batch_size_per_image=32, rpn_batch_size_per_image=32)


def _encoder():
    return build_encoder(None, preset=PRESET)[0]


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from milan.data.shapes import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("det") / "shapes", num_train=240, num_val=16, progress=False)


# --- model ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["intermediate", "simple"])
def test_backbone_levels_strides_and_channels(mode: str) -> None:
    backbone = ViTFPNBackbone(_encoder(), mode=mode, out_channels=32)
    assert backbone.out_channels == 32 and backbone.strides == (2, 4, 8, 16, 32)
    out = backbone(torch.randn(2, 3, 64, 96))
    assert tuple(out) == LEVELS
    for (name, fmap), stride in zip(out.items(), backbone.strides):
        assert fmap.shape == (2, 32, 64 // stride, 96 // stride), name
    assert (backbone.fpn is not None) == (mode == "intermediate")
    backbone.amp_dtype = torch.bfloat16  # autocast inside; float32 out for the RPN / RoI heads
    out = backbone(torch.randn(1, 3, 64, 64))
    assert all(f.dtype == torch.float32 and torch.isfinite(f).all() for f in out.values())


def test_mask_rcnn_trains_and_predicts_with_layer_decay_groups() -> None:
    model = build_mask_rcnn(_encoder(), 6, **TINY_HEADS)
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith(ENCODER_PREFIX + "blocks.5.") for n in names)
    groups = layer_decay_groups(model, weight_decay=0.1, layer_decay=0.75, num_layers=model.backbone.num_layers,
                                backbone=ENCODER_PREFIX)
    assert {g["layer"] for g in groups} == set(range(8))  # embeddings 0, blocks 1..6, heads 7
    assert min(g["lr_scale"] for g in groups) == pytest.approx(0.75 ** 7)

    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 56)]  # padded to 64 × 64 (multiple of 4 × patch)
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:30, 12:34] = 1
    targets = [{"boxes": torch.tensor([[12.0, 10.0, 34.0, 30.0]]), "labels": torch.tensor([3]), "masks": masks},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "masks": torch.zeros(0, 48, 56, dtype=torch.uint8)}]  # an image without objects
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    assert model.backbone.body.encoder.blocks[0].attn.qkv.weight.grad is not None
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and out[1]["masks"].shape[-2:] == (48, 56)  # back at the input size
    assert out[0]["boxes"].shape[1] == 4 and out[0]["labels"].dtype == torch.int64


def test_pad_to_gives_square_batches() -> None:
    model = build_mask_rcnn(_encoder(), 2, **{**TINY_HEADS, "min_size": 48, "max_size": 48}, pad_to=64)
    batch, _ = model.transform([torch.rand(3, 40, 20)])
    assert batch.tensors.shape[-2:] == (64, 64) and batch.image_sizes == [(48, 24)]


def test_shipped_configs_load_and_the_coco_one_is_appendix_a1() -> None:
    from milan.recipes.detect import CONFIG
    from milan.train.config import config_path, load_config

    shapes = load_config(CONFIG, config_path("detect_shapes"))
    assert shapes.data.kind == "shapes" and shapes.model.preset == PRESET
    coco = load_config(CONFIG, config_path("detect_coco_vit_base"))
    o, m = coco.optim, coco.model
    assert (o.epochs, o.lr_steps, o.gamma, o.batch_size, o.lr) == (12, (8, 11), 0.1, 16, 2e-4)
    assert (o.layer_decay, o.weight_decay, o.betas, m.drop_path) == (0.75, 0.1, (0.9, 0.999), 0.1)
    assert (m.min_size, m.max_size, m.pad_to, m.preset, coco.data.kind) == (1024, 1024, 1024, "vit_base_patch16", "coco")


def test_warmup_step_schedule() -> None:
    kw = dict(peak=2e-4, milestones=[80, 110], warmup=10)
    assert warmup_step_lr(0, **kw) == pytest.approx(2e-7)  # 0.001 × lr
    assert warmup_step_lr(5, **kw) == pytest.approx(2e-4 * (0.001 * 0.5 + 0.5))
    assert warmup_step_lr(10, **kw) == warmup_step_lr(79, **kw) == pytest.approx(2e-4)
    assert warmup_step_lr(80, **kw) == pytest.approx(2e-5)
    assert warmup_step_lr(110, **kw) == pytest.approx(2e-6)


# --- COCO AP -------------------------------------------------------------------------------------


def _toy_gt() -> tuple[dict, list[tuple[int, int, list[int]]]]:
    """2 images of 64 × 64; 4 rectangles of category 7 (sparse ids: 3 and 7 exist)."""
    objects = [(1, 7, [4, 4, 20, 24]), (1, 7, [30, 8, 60, 40]), (2, 7, [10, 10, 26, 30]), (2, 7, [36, 30, 62, 62])]
    annotations = []
    for k, (image_id, cat, (x0, y0, x1, y1)) in enumerate(objects):
        m = np.zeros((64, 64), np.uint8)
        m[y0:y1, x0:x1] = 1
        from pycocotools import mask as mask_utils

        rle = mask_utils.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode()
        annotations.append({"id": k + 1, "image_id": image_id, "category_id": cat, "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "area": float(m.sum()), "segmentation": rle, "iscrowd": 0})
    gt = {"images": [{"id": i, "width": 64, "height": 64, "file_name": f"{i}.png"} for i in (1, 2)],
          "annotations": annotations, "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]}
    return gt, objects


def _outputs(objects, *, label: int, drop: int | None = None) -> tuple[list[dict], list[int]]:
    """Detector outputs (contiguous labels, masks as probabilities) that reproduce `objects` exactly."""
    outputs, ids = [], []
    for image_id in (1, 2):
        boxes, masks = [], []
        for k, (i, _, box) in enumerate(objects):
            if i != image_id or k == drop:
                continue
            x0, y0, x1, y1 = box
            m = torch.full((1, 64, 64), 0.1)
            m[0, y0:y1, x0:x1] = 0.9
            boxes.append(box)
            masks.append(m)
        n = len(boxes)
        outputs.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
                        "scores": torch.linspace(0.9, 0.5, n), "labels": torch.full((n,), label),
                        "masks": torch.stack(masks) if masks else torch.zeros(0, 1, 64, 64)})
        ids.append(image_id)
    return outputs, ids


LABEL_TO_CAT = {1: 3, 2: 7}


def test_to_coco_results_converts_boxes_labels_and_masks() -> None:
    from pycocotools import mask as mask_utils

    _, objects = _toy_gt()
    outputs, ids = _outputs(objects, label=2)
    boxes, segms = to_coco_results(outputs, ids, LABEL_TO_CAT)
    assert len(boxes) == len(segms) == 4
    assert boxes[0] == {"image_id": 1, "category_id": 7, "bbox": [4.0, 4.0, 16.0, 20.0], "score": pytest.approx(0.9)}
    decoded = mask_utils.decode(segms[0]["segmentation"])
    assert decoded.shape == (64, 64) and decoded.sum() == 16 * 20 and decoded[4:24, 4:20].all()


def test_coco_ap_perfect_missing_wrong_class_and_empty() -> None:
    gt_dict, objects = _toy_gt()
    gt = load_coco(gt_dict)
    # exact predictions: AP = AP50 = AP75 = 1 for boxes and masks
    boxes, segms = to_coco_results(*_outputs(objects, label=2), LABEL_TO_CAT)
    result = evaluate_results(gt, boxes, segms)
    for kind in ("bbox", "segm"):
        assert result[kind]["AP"] == pytest.approx(1.0)
        assert result[kind]["AP50"] == result[kind]["AP75"] == pytest.approx(1.0)
        assert len(result[kind]["stats"]) == 12 and "Average Precision" in result[kind]["summary"]
    # one object missed: precision 1 up to recall 3/4, then nothing → 76 of the 101 recall points
    boxes, segms = to_coco_results(*_outputs(objects, label=2, drop=1), LABEL_TO_CAT)
    result = evaluate_results(gt, boxes, segms)
    assert result["bbox"]["AP"] == pytest.approx(76 / 101) and result["segm"]["AP"] == pytest.approx(76 / 101)
    assert result["bbox"]["AR100"] == pytest.approx(0.75)
    # right boxes, wrong class (category 3 has no ground truth, category 7 no detections) → 0
    boxes, segms = to_coco_results(*_outputs(objects, label=1), LABEL_TO_CAT)
    result = evaluate_results(gt, boxes, segms)
    assert result["bbox"]["AP"] == 0.0 and result["segm"]["AP"] == 0.0
    # no detections at all: 0, not a crash
    empty = coco_evaluate(gt, [], "bbox")
    assert empty["AP"] == 0.0 and empty["num_detections"] == 0
    # a subset of images: only image 1's two objects count
    boxes, _ = to_coco_results(*_outputs(objects, label=2), LABEL_TO_CAT)
    assert coco_evaluate(gt, [b for b in boxes if b["image_id"] == 1], "bbox", image_ids=[1])["AP"] == pytest.approx(1)


# --- data ----------------------------------------------------------------------------------------


def _write_fake_coco(root: Path) -> None:
    from pycocotools import mask as mask_utils

    (root / "images").mkdir(parents=True)
    sizes = {11: (40, 30), 12: (20, 20), 13: (16, 16)}  # id: (width, height)
    for image_id, (w, h) in sizes.items():
        Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(root / "images" / f"{image_id}.png")
    rle_mask = np.zeros((20, 20), np.uint8)
    rle_mask[2:9, 3:15] = 1
    rle = mask_utils.encode(np.asfortranarray(rle_mask))
    rle["counts"] = rle["counts"].decode()
    crowd = mask_utils.encode(np.asfortranarray(np.ones((30, 40), np.uint8)))
    crowd["counts"] = crowd["counts"].decode()
    annotations = [
        {"id": 1, "image_id": 11, "category_id": 9, "bbox": [4, 4, 16, 10], "area": 160.0, "iscrowd": 0,
         "segmentation": [[4, 4, 20, 4, 20, 14, 4, 14]]},  # a polygon
        {"id": 2, "image_id": 11, "category_id": 5, "bbox": [0, 0, 40, 30], "area": 1200.0, "iscrowd": 1,
         "segmentation": crowd},
        {"id": 3, "image_id": 12, "category_id": 5, "bbox": [3, 2, 12, 7], "area": 84.0, "iscrowd": 0,
         "segmentation": rle},  # compressed RLE
        {"id": 4, "image_id": 13, "category_id": 9, "bbox": [0, 0, 16, 16], "area": 256.0, "iscrowd": 1,
         "segmentation": [[0, 0, 16, 0, 16, 16, 0, 16]]},  # crowd only
    ]
    data = {"images": [{"id": i, "width": w, "height": h, "file_name": f"{i}.png"} for i, (w, h) in sizes.items()],
            "annotations": annotations,
            "categories": [{"id": 9, "name": "dog"}, {"id": 5, "name": "cat"}]}
    (root / "annotations").mkdir()
    (root / "annotations" / "instances.json").write_text(json.dumps(data))


def test_coco_loader_polygons_rle_crowd_and_category_mapping(tmp_path: Path) -> None:
    _write_fake_coco(tmp_path)
    train = CocoDetection(tmp_path / "images", tmp_path / "annotations" / "instances.json", train=True)
    val = CocoDetection(tmp_path / "images", tmp_path / "annotations" / "instances.json")
    assert train.label_to_cat == {1: 5, 2: 9} and train.classes == ("cat", "dog")
    assert train.ids == [11, 12] and val.ids == [11, 12, 13]  # crowd-only image kept for evaluation only
    image, target = train[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32 and float(image.max()) <= 1
    assert target["image_id"] == 11 and target["labels"].tolist() == [2]  # crowd dropped, 9 → 2
    torch.testing.assert_close(target["boxes"], torch.tensor([[4.0, 4.0, 20.0, 14.0]]))
    mask = target["masks"][0]
    assert mask.shape == (30, 40) and mask.dtype == torch.uint8
    ys, xs = mask.nonzero(as_tuple=True)
    assert abs(int(mask.sum()) - 160) <= 30 and 3 <= xs.min() <= 5 and 18 <= xs.max() <= 20
    _, target = train[1]
    assert target["labels"].tolist() == [1] and int(target["masks"][0].sum()) == 84 and target["masks"][0, 2:9, 3:15].all()
    _, target = val[2]
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, 16, 16)


def test_coco_loader_missing_json_names_the_layout(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match=r"instances_\{train,val\}2017\.json"):
        CocoDetection(tmp_path / "images", tmp_path / "annotations" / "nope.json")
    from milan.tools.cli import main

    with pytest.raises(DataError, match="^COCO annotations .*instances_train2017.json not found"):
        main(["detect", "data.kind=coco", f"data.path={tmp_path}", f"run.out_dir={tmp_path / 'run'}"])


def test_coco_images_missing_on_disk_are_skipped_like_unreadable_ones(tmp_path: Path) -> None:
    """One image of the json not on disk: the recipe trains and evaluates on the others and lists it in
    bad_images.txt; none on disk (the wrong folder): one line naming the layout."""
    import shutil

    from milan.tools.cli import main

    root = tmp_path / "coco"
    _write_fake_coco(root)
    for split in ("train2017", "val2017"):
        shutil.copytree(root / "images", root / split)
        shutil.copy(root / "annotations" / "instances.json", root / "annotations" / f"instances_{split}.json")
    (root / "val2017" / "12.png").unlink()
    out = tmp_path / "run"
    args = ["detect", "--config", "detect_shapes", "data.kind=coco", f"data.path={root}", "data.num_workers=0",
            "optim.batch_size=2", "optim.warmup_iters=1", "data.eval_batch_size=3", "data.max_bad_fraction=0.5"]
    main([*args, f"run.out_dir={out}"])
    assert json.loads((out / "results.json").read_text())["step"] == 1
    listed = (out / "bad_images.txt").read_text()
    assert "12.png" in listed and "missing" in listed
    for name in ("11.png", "12.png", "13.png"):
        (root / "train2017" / name).unlink()
    with pytest.raises(DataError, match="none of the 2 images instances_train2017.json names is in"):
        main([*args, f"run.out_dir={tmp_path / 'run2'}"])


def test_shapes_detection_gt_and_flip(shapes_root: Path) -> None:
    ds = ShapesDetection(shapes_root, "val", limit=5)
    gt = shapes_coco_gt(shapes_root, "val", limit=5)
    assert len(ds) == 5 and [im["id"] for im in gt["images"]] == ds.ids == [1, 2, 3, 4, 5]
    assert [c["id"] for c in gt["categories"]] == list(range(1, 7)) and ds.label_to_cat[1] == 1
    image, target = ds[0]
    anns = [a for a in gt["annotations"] if a["image_id"] == 1]
    assert len(anns) == len(target["labels"]) >= 1
    for ann, box, label, mask in zip(anns, target["boxes"], target["labels"], target["masks"]):
        x0, y0, x1, y1 = box.tolist()
        assert ann["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0]) and ann["category_id"] == int(label)
        assert ann["area"] == int(mask.sum())
    # the flip keeps boxes tight around the (flipped) masks
    flipped_image, flipped = hflip(image, target)
    torch.testing.assert_close(flipped_image, image.flip(-1))
    for box, mask in zip(flipped["boxes"], flipped["masks"]):
        ys, xs = mask.nonzero(as_tuple=True)
        assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    # DetSamples: the same (epoch, index) always gives the same flip; int keys are never flipped
    samples = DetSamples(ds, hflip=0.5, seed=3)
    flips = [bool(torch.equal(samples[(0, i)][0], ds[i][0].flip(-1))) for i in range(5)]
    assert flips == [bool(torch.equal(samples[(0, i)][0], ds[i][0].flip(-1))) for i in range(5)]
    assert torch.equal(samples[1][0], ds[1][0])
    images, targets = collate([ds[0], ds[1]])
    assert isinstance(images, list) and len(targets) == 2


class _Broken(torch.utils.data.Dataset):
    """`dataset` with the images at `bad` unreadable (as `load_rgb` reports a truncated file)."""

    def __init__(self, dataset, bad: set[int]) -> None:
        self.dataset, self.bad = dataset, bad

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        from milan.data.folder import BadImage

        if index in self.bad:
            raise BadImage(f"img{index}.png: truncated", name=f"img{index}.png", reason="truncated")
        return self.dataset[index]


def test_det_samples_replace_or_drop_an_unreadable_image_with_its_annotations(shapes_root: Path) -> None:
    ds = ShapesDetection(shapes_root, "val", limit=6)
    broken = _Broken(ds, {2, 3})
    clean = DetSamples(ds, hflip=0.5, seed=3)
    # training: (epoch, 2) and (epoch, 3) become (epoch, 4), flip included; both files reported
    image, target, reports = DetSamples(broken, hflip=0.5, seed=3, bad="replace")[(1, 2)]
    want_image, want_target = clean[(1, 4)]
    assert torch.equal(image, want_image) and target["image_id"] == 5
    assert torch.equal(target["boxes"], want_target["boxes"]) and torch.equal(target["masks"], want_target["masks"])
    assert reports == [("img2.png", "truncated", True), ("img3.png", "truncated", True)]
    assert DetSamples(broken, hflip=0.5, seed=3, bad="replace")[(1, 1)][2] == []
    # evaluation: left out, annotations and all; a readable one is unchanged
    assert DetSamples(broken, bad="drop")[2] == (None, None, [("img2.png", "truncated", True)])
    assert torch.equal(DetSamples(broken, bad="drop")[1][0], ds[1][0])
    with pytest.raises(DataError, match=r"unreadable image img2\.png: truncated; replace or remove it"):
        DetSamples(broken)[2]


def test_evaluate_scores_only_the_images_the_loader_delivered() -> None:
    """Image 2 unreadable (left out by the loader): COCOeval over image 1 only, so its two objects
    detected exactly give AP 1 — not image 2's two annotations counted as missed."""
    from milan.recipes.detect import evaluate

    gt_dict, objects = _toy_gt()
    outputs, _ = _outputs(objects, label=2)

    class Oracle(torch.nn.Module):
        def forward(self, images):
            return [outputs[int(img[0, 0, 0].item()) - 1] for img in images]

    loader = [([torch.full((3, 64, 64), 1.0)], [{"image_id": 1}])]
    result = evaluate(Oracle(), loader, torch.device("cpu"), load_coco(gt_dict), LABEL_TO_CAT, image_ids=[1, 2])
    assert result["images"] == 1
    assert result["bbox"]["AP"] == pytest.approx(1.0) and result["segm"]["AP"] == pytest.approx(1.0)
    both = loader + [([torch.full((3, 64, 64), 2.0)], [{"image_id": 2}])]
    assert evaluate(Oracle(), both, torch.device("cpu"), load_coco(gt_dict), LABEL_TO_CAT)["images"] == 2


# --- the recipe ----------------------------------------------------------------------------------


def _cli(shapes_root: Path, out: Path, *extra: str) -> None:
    from milan.tools.cli import main

    main(["detect", "--config", "detect_shapes", f"data.path={shapes_root}", f"run.out_dir={out}",
          "data.num_workers=0", "optim.batch_size=8", "optim.warmup_iters=2", "data.val_limit=4", *extra])


def test_cli_runs_checkpoints_and_resumes_exactly(shapes_root: Path, tmp_path: Path) -> None:
    """3 iterations straight vs 1 + resume to 3 (mid-epoch): the same weights (exact resume)."""
    from milan.train.checkpoint import load_checkpoint

    common = ("optim.epochs=1", "optim.lr_steps=[0.05]", "run.eval_every_epochs=2")  # lr ÷10 after iteration 2
    _cli(shapes_root, tmp_path / "a", *common, "run.max_steps=3")
    _cli(shapes_root, tmp_path / "b", *common, "run.max_steps=1")
    _cli(shapes_root, tmp_path / "b", *common, "run.max_steps=3")
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    last = results["last"]
    assert results["step"] == 3 and results["steps_per_epoch"] == 30 and results["classes"][0] == "circle"
    for key in ("box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50", "mask_AP75"):
        assert 0.0 <= last[key] <= 1.0
    assert len(last["box_stats"]) == 12
    assert (tmp_path / "a" / "config.yaml").is_file()
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert any("box_AP" in r for r in records) and any("loss_mask" in r for r in records)
    a, b = load_checkpoint(tmp_path / "a" / "checkpoint-last.pt"), load_checkpoint(tmp_path / "b" / "checkpoint-last.pt")
    assert a["step"] == b["step"] == 3 and a["label_to_cat"] == {k: k for k in range(1, 7)}
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, msg=key)


def test_resume_refuses_another_models_checkpoint(shapes_root: Path, tmp_path: Path) -> None:
    """A checkpoint-last.pt of another model (here: the ViTDet pyramid, not MAE's) or of another recipe
    is refused with one line naming the fix; the folder's config.yaml stays as it was."""
    out = tmp_path / "run"
    common = ("optim.epochs=1", "run.eval_every_epochs=2", "data.val_limit=1", "data.eval_batch_size=1")
    _cli(shapes_root, out, *common, "run.max_steps=1")
    config = (out / "config.yaml").read_text()
    fix = r"Use a new run\.out_dir, or run\.resume=none to start over in .*"
    with pytest.raises(CheckpointError, match=r"checkpoint-last\.pt is a checkpoint of another model \(.*pyramid "
                                              r"intermediate; this run: .*pyramid simple\)\. " + fix) as err:
        _cli(shapes_root, out, *common, "run.max_steps=2", "model.pyramid=simple")
    assert "\n" not in str(err.value)
    assert (out / "config.yaml").read_text() == config

    state = torch.load(out / "checkpoint-last.pt", weights_only=True)
    foreign = {"model": state["model"], "optimizer": state["optimizer"], "kind": "segment", "step": 3}
    torch.save(foreign, out / "checkpoint-last.pt")  # e.g. a segment checkpoint-last.pt copied in
    with pytest.raises(CheckpointError, match=r"is not a resumable detect checkpoint \(kind 'segment'\)\. " + fix):
        _cli(shapes_root, out, *common, "run.max_steps=2")
    assert (out / "config.yaml").read_text() == config


def test_short_training_beats_the_trivial_baseline(shapes_root: Path, tmp_path: Path) -> None:
    """Under a minute of training from random init (120 iterations of 4 scenes): box AP above 0 (an
    untrained detector's) on 16 val scenes. Small batches and no layer decay learn fastest here."""
    from milan.recipes.detect import CONFIG, main
    from milan.train.config import load_config

    cfg = load_config(CONFIG, Path(__file__).parents[1] / "src/milan/configs/detect_shapes.yaml", [
        f"data.path={shapes_root}", f"run.out_dir={tmp_path}", "data.num_workers=0", "optim.batch_size=4",
        "optim.epochs=2", "optim.lr_steps=[2]", "optim.warmup_iters=5", "optim.lr=1e-3", "optim.layer_decay=1.0",
        "run.eval_every_epochs=100", "run.ckpt_every=1000", "data.val_limit=null",
    ])
    summary = main(cfg)
    assert summary["step"] == 120
    assert summary["last"]["box_AP"] > 0 and summary["last"]["box_AP50"] > 0


def test_recipe_on_a_coco_folder_in_the_2017_layout(tmp_path: Path) -> None:
    """The COCO path end to end on a 3-image folder in COCO 2017's layout (sparse category ids 5, 9)."""
    import shutil

    from milan.tools.cli import main
    from milan.train.checkpoint import load_checkpoint

    root = tmp_path / "coco"
    _write_fake_coco(root)
    for split in ("train2017", "val2017"):
        shutil.copytree(root / "images", root / split)
        shutil.copy(root / "annotations" / "instances.json", root / "annotations" / f"instances_{split}.json")
    out = tmp_path / "run"
    main(["detect", "--config", "detect_shapes", "data.kind=coco", f"data.path={root}", f"run.out_dir={out}",
          "data.num_workers=0", "optim.batch_size=2", "optim.warmup_iters=1", "data.eval_batch_size=3",
          "model.box_score_thresh=0.0", "run.save_detections=true"])
    results = json.loads((out / "results.json").read_text())
    assert results["classes"] == ["cat", "dog"] and results["step"] == 1  # 2 training images (crowd-only dropped)
    assert 0.0 <= results["last"]["box_AP"] <= 1.0
    ckpt = load_checkpoint(out / "checkpoint-last.pt")
    assert ckpt["label_to_cat"] == {1: 5, 2: 9} and ckpt["num_classes"] == 2
    detections = json.loads((out / "detections_bbox.json").read_text())  # written back in COCO ids
    assert detections and {d["category_id"] for d in detections} <= {5, 9}
    assert {d["image_id"] for d in detections} <= {11, 12, 13}
    assert len(json.loads((out / "detections_segm.json").read_text())) == len(detections)


def test_missing_pycocotools_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import sys

    from milan.tools.cli import main

    monkeypatch.setitem(sys.modules, "pycocotools", None)  # import now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'milan-mim\[dense\]'"):
        main(["detect", "--config", "detect_shapes", f"run.out_dir={tmp_path}"])
