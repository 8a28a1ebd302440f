"""Decoders that predict targets for every token from the encoder's visible tokens.

`PromptingDecoder` is MILAN's (section 2.3, eq. 2). The encoder output, embedded to the decoder
width and given position embeddings, becomes a fixed set of *prompts* Z. Only the mask tokens X
flow through the decoder blocks. In each block

    MHA(X, Z) = softmax(Q Kᵀ / √d) V,   Q = X Wq,  K = concat(Z, X) Wk,  V = concat(Z, X) Wv

with the block's own Wq/Wk/Wv; the FFN runs on X only; Z is never updated (nor normalised by
the block's norm). Visible-token and CLS predictions come straight from the prompts, so the
decoder cannot improve them: the encoder has to produce target-aligned features itself.

`MAEDecoder` is MAE's: full self-attention over CLS + visible + mask tokens, for the ablations.

Both return predictions for all `1 + N` tokens in patch order, CLS first.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from milan.encoder import run_block, sincos_pos_embed_2d
from milan.masking import Mask, gather_tokens, restore_tokens

__all__ = ["PromptingAttention", "PromptingBlock", "PromptingDecoder", "MAEDecoder", "VisibleHead"]

_LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class PromptingAttention(nn.Module):
    """Eq. 2: queries from the mask tokens, keys/values from prompts and mask tokens.

    One `qkv` projection (timm naming) serves both: its q rows are applied to the mask tokens
    only, its k/v rows to the concatenation, so the prompts get this layer's Wk, Wv.
    """

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, prompts: Tensor) -> Tensor:
        """x: `[B, M, D]` normed mask tokens; prompts: `[B, P, D]` → `[B, M, D]`."""
        batch, num_masked, dim = x.shape
        w_q, w_kv = self.qkv.weight.split([dim, 2 * dim])
        b_q, b_kv = self.qkv.bias.split([dim, 2 * dim]) if self.qkv.bias is not None else (None, None)
        q = F.linear(x, w_q, b_q)  # [B, M, D]
        kv = F.linear(torch.cat([prompts, x], dim=1), w_kv, b_kv)  # [B, P+M, 2D]
        k, v = kv.unflatten(-1, (2, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        q = q.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # [B, H, M, d]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, M, d]
        return self.proj(out.transpose(1, 2).reshape(batch, num_masked, dim))


class PromptingBlock(nn.Module):
    """Pre-norm transformer block whose attention also reads fixed prompts."""

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = _LayerNorm(dim)
        self.attn = PromptingAttention(dim, num_heads)
        self.norm2 = _LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: Tensor, prompts: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), prompts)
        return x + self.mlp(self.norm2(x))


class _DecoderBase(nn.Module):
    """What both decoders share: embedding, mask token, fixed pos-embed, `depth` blocks (each
    decoder's own, from `build_blocks`), final norm and head.

    Args:
        encoder_dim: width of the encoder tokens.
        num_patches: N, patches per image (square grid).
        out_dim: target width (the teacher's projection dim, or p²·3 for pixels).
        dim, depth, num_heads, mlp_ratio: decoder shape (default: MAE's decoder, 512 wide, 8 deep, 16 heads).
    """

    def __init__(
        self,
        *,
        encoder_dim: int,
        num_patches: int,
        out_dim: int,
        dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        grid = int(round(num_patches**0.5))
        if grid * grid != num_patches:
            raise ValueError(f"decoder needs a square patch grid, got {num_patches} patches")
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, grid))  # [1, 1+N, Dd]
        self.norm = _LayerNorm(dim)
        self.head = nn.Linear(dim, out_dim)
        self.blocks = self.build_blocks(dim, depth, num_heads, mlp_ratio)
        self.grad_checkpointing = False  # set_grad_checkpointing
        self.reset_parameters()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing over the blocks: each block's activations are recomputed in backward."""
        self.grad_checkpointing = enable

    def build_blocks(self, dim: int, depth: int, num_heads: int, mlp_ratio: float) -> nn.Module:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)


class PromptingDecoder(_DecoderBase):
    """MILAN's prompting decoder: the encoder's tokens become fixed prompts; only the mask tokens
    go through the `PromptingBlock`s. Arguments as `_DecoderBase` (encoder_dim, num_patches, out_dim;
    dim=512, depth=8, num_heads=16, mlp_ratio=4, as MAE's decoder)."""

    def build_blocks(self, dim: int, depth: int, num_heads: int, mlp_ratio: float) -> nn.Module:
        return nn.ModuleList(PromptingBlock(dim, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        # The authors' decoder has separate q [D, D] and kv [2D, D] projections, each xavier-initialised;
        # init the two row blocks of our fused qkv the same way (the bounds differ from a [3D, D] init).
        with torch.no_grad():
            for block in self.blocks:
                w_q, w_kv = block.attn.qkv.weight.split([self.embed.out_features, 2 * self.embed.out_features])
                nn.init.xavier_uniform_(w_q)
                nn.init.xavier_uniform_(w_kv)

    def forward(self, latent: Tensor, mask: Mask) -> Tensor:
        """latent: `[B, 1+K, De]` encoder output → predictions `[B, 1+N, out_dim]`."""
        pos = self.pos_embed.expand(latent.shape[0], -1, -1)  # [B, 1+N, Dd]
        pos_cls, pos_patch = pos[:, :1], pos[:, 1:]
        prompts = self.embed(latent) + torch.cat(
            [pos_cls, gather_tokens(pos_patch, mask.keep)], dim=1
        )  # [B, 1+K, Dd], fixed from here on
        x = self.mask_token + gather_tokens(pos_patch, mask.masked)  # [B, M, Dd]
        for block in self.blocks:  # checkpointed: each block keeps x; the prompts are kept once, shared
            x = run_block(block, x, prompts, checkpointed=self.grad_checkpointing)
        visible = self.head(self.norm(prompts))  # [B, 1+K, out]
        masked = self.head(self.norm(x))  # [B, M, out]
        patches = restore_tokens(torch.cat([visible[:, 1:], masked], dim=1), mask.restore)
        return torch.cat([visible[:, :1], patches], dim=1)  # [B, 1+N, out]


class MAEDecoder(_DecoderBase):
    """MAE's decoder: self-attention over CLS + all patches (visible ones re-inserted).
    Arguments as `_DecoderBase`."""

    def build_blocks(self, dim: int, depth: int, num_heads: int, mlp_ratio: float) -> nn.Module:
        return nn.Sequential(
            *(Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=_LayerNorm) for _ in range(depth))
        )

    def forward(self, latent: Tensor, mask: Mask) -> Tensor:
        """latent: `[B, 1+K, De]` encoder output → predictions `[B, 1+N, out_dim]`."""
        x = self.embed(latent)  # [B, 1+K, Dd]
        fill = self.mask_token.expand(x.shape[0], mask.masked.shape[1], -1)  # [B, M, Dd]
        patches = restore_tokens(torch.cat([x[:, 1:], fill], dim=1), mask.restore)  # [B, N, Dd]
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed  # [B, 1+N, Dd]
        for block in self.blocks:
            x = run_block(block, x, checkpointed=self.grad_checkpointing)
        return self.head(self.norm(x))


class VisibleHead(nn.Module):
    """No decoder (Table 9's KD baseline): a linear head maps encoder tokens to targets.

    Predicts CLS + visible tokens only, so the loss is taken on those.
    """

    def __init__(self, *, encoder_dim: int, num_patches: int, out_dim: int) -> None:
        super().__init__()
        del num_patches  # same constructor signature as the real decoders
        self.head = nn.Linear(encoder_dim, out_dim)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, latent: Tensor, mask: Mask) -> Tensor:
        """latent: `[B, 1+K, De]` → `[B, 1+K, out_dim]` (CLS, then visible in `mask.keep` order)."""
        del mask
        return self.head(latent)
