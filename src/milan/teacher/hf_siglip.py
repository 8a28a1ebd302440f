"""`hf:<folder>` for SigLIP / SigLIP 2: transformers Siglip[Vision]Model and Siglip2[Vision]Model.

Targets and importance are those of `milan.teacher.siglip` (the MAP head's pooled embedding in the
CLS slot, each patch through the head alone, the head's latent-query attention over the patches).

transformers' Siglip2 is the NaFlex model: it takes patchified pixels plus each image's grid and
resizes its position embedding to that grid. The teacher feeds it whole images (no padding) at
the grid the student needs, patchified the way Siglip2's image processor does (pixels (p, p, C)
inside a patch, patches in row-major order). A fixed-resolution SigLIP 2 release saved as
model_type 'siglip' is a plain SigLIP architecture and loads as such.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from milan.errors import TeacherError
from milan.teacher.base import Teacher, _heads, from_pretrained
from milan.teacher.siglip import SIGLIP_MEAN, SIGLIP_STD, map_targets

__all__ = ["HF_SIGLIP_TYPES", "HFSiglipTeacher", "build_hf_siglip_teacher"]

# model_type in config.json -> transformers class name
HF_SIGLIP_TYPES = {
    "siglip": "SiglipModel",
    "siglip_vision_model": "SiglipVisionModel",
    "siglip2": "Siglip2Model",
    "siglip2_vision_model": "Siglip2VisionModel",
}


class HFSiglipTeacher(Teacher):
    """A transformers SigLIP / SigLIP 2 vision tower with its attention-pooling head.

    Args:
        vision: `SiglipVisionModel` / `Siglip2VisionModel` (or transformers 4.x's inner
            `Siglip[2]VisionTransformer`); it must have its head (vision_use_head=True).
        **kwargs: `Teacher` arguments; mean / std default to SigLIP's 0.5.
    """

    def __init__(self, vision: nn.Module, **kwargs: Any) -> None:
        config = vision.config
        head = getattr(vision, "head", None) if getattr(vision, "use_head", True) else None
        if head is None:
            raise TeacherError(
                "this SigLIP vision tower has no attention-pooling head (vision_use_head=False): "
                "there is no pooled embedding to predict and no pooling query to rank patches; "
                "use a checkpoint saved with its head (vision_use_head=True)"
            )
        attn = head.attention
        if not attn._qkv_same_embed_dim or attn.in_proj_bias is None:
            raise TeacherError("this SigLIP pooling head has an unexpected attention layout")
        # Siglip2 (NaFlex) embeds patchified pixels with a Linear layer; Siglip uses a Conv2d.
        self.naflex = isinstance(vision.embeddings.patch_embedding, nn.Linear)
        if self.naflex:
            side = vision.embeddings.position_embedding_size
            if side * side != config.num_patches:
                raise TeacherError(
                    f"Siglip2 num_patches={config.num_patches} is not a square grid: its position "
                    "embedding cannot be laid out as side x side; use a checkpoint whose "
                    "num_patches is a square (e.g. 256 = 16 x 16)"
                )
        kwargs.setdefault("mean", SIGLIP_MEAN)
        kwargs.setdefault("std", SIGLIP_STD)
        super().__init__(vision, dim=config.hidden_size, patch_size=config.patch_size, **kwargs)

    def _embed(self, x: Tensor) -> Tensor:
        v = self.backbone
        if not self.naflex:
            return v.embeddings(x, interpolate_pos_encoding=True)  # [B, N, D]
        b, c, height, width = x.shape
        p = self.patch_size
        h, w = height // p, width // p
        patches = x.reshape(b, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, p * p * c)
        shapes = torch.tensor([[h, w]], device=x.device).expand(b, 2)  # [B, 2] every image whole
        return v.embeddings(patches, shapes)  # position embedding resized to h x w

    def _tokens_and_attn(self, x: Tensor) -> tuple[Tensor, Tensor]:
        v = self.backbone
        # No padding, so no attention mask: every layer attends over all patches.
        hidden = v.post_layernorm(v.encoder(inputs_embeds=self._embed(x)).last_hidden_state)
        head = v.head
        attn = head.attention  # nn.MultiheadAttention(batch_first=True), packed in_proj
        dim = hidden.shape[-1]
        b = hidden.shape[0]
        q = F.linear(head.probe, attn.in_proj_weight[:dim], attn.in_proj_bias[:dim])  # [1, 1, D]
        kv = F.linear(hidden, attn.in_proj_weight[dim:], attn.in_proj_bias[dim:])  # [B, N, 2D]
        k, val = (_heads(t, attn.num_heads) for t in kv.chunk(2, dim=-1))  # [B, H, N, d]
        q = _heads(q, attn.num_heads).expand(b, -1, -1, -1).contiguous()  # [B, H, 1, d]
        return map_targets(q, k, val, attn.out_proj, head.layernorm, head.mlp)


def build_hf_siglip_teacher(
    folder: str, path: Path, model_type: str, load: dict[str, Any], **kwargs: Any
) -> Teacher:
    """A SigLIP / SigLIP 2 folder written by save_pretrained (config.json already read)."""
    # lazy: transformers is the optional `hf` extra
    import transformers

    cls = getattr(transformers, HF_SIGLIP_TYPES[model_type])
    model, info = from_pretrained(cls, path, load)
    missing = {k for k in info["missing_keys"] if not k.startswith("text")}
    if missing:
        raise TeacherError(f"teacher 'hf:{folder}': weights in {path} lack {sorted(missing)[:5]}")
    vision = getattr(model, "vision_model", model)
    vision = getattr(vision, "vision_model", vision)  # transformers 4.x nests the tower deeper
    return HFSiglipTeacher(vision, **kwargs)
