"""UperNet (Xiao et al., 2018) on a ViT pyramid: the ADE20K segmenter of Table 3 / Table 6.

    images ─► ViTPyramid ─► p2 p3 p4 p5 ─┬─► UperNetHead ─► logits (stride p/4) ─► bilinear ×(p/4)
                                         └─► FCN aux head on p4 (training only, loss weight 0.4)

UperNetHead, as in the MAE / BEiT transfer recipes:
    PPM on the top level: adaptive average pools to 1, 2, 3, 6 cells, each a 1×1 conv-BN-ReLU,
        upsampled back and concatenated with the input, then a 3×3 conv-BN-ReLU (`channels`);
    laterals: 1×1 conv-BN-ReLU on the three lower levels (the PPM output is the top lateral);
    top-down: each lateral plus the upsampled (bilinear) coarser one;
    FPN: 3×3 conv-BN-ReLU on the three lower sums; every level upsampled to the finest and
        concatenated, a 3×3 conv-BN-ReLU fuses them; Dropout2d(0.1); 1×1 classifier.
BatchNorm throughout (convert with `nn.SyncBatchNorm.convert_sync_batchnorm` under DDP on GPU:
the A.1 batch is 2 images per GPU). Training needs more than one image per BatchNorm: the 1×1
pool of the PPM has one value per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from milan.dense.backbone import ViTPyramid

__all__ = ["ConvBNReLU", "PyramidPooling", "UperNetHead", "FCNHead", "Segmenter", "build_segmenter"]


class ConvBNReLU(nn.Sequential):
    """conv (no bias) → BatchNorm → ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling: `[B, C_in, h, w]` → `[B, C_in + len(scales)·channels, h, w]`."""

    def __init__(self, in_channels: int, channels: int, scales: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_channels, channels, 1)) for s in scales
        )

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        return torch.cat([x] + [_resize(stage(x), size) for stage in self.stages], dim=1)


def _init_head(module: nn.Module, classifier: nn.Conv2d) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.normal_(classifier.weight, std=0.01)
    nn.init.zeros_(classifier.bias)


class UperNetHead(nn.Module):
    """UperNet decode head over four levels (finest first).

    Args:
        in_channels: channels of the four levels, e.g. `ViTPyramid.channels`.
        channels: width of every internal map (MAE/BEiT ViT-B: 768; 512 in the original UperNet).
        num_classes: output classes.
        pool_scales: PPM output grids.
        dropout: Dropout2d before the classifier.

    Forward: list/tuple (or mapping, in order) of 4 maps `[B, C_i, H_i, W_i]` → logits `[B, K, H_0, W_0]`.
    """

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"UperNetHead takes 4 levels, got in_channels={tuple(in_channels)}")
        self.in_channels, self.channels, self.num_classes = tuple(in_channels), channels, num_classes
        self.ppm = PyramidPooling(in_channels[-1], channels, pool_scales)
        self.ppm_bottleneck = ConvBNReLU(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.laterals = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        _init_head(self, self.classifier)

    def forward(self, features: Sequence[Tensor] | dict[str, Tensor]) -> Tensor:
        feats = list(features.values()) if isinstance(features, dict) else list(features)
        if len(feats) != 4:
            raise ValueError(f"UperNetHead takes 4 levels, got {len(feats)}")
        lat = [conv(f) for conv, f in zip(self.laterals, feats[:-1])]
        lat.append(self.ppm_bottleneck(self.ppm(feats[-1])))
        for i in range(len(lat) - 1, 0, -1):  # top-down
            lat[i - 1] = lat[i - 1] + _resize(lat[i], lat[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, lat[:-1])] + [lat[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([_resize(x, size) for x in outs], dim=1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """The auxiliary head of the transfer recipes: 3×3 conv-BN-ReLU, Dropout2d, 1×1 classifier."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        _init_head(self, self.classifier)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.conv(x)))


class Segmenter(nn.Module):
    """ViT pyramid + UperNet (+ auxiliary FCN on level `aux_index`); logits at the input size.

    The backbone is the attribute `backbone` so `layer_decay_groups(model, ...)` finds the encoder
    under its default prefix "backbone.encoder.".

    Forward: images `[B, 3, H, W]` (multiples of the patch size) → logits `[B, K, H, W]`; with
    `with_aux=True`, `(logits, aux_logits or None)`, both at `[B, K, H, W]`.
    """

    def __init__(self, backbone: ViTPyramid, decode_head: UperNetHead, aux_head: FCNHead | None = None,
                 *, aux_index: int = 2) -> None:
        super().__init__()
        self.backbone, self.decode_head, self.aux_head, self.aux_index = backbone, decode_head, aux_head, aux_index
        self.num_classes = decode_head.num_classes

    def forward(self, images: Tensor, *, with_aux: bool = False) -> Tensor | tuple[Tensor, Tensor | None]:
        size = images.shape[-2:]
        feats = list(self.backbone(images).values())
        logits = _resize(self.decode_head(feats), size)
        if not with_aux:
            return logits
        aux = _resize(self.aux_head(feats[self.aux_index]), size) if self.aux_head is not None else None
        return logits, aux


def build_segmenter(encoder: nn.Module, num_classes: int, *, pyramid: str = "intermediate",
                    out_indices: Sequence[int] | None = None, out_channels: int = 256, channels: int = 768,
                    pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1, aux: bool = True,
                    aux_channels: int = 256) -> Segmenter:
    """A `Segmenter` around `encoder` (a `MaskedViTEncoder`, e.g. from `milan.io.weights.build_encoder`)."""
    backbone = ViTPyramid(encoder, mode=pyramid, out_indices=tuple(out_indices) if out_indices else None,
                          out_channels=out_channels)
    head = UperNetHead(backbone.channels, channels, num_classes, pool_scales=pool_scales, dropout=dropout)
    aux_head = FCNHead(backbone.channels[2], aux_channels, num_classes, dropout=dropout) if aux else None
    return Segmenter(backbone, head, aux_head)

