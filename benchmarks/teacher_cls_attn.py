"""Cost of the teacher's CLS attention (eq. 3) on CPU: CLS query row vs the full attention matrix.

ViT-B-16 from open_clip with random weights. Variants, all under no_grad in eval mode:
  library     open_clip's own forward (pooled output only): the floor
  tokens      embed, all blocks fused, ln_post + proj on all tokens: what targets alone cost
  teacher     milan's teacher: tokens + cls_attn from the CLS query row (last block stays fused)
  need_wts    tokens + cls_attn from nn.MultiheadAttention(need_weights=True) on the last block

Rounds are interleaved so load on a shared machine hits all variants alike; medians are reported.

    python benchmarks/teacher_cls_attn.py [--batch 8] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import open_clip
import torch
from torch import Tensor, nn

from milan.teacher import OpenCLIPTeacher


def tokens_only(visual: nn.Module, x: Tensor) -> Tensor:
    x = visual._embeds(x)
    x = visual.transformer(x)
    return visual.ln_post(x) @ visual.proj


def need_weights(visual: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    x = visual._embeds(x)
    *blocks, last = visual.transformer.resblocks
    for block in blocks:
        x = block(x)
    h = last.ln_1(x)
    out, weights = last.attn(h, h, h, need_weights=True, average_attn_weights=True)  # [B, L, L]
    x = x + last.ls_1(out)
    x = x + last.ls_2(last.mlp(last.ln_2(x)))
    return visual.ln_post(x) @ visual.proj, weights[:, 0, 1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    visual = open_clip.create_model("ViT-B-16", pretrained=None).visual.eval()
    teacher = OpenCLIPTeacher(visual)
    x = torch.randn(args.batch, 3, 224, 224)
    variants: dict[str, Callable[[], object]] = {
        "library": lambda: visual(x),
        "tokens": lambda: tokens_only(visual, x),
        "teacher": lambda: teacher._tokens_and_attn(x),
        "need_wts": lambda: need_weights(visual, x),
    }

    with torch.no_grad():
        tokens, attn = teacher._tokens_and_attn(x)
        ref_tokens, ref_attn = need_weights(visual, x)
        torch.testing.assert_close(tokens, ref_tokens, atol=1e-4, rtol=0)
        torch.testing.assert_close(attn, ref_attn, atol=1e-5, rtol=0)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)

    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(
        f"ViT-B-16, batch {args.batch}, 224 px, CPU {args.threads} threads, "
        f"median of {args.repeats} (torch {torch.__version__})\n"
    )
    print("| variant | median ms | vs tokens |")
    print("|---|---:|---:|")
    for name, ms in med.items():
        print(f"| {name} | {ms:.0f} | {ms / med['tokens'] - 1:+.1%} |")


if __name__ == "__main__":
    main()
