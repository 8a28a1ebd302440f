"""`MILAN`: the method as one object — frozen teacher → mask sampler → masked autoencoder → loss.

    step = milan.MILAN(model, teacher=teacher)        # sampler from model.spec (semantic, 0.75)
    out = step(images, generator=g)                   # StepOutput(loss, pred, target, mask, token_loss, teacher)
    out.loss.backward()

`milan pretrain`, `milan bench speed`, `milan viz` and the demo all run this object; nothing else
implements the path. Its phases are public so that a training loop can put each where it
belongs (the teacher outside autocast, the model inside DDP's `no_sync`, a timer between them):

    teacher_out = step.teach(images)                  # no grad; None when the variant needs no teacher
    mask = step.sample_mask(images, teacher_out, noise=noise)
    model_out = step.forward(images, mask, teacher_out, net=ddp_model)

The teacher is held by reference: `MILAN` is not an `nn.Module`, so the teacher is never a
submodule of anything that is trained, wrapped in DDP or saved.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import Tensor, nn

from milan.masking import Mask, MaskSampler, build_sampler
from milan.model import MaskedAutoencoder, ModelOutput, ModelSpec
from milan.teacher import Teacher, TeacherOutput

__all__ = ["MILAN", "StepOutput"]


class StepOutput(NamedTuple):
    loss: Tensor  # scalar: eq. 1 (or MAE's pixel loss for target='pixel')
    pred: Tensor  # [B, 1+N, D] decoder predictions (or [B, 1+K, D] without a decoder)
    target: Tensor  # what `pred` is scored against (see `milan.model`'s objectives)
    mask: Mask  # the visible / masked patches of this step
    token_loss: Tensor  # [B, 1+N] per token, CLS first then patch order; NaN where not scored
    teacher: TeacherOutput | None  # tokens and cls_attn, when the variant uses a teacher


class MILAN:
    """One pretraining step of a `MaskedAutoencoder` with its teacher and mask sampler.

    Args:
        model: the student (`build_model`); its `spec` says what it needs.
        teacher: the frozen teacher; required when `model.spec.needs_teacher`.
        sampler: the mask sampler; default `build_sampler(spec.masking, spec.mask_ratio)`.
        amp_dtype: autocast dtype for the student's forward (bf16/fp16 on GPU), None for fp32.
            The teacher runs in its own dtype, outside autocast.
    """

    def __init__(self, model: MaskedAutoencoder, *, teacher: Teacher | None = None,
                 sampler: MaskSampler | None = None, amp_dtype: torch.dtype | None = None) -> None:
        spec = model.spec
        if spec.needs_teacher and teacher is None:
            raise ValueError(f"{spec.name} ({spec.target} target, {spec.masking} masking) needs a teacher")
        self.model = model
        self.teacher = teacher
        self.sampler = sampler if sampler is not None else build_sampler(spec.masking, spec.mask_ratio)
        self.amp_dtype = amp_dtype

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec

    @torch.no_grad()
    def teach(self, images: Tensor) -> TeacherOutput | None:
        """The teacher's tokens `[B, 1+N, Dt]` and cls_attn `[B, N]`; None without a teacher."""
        return self.teacher(images) if self.teacher is not None else None

    def sample_mask(self, images: Tensor, teacher_out: TeacherOutput | None, *, noise: Tensor | None = None,
                    generator: torch.Generator | None = None, check_values: bool = True) -> Mask:
        """The step's mask from uniform `noise` `[B, N]` (drawn from `generator` when not given)."""
        batch, num_patches = images.shape[0], self.model.num_patches
        if noise is None:
            noise = torch.rand(batch, num_patches, generator=generator, device=images.device)  # [B, N]
        importance = teacher_out.cls_attn if teacher_out is not None else None
        return self.sampler(batch, num_patches, importance=importance, noise=noise, check_values=check_values)

    def forward(self, images: Tensor, mask: Mask, teacher_out: TeacherOutput | None, *,
                net: nn.Module | None = None) -> ModelOutput:
        """The student's forward and loss, under autocast; `net` runs it (DDP or compiled wrapper of `model`)."""
        targets = teacher_out.tokens if teacher_out is not None else None
        autocast = (torch.autocast(images.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            return (net if net is not None else self.model)(images, mask, targets)

    def __call__(self, images: Tensor, *, noise: Tensor | None = None, generator: torch.Generator | None = None,
                 net: nn.Module | None = None, check_values: bool = True) -> StepOutput:
        """teacher → mask → model → loss for one batch of normalised images `[B, 3, H, W]`."""
        teacher_out = self.teach(images)
        mask = self.sample_mask(images, teacher_out, noise=noise, generator=generator, check_values=check_values)
        out = self.forward(images, mask, teacher_out, net=net)
        return StepOutput(out.loss, out.pred, out.target, mask, out.token_loss, teacher_out)
