"""The pretrain_shapes loader alone (the demo's input path: 64-px PNGs, 1 worker, batch 128): the reference
transform (float32 in the worker) against the uint8 path (normalised after the loader), alternating
rounds in one process; images/s per round (10 batches after worker start-up) and the per-round ratio.

    PYTHONPATH=src python benchmarks/shapes_loader.py     # ≈ 30 s; the shapes cache (generated on first use)
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.data import DataLoader

from milan.data import build_dataset
from milan.data.fast import pretrain_input, to_device
from milan.data.reading import Samples, collate
from milan.data.sampler import EpochSampler
from milan.data.transforms import pretrain_transform


def main(rounds: int = 4, batches: int = 10, batch_size: int = 128) -> dict[str, list[float]]:
    torch.set_num_threads(2)
    kw = dict(scale=(1.0, 1.0), hflip=False)  # the pretrain_shapes preset
    paths = {"reference": pretrain_transform(64, output="float", **kw), "uint8": pretrain_input(64, **kw)}
    rates: dict[str, list[float]] = {k: [] for k in paths}
    for r in range(rounds):
        for name, transform in paths.items():
            dataset = build_dataset("shapes", None, transform=transform)
            sampler = EpochSampler(len(dataset), seed=0, batch_size=batch_size)
            sampler.set_epoch(r)
            loader = DataLoader(Samples(dataset, seed=0), batch_size=batch_size, sampler=sampler, num_workers=1,
                                drop_last=True, collate_fn=collate)
            batches_in = iter(loader)
            next(batches_in)  # worker start-up is not counted
            start = time.perf_counter()
            for _ in range(batches):
                to_device(next(batches_in)[0], torch.device("cpu"))
            rates[name].append(batches * batch_size / (time.perf_counter() - start))
            del batches_in
    for name, values in rates.items():
        print(f"{name}: median {statistics.median(values):.0f} images/s, rounds {[round(v) for v in values]}")
    print("uint8 / reference per round:", [round(b / a, 2) for a, b in zip(rates["reference"], rates["uint8"])])
    return rates


if __name__ == "__main__":
    main()
