"""Mask R-CNN + FPN on a MILAN / timm ViT (paper Table 3, appendix A.1), with torchvision's detector.

    images ─► GeneralizedRCNNTransform (resize, ImageNet normalisation, pad)
           ─► ViTPyramid (strides p/4, p/2, p, 2p) ─► FPN (+ max-pool level, stride 4p)
           ─► RPN ─► RoIAlign box head (2 fc) / mask head (convs + deconv) ─► boxes, labels, masks

"intermediate" pyramid (default; MAE's detection transfer): four blocks spread over the depth, each
resized by its own deconv / pool neck, then a standard FPN (lateral 1×1 + top-down + 3×3 output
convs) to `fpn_channels`, plus FPN's extra max-pooled level. "simple" pyramid (ViTDet): the last
block only, necks already ending in `fpn_channels`-wide conv + LN, so no FPN; the extra level is
max-pooled from the coarsest map.

Parameter names start with `backbone.body.encoder.` (the ViT), so
`layer_decay_groups(model, ..., backbone=ENCODER_PREFIX)` gives the layer-wise lr decay groups.

Mixed precision: set `backbone.amp_dtype` (e.g. `torch.bfloat16`) to run the ViT and the FPN under
autocast; their outputs are cast back to float32 and the RPN / RoI heads run in float32. (Under a
global bf16 autocast the anchors and the decoded boxes would be bf16 too: 8 mantissa bits quantise
coordinates near 1024 px to 4–8 px.)

Padding: every batch is padded (bottom / right, zeros after normalisation) to a multiple of `4p`
(so every pyramid level, the pooled one included, has an exact stride) and, with `pad_to`, to at
least `pad_to × pad_to`: A.1's "1024 × 1024 input" is `min_size=max_size=pad_to=1024` (long side
resized to 1024, padded to a square).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from milan.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from milan.dense.backbone import ViTPyramid
from milan.encoder import MaskedViTEncoder

__all__ = ["ViTFPNBackbone", "PaddedRCNNTransform", "build_mask_rcnn", "default_anchor_sizes", "ENCODER_PREFIX",
           "LEVELS"]

ENCODER_PREFIX = "backbone.body.encoder."  # where the ViT's parameters live in the MaskRCNN model
LEVELS = ("p2", "p3", "p4", "p5", "pool")  # feature maps given to the RPN; the RoI heads use the first four


class ViTFPNBackbone(nn.Module):
    """A ViT pyramid (`body`) and an FPN (`fpn`), exposing `out_channels` as torchvision detectors want.

    Forward: images `[B, 3, H, W]` (H, W multiples of `4 × patch`) → OrderedDict
    {"p2", "p3", "p4", "p5", "pool"} of `[B, out_channels, H / s, W / s]`, s = `self.strides`.
    """

    def __init__(self, encoder: MaskedViTEncoder, *, mode: Literal["intermediate", "simple"] = "intermediate",
                 out_indices: tuple[int, ...] | None = None, out_channels: int = 256) -> None:
        super().__init__()
        self.body = ViTPyramid(encoder, mode=mode, out_indices=out_indices, out_channels=out_channels)
        self.mode = mode
        self.out_channels = out_channels
        if mode == "intermediate":
            self.fpn: nn.Module | None = FeaturePyramidNetwork(list(self.body.channels), out_channels,
                                                               extra_blocks=LastLevelMaxPool())
        else:  # the simple pyramid's necks already end in out_channels with conv + LN
            self.fpn = None
        self.strides: tuple[int, ...] = (*self.body.strides, 2 * self.body.strides[-1])
        self.num_layers = self.body.num_layers
        self.patch_size = encoder.patch_size
        self.amp_dtype: torch.dtype | None = None  # autocast dtype of the ViT + FPN; outputs are float32

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        amp = (torch.autocast(images.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        with amp:
            feats = self.body(images)
            if self.fpn is not None:
                out = self.fpn(feats)  # FPN appends "pool" (max-pool of the coarsest output)
            else:
                out = OrderedDict(feats)
                out["pool"] = F.max_pool2d(feats["p5"], kernel_size=1, stride=2)
        if self.amp_dtype is not None:
            out = OrderedDict((k, v.float()) for k, v in out.items())
        return out


class PaddedRCNNTransform(GeneralizedRCNNTransform):
    """torchvision's resize + normalise + batch, padding each batch to at least `pad_to × pad_to`."""

    def __init__(self, *args, pad_to: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pad_to = pad_to

    def batch_images(self, images: list[Tensor], size_divisible: int = 32) -> Tensor:
        if self.pad_to is None:
            return super().batch_images(images, size_divisible)
        h = max(self.pad_to, *(int(img.shape[-2]) for img in images))
        w = max(self.pad_to, *(int(img.shape[-1]) for img in images))
        h, w = -(-h // size_divisible) * size_divisible, -(-w // size_divisible) * size_divisible
        batched = images[0].new_zeros(len(images), images[0].shape[0], h, w)
        for img, pad in zip(images, batched):
            pad[:, : img.shape[1], : img.shape[2]].copy_(img)
        return batched


def default_anchor_sizes(strides: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """One anchor size per level, 8 × stride (32 ... 512 for strides 4 ... 64, as Detectron's FPN)."""
    return tuple((8 * s,) for s in strides)


def build_mask_rcnn(
    encoder: MaskedViTEncoder,
    num_classes: int,
    *,
    pyramid: Literal["intermediate", "simple"] = "intermediate",
    out_indices: tuple[int, ...] | None = None,
    fpn_channels: int = 256,
    min_size: int = 1024,
    max_size: int = 1024,
    pad_to: int | None = None,
    anchor_sizes: Sequence[Sequence[int]] | None = None,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    box_head_dim: int = 1024,
    mask_head_channels: int = 256,
    mask_head_layers: int = 4,
    rpn_batch_size_per_image: int = 256,
    rpn_pre_nms_top_n: tuple[int, int] = (2000, 1000),
    rpn_post_nms_top_n: tuple[int, int] = (1000, 1000),
    box_batch_size_per_image: int = 512,
    box_score_thresh: float = 0.05,
    detections_per_img: int = 100,
) -> MaskRCNN:
    """torchvision `MaskRCNN` on `encoder` (trained along), for `num_classes` object classes.

    Args:
        encoder: a `MaskedViTEncoder` (`milan.io.weights.build_encoder`); its final norm is dropped.
        num_classes: object classes, background excluded (the model predicts 1 + num_classes).
        pyramid: "intermediate" (MAE: 4 tapped blocks + deconv necks + FPN) or "simple" (ViTDet).
        out_indices: blocks tapped in "intermediate" mode (default: spread over the depth).
        fpn_channels: width of every pyramid level and of the RPN / RoI heads' input.
        min_size, max_size: images are resized so the short side is `min_size` unless the long
            side would exceed `max_size` (`min_size == max_size`: long side = that size).
        pad_to: pad every batch to at least this square (A.1: 1024); None pads to the batch's largest.
        anchor_sizes: one tuple per level p2, p3, p4, p5, pool (default `default_anchor_sizes`).
        box_head_dim: width of the box head's two fc layers (Detectron: 1024).
        mask_head_channels, mask_head_layers: the mask head's 3×3 convs (Detectron: 4 × 256).
        rpn_pre_nms_top_n, rpn_post_nms_top_n: (train, test) proposal counts per image.
        box_batch_size_per_image: RoIs sampled per image for the box / mask losses (25% positive).
    """
    backbone = ViTFPNBackbone(encoder, mode=pyramid, out_indices=out_indices, out_channels=fpn_channels)
    anchors = tuple(tuple(a) for a in (anchor_sizes or default_anchor_sizes(backbone.strides)))
    if len(anchors) != len(LEVELS):
        raise ValueError(f"anchor_sizes needs one tuple per level {LEVELS}, got {len(anchors)}")
    anchor_generator = AnchorGenerator(anchors, (tuple(aspect_ratios),) * len(anchors))
    rois = list(LEVELS[:4])
    box_pool = MultiScaleRoIAlign(rois, output_size=7, sampling_ratio=2)
    mask_pool = MultiScaleRoIAlign(rois, output_size=14, sampling_ratio=2)
    box_head = TwoMLPHead(fpn_channels * 7 * 7, box_head_dim)
    mask_head = MaskRCNNHeads(fpn_channels, [mask_head_channels] * mask_head_layers, dilation=1)
    model = MaskRCNN(
        backbone, num_classes=None,
        rpn_anchor_generator=anchor_generator,
        rpn_batch_size_per_image=rpn_batch_size_per_image,
        rpn_pre_nms_top_n_train=rpn_pre_nms_top_n[0], rpn_pre_nms_top_n_test=rpn_pre_nms_top_n[1],
        rpn_post_nms_top_n_train=rpn_post_nms_top_n[0], rpn_post_nms_top_n_test=rpn_post_nms_top_n[1],
        box_roi_pool=box_pool, box_head=box_head,
        box_predictor=FastRCNNPredictor(box_head_dim, num_classes + 1),
        box_batch_size_per_image=box_batch_size_per_image, box_score_thresh=box_score_thresh,
        box_detections_per_img=detections_per_img,
        mask_roi_pool=mask_pool, mask_head=mask_head,
        mask_predictor=MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes + 1),
    )
    # Pad to a multiple of 4p: the patch grid, the 2× pooled p5 and the pooled extra level stay exact.
    model.transform = PaddedRCNNTransform(min_size, max_size, list(IMAGENET_MEAN), list(IMAGENET_STD),
                                          size_divisible=4 * backbone.patch_size, pad_to=pad_to)
    return model
