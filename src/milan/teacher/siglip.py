"""SigLIP / SigLIP 2 teachers: a ViT without a class token, pooled by an attention-pooling head.

SigLIP's image embedding is the output of its MAP head (multihead attention pooling): one
learned latent query attends over the final-norm patch tokens, the heads' outputs go through the
out projection, then a residual MLP (`u + mlp(norm(u))`). There is no CLS token and no separate
projection, so the MILAN targets are defined through that head (see docs/TEACHERS.md):

- tokens[:, 0]  (the CLS slot): the pooled embedding, exactly the library's own image embedding
  (timm `forward_head`, open_clip `encode_image`, transformers `pooler_output`);
- tokens[:, 1:] (patch i): the same head applied to token i alone. With a single key the softmax
  is 1, so this is the value and out projections followed by the head's residual MLP:
  `u_i = W_o (W_v x_i + b_v) + b_o`, `t_i = u_i + mlp(norm(u_i))`. Before its MLP the pooled
  embedding is, head by head, an attention-weighted mean of these same value rows, so patches and
  pooled embedding live in one space, as CLIP's `ln_post + proj` on all tokens does for CLIP.
- cls_attn: the head's latent-query attention over the patch keys, head-averaged
  (`query_attention`; the softmax is over the patches only, as there is no CLS key).

`map_targets` holds that definition once; `SiglipTeacher` feeds it from a timm
`VisionTransformer(global_pool='map')` (specs `timm:` and `openclip:`, whose SigLIP towers wrap a
timm trunk) and `hf_siglip.HFSiglipTeacher` from transformers' Siglip / Siglip2 vision models.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.data.constants import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import AttentionPoolLatent
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from milan.errors import TeacherError
from milan.teacher.base import TimmTowerTeacher, query_attention

__all__ = ["SIGLIP_MEAN", "SIGLIP_STD", "SiglipTeacher", "map_targets"]

# SigLIP normalises pixels to [-1, 1]: mean = std = 0.5 per channel.
SIGLIP_MEAN, SIGLIP_STD = IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD


def map_targets(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    proj: nn.Module,
    norm: nn.Module,
    mlp: nn.Module | None,
) -> tuple[Tensor, Tensor]:
    """MILAN targets through an attention-pooling head with one latent query.

    Args:
        q: [B, H, 1, d] the latent query, projected (and q-normed) as the head does.
        k, v: [B, H, N, d] keys and values of the N patch tokens.
        proj, norm, mlp: the head's out projection and its residual MLP (`mlp` None: no MLP).

    Returns:
        tokens [B, 1+N, D']: the pooled embedding, then each patch through the head alone;
        importance [B, N]: the latent's attention over the patches, head-averaged, float32.
    """
    b, h, n, d = v.shape
    importance = query_attention(q, k, scale=d**-0.5)  # [B, N]
    pooled = F.scaled_dot_product_attention(q, k, v)  # [B, H, 1, d], the head's own fused path
    # A token pooled alone is its value row: stack [pooled, values] and run the rest of the head.
    x = torch.cat([pooled, v], dim=2).transpose(1, 2).reshape(b, 1 + n, h * d)  # [B, 1+N, H*d]
    x = proj(x)
    if mlp is not None:
        x = x + mlp(norm(x))
    return x, importance


class SiglipTeacher(TimmTowerTeacher):
    """A timm `VisionTransformer` pooled by `AttentionPoolLatent` (global_pool='map'): SigLIP 1/2.

    Args:
        model: the timm model; build it with `dynamic_img_size=True` to accept other grids.
        head: a per-token module applied after timm's own head (open_clip's `TimmModel.head`);
            None for a plain timm model.
        **kwargs: `Teacher` arguments; mean / std default to the model's pretrained_cfg, else 0.5.
    """

    def __init__(self, model: nn.Module, head: nn.Module | None = None, **kwargs: Any) -> None:
        if not isinstance(model, VisionTransformer) or not isinstance(
            model.attn_pool, AttentionPoolLatent
        ):
            raise TeacherError(
                f"a SigLIP teacher needs a timm VisionTransformer with global_pool='map', got "
                f"{type(model).__name__} with global_pool={getattr(model, 'global_pool', None)!r}"
            )
        pool = model.attn_pool
        if pool.latent_len != 1 or pool.pos_embed is not None or model.pool_include_prefix:
            raise TeacherError(
                "only SigLIP's attention-pool head is supported (one latent query over the patch "
                f"tokens, no pool position embedding); this one has latent_len={pool.latent_len}, "
                f"pos_embed={pool.pos_embed is not None}"
            )
        super().__init__(model, head, width=pool.out_features, mean=SIGLIP_MEAN, std=SIGLIP_STD,
                         what="the SigLIP tower", **kwargs)

    def _tokens_and_attn(self, x: Tensor) -> tuple[Tensor, Tensor]:
        m = self.backbone["trunk"]
        pool = m.attn_pool
        # timm's own trunk: patch embed, (interpolated) position embedding, blocks, final norm.
        x = m.forward_features(x)[:, m.num_prefix_tokens :]  # [B, N, D] the head pools patches only
        b, n, _ = x.shape
        q = pool.q(pool.latent).unflatten(-1, (pool.num_heads, -1)).transpose(1, 2)  # [1, H, 1, d]
        kv = pool.kv(x).reshape(b, n, 2, pool.num_heads, -1).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # [B, H, N, d]
        q, k = pool.q_norm(q).expand(b, -1, -1, -1).contiguous(), pool.k_norm(k)
        tokens, importance = map_targets(q, k, v, pool.proj, pool.norm, pool.mlp)
        # After the pool timm applies fc_norm (Identity for 'map') and its head (Identity, or a
        # classifier fine-tuned on top); open_clip may add its own projection after that.
        tokens = self.backbone["head"](m.head(m.fc_norm(tokens)))
        return tokens, importance
