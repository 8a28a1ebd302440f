"""Tests for milan.loss: eq. 1 (feature loss) and MAE's pixel loss (as `PixelObjective` takes it)."""

from __future__ import annotations

import math

import pytest
import torch

from _mae_reference import mae_patchify, mae_pixel_loss
from milan.loss import feature_loss, patchify, pixel_errors
from milan.masking import random_masking
from milan.model import PixelObjective

# ---------------------------------------------------------------- feature loss (eq. 1)


def _eq1_by_loops(pred, target):
    """(1/B) sum_b (1/T) sum_t || p/|p| - t/|t| ||^2, one token at a time, in float64."""
    batch, tokens, _ = pred.shape
    total = 0.0
    for b in range(batch):
        per_image = 0.0
        for t in range(tokens):
            p = pred[b, t].double()
            q = target[b, t].double()
            diff = p / torch.sqrt((p * p).sum()) - q / torch.sqrt((q * q).sum())
            per_image += float((diff * diff).sum())
        total += per_image / tokens
    return total / batch


def test_feature_loss_matches_eq1_and_cosine_form():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 7, 5, generator=g)
    target = torch.randn(3, 7, 5, generator=g)
    loss = feature_loss(pred, target)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(_eq1_by_loops(pred, target), abs=1e-6)
    cos = torch.einsum("btd,btd->bt", pred, target) / (pred.norm(dim=-1) * target.norm(dim=-1))
    assert loss.item() == pytest.approx((2 - 2 * cos).mean().item(), abs=1e-6)


def test_feature_loss_is_scale_invariant_per_token():
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 9, 6, generator=g)
    target = torch.randn(2, 9, 6, generator=g)
    scale_p = torch.rand(2, 9, 1, generator=g) * 10 + 0.01
    scale_t = torch.rand(2, 9, 1, generator=g) * 10 + 0.01
    base = feature_loss(pred, target)
    torch.testing.assert_close(feature_loss(pred * scale_p, target), base)
    torch.testing.assert_close(feature_loss(pred, target * scale_t), base)
    torch.testing.assert_close(feature_loss(pred * scale_p, target * scale_t), base)
    # a negative scale is not invariant (direction flips)
    assert not torch.allclose(feature_loss(-pred, target), base)


def test_feature_loss_zero_at_target_and_four_at_opposite():
    target = torch.randn(2, 5, 8)
    assert feature_loss(target.clone(), target).item() == pytest.approx(0.0, abs=1e-6)
    assert feature_loss(3.0 * target, target).item() == pytest.approx(0.0, abs=1e-6)
    assert feature_loss(-target, target).item() == pytest.approx(4.0, abs=1e-5)


def test_feature_loss_covers_every_token_uniformly():
    """Changing any single token (CLS included) changes the loss by exactly its share."""
    g = torch.Generator().manual_seed(2)
    batch, tokens = 2, 6
    pred = torch.randn(batch, tokens, 4, generator=g)
    target = torch.randn(batch, tokens, 4, generator=g)
    base = feature_loss(pred, target).double()
    for b in range(batch):
        for t in range(tokens):
            changed = pred.clone()
            changed[b, t] = -target[b, t]  # this token's term becomes exactly 4
            old = _eq1_by_loops(pred[b : b + 1, t : t + 1], target[b : b + 1, t : t + 1])
            expected = base + (4.0 - old) / (batch * tokens)
            got = feature_loss(changed, target).double()
            assert got.item() == pytest.approx(expected.item(), abs=1e-5), (b, t)
            assert abs(got.item() - base.item()) > 1e-4


def test_feature_loss_accepts_low_precision_and_gradients():
    pred = torch.randn(2, 3, 4, requires_grad=True)
    target = torch.randn(2, 3, 4)
    loss = feature_loss(pred.bfloat16(), target.bfloat16())
    assert loss.dtype == torch.float32
    loss.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()


@pytest.mark.parametrize(
    ("a", "b"), [((2, 5, 4), (2, 4, 4)), ((2, 5, 4), (2, 5, 3)), ((2, 5, 4), (1, 5, 4))]
)
def test_feature_loss_shape_mismatch_raises(a, b):
    with pytest.raises(ValueError):
        feature_loss(torch.randn(*a), torch.randn(*b))


# ---------------------------------------------------------------- patchify / pixel loss


@pytest.mark.parametrize(("size", "p"), [(16, 4), (32, 8), (12, 3)])
def test_patchify_layout(size, p):
    imgs = torch.randn(2, 3, size, size)
    patches = patchify(imgs, p)
    grid = size // p
    assert patches.shape == (2, grid * grid, p * p * 3)
    assert torch.equal(patches, mae_patchify(imgs, p))
    # patch j is the crop at row j // grid, col j % grid; pixels (row, col, channel) inside
    j = grid + 1 if grid > 1 else 0
    r, c = divmod(j, grid)
    crop = imgs[1, :, r * p : (r + 1) * p, c * p : (c + 1) * p]
    assert torch.equal(patches[1, j], crop.permute(1, 2, 0).reshape(-1))


def test_patchify_rejects_indivisible_images():
    with pytest.raises(ValueError):
        patchify(torch.randn(1, 3, 10, 10), 4)


def _pixel_loss(pred, imgs, mask, p):
    """The pixel objective's loss as the model takes it; pred: `[B, N, p·p·3]` (a CLS row is added)."""
    with_cls = torch.cat([torch.randn(pred.shape[0], 1, pred.shape[-1]), pred], dim=1)  # [B, 1+N, P]
    return PixelObjective(patch_size=p)(with_cls, imgs, mask, None).loss


def test_pixel_loss_matches_mae():
    g = torch.Generator().manual_seed(3)
    imgs = torch.randn(3, 3, 16, 16, generator=g)
    pred = torch.randn(3, 16, 48, generator=g)
    mask = random_masking(3, 16, 0.75, generator=g)
    ref = mae_pixel_loss(imgs, pred, mask.is_masked().float(), 4)
    torch.testing.assert_close(_pixel_loss(pred, imgs, mask, 4), ref)


def test_pixel_errors_without_norm_pix():
    g = torch.Generator().manual_seed(4)
    imgs = torch.randn(2, 3, 8, 8, generator=g)
    pred = torch.randn(2, 4, 48, generator=g)
    masked = torch.tensor([[0, 3], [2, 1]])
    errors, target = pixel_errors(pred, imgs, masked, patch_size=4, norm_pix=False)
    raw = mae_patchify(imgs, 4)
    assert torch.equal(target, torch.stack([raw[b, masked[b]] for b in range(2)]))
    terms = [((pred[b, i] - raw[b, i]) ** 2).mean() for b in range(2) for i in masked[b]]
    assert errors.mean().item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-6)


def test_pixel_loss_ignores_visible_patches_and_cls():
    g = torch.Generator().manual_seed(5)
    imgs = torch.randn(2, 3, 16, 16, generator=g)
    pred = torch.randn(2, 17, 48, generator=g)  # [B, 1+N, P]: CLS first
    mask = random_masking(2, 16, 0.75, generator=g)
    objective = PixelObjective(patch_size=4)
    base = objective(pred, imgs, mask, None).loss
    changed = pred.clone()
    visible = torch.cat([torch.ones(2, 1, dtype=torch.bool), ~mask.is_masked()], dim=1)  # CLS + visible
    changed[visible] = torch.randn(int(visible.sum()), 48, generator=g) * 100
    assert torch.equal(objective(changed, imgs, mask, None).loss, base)
    # and it does see the masked ones
    changed = pred.clone()
    changed[0, 1 + mask.masked[0, 0]] += 1.0
    assert not torch.equal(objective(changed, imgs, mask, None).loss, base)


def test_pixel_loss_zero_at_normalised_target():
    imgs = torch.randn(2, 3, 8, 8)
    target = mae_patchify(imgs, 4)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    mask = random_masking(2, 4, 0.75)
    assert _pixel_loss(target, imgs, mask, 4).item() == pytest.approx(0.0, abs=1e-10)
    assert math.isfinite(_pixel_loss(target + 1, imgs, mask, 4).item())
