"""The student: a ViT (MAE/timm layout) that runs on the CLS token plus the visible patches only.

Parameters are named exactly as in `timm.models.vision_transformer.VisionTransformer`, so the
encoder's `state_dict` loads with `strict=True` into the matching timm model
(`vit_base_patch16_224(num_classes=0)`, ...) and the pretrained weights go wherever timm goes.
The blocks are timm's own `Block` (fused attention), not a copy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.utils.checkpoint
from timm.layers import PatchEmbed
from timm.models import checkpoint_seq
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from milan.masking import gather_tokens

_LAYER_NORM = partial(nn.LayerNorm, eps=1e-6)  # MAE/timm ViT norm

__all__ = ["EncoderConfig", "ENCODER_PRESETS", "MaskedViTEncoder", "sincos_pos_embed_2d", "run_block"]


@dataclass(frozen=True)
class EncoderConfig:
    """Shape of a ViT encoder. `timm_name` is the timm model its weights load into, if any."""

    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    timm_name: str | None = None


ENCODER_PRESETS: dict[str, EncoderConfig] = {
    "vit_tiny_patch16": EncoderConfig(224, 16, 192, 12, 3, timm_name="vit_tiny_patch16_224"),
    "vit_small_patch16": EncoderConfig(224, 16, 384, 12, 6, timm_name="vit_small_patch16_224"),
    "vit_base_patch16": EncoderConfig(224, 16, 768, 12, 12, timm_name="vit_base_patch16_224"),
    "vit_large_patch16": EncoderConfig(224, 16, 1024, 24, 16, timm_name="vit_large_patch16_224"),
    "vit_huge_patch14": EncoderConfig(224, 14, 1280, 32, 16, timm_name="vit_huge_patch14_224"),
    # CPU-sized student for the built-in 64 px shapes data (8x8 grid of 8 px patches).
    "vit_shapes_patch8": EncoderConfig(64, 8, 192, 6, 3),
}


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, *, cls_token: bool = True) -> Tensor:
    """Fixed 2-D sin-cos position embedding (MAE layout): `[1, cls + grid², embed_dim]`.

    Half the channels encode the column, half the row; each half is [sin, cos] of the
    coordinate times geometrically spaced frequencies. The CLS row is zero.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [D/4]
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # [G, G] each

    def encode(pos: Tensor) -> Tensor:  # [G*G] -> [G*G, D/2]
        angles = pos.reshape(-1, 1) * omega  # [G*G, D/4]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([encode(cols), encode(rows)], dim=1)  # [G*G, D]
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float().unsqueeze(0)


def run_block(block: nn.Module, *inputs: Tensor, checkpointed: bool) -> Tensor:
    """`block(*inputs)`; `checkpointed` (while autograd records) keeps only the inputs for backward and
    recomputes the block's activations there: less memory for one more forward per block. Non-reentrant
    (`use_reentrant=False`): works with several inputs, DDP and `no_sync`, and replays the RNG, so drop
    path draws the same masks in the recomputation and the gradients equal the plain block's."""
    if checkpointed and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *inputs, use_reentrant=False)
    return block(*inputs)


class MaskedViTEncoder(nn.Module):
    """ViT over CLS + a subset of patches.

    Args:
        img_size: input resolution the position embedding is built for.
        patch_size: side of a square patch.
        in_chans: image channels.
        embed_dim: token width.
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width / embed_dim.
        drop_path_rate: stochastic depth at the last block (linear from 0), for finetuning.
        norm_layer: normalisation used in blocks and at the end (LayerNorm eps 1e-6 as MAE).
    """

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        norm_layer: type[nn.Module] | partial = _LAYER_NORM,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed, not learned (MAE): a persistent buffer keeps it in the state_dict for timm.
        self.register_buffer(
            "pos_embed", sincos_pos_embed_2d(embed_dim, self.patch_embed.grid_size[0])
        )
        rates = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]
        self.blocks = nn.Sequential(
            *(
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=rate,
                      norm_layer=norm_layer)
                for rate in rates
            )
        )
        self.norm = norm_layer(embed_dim)
        self.grad_checkpointing = False  # set_grad_checkpointing
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: EncoderConfig, **kwargs) -> MaskedViTEncoder:
        fields = asdict(config)
        fields.pop("timm_name")
        return cls(**fields, **kwargs)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing over the blocks (timm's name): each block's activations are recomputed
        in backward instead of kept, the same gradients for about a third more compute."""
        self.grad_checkpointing = enable

    def reset_parameters(self) -> None:
        """MAE's initialisation: xavier-uniform linears (and patch projection), N(0, .02) CLS."""
        proj = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        """Encode CLS + the patches in `keep` (all patches when None).

        Args:
            images: `[B, C, H, W]` normalised images.
            keep: `[B, K]` indices of visible patches (from `milan.masking`), or None.

        Returns:
            `[B, 1 + K, D]` normed tokens, CLS first, visible patches in `keep` order.
        """
        x = self.embed(images, keep)  # [B, 1+K, D]
        if self.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint_seq(self.blocks, x, use_reentrant=False)  # keeps each block's input only
        else:
            x = self.blocks(x)
        return self.norm(x)

    def embed(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        """The tokens the first block sees: `[B, 1 + K, D]`, CLS first (positions added)."""
        x = self.patch_embed(images) + self.pos_embed[:, 1:]  # [B, N, D]
        if keep is not None:
            x = gather_tokens(x, keep)  # [B, K, D]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # [B, 1, D]
        return torch.cat([cls, x], dim=1)  # [B, 1+K, D]

    def timm_kwargs(self) -> dict:
        """Keyword arguments for `timm.models.VisionTransformer` that match this encoder."""
        first = self.blocks[0]
        return dict(
            img_size=self.patch_embed.img_size,
            patch_size=self.patch_size,
            embed_dim=self.embed_dim,
            depth=len(self.blocks),
            num_heads=first.attn.num_heads,
            mlp_ratio=first.mlp.fc1.out_features / self.embed_dim,
            num_classes=0,
        )
