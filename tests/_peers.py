"""Other projects' MILAN / MAE / ViT models, written out from their sources for the format tests.

Each class has the peer's parameter names (so `state_dict()` is the peer's checkpoint layout) and the
peer's forward, re-typed from reading:
- the MILAN authors' `models_milan.py` (MAE's `MaskedAutoencoderViT` with `Block_fordecoder` /
  `Attention_fordecoder`: separate `q` and `kv` projections; K/V over the fixed encoding tokens and
  the mask tokens) and MAE's `models_mae.py` (timm `Block`s in the decoder, CLS prediction removed);
- mmpretrain's `VisionTransformer` / `TransformerEncoderLayer` (`ln1`, `attn.qkv`, `attn.proj`, `ln2`,
  `ffn.layers.0.0`, `ffn.layers.1`, `patch_embed.projection`, final `ln1`, avg-pool `ln2`),
  `MultiheadAttention`, `PromptMultiheadAttention`, `MILANPretrainDecoder` and `MAEPretrainDecoder`
  (`decoder_norm` registered as `ln1`), `LinearClsHead` (`fc`).
Weights are random (perturbed away from the default init, so a swapped norm or bias shows).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

LN = partial(nn.LayerNorm, eps=1e-6)


def perturb(model: nn.Module, scale: float = 0.05) -> nn.Module:
    """Random weights: every parameter moved away from its initial value (norm weights stay near 1)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def gather(x: Tensor, ids: Tensor) -> Tensor:
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def ids_from(noise: Tensor, keep: int) -> tuple[Tensor, Tensor, Tensor]:
    """MAE's masking indices from `[B, N]` scores (large is kept): ids_keep, ids_dump, ids_restore."""
    ids_shuffle = torch.argsort(noise, dim=1, descending=True)
    return ids_shuffle[:, :keep], ids_shuffle[:, keep:], torch.argsort(ids_shuffle, dim=1)


# ----------------------------------------------------------------------------------------------
# The MILAN authors' / MAE's MaskedAutoencoderViT (MAE save_model layout)
# ----------------------------------------------------------------------------------------------


class AuthorsAttention(nn.Module):
    """`Attention_fordecoder`: q from the mask tokens, k/v from [CLS, unshuffled(visible ∪ mask)]."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=True)
        self.kv = nn.Linear(dim, dim * 2, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, fixed: Tensor, ids_restore: Tensor) -> Tensor:
        full = gather(torch.cat([fixed[:, 1:], x], dim=1), ids_restore)
        full = torch.cat([fixed[:, :1], full], dim=1)
        b, n, c = full.shape
        q = self.q(x).reshape(b, x.shape[1], self.num_heads, c // self.num_heads).permute(0, 2, 1, 3)
        kv = self.kv(full).reshape(b, n, 2, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ kv[0].transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ kv[1]).transpose(1, 2).reshape(b, x.shape[1], c))


class AuthorsBlock(nn.Module):
    """`Block_fordecoder`: pre-norm; the block's norm1 is applied to the mask tokens only."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = LN(dim)
        self.attn = AuthorsAttention(dim, num_heads)
        self.norm2 = LN(dim)
        self.mlp = Mlp(dim, dim * 4, act_layer=nn.GELU)

    def forward(self, x: Tensor, fixed: Tensor, ids_restore: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), fixed, ids_restore)
        return x + self.mlp(self.norm2(x))


class AuthorsMAE(nn.Module):
    """MAE's `MaskedAutoencoderViT`; `prompting=True` is the MILAN authors' version of it."""

    def __init__(self, *, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                 decoder_dim: int, decoder_depth: int, decoder_heads: int, out_dim: int,
                 prompting: bool = True) -> None:
        super().__init__()
        self.prompting = prompting
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, 4.0, qkv_bias=True, norm_layer=LN)
                                    for _ in range(depth))
        self.norm = LN(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, decoder_dim), requires_grad=False)
        block = AuthorsBlock if prompting else partial(Block, mlp_ratio=4.0, qkv_bias=True, norm_layer=LN)
        self.decoder_blocks = nn.ModuleList(block(decoder_dim, decoder_heads) for _ in range(decoder_depth))
        self.decoder_norm = LN(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, out_dim, bias=True)
        perturb(self)

    def forward_encoder(self, imgs: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        if ids_keep is not None:
            x = gather(x, ids_keep)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_decoder(self, x: Tensor, ids_restore: Tensor, ids_keep: Tensor, ids_dump: Tensor) -> Tensor:
        x = self.decoder_embed(x)
        masks = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = gather(torch.cat([x[:, 1:, :], masks], dim=1), ids_restore)
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        if not self.prompting:  # MAE
            for blk in self.decoder_blocks:
                x = blk(x)
            return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]
        fixed = torch.cat([x[:, :1, :], gather(x[:, 1:, :], ids_keep)], dim=1)
        x = gather(x[:, 1:, :], ids_dump)
        for blk in self.decoder_blocks:
            x = blk(x, fixed, ids_restore)
        x_ = gather(torch.cat([fixed[:, 1:, :], x], dim=1), ids_restore)
        x = torch.cat([fixed[:, :1, :], x_], dim=1)
        return self.decoder_pred(self.decoder_norm(x))


# ----------------------------------------------------------------------------------------------
# mmpretrain
# ----------------------------------------------------------------------------------------------


class MMAttention(nn.Module):
    """mmpretrain `MultiheadAttention` (`prompt=False`) or `PromptMultiheadAttention` (`prompt=True`)."""

    def __init__(self, dim: int, num_heads: int, *, prompt: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dims = num_heads, dim // num_heads
        if prompt:
            self.q = nn.Linear(dim, dim, bias=True)
            self.kv = nn.Linear(dim, dim * 2, bias=True)
        else:
            self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: Tensor, visible: Tensor | None = None, ids_restore: Tensor | None = None) -> Tensor:
        b, n, c = x.shape
        if visible is None:
            q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dims).permute(2, 0, 3, 1, 4)
        else:
            full = gather(torch.cat([visible[:, 1:], x], dim=1), ids_restore)
            full = torch.cat([visible[:, :1], full], dim=1)
            q = self.q(x).reshape(b, n, self.num_heads, self.head_dims).permute(0, 2, 1, 3)
            k, v = self.kv(full).reshape(b, full.shape[1], 2, self.num_heads, self.head_dims).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class MMFFN(nn.Module):
    """mmcv `FFN` with num_fcs=2: `layers = [Sequential(Linear, GELU, Dropout), Linear, Dropout]`."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0)),
                                    nn.Linear(hidden, dim), nn.Dropout(0.0))

    def forward(self, x: Tensor, identity: Tensor) -> Tensor:
        return identity + self.layers(x)


class MMLayer(nn.Module):
    """`TransformerEncoderLayer` (or MILAN's `PromptTransformerEncoderLayer` with `prompt=True`)."""

    def __init__(self, dim: int, num_heads: int, *, prompt: bool = False) -> None:
        super().__init__()
        self.ln1 = LN(dim)
        self.attn = MMAttention(dim, num_heads, prompt=prompt)
        self.ln2 = LN(dim)
        self.ffn = MMFFN(dim, dim * 4)

    def forward(self, x: Tensor, visible: Tensor | None = None, ids_restore: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln1(x), visible, ids_restore)
        return self.ffn(self.ln2(x), identity=x)


class MMPatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.projection = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.projection(x).flatten(2).transpose(1, 2)  # [B, N, C]


class MMViT(nn.Module):
    """mmpretrain `VisionTransformer` / `MAEViT`: `final_norm` adds `ln1`; `avg=True` is out_type
    'avg_featmap' (its `ln2` after averaging the patch tokens), used with final_norm=False."""

    def __init__(self, *, img_size: int, patch_size: int, dim: int, depth: int, num_heads: int,
                 final_norm: bool = True, avg: bool = False) -> None:
        super().__init__()
        self.patch_embed = MMPatchEmbed(patch_size, dim)
        n = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim))
        self.layers = nn.ModuleList(MMLayer(dim, num_heads) for _ in range(depth))
        self.final_norm, self.avg = final_norm, avg
        if final_norm:
            self.ln1 = LN(dim)
        if avg:
            self.ln2 = LN(dim)

    def forward(self, x: Tensor) -> Tensor:
        """All tokens (out_type 'raw'), or the averaged patch tokens after `ln2` (avg_featmap)."""
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == len(self.layers) - 1 and self.final_norm:
                x = self.ln1(x)
        return self.ln2(x[:, 1:].mean(dim=1)) if self.avg else x

    def forward_masked(self, x: Tensor, ids_keep: Tensor) -> Tensor:
        """`MILANViT.forward` with an importance: visible patches only."""
        x = gather(self.patch_embed(x) + self.pos_embed[:, 1:, :], ids_keep)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        for layer in self.layers:
            x = layer(x)
        return self.ln1(x)


class MMDecoder(nn.Module):
    """`MILANPretrainDecoder` (`prompt=True`) or `MAEPretrainDecoder` (`prompt=False`): the `neck`."""

    def __init__(self, *, num_patches: int, embed_dim: int, dim: int, depth: int, num_heads: int, out_dim: int,
                 prompt: bool = True) -> None:
        super().__init__()
        self.prompt = prompt
        self.decoder_embed = nn.Linear(embed_dim, dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(MMLayer(dim, num_heads, prompt=prompt) for _ in range(depth))
        self.ln1 = LN(dim)  # build_norm_layer(norm_cfg, dim, postfix=1) → 'ln1', the decoder_norm property
        self.decoder_pred = nn.Linear(dim, out_dim, bias=True)

    def forward(self, x: Tensor, ids_restore: Tensor, ids_keep: Tensor, ids_dump: Tensor) -> Tensor:
        x = self.decoder_embed(x)
        masks = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = gather(torch.cat([x[:, 1:, :], masks], dim=1), ids_restore)
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        if not self.prompt:
            for blk in self.decoder_blocks:
                x = blk(x)
            return self.decoder_pred(self.ln1(x))[:, 1:, :]
        visible = torch.cat([x[:, :1, :], gather(x[:, 1:, :], ids_keep)], dim=1)
        x = gather(x[:, 1:, :], ids_dump)
        for blk in self.decoder_blocks:
            x = blk(x, visible, ids_restore)
        x_ = gather(torch.cat([visible[:, 1:, :], x], dim=1), ids_restore)
        x = torch.cat([visible[:, :1, :], x_], dim=1)
        return self.decoder_pred(self.ln1(x))


class MMClassifier(nn.Module):
    """mmpretrain `ImageClassifier`: a finetuned ViT (avg_featmap, final_norm=False) + `LinearClsHead`."""

    def __init__(self, *, num_classes: int, **vit: int) -> None:
        super().__init__()
        self.backbone = MMViT(**vit, final_norm=False, avg=True)
        self.head = nn.Module()
        self.head.fc = nn.Linear(vit["dim"], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head.fc(self.backbone(x))
