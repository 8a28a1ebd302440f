"""Bytes a MILAN pretraining step keeps for backward, per image, with and without activation checkpointing.

    python benchmarks/memory.py                      # ViT-B/16 + CLIP B/16, ViT-L/16 + CLIP L/14
    python benchmarks/memory.py --models base --batch 1 2

A measurement on the CPU (random weights, the real model sizes), not a GPU run. What is counted:

- student: the storages autograd saves during the forward of encoder + prompting decoder + eq. 1
  (`torch.autograd.graph.saved_tensors_hooks`, unique storages, parameters left out: they are counted
  as weights), at two batch sizes; per image = the difference, per step = what is left (under
  autocast: the bf16 copies of the weights). Checkpointed blocks keep their inputs (counted by the
  same hook) and recompute their activations in backward one block at a time: the largest block's
  saved bytes are added back as "recompute".
- the teacher (CLIP visual tower, random weights via `open_clip.create_model`): it runs under
  no_grad before the student's forward and saves nothing; its peak of live tensors during the
  forward is tracked op by op (a dispatch mode), in fp32 on the CPU; in bf16 on a GPU its weights
  and activations are all bf16, half of that. Its output tokens are the targets, counted in the
  student's saved bytes.

`--precision bf16` runs the student under CPU bf16 autocast (CPU autocast's op lists are close to
CUDA's: matmuls in bf16, norms and softmax in fp32); `fp32` without autocast.
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from milan.masking import random_masking
from milan.model import build_model

MODELS = {  # student name → (open_clip teacher, teacher token width, teacher input size for a 14×14 grid)
    "base": ("milan_vit_base_patch16", "ViT-B-16", 512, 224),
    "large": ("milan_vit_large_patch16", "ViT-L-14", 768, 196),
}


def saved_bytes(run: Callable[[], torch.Tensor], exclude: set[int]) -> int:
    """Bytes of the unique storages autograd saves while `run()` records (storages in `exclude` left out)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in exclude:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    del out
    return sum(storages.values())


class PeakLive(TorchDispatchMode):
    """The peak bytes of tensors that ops create and that are still alive, op by op (storages in
    `exclude` left out: the weights, which views such as `weight.t()` return)."""

    def __init__(self, exclude: set[int]) -> None:
        super().__init__()
        self.exclude = exclude
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                if s.data_ptr() in self.exclude:
                    continue
                self.live.setdefault(s.data_ptr(), (StorageWeakRef(s), s.nbytes()))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


@dataclass
class Student:
    params: int
    per_image: dict[bool, int]  # checkpointing → bytes saved per image
    per_step: dict[bool, int]
    recompute: int  # per image: the largest block's saved bytes, live while it is recomputed


def measure_student(name: str, target_dim: int, batches: tuple[int, int], *, amp: bool) -> Student:
    torch.manual_seed(0)
    model = build_model(name, target_dim=target_dim).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    num_patches, tokens = model.num_patches, 1 + model.num_patches
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp)

    def step(batch: int) -> Callable[[], torch.Tensor]:
        images = torch.randn(batch, 3, 224, 224)
        targets = torch.randn(batch, tokens, target_dim)  # the teacher's tokens
        mask = random_masking(batch, num_patches, 0.75, generator=torch.Generator().manual_seed(0))

        def run() -> torch.Tensor:
            with autocast:
                return model(images, mask, targets).loss
        return run

    per_image, per_step = {}, {}
    for ckpt in (False, True):
        model.set_grad_checkpointing(ckpt)
        small, big = (saved_bytes(step(b), params) for b in batches)
        per_image[ckpt] = (big - small) // (batches[1] - batches[0])
        per_step[ckpt] = small - per_image[ckpt] * batches[0]
        gc.collect()
    # one block of each kind, alone, without checkpointing: what a recomputation holds at once
    model.set_grad_checkpointing(False)
    visible = int(num_patches * 0.25)
    enc_dim, dec_dim = model.encoder.embed_dim, model.decoder.embed.out_features

    def block_bytes(batch: int) -> int:
        enc_in = torch.randn(batch, 1 + visible, enc_dim, requires_grad=True)
        dec_x = torch.randn(batch, num_patches - visible, dec_dim, requires_grad=True)
        prompts = torch.randn(batch, 1 + visible, dec_dim, requires_grad=True)

        def enc_block() -> torch.Tensor:
            with autocast:
                return model.encoder.blocks[0](enc_in)

        def dec_block() -> torch.Tensor:
            with autocast:
                return model.decoder.blocks[0](dec_x, prompts)
        return max(saved_bytes(enc_block, params), saved_bytes(dec_block, params))
    recompute = (block_bytes(batches[1]) - block_bytes(batches[0])) // (batches[1] - batches[0])
    return Student(sum(p.numel() for p in model.parameters()), per_image, per_step, recompute)


def measure_teacher(arch: str, img_size: int, batch: int) -> tuple[int, int]:
    """(visual-tower parameters, peak live bytes per image of a no_grad fp32 forward)."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None, force_image_size=img_size).visual.eval()
    params = sum(p.numel() for p in model.parameters())
    images = torch.randn(batch, 3, img_size, img_size)
    with torch.no_grad(), PeakLive({p.untyped_storage().data_ptr() for p in model.parameters()}) as mode:
        model(images)
    return params, mode.peak // batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", nargs=2, type=int, default=(1, 2), help="the two batch sizes measured")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="GPU memory, 10^9 bytes")
    parser.add_argument("--headroom", type=float, default=0.10, help="fraction of the GPU left free")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mib = 2**20
    usable = args.gpu_gb * 1e9 * (1 - args.headroom)
    print(f"saved-for-backward bytes on CPU (torch {torch.__version__}), batches {args.batch[0]} and {args.batch[1]}; "
          f"GPU budget {args.gpu_gb:g} GB − {args.headroom:.0%} = {usable / 1e9:.1f} GB")
    print("| student | teacher | autocast | ckpt | student MiB/img | recompute MiB/img | per-step MiB | "
          "teacher peak MiB/img (bf16) | static GB | max batch / GPU |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for key in args.models:
        name, arch, target_dim, teacher_px = MODELS[key]
        t_params, t_peak_fp32 = measure_teacher(arch, teacher_px, args.batch[1])
        t_peak = t_peak_fp32 // 2  # bf16 weights and activations on the GPU
        for precision in args.precision:
            s = measure_student(name, target_dim, tuple(args.batch), amp=precision == "bf16")
            # fp32 weights, fp32 grads, AdamW exp_avg + exp_avg_sq (fp32): 16 B / student param; bf16 teacher
            static = 16 * s.params + 2 * t_params
            for ckpt in (False, True):
                image = 3 * 224 * 224 * 4  # the fp32 input batch
                student = s.per_image[ckpt] + (s.recompute if ckpt else 0) + image
                # the teacher's forward ends before the student's begins: the larger of the two peaks
                per_image = max(student, t_peak + image)
                batch = int((usable - static - s.per_step[ckpt]) // per_image)
                print(f"| {name} | {arch} | {precision} | {'yes' if ckpt else 'no'} | {s.per_image[ckpt] / mib:.1f} | "
                      f"{(s.recompute if ckpt else 0) / mib:.1f} | {s.per_step[ckpt] / mib:.0f} | {t_peak / mib:.1f} | "
                      f"{static / 1e9:.2f} | {batch} |", flush=True)
        print(f"<!-- {name}: {s.params / 1e6:.1f}M student params, {arch} visual {t_params / 1e6:.1f}M params -->")


if __name__ == "__main__":
    main()
