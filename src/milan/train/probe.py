"""Cheap representation probes on frozen features: feature extraction, linear probe, weighted kNN.

Used by `milan demo`, and as the building blocks of the evaluation recipes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from milan.data import loader_workers
from milan.data.reading import BadFiles, Checked, collate
from milan.errors import DataError

__all__ = [
    "extract_features", "standardise", "LinearFit", "fit_linear", "linear_probe", "linear_probes",
    "knn_neighbours", "knn_classify", "knn_accuracy", "knn_accuracies", "remap_labels", "topk_accuracy",
    "label_entropy", "beats_chance",
]


@torch.no_grad()
def extract_features(
    encode: Callable[[Tensor], Tensor], dataset: Dataset, *, batch_size: int = 256,
    num_workers: int = 0, device: torch.device | str = "cpu", limit: int | None = None,
    desc: str | None = None, bad_files: BadFiles | None = None,
) -> tuple[Tensor, Tensor]:
    """Run `encode` (images → `[B, D]`) over a dataset of (image, label); returns features, labels.

    Unreadable images are left out, features and labels alike, and reported to `bad_files` (the
    run's `milan.data.reading.BadFiles`: one warning per file, its threshold checked after each
    batch; by default a registry of this call alone). With `desc`, a progress bar of that name is shown.
    """
    if limit is not None and limit < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(limit))
    if bad_files is None:
        bad_files = BadFiles()
        bad_files.expect(dataset)
    loader = DataLoader(Checked(dataset), batch_size=batch_size, num_workers=loader_workers(num_workers), shuffle=False,
                        collate_fn=collate)
    feats, labels = [], []
    batches = bad_files.track(loader)
    if desc is not None:
        batches = tqdm(batches, desc=desc, unit="batch", dynamic_ncols=True)
    for images, targets in batches:
        feats.append(encode(images.to(device)).float().cpu())
        labels.append(torch.as_tensor(targets))
    if not feats:
        raise DataError(f"none of the {len(dataset)} images could be read; check the data path")
    return torch.cat(feats), torch.cat(labels)


def standardise(train_x: Tensor, *others: Tensor, eps: float = 1e-6) -> tuple[Tensor, ...]:
    """`(x - mean) / (std + eps)` with the training set's statistics, for it and each of `others`.

    This is BatchNorm1d(affine=False) folded into the data (MAE's linear-probe head).
    """
    mean, std = train_x.mean(0), train_x.std(0) + eps
    return tuple((x - mean) / std for x in (train_x, *others))


@dataclass
class LinearFit:
    """A linear classifier `x @ weight.T + bias` and how its solve went."""

    weight: Tensor  # [C, D]
    bias: Tensor  # [C]
    loss: float  # mean training cross-entropy at the solution (without the L2 term)
    iterations: int  # L-BFGS iterations used
    converged: bool  # stopped on the gradient / change tolerance, not on max_iter


def fit_linear(
    x: Tensor, targets: Sequence[Tensor], num_classes: Sequence[int], *, l2: float = 1e-4,
    max_iter: int = 1000, tol: float = 1e-5,
) -> list[LinearFit]:
    """Multinomial logistic regression per label set, solved jointly by full-batch L-BFGS.

    Minimises, for each `targets[k]` (with `num_classes[k]` classes), mean cross-entropy
    + `l2`/2 · |W_k|² (biases unpenalised) on the same features `x` [N, D] (standardise them first).
    The heads share no parameters, so one solve of the summed objective is the separate solves at
    once: the features are read once per iteration for every label. Deterministic (zero start,
    strong-Wolfe line search); no learning rate, epochs or batch size to tune.
    """
    x = x.float()
    sizes = [int(c) for c in num_classes]
    # Solve in whitened coordinates, W = P W' with P = V (Λ + l2)^-1/2 from the feature covariance
    # V Λ V^T, the penalty still on W: the same minimum, but the objective's curvature (~Λ + l2) is
    # made ~1 in every direction. Frozen features are strongly correlated (condition numbers ~1e6);
    # this cuts L-BFGS's iterations several-fold. Directions without variance (Λ ≈ 0) get no weight,
    # as in the unwhitened solve.
    centred = x - x.mean(0)
    ev, vecs = torch.linalg.eigh((centred.T.double() @ centred.double()) / len(x))
    keep = ev > ev.max() * 1e-10
    ev, vecs = ev[keep], vecs[:, keep]
    proj = (vecs / (ev + l2).sqrt()).to(x.dtype)  # P [D, R]
    inv_ev = (1 / (ev + l2)).to(x.dtype)[:, None]  # P^T P: the penalty on W in W' coordinates
    x = x @ proj  # [N, R]
    weight = torch.zeros(x.shape[1], sum(sizes), dtype=x.dtype, device=x.device)
    bias = torch.zeros(sum(sizes), dtype=x.dtype, device=x.device)
    bounds = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    targets = [t.to(x.device).long() for t in targets]
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=tol,
                            tolerance_change=tol * 1e-2, line_search_fn="strong_wolfe")
    n = len(x)

    def objective(grad: bool) -> tuple[Tensor, list[Tensor]]:
        # cross-entropy and its gradient by hand: (softmax - onehot) / N per head; this is several
        # times faster on CPU than autograd through F.cross_entropy for a few classes per head
        with torch.no_grad():
            logits = torch.addmm(bias, x, weight)  # [N, sum C]
            ce, g = [], torch.empty_like(logits) if grad else None
            for lo, hi, t in zip(bounds, bounds[1:], targets):
                z = logits[:, lo:hi]
                lse = z.logsumexp(1, keepdim=True)
                ce.append((lse[:, 0] - z.gather(1, t[:, None])[:, 0]).mean())
                if grad:
                    p = (z - lse).exp_()
                    p[torch.arange(n, device=x.device), t] -= 1
                    g[:, lo:hi] = p.div_(n)
            loss = torch.stack(ce).sum() + 0.5 * l2 * (weight.pow(2) * inv_ev).sum()
            if grad:
                weight.grad = torch.addmm(weight * inv_ev, x.T, g, beta=l2)
                bias.grad = g.sum(0)
        return loss, ce

    def closure() -> Tensor:
        return objective(grad=True)[0]

    opt.step(closure)
    iterations = int(opt.state[opt.param_groups[0]["params"][0]].get("n_iter", 0))
    final = [float(c) for c in objective(grad=False)[1]]  # at the solution (not a line-search probe)
    w, b = proj @ weight, bias  # back to the caller's coordinates: [D, sum C]
    return [LinearFit(w[:, lo:hi].T.contiguous(), b[lo:hi].clone(), loss, iterations, iterations < max_iter)
            for lo, hi, loss in zip(bounds, bounds[1:], final)]


def linear_probes(
    train_x: Tensor, train_ys: Mapping[str, Tensor], test_x: Tensor, test_ys: Mapping[str, Tensor], *,
    l2: float = 1e-4, max_iter: int = 1000,
) -> dict[str, float]:
    """Top-1 accuracy of a linear classifier per label set, on standardised frozen features.

    One standardisation and one joint L-BFGS solve (`fit_linear`) serve every label set.
    """
    xtr, xte = standardise(train_x.float(), test_x.float())
    names = list(train_ys)
    sizes = [int(max(train_ys[n].max(), test_ys[n].max())) + 1 for n in names]
    fits = fit_linear(xtr, [train_ys[n] for n in names], sizes, l2=l2, max_iter=max_iter)
    return {n: float(((xte @ f.weight.T + f.bias).argmax(1) == test_ys[n]).float().mean())
            for n, f in zip(names, fits)}


def linear_probe(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, *, solver: str = "adamw",
    epochs: int = 100, lr: float = 1e-2, batch_size: int = 1024, weight_decay: float = 0.0, seed: int = 0,
    l2: float = 1e-4,
) -> float:
    """Top-1 accuracy of a linear classifier on standardised frozen features.

    `solver="lbfgs"`: the converged L2-regularised solution (`fit_linear`, `l2`). `solver="adamw"`:
    `epochs` of AdamW with a cosine schedule (`lr`, `batch_size`, `weight_decay`, `seed`).
    """
    if solver == "lbfgs":
        return linear_probes(train_x, {"y": train_y}, test_x, {"y": test_y}, l2=l2)["y"]
    if solver != "adamw":
        raise ValueError(f"solver={solver!r}: use 'lbfgs' or 'adamw'")
    xtr, xte = standardise(train_x, test_x)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(xtr.shape[1], num_classes)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=g)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, len(xtr) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    for _ in range(epochs):
        order = torch.randperm(len(xtr), generator=g)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size: (i + 1) * batch_size]
            loss = F.cross_entropy(head(xtr[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return float((head(xte).argmax(1) == test_y).float().mean())


def knn_neighbours(train_x: Tensor, test_x: Tensor, *, k: int = 20, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Cosine similarities and indices of each test row's `k` nearest training rows: `[M, k]` each.

    Label-free, so one search serves every label set (`knn_accuracies`).
    """
    train = F.normalize(train_x.float(), dim=1)
    k = min(k, len(train))
    sims, idx = [], []
    for start in range(0, len(test_x), chunk):
        top, ind = (F.normalize(test_x[start:start + chunk].float(), dim=1) @ train.T).topk(k, dim=1)
        sims.append(top)
        idx.append(ind)
    return torch.cat(sims), torch.cat(idx)


def _knn_vote(sims: Tensor, idx: Tensor, train_y: Tensor, num_classes: int, temperature: float) -> Tensor:
    weights = (sims / temperature).exp()  # [M, k]
    votes = torch.zeros(len(sims), num_classes, dtype=weights.dtype).scatter_add_(1, train_y[idx], weights)
    return votes.argmax(1)


def knn_classify(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, *, k: int = 20, temperature: float = 0.07,
    num_classes: int | None = None, chunk: int = 1024,
) -> Tensor:
    """Weighted kNN (cosine similarity, weights exp(sim / T), as in DINO/InstDisc): predicted labels."""
    num_classes = num_classes or int(train_y.max()) + 1
    sims, idx = knn_neighbours(train_x, test_x, k=k, chunk=chunk)
    return _knn_vote(sims, idx, train_y, num_classes, temperature)


def knn_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, **kwargs) -> float:
    return float((knn_classify(train_x, train_y, test_x, **kwargs) == test_y).float().mean())


def knn_accuracies(
    train_x: Tensor, train_ys: Mapping[str, Tensor], test_x: Tensor, test_ys: Mapping[str, Tensor], *,
    k: int = 20, temperature: float = 0.07,
) -> dict[str, float]:
    """`knn_accuracy` for several label sets from one neighbour search."""
    sims, idx = knn_neighbours(train_x, test_x, k=k)
    return {n: float((_knn_vote(sims, idx, train_ys[n], int(train_ys[n].max()) + 1, temperature)
                      == test_ys[n]).float().mean()) for n in train_ys}


def label_entropy(labels: Tensor) -> float:
    """Entropy (nats) of the label frequencies: the cross-entropy of a classifier that learned nothing
    but the class prior (`ln C` for balanced classes)."""
    p = torch.bincount(labels.long()).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def beats_chance(top1: float, labels: Tensor) -> bool:
    """Whether `top1` on `labels` is clearly above always guessing the most frequent class: by more
    than two binomial standard deviations of that guess's accuracy on this many images."""
    p = float(torch.bincount(labels.long()).max()) / max(1, len(labels))
    return top1 > p + 2 * math.sqrt(max(p * (1 - p), 1e-12) / max(1, len(labels)))


def remap_labels(labels: Tensor, classes: list[str], onto: list[str]) -> Tensor:
    """Re-index `labels` (indices into `classes`) as indices into `onto`, matching class names.

    ImageFolder numbers the classes present in each split, so a val split that lacks some
    training classes would otherwise be scored against the wrong ones.
    """
    if classes == onto:
        return labels
    index = {name: i for i, name in enumerate(onto)}
    unknown = [c for c in classes if c not in index]
    if unknown:
        raise DataError(f"val classes not in the training set: {', '.join(unknown[:5])}; "
                        "the val folder's class folders must be a subset of train's")
    return torch.tensor([index[c] for c in classes], dtype=torch.long)[labels]


def topk_accuracy(logits: Tensor, targets: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """Fraction of rows whose target is among the top-k logits, for each k (k clipped to #classes)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # [B, kmax]
    hits = top == targets[:, None]
    return [float(hits[:, :k].any(1).float().mean()) for k in ks]
