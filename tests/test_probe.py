"""The frozen-feature probes: the L-BFGS linear solver, shared kNN search, chance checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from milan.train.probe import (
    beats_chance,
    fit_linear,
    knn_accuracies,
    knn_accuracy,
    label_entropy,
    linear_probe,
    linear_probes,
    standardise,
)


def _logistic_data(n: int, weight: torch.Tensor, bias: torch.Tensor, mix: torch.Tensor | None = None,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features with a known softmax model: y ~ softmax(x W^T + b); optionally observed through `mix`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, weight.shape[1], generator=g)
    y = torch.multinomial(F.softmax(x @ weight.T + bias, 1), 1, generator=g)[:, 0]
    return (x if mix is None else x @ mix), y


def _centred(w: torch.Tensor) -> torch.Tensor:
    return w - w.mean(0)  # softmax is unchanged by adding one vector to every class row


def test_fit_linear_recovers_a_known_softmax_model() -> None:
    weight = torch.tensor([[2.0, -1.0, 0.0, 0.5], [-1.0, 2.0, 1.0, 0.0], [0.0, 0.0, -2.0, 1.5]])
    bias = torch.tensor([0.3, -0.2, 0.0])
    x, y = _logistic_data(20000, weight, bias)
    fit = fit_linear(x, [y], [3], l2=0.0)[0]
    assert fit.converged and fit.weight.shape == (3, 4) and fit.bias.shape == (3,)
    torch.testing.assert_close(_centred(fit.weight), _centred(weight), atol=0.12, rtol=0)
    torch.testing.assert_close(_centred(fit.bias[:, None])[:, 0], _centred(bias[:, None])[:, 0], atol=0.08, rtol=0)
    assert fit.loss < label_entropy(y) - 0.3


def test_fit_linear_on_strongly_correlated_features() -> None:
    """The whitened solve gives the right answer when features are nearly collinear (cond ~1e6)."""
    weight = torch.tensor([[1.5, -1.0, 0.5], [-1.0, 1.0, 0.0]])
    mix = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 1e-3, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0]])  # [3, 4], rank 3
    x, y = _logistic_data(20000, weight, torch.zeros(2), mix)
    fit = fit_linear(x, [y], [2], l2=0.0)[0]
    assert fit.converged
    # the logits it predicts are the true model's (W acts through the mixing)
    probe = torch.randn(500, 3)
    torch.testing.assert_close(_centred((probe @ mix @ fit.weight.T).T).T, _centred((probe @ weight.T).T).T,
                               atol=0.15, rtol=0)


def test_joint_solve_equals_separate_solves() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(600, 8, generator=g)
    ya, yb = (x[:, :2] @ torch.randn(2, 3, generator=g)).argmax(1), (x[:, 3] > 0).long()
    joint = fit_linear(x, [ya, yb], [3, 2])
    alone = [fit_linear(x, [ya], [3])[0], fit_linear(x, [yb], [2])[0]]
    for j, a in zip(joint, alone):
        torch.testing.assert_close(j.weight, a.weight, atol=1e-3 * float(a.weight.abs().max()), rtol=2e-3)
        assert j.loss == pytest.approx(a.loss, abs=1e-4)


def test_linear_probes_learn_signal_and_not_noise() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3000, 16, generator=g) * torch.linspace(0.01, 100, 16)  # unstandardised scales
    y = (x[:, 0] / 0.01 + x[:, 1] / 0.01 > 0).long() + 2 * (x[:, 5] > 0).long()  # 4 classes, linear in x
    noise = torch.randint(0, 4, (3000,), generator=g)
    acc = linear_probes(x[:2000], {"signal": y[:2000], "noise": noise[:2000]}, x[2000:],
                        {"signal": y[2000:], "noise": noise[2000:]})
    assert acc["signal"] > 0.95
    assert not beats_chance(acc["noise"], noise[2000:]) and beats_chance(acc["signal"], y[2000:])
    assert linear_probe(x[:2000], y[:2000], x[2000:], y[2000:], solver="lbfgs") == acc["signal"]


def test_standardise_uses_the_training_statistics() -> None:
    train, test = torch.randn(100, 3) * 5 + 2, torch.randn(10, 3)
    a, b = standardise(train, test)
    torch.testing.assert_close(a.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(b, (test - train.mean(0)) / (train.std(0) + 1e-6))


def test_knn_accuracies_share_one_search() -> None:
    g = torch.Generator().manual_seed(3)
    xtr, xte = torch.randn(300, 6, generator=g), torch.randn(80, 6, generator=g)
    labels = {"a": (xtr[:, 0] > 0).long(), "b": torch.randint(0, 5, (300,), generator=g)}
    tests = {"a": (xte[:, 0] > 0).long(), "b": torch.randint(0, 5, (80,), generator=g)}
    shared = knn_accuracies(xtr, labels, xte, tests, k=7)
    assert shared == {n: knn_accuracy(xtr, labels[n], xte, tests[n], k=7) for n in labels}
    assert shared["a"] > 0.8


def test_label_entropy_and_chance() -> None:
    assert label_entropy(torch.arange(5).repeat(20)) == pytest.approx(math.log(5))
    assert label_entropy(torch.zeros(10, dtype=torch.long)) == 0.0
    y = torch.tensor([0] * 60 + [1] * 40)
    assert not beats_chance(0.6, y) and not beats_chance(0.65, y) and beats_chance(0.8, y)
