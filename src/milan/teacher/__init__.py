"""Frozen CLIP-like teachers: per-token targets and the attention of the pooling query.

`build_teacher(spec, weights=...)` turns a checkpoint already on disk into a frozen module whose
call returns `TeacherOutput(tokens [B, 1+N, Dt], cls_attn [B, N])`:

- tokens: the final LayerNorm and the projection applied to ALL tokens, CLS included (the
  library's own pooled output projects only the CLS token, and open_clip's `output_tokens=True`
  returns patch tokens without the projection, so neither is used).
- cls_attn: eq. 3 of the paper, softmax(q_cls K^T / sqrt(d)) of the last attention layer,
  averaged over heads, patch columns only (the CLS column is dropped, so rows sum to < 1).
  Only the CLS query row is computed; the blocks themselves run unchanged on the library's fused
  attention path, so the full [L, L] attention matrix never exists.

Families: CLIP ViTs (above); EVA-CLIP (`teacher.eva`: the same with rope, q/k norms, SwiGLU);
SigLIP / SigLIP 2 (`teacher.siglip`: no CLS token; the CLS slot holds the attention-pool head's
pooled embedding, each patch token is that head applied to the patch alone, and cls_attn is the
head's latent-query attention over the patches, which sums to 1). docs/TEACHERS.md says why.

Specs: `openclip:<arch>` (OpenAI TorchScript archive, OpenAI or open_clip state dict; ViTs and
the timm-trunk SigLIP / EVA02 archs), `hf:<folder>` (transformers CLIPModel /
CLIPVisionModel[WithProjection], Siglip[Vision]Model, Siglip2[Vision]Model), `timm:<model name>`
(a timm VisionTransformer with a class token, whose head, when the weights have one, is the
projection; a SigLIP VisionTransformer with global_pool='map'; an EVA-CLIP Eva) and
`slip:<model>` (a checkpoint of SLIP's training script: SLIP_VIT{S,B,L}16 or CLIP_VIT{S,B,L}16, Table 5 #9)
and `builtin:shapes` / `builtin:shapes-slip` (the small teachers of the built-in demo). Nothing is downloaded.

The teacher is frozen for real: eval mode that `train()` cannot undo, no parameter requires grad,
forward runs under `no_grad`. It must never be part of the optimizer, of DDP or of the student's
checkpoint: keep it beside the model, not inside it (the pretrain recipe does), and rebuild it
from its spec when resuming.

Resolution: the student's batch is re-normalised to the teacher's mean/std and, when the patch
sizes differ, resized so both token grids match (a CLIP L/14 teacher under a ViT-L/16 student at
224 px sees 196 px). A grid that differs from the one the positional embedding was trained for is
handled by interpolating the positional embedding (bicubic), as each library does.

Loading is safe (`milan.io.safe_load`): safetensors, `torch.load(weights_only=True)`, and TorchScript
archives read by a restricted unpickler that never runs their code; an archive's code is read as
text to tell its MLP activation (QuickGELU or GELU), which then overrides the architecture's. A
file that cannot be read says what it is (junk, truncated, pickled objects, ...). Hub ids and
release tags are refused with what to download and which spec to give then.

Errors: a bad spec, an unusable weights file or folder, an unsupported tower raise
`milan.errors.TeacherError` (a `UserError`, also a `ValueError`) whose message names the fix; a
missing one raises `milan.errors.TeacherFileNotFound`, a `TeacherError` that is also a
`FileNotFoundError`.

Layout: `base` (Teacher, TeacherOutput, cls_attention, query_attention, check_fits), one module
per backend (`openclip`, `hf`, `timm_vit`, `slip`, `builtin`) with its Teacher subclass and builder, one
per non-CLIP family (`siglip`, `hf_siglip`, `eva`) whose teachers the backends dispatch to; this
module only dispatches a spec to its builder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from milan.errors import TeacherError
from milan.io.safe_load import load_weights
from milan.teacher.base import Teacher, TeacherOutput, cls_attention, query_attention
from milan.teacher.builtin import BUILTIN_TEACHERS, build_builtin_teacher
from milan.teacher.eva import EvaTeacher
from milan.teacher.hf import HFTeacher, build_hf_teacher
from milan.teacher.hf_siglip import HFSiglipTeacher
from milan.teacher.openclip import OpenCLIPTeacher, build_openclip_teacher
from milan.teacher.siglip import SiglipTeacher
from milan.teacher.slip import build_slip_teacher
from milan.teacher.timm_vit import TimmTeacher, build_timm_teacher

__all__ = [
    "EvaTeacher",
    "HFSiglipTeacher",
    "HFTeacher",
    "OpenCLIPTeacher",
    "SiglipTeacher",
    "Teacher",
    "TeacherOutput",
    "TimmTeacher",
    "build_teacher",
    "cls_attention",
    "load_weights",
    "query_attention",
]

SPEC_FORMS = (
    "openclip:<arch> with weights=<OpenAI .pt | open_clip checkpoint | .safetensors> "
    "(CLIP ViTs, ViT-*-SigLIP*, EVA02-*)",
    "hf:<local folder of a transformers CLIPModel or CLIPVisionModel[WithProjection], "
    "Siglip[Vision]Model or Siglip2[Vision]Model>",
    "timm:<model name> with weights=<.safetensors | .pth> "
    "(CLS ViTs, *_siglip_* with global_pool='map', eva02_*_clip_*)",
    "slip:<SLIP_VITB16 | CLIP_VITB16 | ... | ViT-B-16> with weights=<a checkpoint of SLIP's main.py> "
    "(SLIP and CLIP models of facebookresearch/SLIP; not SimCLR)",
    *(f"builtin:{name}" for name in BUILTIN_TEACHERS),  # builtin:shapes, builtin:shapes-slip
)

# spec prefix -> builder(name, weights, **Teacher kwargs)
_BUILDERS: dict[str, Callable[..., Teacher]] = {
    "openclip": build_openclip_teacher,
    "hf": build_hf_teacher,
    "timm": build_timm_teacher,
    "slip": build_slip_teacher,
    "builtin": build_builtin_teacher,
}


def build_teacher(
    spec: str,
    weights: str | Path | None = None,
    *,
    input_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    input_std: Sequence[float] = IMAGENET_DEFAULT_STD,
    dtype: torch.dtype = torch.float32,
    student_patch_size: int | None = None,
) -> Teacher:
    """Build a frozen teacher from a checkpoint on disk; nothing is downloaded.

    Args:
        spec: "openclip:<arch>", "hf:<folder>", "timm:<model name>", "slip:<model>" or "builtin:<name>"
            (CLIP, SigLIP / SigLIP 2 and EVA-CLIP towers; see the module docstring).
        weights: checkpoint file for openclip / timm / slip specs (hf reads its folder).
        input_mean: per-channel mean of the normalised batches the teacher will receive.
        input_std: their per-channel std (the teacher re-normalises to its own statistics).
        dtype: weight dtype; bf16 / fp16 halve the teacher's cost on GPU (outputs stay float32).
        student_patch_size: the student's patch size, so the teacher's grid can be made to match.

    Returns:
        A frozen `Teacher`: `teacher(images) -> TeacherOutput`, `.dim`, `.patch_size`.
        Move it with `.to(device)`; keep it out of the optimizer, DDP and the student's checkpoint.

    Raises:
        TeacherError: an unknown spec, missing or unusable weights, an unsupported tower.
    """
    kind, sep, name = spec.partition(":")
    if not sep or not name or kind not in _BUILDERS:
        raise TeacherError(
            f"unknown teacher spec {spec!r}; valid forms:\n  " + "\n  ".join(SPEC_FORMS)
        )
    kwargs = {
        "input_mean": input_mean,
        "input_std": input_std,
        "student_patch_size": student_patch_size,
    }
    teacher = _BUILDERS[kind](name, weights, **kwargs)
    teacher.backbone.to(dtype=dtype)  # weights only: the input affine map stays float32
    return teacher
