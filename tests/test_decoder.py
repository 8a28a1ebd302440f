"""Tests for milan.decoder: the prompting decoder against eq. 2 written out, and MAE's decoder."""

from __future__ import annotations

import math

import pytest
import torch

from milan.decoder import MAEDecoder, PromptingBlock, PromptingDecoder, VisibleHead
from milan.encoder import MaskedViTEncoder
from milan.loss import feature_loss
from milan.masking import Mask, random_masking, semantic_masking

ENC_DIM, NUM_PATCHES, OUT_DIM = 24, 16, 10
SHAPE = dict(dim=32, depth=2, num_heads=4, mlp_ratio=2.0)


def _perturb_(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Make every parameter non-trivial (init leaves biases 0, LN weights 1, mask token tiny)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _mask(batch: int, seed: int = 0, ratio: float = 0.75) -> Mask:
    return random_masking(batch, NUM_PATCHES, ratio, generator=torch.Generator().manual_seed(seed))


def _decoder(cls=PromptingDecoder, seed: int = 0, dtype=torch.float32):
    dec = cls(encoder_dim=ENC_DIM, num_patches=NUM_PATCHES, out_dim=OUT_DIM, **SHAPE)
    _perturb_(dec, seed)
    return dec.to(dtype).eval()


# ---------------------------------------------------------------- eq. 2 written out


def _layer_norm(x, ln):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _linear(x, layer):
    return x @ layer.weight.T + layer.bias


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _reference_block(blk: PromptingBlock, x, z):
    """One prompting block for one image: x [M, D] mask tokens, z [P, D] prompts."""
    dim = x.shape[-1]
    heads = blk.attn.num_heads
    hd = dim // heads
    w, b = blk.attn.qkv.weight, blk.attn.qkv.bias
    wq, wk, wv = w[:dim], w[dim : 2 * dim], w[2 * dim :]
    bq, bk, bv = b[:dim], b[dim : 2 * dim], b[2 * dim :]
    xn = _layer_norm(x, blk.norm1)
    kv_in = torch.cat([z, xn], dim=0)  # prompts are NOT normalised
    q = xn @ wq.T + bq
    k = kv_in @ wk.T + bk
    v = kv_in @ wv.T + bv
    outs = []
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        logits = q[:, sl] @ k[:, sl].T / math.sqrt(hd)
        attn = torch.softmax(logits, dim=-1)
        outs.append(attn @ v[:, sl])
    x = x + _linear(torch.cat(outs, dim=-1), blk.attn.proj)
    hidden = _gelu(_linear(_layer_norm(x, blk.norm2), blk.mlp.fc1))
    return x + _linear(hidden, blk.mlp.fc2)


def _reference_prompting(dec: PromptingDecoder, latent, mask: Mask):
    batch = latent.shape[0]
    n = mask.num_patches
    pos = dec.pos_embed[0]  # [1+N, D]
    preds = []
    for b in range(batch):
        keep, masked = mask.keep[b], mask.masked[b]
        z = (
            _linear(latent[b], dec.embed)
            + pos[torch.cat([torch.zeros(1, dtype=torch.long), 1 + keep])]
        )
        x = dec.mask_token[0, 0] + pos[1 + masked]
        for blk in dec.blocks:
            x = _reference_block(blk, x, z)
        vis = _linear(_layer_norm(z, dec.norm), dec.head)  # [1+K, out]
        msk = _linear(_layer_norm(x, dec.norm), dec.head)  # [M, out]
        full = torch.empty(1 + n, vis.shape[-1], dtype=vis.dtype)
        full[0] = vis[0]
        full[1 + keep] = vis[1:]
        full[1 + masked] = msk
        preds.append(full)
    return torch.stack(preds)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("ratio", [0.75, 0.5])
def test_prompting_decoder_matches_eq2_reference(dtype, atol, ratio):
    dec = _decoder(seed=1, dtype=dtype)
    mask = _mask(3, seed=2, ratio=ratio)
    k = mask.num_keep
    latent = torch.randn(3, 1 + k, ENC_DIM, dtype=dtype)
    with torch.no_grad():
        out = dec(latent, mask)
        ref = _reference_prompting(dec, latent, mask)
    assert out.shape == (3, 1 + NUM_PATCHES, OUT_DIM)
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)


def test_prompting_decoder_with_semantic_mask_matches_reference():
    dec = _decoder(seed=3)
    importance = torch.rand(2, NUM_PATCHES) + 0.05
    mask = semantic_masking(importance, 0.75, generator=torch.Generator().manual_seed(4))
    latent = torch.randn(2, 1 + mask.num_keep, ENC_DIM)
    with torch.no_grad():
        torch.testing.assert_close(
            dec(latent, mask), _reference_prompting(dec, latent, mask), atol=1e-5, rtol=0
        )


def test_prompting_default_shape_is_mae_decoder_shape():
    dec = PromptingDecoder(encoder_dim=48, num_patches=4, out_dim=8)
    assert len(dec.blocks) == 8
    assert dec.embed.out_features == 512
    assert dec.blocks[0].attn.num_heads == 16
    assert dec.blocks[0].mlp.fc1.out_features == 2048


# ---------------------------------------------------------------- structural properties


def _visible_positions(mask: Mask):
    """[B, 1+K] indices into the 1+N predictions: CLS and the kept patches."""
    zeros = torch.zeros(mask.keep.shape[0], 1, dtype=torch.long)
    return torch.cat([zeros, 1 + mask.keep], dim=1)


def _take(pred, idx):
    return pred.gather(1, idx.unsqueeze(-1).expand(-1, -1, pred.shape[-1]))


def test_visible_predictions_ignore_mask_tokens():
    dec = _decoder(seed=5)
    mask = _mask(2, seed=6)
    latent = torch.randn(2, 1 + mask.num_keep, ENC_DIM)
    vis_idx = _visible_positions(mask)
    with torch.no_grad():
        base = dec(latent, mask)
        dec.mask_token.add_(torch.randn_like(dec.mask_token))
        other = dec(latent, mask)
        # perturb the pos-embed rows of positions masked in every image
        masked_everywhere = mask.is_masked().all(0).nonzero().flatten()
        assert masked_everywhere.numel() > 0
        rows = masked_everywhere + 1
        dec.pos_embed[:, rows] += torch.randn(1, rows.numel(), dec.pos_embed.shape[-1])
        third = dec(latent, mask)
    assert torch.equal(_take(base, vis_idx), _take(other, vis_idx))
    assert torch.equal(_take(base, vis_idx), _take(third, vis_idx))
    masked_idx = 1 + mask.masked
    assert not torch.allclose(_take(base, masked_idx), _take(other, masked_idx), atol=1e-4)


def test_mae_decoder_visible_predictions_depend_on_mask_tokens():
    dec = _decoder(MAEDecoder, seed=7)
    mask = _mask(2, seed=8)
    latent = torch.randn(2, 1 + mask.num_keep, ENC_DIM)
    vis_idx = _visible_positions(mask)
    with torch.no_grad():
        base = dec(latent, mask)
        dec.mask_token.add_(torch.randn_like(dec.mask_token))
        other = dec(latent, mask)
    assert base.shape == (2, 1 + NUM_PATCHES, OUT_DIM)
    assert not torch.allclose(_take(base, vis_idx), _take(other, vis_idx), atol=1e-4)


def test_mae_decoder_matches_full_sequence_reference():
    """MAE: visible tokens re-inserted at their patch positions, mask tokens elsewhere, + pos."""
    dec = _decoder(MAEDecoder, seed=9)
    mask = _mask(2, seed=10)
    latent = torch.randn(2, 1 + mask.num_keep, ENC_DIM)
    with torch.no_grad():
        emb = _linear(latent, dec.embed)
        seq = dec.mask_token.expand(2, 1 + NUM_PATCHES, -1).clone()
        for b in range(2):
            seq[b, 0] = emb[b, 0]
            seq[b, 1 + mask.keep[b]] = emb[b, 1:]
        seq = seq + dec.pos_embed
        for blk in dec.blocks:
            seq = blk(seq)
        ref = _linear(_layer_norm(seq, dec.norm), dec.head)
        torch.testing.assert_close(dec(latent, mask), ref, atol=1e-5, rtol=0)


def test_prompt_order_does_not_matter():
    dec = _decoder(seed=11)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 6, SHAPE["dim"], generator=g)
    prompts = torch.randn(2, 5, SHAPE["dim"], generator=g)
    perm = torch.tensor([3, 0, 4, 2, 1])
    with torch.no_grad():
        a, b = x, x
        for blk in dec.blocks:
            a = blk(a, prompts)
            b = blk(b, prompts[:, perm])
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        # and the prompts matter at all
        c = x
        for blk in dec.blocks:
            c = blk(c, prompts.flip(-1))
        assert not torch.allclose(a, c, atol=1e-4)


def test_mask_tokens_are_permutation_equivariant():
    dec = _decoder(seed=13)
    g = torch.Generator().manual_seed(14)
    x = torch.randn(2, 6, SHAPE["dim"], generator=g)
    prompts = torch.randn(2, 5, SHAPE["dim"], generator=g)
    perm = torch.tensor([5, 2, 0, 1, 4, 3])
    with torch.no_grad():
        a, b = x, x[:, perm]
        for blk in dec.blocks:
            a = blk(a, prompts)
            b = blk(b, prompts)
    torch.testing.assert_close(a[:, perm], b, atol=1e-5, rtol=1e-5)


def test_every_block_reads_the_same_fixed_prompts():
    """Z = embed(latent) + pos is computed once; each block gets that very tensor, never an update."""
    dec = PromptingDecoder(encoder_dim=ENC_DIM, num_patches=NUM_PATCHES, out_dim=OUT_DIM, **SHAPE)
    mask = _mask(2, seed=15)
    latent = torch.randn(2, 1 + mask.num_keep, ENC_DIM)
    seen: list[torch.Tensor] = []
    hooks = [blk.register_forward_pre_hook(lambda _m, args: seen.append(args[1])) for blk in dec.blocks]
    with torch.no_grad():
        dec(latent, mask)
    for h in hooks:
        h.remove()
    pos = dec.pos_embed.expand(2, -1, -1)
    expected = _linear(latent, dec.embed) + torch.cat([pos[:, :1], _take(pos, 1 + mask.keep)], dim=1)
    assert len(seen) == SHAPE["depth"] >= 2
    assert all(z is seen[0] for z in seen)
    torch.testing.assert_close(seen[0], expected)


def test_q_and_kv_rows_are_initialised_as_separate_projections():
    """xavier bounds of the authors' separate q [D, D] and kv [2D, D] layers, not of one [3D, D]."""
    torch.manual_seed(0)
    dim = 256
    dec = PromptingDecoder(encoder_dim=ENC_DIM, num_patches=NUM_PATCHES, out_dim=OUT_DIM, dim=dim, depth=1,
                           num_heads=4)
    w_q, w_kv = dec.blocks[0].attn.qkv.weight.detach().split([dim, 2 * dim])
    for w, fan_out in ((w_q, dim), (w_kv, 2 * dim)):
        bound = math.sqrt(6 / (dim + fan_out))
        assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.02 * bound


def test_prompts_reach_masked_outputs_through_attention():
    """Gradient of masked outputs w.r.t. the prompts exists (K/V path)."""
    dec = _decoder(seed=15)
    x = torch.randn(1, 4, SHAPE["dim"])
    prompts = torch.randn(1, 3, SHAPE["dim"], requires_grad=True)
    out = x
    for blk in dec.blocks:
        out = blk(out, prompts)
    out.sum().backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0


def test_gradients_reach_encoder_through_prompts():
    enc = MaskedViTEncoder(img_size=16, patch_size=4, embed_dim=ENC_DIM, depth=1, num_heads=2)
    dec = PromptingDecoder(encoder_dim=ENC_DIM, num_patches=NUM_PATCHES, out_dim=OUT_DIM, **SHAPE)
    mask = _mask(2, seed=16)
    images = torch.randn(2, 3, 16, 16)
    targets = torch.randn(2, 1 + NUM_PATCHES, OUT_DIM)
    pred = dec(enc(images, mask.keep), mask)
    masked_idx = 1 + mask.masked
    loss = feature_loss(_take(pred, masked_idx), _take(targets, masked_idx))  # masked only
    loss.backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
    assert dec.embed.weight.grad.abs().sum() > 0


def test_visible_head_shape_and_values():
    head = VisibleHead(encoder_dim=ENC_DIM, num_patches=NUM_PATCHES, out_dim=OUT_DIM)
    mask = _mask(3, seed=17)
    latent = torch.randn(3, 1 + mask.num_keep, ENC_DIM)
    out = head(latent, mask)
    assert out.shape == (3, 1 + mask.num_keep, OUT_DIM)
    torch.testing.assert_close(out, _linear(latent, head.head))


def test_decoder_argument_validation():
    with pytest.raises(ValueError):
        PromptingDecoder(encoder_dim=8, num_patches=15, out_dim=4, dim=16, depth=1, num_heads=2)
    with pytest.raises(ValueError):
        PromptingDecoder(encoder_dim=8, num_patches=16, out_dim=4, dim=18, depth=1, num_heads=4)


@pytest.mark.parametrize("cls", [PromptingDecoder, MAEDecoder])
def test_decoder_pos_embed_is_fixed_and_all_params_get_grads(cls):
    dec = cls(encoder_dim=ENC_DIM, num_patches=NUM_PATCHES, out_dim=OUT_DIM, **SHAPE)
    assert "pos_embed" not in dict(dec.named_parameters())
    assert dec.pos_embed.shape == (1, 1 + NUM_PATCHES, SHAPE["dim"])
    mask = _mask(2, seed=18)
    dec(torch.randn(2, 1 + mask.num_keep, ENC_DIM), mask).pow(2).mean().backward()
    for name, p in dec.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def _closed_form_flops(
    kind: str, *, enc: int, n: int, k: int, dim: int, depth: int, out: int, mlp: float
) -> int:
    """2 * multiply-adds of the linear layers and both attention matmuls of one forward."""
    m = n - k
    hidden = int(dim * mlp)
    embed = 2 * (1 + k) * enc * dim
    head = 2 * (1 + n) * dim * out
    t = 1 + n  # MAE: all tokens; prompting: the 1 + K prompts plus the M mask tokens
    if kind == "mae":
        layer = 2 * t * dim * 3 * dim + 2 * t * dim * dim + 2 * 2 * t * dim * hidden
        layer += 2 * 2 * t * t * dim
    else:  # queries and FFN on the M mask tokens; keys/values on 1 + K prompts + M tokens
        layer = 2 * m * dim * dim + 2 * t * dim * 2 * dim + 2 * m * dim * dim
        layer += 2 * 2 * m * dim * hidden + 2 * 2 * m * t * dim
    return embed + depth * layer + head


@pytest.mark.parametrize("kind", ["prompting", "mae"])
def test_decoder_flops_match_closed_form(kind):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cls = PromptingDecoder if kind == "prompting" else MAEDecoder
    with torch.device("meta"):
        dec = cls(encoder_dim=ENC_DIM, num_patches=NUM_PATCHES, out_dim=OUT_DIM, **SHAPE)
        mask = random_masking(2, NUM_PATCHES, 0.75, device="meta")
        latent = torch.randn(2, 1 + mask.num_keep, ENC_DIM)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        dec(latent, mask)
    expected = 2 * _closed_form_flops(
        kind,
        enc=ENC_DIM,
        n=NUM_PATCHES,
        k=mask.num_keep,
        dim=SHAPE["dim"],
        depth=SHAPE["depth"],
        out=OUT_DIM,
        mlp=SHAPE["mlp_ratio"],
    )
    assert fc.get_total_flops() == expected
