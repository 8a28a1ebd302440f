"""COCO box / mask AP of detector outputs with pycocotools (the official COCO evaluation).

    outputs (torchvision: boxes xyxy, labels 1..C, scores, masks [N, 1, H, W] probabilities)
      ─► `to_coco_results` (boxes xywh, COCO category ids, masks > 0.5 as RLE)
      ─► `coco_evaluate` (COCOeval "bbox" / "segm") ─► AP, AP50, AP75, APs/m/l and the 12 stats

AP values are fractions in [0, 1] (pycocotools' stats; ×100 for the usual table numbers). No
detections at all gives AP 0 (pycocotools cannot load an empty result list). pycocotools' prints
are captured; the summary table is returned as text (and logged by the recipe).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["to_coco_results", "coco_evaluate", "evaluate_results", "STAT_NAMES"]

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def to_coco_results(outputs: Sequence[Mapping[str, torch.Tensor]], image_ids: Sequence[int],
                    label_to_cat: Mapping[int, int], *, masks: bool = True,
                    mask_threshold: float = 0.5) -> tuple[list[dict], list[dict]]:
    """COCO result lists (box, segm) of per-image detector outputs.

    Args:
        outputs: per image {"boxes": [N, 4] xyxy, "scores": [N], "labels": [N] (contiguous 1..C),
            optionally "masks": [N, 1, H, W] (probabilities pasted into the image)}.
        image_ids: COCO image id of each output.
        label_to_cat: contiguous label → COCO category id.
        masks: also encode the masks (segm results).
    """
    # lazy: pycocotools is the optional `dense` extra
    from pycocotools import mask as mask_utils

    boxes_out: list[dict] = []
    segms_out: list[dict] = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().float().cpu().numpy().reshape(-1, 4)
        scores = out["scores"].detach().float().cpu().numpy().reshape(-1)
        labels = out["labels"].detach().cpu().numpy().reshape(-1)
        if len(boxes) == 0:
            continue
        xywh = boxes.copy()
        xywh[:, 2:] -= xywh[:, :2]
        cats = [int(label_to_cat[int(label)]) for label in labels]
        for box, score, cat in zip(xywh, scores, cats):
            boxes_out.append({"image_id": int(image_id), "category_id": cat,
                              "bbox": [round(float(v), 3) for v in box], "score": float(score)})
        if masks and "masks" in out:
            binary = (out["masks"].detach()[:, 0] > mask_threshold).to("cpu", torch.uint8).numpy()  # [N, H, W]
            rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))  # [H, W, N] → N RLEs
            for rle, score, cat in zip(rles, scores, cats):
                rle["counts"] = rle["counts"].decode("ascii")
                segms_out.append({"image_id": int(image_id), "category_id": cat, "segmentation": rle,
                                  "score": float(score)})
    return boxes_out, segms_out


def coco_evaluate(coco_gt: Any, results: list[dict], iou_type: str, *,
                  image_ids: Iterable[int] | None = None) -> dict[str, Any]:
    """COCOeval of `results` against `coco_gt` (a pycocotools `COCO`) for "bbox" or "segm".

    Args:
        image_ids: evaluate these images only (default: every image of `coco_gt`), e.g. the
            subset that was run; images without detections count as missed objects.

    Returns:
        {"AP", "AP50", "AP75", "APs", "APm", "APl", ... (`STAT_NAMES`), "stats": the 12 numbers,
        "summary": pycocotools' printed table, "num_detections"}. Entries pycocotools marks −1
        (no ground truth in that area range) stay −1.
    """
    # lazy: pycocotools is the optional `dense` extra
    from pycocotools.cocoeval import COCOeval

    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', not {iou_type!r}")
    ids = sorted(coco_gt.getImgIds() if image_ids is None else set(image_ids))
    if not results:
        stats = [0.0] * len(STAT_NAMES)
        summary = f"no detections: {iou_type} AP 0 on {len(ids)} images"
    else:
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink):
            coco_dt = coco_gt.loadRes([dict(r) for r in results])  # loadRes adds fields in place
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            evaluator.params.imgIds = ids
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats = [float(s) for s in evaluator.stats]
        summary = "\n".join(line for line in sink.getvalue().splitlines() if line.startswith(" Average"))
    return {**dict(zip(STAT_NAMES, stats)), "stats": stats, "summary": summary, "num_detections": len(results)}


def evaluate_results(coco_gt: Any, box_results: list[dict], segm_results: list[dict] | None, *,
                     image_ids: Iterable[int] | None = None) -> dict[str, dict[str, Any]]:
    """{"bbox": coco_evaluate(...), "segm": ...} (segm only when `segm_results` is not None)."""
    ids = None if image_ids is None else list(image_ids)
    out = {"bbox": coco_evaluate(coco_gt, box_results, "bbox", image_ids=ids)}
    if segm_results is not None:
        out["segm"] = coco_evaluate(coco_gt, segm_results, "segm", image_ids=ids)
    return out
