"""Tests for milan.masking: partitions, determinism, sampling distributions, validation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from milan.masking import (
    Mask,
    gather_tokens,
    num_visible,
    random_masking,
    restore_tokens,
    semantic_masking,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_mask(batch: int, num_patches: int, ratio: float, seed: int = 0) -> Mask:
    return random_masking(batch, num_patches, ratio, generator=_gen(seed))


def _semantic_mask(batch: int, num_patches: int, ratio: float, seed: int = 0) -> Mask:
    importance = torch.rand(batch, num_patches, generator=_gen(seed + 1000)) + 0.01
    return semantic_masking(importance, ratio, generator=_gen(seed))


MASKERS = {"random": _random_mask, "semantic": _semantic_mask}


def _check_partition(mask: Mask, batch: int, num_patches: int, ratio: float) -> None:
    num_keep = int(num_patches * (1 - ratio))
    assert mask.keep.shape == (batch, num_keep)
    assert mask.masked.shape == (batch, num_patches - num_keep)
    assert mask.restore.shape == (batch, num_patches)
    for t in (mask.keep, mask.masked, mask.restore):
        assert t.dtype == torch.int64
    assert mask.num_keep == num_keep
    assert mask.num_patches == num_patches
    for b in range(batch):
        keep = set(mask.keep[b].tolist())
        masked = set(mask.masked[b].tolist())
        assert len(keep) == num_keep  # no duplicates
        assert len(masked) == num_patches - num_keep
        assert keep.isdisjoint(masked)
        assert keep | masked == set(range(num_patches))
    shuffled = torch.cat([mask.keep, mask.masked], dim=1)
    expected = torch.arange(num_patches).expand(batch, -1)
    assert torch.equal(shuffled.gather(1, mask.restore), expected)


@pytest.mark.parametrize("kind", sorted(MASKERS))
@pytest.mark.parametrize(
    ("batch", "num_patches", "ratio"),
    [(3, 16, 0.75), (2, 196, 0.75), (4, 10, 0.5), (1, 7, 0.3), (5, 64, 0.9), (2, 5, 0.6)],
)
def test_partition_and_restore_invariants(kind, batch, num_patches, ratio):
    mask = MASKERS[kind](batch, num_patches, ratio)
    _check_partition(mask, batch, num_patches, ratio)


def test_num_visible_matches_mae_formula():
    for n, r in [(196, 0.75), (64, 0.75), (10, 0.55), (7, 0.3), (5, 0.6), (256, 0.4)]:
        assert num_visible(n, r) == int(n * (1 - r))
    assert num_visible(196, 0.75) == 49


@pytest.mark.parametrize("kind", sorted(MASKERS))
def test_seeded_determinism(kind):
    a = MASKERS[kind](4, 64, 0.75, seed=7)
    b = MASKERS[kind](4, 64, 0.75, seed=7)
    c = MASKERS[kind](4, 64, 0.75, seed=8)
    for x, y in [(a.keep, b.keep), (a.masked, b.masked), (a.restore, b.restore)]:
        assert torch.equal(x, y)
    assert not torch.equal(a.keep, c.keep)
    # rows of one call differ too (the noise is per row)
    assert not torch.equal(a.keep[0], a.keep[1])


def test_semantic_determinism_with_fixed_importance():
    importance = torch.rand(3, 49, generator=_gen(3))
    a = semantic_masking(importance, 0.75, generator=_gen(11))
    b = semantic_masking(importance, 0.75, generator=_gen(11))
    c = semantic_masking(importance, 0.75, generator=_gen(12))
    assert torch.equal(a.keep, b.keep) and torch.equal(a.restore, b.restore)
    assert not torch.equal(a.keep, c.keep)


def _successive_sampling_probs(weights: list[float], k: int):
    """Exact inclusion probabilities of successive weighted draws without replacement.

    Enumerates every ordered sequence of k distinct items; the probability of a sequence is
    the product over draws of w_i / (sum of the weights not drawn yet).
    """
    n = len(weights)
    total = sum(weights)
    single = [0.0] * n
    pairs: dict[tuple[int, int], float] = {}
    for seq in itertools.permutations(range(n), k):
        prob, left = 1.0, total
        for i in seq:
            prob *= weights[i] / left
            left -= weights[i]
        for i in seq:
            single[i] += prob
        key = tuple(sorted(seq))
        pairs[key] = pairs.get(key, 0.0) + prob
    return single, pairs


def test_successive_sampling_reference_is_a_distribution():
    single, pairs = _successive_sampling_probs([0.5, 0.2, 0.15, 0.1, 0.05], 2)
    assert math.isclose(sum(single), 2.0)
    assert math.isclose(sum(pairs.values()), 1.0)
    # weighted sampling without replacement is NOT proportional inclusion: check it differs
    assert abs(single[0] - 2 * 0.5) > 0.1


@pytest.mark.parametrize(
    ("weights", "ratio"),
    [([0.5, 0.2, 0.15, 0.1, 0.05], 0.5), ([4.0, 1.0, 1.0, 0.5, 2.5, 0.25], 0.5)],
)
def test_semantic_keep_frequencies_match_exact_inclusion_probabilities(weights, ratio):
    n = len(weights)
    k = num_visible(n, ratio)
    draws = 20000
    importance = torch.tensor(weights).expand(draws, n)
    mask = semantic_masking(importance, ratio, generator=_gen(1234))
    assert mask.keep.shape == (draws, k)
    single, pairs = _successive_sampling_probs(weights, k)

    kept = torch.zeros(draws, n).scatter_(1, mask.keep, 1.0)
    freq = kept.mean(0)
    for i in range(n):
        p = single[i]
        sigma = math.sqrt(p * (1 - p) / draws)
        assert abs(freq[i].item() - p) < 4 * sigma + 1e-12, (i, freq[i].item(), p)

    # joint distribution of the kept set (K=3 for the second case: use all subsets)
    subset_counts: dict[tuple[int, ...], int] = {}
    for row in mask.keep.sort(dim=1).values.tolist():
        subset_counts[tuple(row)] = subset_counts.get(tuple(row), 0) + 1
    for subset, p in pairs.items():
        sigma = math.sqrt(p * (1 - p) / draws)
        got = subset_counts.get(subset, 0) / draws
        assert abs(got - p) < 4 * sigma + 1e-12, (subset, got, p)


def test_semantic_importance_need_not_be_normalised():
    importance = torch.rand(64, 16, generator=_gen(5)) + 1e-3
    base = semantic_masking(importance, 0.75, generator=_gen(99))
    for scaled in (
        importance / importance.sum(1, keepdim=True),
        importance * 3.7,
        importance * 1e3,
    ):
        other = semantic_masking(scaled, 0.75, generator=_gen(99))
        assert torch.equal(base.keep, other.keep)
        assert torch.equal(base.restore, other.restore)


def test_semantic_prefers_important_patches():
    # one patch carries almost all the weight: it is (virtually) always kept
    importance = torch.full((500, 16), 1e-4)
    importance[:, 13] = 1.0
    mask = semantic_masking(importance, 0.75, generator=_gen(0))
    assert (mask.keep == 13).any(1).all()
    # and a negligible-weight patch is rarely kept (K=4 draws among 15 tiny weights after #13)
    assert (mask.keep == 0).any(1).float().mean().item() < 0.35


def test_semantic_zero_importance_never_kept_while_positive_remain():
    batch, n = 400, 16
    g = _gen(21)
    importance = torch.rand(batch, n, generator=g)
    # zero out 10 patches per row (6 positive left >= K = 4)
    zero_idx = torch.rand(batch, n, generator=g).argsort(1)[:, :10]
    importance.scatter_(1, zero_idx, 0.0)
    mask = semantic_masking(importance, 0.75, generator=_gen(22))
    assert mask.keep.shape[1] == 4
    kept_weight = importance.gather(1, mask.keep)
    assert (kept_weight > 0).all()
    _check_partition(mask, batch, n, 0.75)


def test_semantic_fewer_positive_than_keep():
    batch, n = 50, 16  # K = 4
    importance = torch.zeros(batch, n)
    importance[:, 5] = 0.3
    importance[:, 11] = 2.0
    mask = semantic_masking(importance, 0.75, generator=_gen(3))
    _check_partition(mask, batch, n, 0.75)
    for b in range(batch):
        kept = set(mask.keep[b].tolist())
        assert {5, 11} <= kept

    all_zero = torch.zeros(2, n)
    _check_partition(semantic_masking(all_zero, 0.75, generator=_gen(3)), 2, n, 0.75)


def test_random_masking_is_uniform():
    draws, n, ratio = 20000, 8, 0.75
    k = num_visible(n, ratio)  # 2
    mask = random_masking(draws, n, ratio, generator=_gen(77))
    kept = torch.zeros(draws, n).scatter_(1, mask.keep, 1.0)
    p = k / n
    sigma = math.sqrt(p * (1 - p) / draws)
    assert (kept.mean(0) - p).abs().max().item() < 4 * sigma

    # every pair of patches equally likely to be the kept set: 1 / C(8, 2)
    pair_p = 1 / math.comb(n, k)
    pair_sigma = math.sqrt(pair_p * (1 - pair_p) / draws)
    sets = mask.keep.sort(dim=1).values
    codes = sets[:, 0] * n + sets[:, 1]
    counts = torch.bincount(codes, minlength=n * n).float() / draws
    for i, j in itertools.combinations(range(n), 2):
        assert abs(counts[i * n + j].item() - pair_p) < 4 * pair_sigma, (i, j)


def test_semantic_with_uniform_importance_is_uniform():
    draws, n = 20000, 8
    mask = semantic_masking(torch.ones(draws, n), 0.75, generator=_gen(8))
    kept = torch.zeros(draws, n).scatter_(1, mask.keep, 1.0)
    p = 2 / 8
    sigma = math.sqrt(p * (1 - p) / draws)
    assert (kept.mean(0) - p).abs().max().item() < 4 * sigma


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_invalid_ratio_raises(ratio):
    with pytest.raises(ValueError):
        random_masking(2, 16, ratio)
    with pytest.raises(ValueError):
        semantic_masking(torch.rand(2, 16), ratio)
    with pytest.raises(ValueError):
        num_visible(16, ratio)


def test_ratio_leaving_no_visible_patch_raises():
    with pytest.raises(ValueError):
        random_masking(2, 4, 0.9)  # int(4 * 0.1) = 0
    with pytest.raises(ValueError):
        semantic_masking(torch.rand(2, 4), 0.9)


@pytest.mark.parametrize(
    "importance",
    [
        torch.rand(16),  # 1-D
        torch.rand(2, 16, 1),  # 3-D
        torch.tensor([[0.5, -0.1, 0.3, 0.2]]),  # negative
        torch.tensor([[0.5, float("nan"), 0.3, 0.2]]),
        torch.tensor([[0.5, float("inf"), 0.3, 0.2]]),
        torch.tensor([[0.5, 0.3, float("-inf"), 0.2]]),
        torch.ones(2, 16, dtype=torch.int64),  # not floating
    ],
    ids=["1d", "3d", "negative", "nan", "inf", "neg-inf", "int"],
)
def test_invalid_importance_raises(importance):
    with pytest.raises(ValueError):
        semantic_masking(importance, 0.5)


def test_gather_tokens_matches_loop():
    tokens = torch.randn(3, 10, 5)
    index = torch.stack([torch.randperm(10)[:4] for _ in range(3)])
    out = gather_tokens(tokens, index)
    assert out.shape == (3, 4, 5)
    for b in range(3):
        for j in range(4):
            assert torch.equal(out[b, j], tokens[b, index[b, j]])


def test_restore_tokens_inverts_the_shuffle():
    batch, n, d = 3, 12, 4
    tokens = torch.randn(batch, n, d)
    mask = _random_mask(batch, n, 0.75, seed=4)
    shuffled = torch.cat(
        [gather_tokens(tokens, mask.keep), gather_tokens(tokens, mask.masked)], dim=1
    )
    assert torch.equal(restore_tokens(shuffled, mask.restore), tokens)
    # and against an explicit scatter into patch order
    manual = torch.empty_like(tokens)
    order = torch.cat([mask.keep, mask.masked], 1)
    for b in range(batch):
        for j in range(n):
            manual[b, order[b, j]] = shuffled[b, j]
    assert torch.equal(restore_tokens(shuffled, mask.restore), manual)


def test_is_masked():
    mask = _semantic_mask(4, 20, 0.75, seed=2)
    flags = mask.is_masked()
    assert flags.shape == (4, 20) and flags.dtype == torch.bool
    for b in range(4):
        masked = set(mask.masked[b].tolist())
        for i in range(20):
            assert bool(flags[b, i]) == (i in masked)
    assert (flags.sum(1) == 15).all()


def test_mask_to_device_keeps_values():
    mask = _random_mask(2, 16, 0.5)
    moved = mask.to("cpu")
    assert torch.equal(moved.keep, mask.keep)
    assert torch.equal(moved.masked, mask.masked)
    assert torch.equal(moved.restore, mask.restore)
