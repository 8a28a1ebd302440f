"""EVA-CLIP teachers: a timm `Eva` tower (class token, rotary position embedding, SwiGLU).

EVA-02-CLIP (and EVA-01-CLIP) keep CLIP's layout: the image embedding is the class token after
the final norm and the projection, which timm stores as the model's `head` (open_clip's EVA
towers wrap the same timm trunk, with `timm_pool='token'` and the head as projection). So, as for
CLIP, the targets are the final norm and the head applied to ALL tokens, and the importance is the
last block's CLS-row attention over the patch keys (eq. 3), computed from the CLS query alone:
q and k are projected as the block does (fused or separate q/k projections with EVA's zero k
bias), pass through its q/k norms, and the keys of the patch tokens get the same rotary embedding
the block applies; the CLS query and the prefix keys are not rotated, exactly as in `EvaAttention`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.data.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.layers import apply_rot_embed_cat
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
from torch import Tensor, nn

from milan.errors import TeacherError
from milan.teacher.base import TimmTowerTeacher, _heads, cls_attention

__all__ = ["EvaTeacher"]


class EvaTeacher(TimmTowerTeacher):
    """A timm `Eva` with a class token and token pooling (EVA-CLIP); `head` is the projection.

    Register tokens are dropped from the outputs, so tokens are [CLS, patches].

    Args:
        model: the timm model; build it with `dynamic_img_size=True` to accept other grids.
        head: a per-token module applied after timm's head (open_clip's `TimmModel.head`); None
            for a plain timm model.
        **kwargs: `Teacher` arguments; mean / std default to the pretrained_cfg, else CLIP's.
    """

    def __init__(self, model: nn.Module, head: nn.Module | None = None, **kwargs: Any) -> None:
        if not isinstance(model, Eva):
            raise TeacherError(f"an EVA teacher needs a timm Eva model, got {type(model).__name__}")
        if model.cls_token is None or model.attn_pool is not None or model.global_pool != "token":
            raise TeacherError(
                "an EVA teacher needs the EVA-CLIP layout: a class token pooled as the image "
                f"embedding (global_pool='token'); this Eva has class token "
                f"{model.cls_token is not None} and global_pool={model.global_pool!r}. Use an "
                "EVA-CLIP model (timm eva02_*_clip_*, open_clip EVA02-*)"
            )
        last = model.blocks[-1]
        if not isinstance(last, EvaBlock | EvaBlockPostNorm) or not isinstance(
            last.attn, EvaAttention
        ):
            raise TeacherError(
                f"an EVA teacher's last block must be an EvaBlock with EvaAttention, got "
                f"{type(last).__name__} with {type(last.attn).__name__}"
            )
        super().__init__(model, head, width=model.embed_dim, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                         what="the EVA tower", **kwargs)
        self.post_norm: bool = isinstance(last, EvaBlockPostNorm)

    def _tokens_and_attn(self, x: Tensor) -> tuple[Tensor, Tensor]:
        m = self.backbone["trunk"]
        prefix = m.num_prefix_tokens  # CLS + registers
        # timm's own embedding: patches, (interpolated) abs position embedding, the rope for this grid.
        x, rope = m._pos_embed(m.patch_embed(x))  # [B, prefix+N, D]
        x = m.norm_pre(x)
        ropes = list(rope) if rope is not None and m.rope_mixed else [rope] * len(m.blocks)
        *blocks, last = m.blocks
        for block, block_rope in zip(blocks, ropes):
            x = block(x, rope=block_rope)
        cls_attn = self._cls_attn(last, x, ropes[-1], prefix)
        x = m.norm(last(x, rope=ropes[-1]))
        x = self.backbone["head"](m.head(m.fc_norm(x)))  # fc_norm: Identity with token pooling
        return torch.cat([x[:, :1], x[:, prefix:]], dim=1), cls_attn

    def _cls_attn(self, block: nn.Module, x: Tensor, rope: Tensor | None, prefix: int) -> Tensor:
        attn = block.attn
        h = x if self.post_norm else block.norm1(x)  # what the block feeds its attention
        if attn.qkv is not None:  # fused projection; EVA's k bias is a zero buffer
            w_q, w_k, _ = attn.qkv.weight.chunk(3)
            q = F.linear(h[:, :1], w_q, attn.q_bias)
            k = F.linear(h, w_k, attn.k_bias)
        else:
            q, k = attn.q_proj(h[:, :1]), attn.k_proj(h)
        q = attn.q_norm(_heads(q, attn.num_heads))  # [B, H, 1, d]
        k = attn.k_norm(_heads(k, attn.num_heads))  # [B, H, L, d]
        if rope is not None:
            # The block rotates every token after its first num_prefix_tokens; the CLS query
            # (token 0) is one of those prefix tokens, so only the patch keys change.
            npt = attn.num_prefix_tokens
            rotated = apply_rot_embed_cat(k[:, :, npt:], rope, half=attn.rotate_half)
            k = torch.cat([k[:, :, :npt], rotated.type_as(k)], dim=2)
        return cls_attention(q, k, scale=attn.scale, num_prefix=prefix)
