"""FLOPs of one prompting-decoder forward vs one MAE-decoder forward (paper section 2.3).

The paper says the prompting decoder "reduces the decoding computation cost by 20% compared
to MAE" at the default 75 % masking ratio. This script counts the FLOPs of one forward of each
decoder with `torch.utils.flop_counter.FlopCounterMode` (matmuls, linear layers and the
scaled-dot-product attention kernels are counted; norms, GELU and softmax are not, as usual)
and prints a markdown table.

Defaults are the ViT-B setting: encoder width 768, 224 px / 16 px patches (N = 196), decoder
512 wide, 8 blocks, 16 heads, MLP ratio 4, CLIP B/16 target width 512. Tensors live on the
`meta` device by default, so nothing is computed and any batch size is instant; use
`--device cpu` to count on real tensors instead (same numbers: attention is forced onto the
math SDPA backend while counting, see `count_flops`).

    python benchmarks/decoder_flops.py                      # batch 1, 75 % masking
    python benchmarks/decoder_flops.py --batch 8 --mask-ratio 0.75 --device cpu
"""

from __future__ import annotations

import argparse

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from milan.decoder import MAEDecoder, PromptingDecoder
from milan.masking import num_visible, random_masking


def count_flops(module: torch.nn.Module, *args) -> int:
    # The math SDPA backend runs attention as bmm's, which FlopCounterMode always counts; the
    # fused CPU kernel (_scaled_dot_product_flash_attention_for_cpu) is not counted at all in
    # torch 2.x, which would silently drop the attention FLOPs on --device cpu.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        module(*args)
    return counter.get_total_flops()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--num-patches", type=int, default=196)
    parser.add_argument("--encoder-dim", type=int, default=768)
    parser.add_argument("--target-dim", type=int, default=512)
    parser.add_argument("--decoder-dim", type=int, default=512)
    parser.add_argument("--decoder-depth", type=int, default=8)
    parser.add_argument("--decoder-heads", type=int, default=16)
    parser.add_argument("--device", default="meta", help="meta (no compute) or cpu/cuda")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    shape = dict(
        encoder_dim=args.encoder_dim,
        num_patches=args.num_patches,
        out_dim=args.target_dim,
        dim=args.decoder_dim,
        depth=args.decoder_depth,
        num_heads=args.decoder_heads,
    )
    with device:
        prompting = PromptingDecoder(**shape).eval()
        mae = MAEDecoder(**shape).eval()
        mask = random_masking(args.batch, args.num_patches, args.mask_ratio, device=device)
        keep = num_visible(args.num_patches, args.mask_ratio)
        latent = torch.randn(args.batch, 1 + keep, args.encoder_dim)

    flops = {
        "prompting": count_flops(prompting, latent, mask),
        "mae": count_flops(mae, latent, mask),
    }
    ratio = flops["prompting"] / flops["mae"]

    print(
        f"decoder {args.decoder_dim}x{args.decoder_depth}x{args.decoder_heads}, "
        f"encoder dim {args.encoder_dim}, N={args.num_patches}, visible K={keep}, "
        f"mask ratio {args.mask_ratio}, target dim {args.target_dim}, batch {args.batch}, "
        f"device {args.device}\n"
    )
    print("| decoder | GFLOPs / forward | GFLOPs / image |")
    print("|---|---:|---:|")
    for name, label in [("prompting", "PromptingDecoder (MILAN)"), ("mae", "MAEDecoder (MAE)")]:
        print(f"| {label} | {flops[name] / 1e9:.3f} | {flops[name] / 1e9 / args.batch:.3f} |")
    print(f"| ratio prompting / MAE | {ratio:.3f} | {ratio:.3f} |")
    return {
        "prompting_gflops": flops["prompting"] / 1e9,
        "mae_gflops": flops["mae"] / 1e9,
        "ratio": ratio,
    }


if __name__ == "__main__":
    main()
