"""Which patches the encoder sees: random (MAE) and semantic-aware (MILAN, section 2.4) masking.

Every function here is pure: it returns integer indices and never touches the images. A mask
is described by three index tensors over the N patches of an image (CLS excluded):

    keep     [B, K]  patches fed to the encoder, K = int(N * (1 - mask_ratio))
    masked   [B, M]  the other M = N - K patches, reconstructed by the decoder
    restore  [B, N]  undoes the shuffle:  cat([keep, masked], 1).gather(1, restore) == arange(N)

Semantic-aware sampling draws K patches *without replacement* with probability proportional
to the teacher's CLS attention. We draw them with the Gumbel-top-K trick: adding independent
Gumbel noise to log(importance) and keeping the K largest gives exactly the distribution of
successive multinomial draws without replacement, in one sort and without a Python loop.
Random masking is the special case of uniform importance (MAE draws uniform noise and sorts it,
which is the same distribution).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Mask",
    "num_visible",
    "random_masking",
    "semantic_masking",
    "gather_tokens",
    "restore_tokens",
    "SemanticMasking",
    "RandomMasking",
    "MaskSampler",
    "build_sampler",
]


@dataclass(frozen=True)
class Mask:
    """Indices of the visible and masked patches of a batch (all int64, CLS excluded).

    Attributes:
        keep: `[B, K]` indices of the visible patches, in the order the encoder sees them.
        masked: `[B, M]` indices of the masked patches, in the order the decoder predicts them.
        restore: `[B, N]` permutation that puts `cat([keep, masked], 1)` back in patch order.
    """

    keep: Tensor
    masked: Tensor
    restore: Tensor

    @property
    def num_patches(self) -> int:
        return self.restore.shape[1]

    @property
    def num_keep(self) -> int:
        return self.keep.shape[1]

    def to(self, device: torch.device | str) -> Mask:
        return Mask(self.keep.to(device), self.masked.to(device), self.restore.to(device))

    def is_masked(self) -> Tensor:
        """`[B, N]` bool, True where a patch is masked (convenient for plots and pixel loss)."""
        flags = torch.zeros_like(self.restore, dtype=torch.bool)
        return flags.scatter_(1, self.masked, True)


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """K = int(N * (1 - r)), as MAE and the authors' code compute it (196 patches → 49 at 0.75)."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio!r}")
    keep = int(num_patches * (1.0 - mask_ratio))
    if keep < 1:
        raise ValueError(
            f"mask_ratio={mask_ratio} leaves no visible patch out of {num_patches}; "
            f"use a ratio below {1 - 1 / num_patches:.4f}"
        )
    return keep


def _mask_from_scores(scores: Tensor, num_keep: int) -> Mask:
    """Keep the `num_keep` highest-scoring patches of each row."""
    order = torch.argsort(scores, dim=1, descending=True, stable=True)  # [B, N]
    restore = torch.argsort(order, dim=1)  # [B, N]
    return Mask(keep=order[:, :num_keep], masked=order[:, num_keep:], restore=restore)


def random_masking(
    batch: int,
    num_patches: int,
    mask_ratio: float = 0.75,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    noise: Tensor | None = None,
) -> Mask:
    """MAE's uniform masking: every subset of K patches is equally likely.

    Args:
        batch: number of images B.
        num_patches: patches per image N.
        mask_ratio: fraction r of patches to mask, in (0, 1).
        generator: optional RNG for reproducible masks; its device is used when `device` is None.
        device: where the indices live.
        noise: optional `[B, N]` uniform(0, 1) draws to use instead of drawing them (lets a
            data-parallel rank take its rows of one global draw).
    """
    num_keep = num_visible(num_patches, mask_ratio)
    if noise is None:
        if device is None:
            device = generator.device if generator is not None else "cpu"
        noise = torch.rand(batch, num_patches, generator=generator, device=device)  # [B, N]
    return _mask_from_scores(noise, num_keep)


def semantic_masking(
    importance: Tensor,
    mask_ratio: float = 0.75,
    *,
    generator: torch.Generator | None = None,
    check_values: bool = True,
    noise: Tensor | None = None,
) -> Mask:
    """Semantic-aware sampling: keep K patches drawn without replacement, P ∝ importance.

    Args:
        importance: `[B, N]` non-negative weights, typically the teacher's `cls_attn`. Rows need
            not sum to one. Zero-weight patches are kept only when fewer than K patches have
            positive weight.
        mask_ratio: fraction r of patches to mask, in (0, 1).
        generator: optional RNG on the same device as `importance`.
        check_values: reject negative or non-finite weights (one host sync; the training loop
            turns it off on GPU, where the teacher's softmax cannot produce them).
        noise: optional `[B, N]` uniform(0, 1) draws to use instead of drawing them.
    """
    if importance.dim() != 2:
        raise ValueError(f"importance must be [batch, num_patches], got shape {tuple(importance.shape)}")
    if not importance.is_floating_point():
        raise ValueError(f"importance must be a floating tensor, got {importance.dtype}")
    if check_values and (not bool(torch.isfinite(importance).all()) or bool((importance < 0).any())):
        raise ValueError("importance must be finite and non-negative (e.g. the teacher's cls_attn)")
    batch, num_patches = importance.shape
    num_keep = num_visible(num_patches, mask_ratio)
    # Gumbel-top-K: argtopk(log w + G) with G ~ Gumbel(0, 1) i.i.d. is a draw of K items without
    # replacement with probability ∝ w. log(0) = -inf puts zero-weight patches last.
    uniform = noise if noise is not None else torch.rand(
        batch, num_patches, generator=generator, device=importance.device, dtype=torch.float32
    )
    tiny = torch.finfo(torch.float32).tiny
    exponential = -torch.log(uniform.clamp(min=tiny))  # Exp(1) draws, > 0
    gumbel = -torch.log(exponential.clamp(min=tiny))  # [B, N] Gumbel(0, 1)
    scores = torch.log(importance.float()) + gumbel
    return _mask_from_scores(scores, num_keep)


class SemanticMasking:
    """MILAN's sampler, chosen at build time: `semantic_masking` of the teacher's importance."""

    needs_importance = True

    def __init__(self, mask_ratio: float = 0.75) -> None:
        self.mask_ratio = mask_ratio

    def __call__(self, batch: int, num_patches: int, *, importance: Tensor | None,
                 generator: torch.Generator | None = None, noise: Tensor | None = None,
                 check_values: bool = True) -> Mask:
        """A mask for `batch` images of `num_patches` patches from `importance` `[B, N]` (cls_attn)."""
        if importance is None:
            raise ValueError("semantic masking needs the teacher's cls_attn as importance")
        return semantic_masking(importance, self.mask_ratio, generator=generator, noise=noise,
                                check_values=check_values)


class RandomMasking:
    """MAE's sampler, chosen at build time: uniform `random_masking` (any importance is ignored)."""

    needs_importance = False

    def __init__(self, mask_ratio: float = 0.75) -> None:
        self.mask_ratio = mask_ratio

    def __call__(self, batch: int, num_patches: int, *, importance: Tensor | None = None,
                 generator: torch.Generator | None = None, noise: Tensor | None = None,
                 check_values: bool = True) -> Mask:
        device = importance.device if importance is not None else None
        return random_masking(batch, num_patches, self.mask_ratio, generator=generator, device=device,
                              noise=noise)


MaskSampler = SemanticMasking | RandomMasking


def build_sampler(kind: str, mask_ratio: float = 0.75) -> MaskSampler:
    """`semantic` → `SemanticMasking`, `random` → `RandomMasking`, at `mask_ratio`."""
    samplers = {"semantic": SemanticMasking, "random": RandomMasking}
    if kind not in samplers:
        raise ValueError(f"masking must be 'semantic' or 'random', got {kind!r}")
    return samplers[kind](mask_ratio)


def gather_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """Select tokens per row: `[B, N, D]` gathered at `[B, K]` → `[B, K, D]`."""
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def restore_tokens(shuffled: Tensor, restore: Tensor) -> Tensor:
    """Put tokens in `cat([keep, masked])` order back into patch order: `[B, N, D]` → `[B, N, D]`."""
    return gather_tokens(shuffled, restore)
