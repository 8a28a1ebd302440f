"""Cheap representation probes on frozen features: feature extraction, linear probe, weighted kNN.

Used by `milan demo`, and as the building blocks of the evaluation recipes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from milan.errors import DataError

if TYPE_CHECKING:
    from milan.data.reading import BadFiles

__all__ = ["extract_features", "linear_probe", "knn_classify", "knn_accuracy", "remap_labels", "topk_accuracy"]


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
    from milan.data.reading import BadFiles, Checked, collate

    if limit is not None and limit < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(limit))
    if bad_files is None:
        bad_files = BadFiles()
        bad_files.expect(dataset)
    loader = DataLoader(Checked(dataset), batch_size=batch_size, num_workers=num_workers, shuffle=False,
                        collate_fn=collate)
    feats, labels = [], []
    batches = bad_files.track(loader)
    if desc is not None:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=desc, unit="batch", dynamic_ncols=True)
    for images, targets in batches:
        feats.append(encode(images.to(device)).float().cpu())
        labels.append(torch.as_tensor(targets))
    if not feats:
        raise DataError(f"none of the {len(dataset)} images could be read; check the data path")
    return torch.cat(feats), torch.cat(labels)


def linear_probe(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, *, epochs: int = 100,
    lr: float = 1e-2, batch_size: int = 1024, weight_decay: float = 0.0, seed: int = 0,
) -> float:
    """Top-1 accuracy of a linear classifier on standardised frozen features.

    Standardising with the training set's mean/std is BatchNorm1d(affine=False) folded into the
    data (MAE's linear-probe head); AdamW with a cosine schedule keeps it cheap on CPU.
    """
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    xtr, xte = (train_x - mean) / std, (test_x - mean) / std
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


def knn_classify(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, *, k: int = 20, temperature: float = 0.07,
    num_classes: int | None = None, chunk: int = 1024,
) -> Tensor:
    """Weighted kNN (cosine similarity, weights exp(sim / T), as in DINO/InstDisc): predicted labels."""
    num_classes = num_classes or int(train_y.max()) + 1
    train = F.normalize(train_x.float(), dim=1)
    k = min(k, len(train))
    preds = []
    for start in range(0, len(test_x), chunk):
        sims = F.normalize(test_x[start:start + chunk].float(), dim=1) @ train.T  # [b, Ntrain]
        top, idx = sims.topk(k, dim=1)
        weights = (top / temperature).exp()  # [b, k]
        votes = torch.zeros(len(top), num_classes).scatter_add_(1, train_y[idx], weights)
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, **kwargs) -> float:
    return float((knn_classify(train_x, train_y, test_x, **kwargs) == test_y).float().mean())


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
