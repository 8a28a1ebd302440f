"""A MILAN / timm ViT encoder as a multi-scale backbone for dense prediction (Tables 3 and 6).

A plain ViT has one scale (stride = patch size). Dense heads (UperNet, Mask R-CNN's FPN) want four,
at strides p/4, p/2, p and 2p (4, 8, 16, 32 for /16 patches). Two ways to get them:

    "intermediate" (MAE / BEiT transfer recipes): the outputs of four blocks spread over the depth
        (ViT-B: 4, 6, 8, 12), each resized by its own neck — two 2×2 transposed convs (×4), one (×2),
        identity (×1), 2×2 max-pool (×½).
    "simple" (ViTDet's simple feature pyramid): the last block only, resized the same four ways,
        each followed by a 1×1 and a 3×3 conv to `out_channels` with LayerNorm.

Inputs of any size divisible by the patch size are accepted: the position embedding is resampled
(bicubic) to the input's grid, so a 224-px pretrained encoder runs at 512 px (ADE20K) or on the
variable, padded sizes of a detection batch. Stochastic depth comes from the encoder
(`build_encoder(..., drop_path_rate=)`); `layer_decay_groups` gives the layer-wise lr decay
parameter groups of the transfer recipes (A.1: 0.65 for ViT-B).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from milan.encoder import MaskedViTEncoder, run_block

__all__ = ["ViTPyramid", "LayerNorm2d", "default_out_indices", "layer_decay_groups", "resample_pos_embed"]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a `[B, C, H, W]` map (ViTDet's "LN")."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def default_out_indices(depth: int) -> tuple[int, ...]:
    """Four block indices spread over the depth: (3, 5, 7, 11) for 12 blocks, (7, 11, 15, 23) for 24."""
    return tuple(max(0, round(depth * f) - 1) for f in (1 / 3, 1 / 2, 2 / 3, 1))


def resample_pos_embed(pos_embed: Tensor, grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """`[1, 1 + h*w, D]` (CLS first) → `[1, 1 + H*W, D]`, patch part resampled bicubically."""
    if tuple(grid) == tuple(new_grid):
        return pos_embed
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    dim = patches.shape[-1]
    patches = patches.reshape(1, grid[0], grid[1], dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=new_grid, mode="bicubic", align_corners=False)
    patches = patches.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([cls, patches], dim=1)


def _neck(scale: float, dim: int, out_channels: int | None) -> nn.Module:
    """Resize a stride-p map by `scale` (4, 2, 1 or ½); with `out_channels`, ViTDet's conv + LN tail."""
    if scale == 4:
        layers: list[nn.Module] = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2),
                                   nn.GELU(), nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2)]
        width = dim // 4
    elif scale == 2:
        layers, width = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)], dim // 2
    elif scale == 1:
        layers, width = [], dim
    elif scale == 0.5:
        layers, width = [nn.MaxPool2d(2, 2)], dim
    else:
        raise ValueError(f"pyramid scales are 4, 2, 1 and 0.5, not {scale}")
    if out_channels is not None:
        layers += [nn.Conv2d(width, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                   nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels)]
    return nn.Sequential(*layers)


class ViTPyramid(nn.Module):
    """Four feature maps at strides p/4, p/2, p, 2p from a ViT encoder.

    Args:
        encoder: a `MaskedViTEncoder` (e.g. from `milan.io.weights.build_encoder`); trained along.
            Its final norm is replaced by an identity: the pyramid taps the blocks directly.
        mode: "intermediate" (MAE/BEiT: blocks `out_indices`, deconv/pool necks, `dim` channels
            at every level) or "simple" (ViTDet: last block, necks to `out_channels`).
        out_indices: blocks tapped in "intermediate" mode (default `default_out_indices`).
        out_channels: channels of every level in "simple" mode (default 256).

    Forward: images `[B, 3, H, W]` (H, W multiples of the patch size) → OrderedDict
    {"p2", "p3", "p4", "p5"} of `[B, C_i, H / s_i, W / s_i]` with strides `self.strides`.
    """

    def __init__(self, encoder: MaskedViTEncoder, *, mode: Literal["intermediate", "simple"] = "intermediate",
                 out_indices: tuple[int, ...] | None = None, out_channels: int = 256) -> None:
        super().__init__()
        if mode not in ("intermediate", "simple"):
            raise ValueError(f"mode must be 'intermediate' or 'simple', not {mode!r}")
        depth, dim, p = len(encoder.blocks), encoder.embed_dim, encoder.patch_size
        encoder.norm = nn.Identity()  # unused by the pyramid (and DDP wants no unused parameters)
        self.encoder, self.mode = encoder, mode
        if mode == "intermediate":
            self.out_indices = tuple(out_indices) if out_indices is not None else default_out_indices(depth)
            if len(self.out_indices) != 4 or not all(0 <= i < depth for i in self.out_indices):
                raise ValueError(f"out_indices must be 4 block indices in [0, {depth}), got {self.out_indices}")
            widths = (dim // 4, dim // 2, dim, dim)
            self.necks = nn.ModuleList(_neck(s, dim, None) for s in (4, 2, 1, 0.5))
        else:
            self.out_indices = (depth - 1,)
            widths = (out_channels,) * 4
            self.necks = nn.ModuleList(_neck(s, dim, out_channels) for s in (4, 2, 1, 0.5))
        self.channels: tuple[int, ...] = widths
        self.strides: tuple[int, ...] = (p // 4, p // 2, p, 2 * p)
        self.names = ("p2", "p3", "p4", "p5")
        self.num_layers = depth  # for layer_decay_groups

    def tokens(self, images: Tensor) -> tuple[list[Tensor], tuple[int, int]]:
        """Patch tokens `[B, D, h, w]` after each tapped block, and the grid `(h, w)`."""
        enc, p = self.encoder, self.encoder.patch_size
        if images.shape[-2] % p or images.shape[-1] % p:
            raise ValueError(f"input {tuple(images.shape[-2:])} is not a multiple of the patch size {p}; "
                             "pad it (detection pads to a multiple of 32, segmentation crops to one)")
        x = enc.patch_embed.proj(images)  # [B, D, h, w]; bypasses PatchEmbed's fixed-size check
        grid = (x.shape[-2], x.shape[-1])
        pos = resample_pos_embed(enc.pos_embed, enc.patch_embed.grid_size, grid)
        x = x.flatten(2).transpose(1, 2) + pos[:, 1:]
        cls = (enc.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        taps = []
        for i, block in enumerate(enc.blocks):  # the encoder's grad_checkpointing applies here too
            x = run_block(block, x, checkpointed=enc.grad_checkpointing)
            if i in self.out_indices:
                taps.append(x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, *grid))
        return taps, grid

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        taps, _ = self.tokens(images)
        if self.mode == "simple":
            taps = taps * 4
        return OrderedDict((n, neck(t)) for n, neck, t in zip(self.names, self.necks, taps))


def layer_decay_groups(model: nn.Module, *, weight_decay: float, layer_decay: float, num_layers: int,
                       backbone: str = "backbone.encoder.") -> list[dict]:
    """AdamW parameter groups with layer-wise lr decay (BEiT / MAE transfer recipes).

    Parameters under `backbone` get layer ids: patch embedding, CLS and position embedding 0,
    block i → i + 1; everything else (final norm, necks, heads) num_layers + 1. A group's
    `lr_scale` is layer_decay ** (num_layers + 1 − id); multiply the scheduled lr by it. Biases,
    norms (1-D parameters) and the CLS token get no weight decay.
    """
    blocks = {int(n[len(backbone):].split(".")[1]) for n, _ in model.named_parameters()
              if n.startswith(backbone + "blocks.")}
    if not blocks:
        raise ValueError(f"no parameters under {backbone}blocks.*: pass backbone= the encoder's prefix")
    if max(blocks) + 1 != num_layers:
        raise ValueError(f"num_layers={num_layers} but the encoder under {backbone} has {max(blocks) + 1} blocks")
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = num_layers + 1
        if name.startswith(backbone):
            rest = name[len(backbone):]
            if rest.startswith(("patch_embed.", "cls_token", "pos_embed")):
                layer = 0
            elif rest.startswith("blocks."):
                layer = int(rest.split(".")[1]) + 1
        decay = param.ndim > 1 and not name.endswith("cls_token")
        group = groups.setdefault((layer, decay), {
            "params": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (num_layers + 1 - layer), "layer": layer,
        })
        group["params"].append(param)
    return [groups[k] for k in sorted(groups)]
