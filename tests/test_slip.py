"""`slip:<model>`: checkpoints laid out as SLIP's `main.py` saves them (Table 5 #9's teacher).

The checkpoint is written here as SLIP writes it: the image tower built with timm as SLIP's
models.py does (`vit_small_mocov3_patch16_224` = timm's ViT-S with 12 heads, `num_classes=0`),
random weights, under `module.visual.*`; `module.image_projection`; text-tower, `image_mlp` and
`logit_scale` keys (the text tower at a small width: the loader ignores it); and the `epoch`,
`optimizer`, `scaler`, `best_acc1` and `args` (an `argparse.Namespace`) entries beside it.
Tokens and cls_attn are compared with the tower's forward written out below with plain tensor
ops (patch conv, pre-norm blocks with explicit softmax attention, final norm, projection).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.data.constants import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)

import milan
from _evil import Evil
from _pretrain_cli import pretrain_args
from milan.errors import TeacherError
from milan.io.safe_load import read_torch_file
from milan.tools.cli import main as cli

HEADS, WIDTH, EMBED, DEPTH = 12, 384, 512, 12  # SLIP's ViT-S/16 (MoCo v3's: 12 heads of 32)


def _slip_state(*, seed: int = 0) -> dict[str, torch.Tensor]:
    """The DDP state dict of SLIP_VITS16 with random weights (text tower shrunk)."""
    torch.manual_seed(seed)
    visual = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, num_heads=HEADS)
    with torch.no_grad():  # every norm and bias away from its init, so a skipped one shows
        for p in visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = {f"module.visual.{k}": v.clone() for k, v in visual.state_dict().items()}
    state["module.image_projection"] = torch.randn(WIDTH, EMBED) * WIDTH**-0.5
    state["module.text_projection"] = torch.randn(32, EMBED)
    state["module.logit_scale"] = torch.tensor(2.659)
    state["module.token_embedding.weight"] = torch.randn(64, 32)
    state["module.positional_embedding"] = torch.randn(77, 32)
    state["module.ln_final.weight"], state["module.ln_final.bias"] = torch.ones(32), torch.zeros(32)
    for name, shape in (("in_proj_weight", (96, 32)), ("in_proj_bias", (96,)), ("out_proj.weight", (32, 32))):
        state[f"module.transformer.resblocks.0.attn.{name}"] = torch.randn(shape)
    for i, (fan_in, fan_out) in enumerate(((WIDTH, 64), (64, 64), (64, 16)), start=1):
        state[f"module.image_mlp.layer{i}.weight"] = torch.randn(fan_out, fan_in)
        state[f"module.image_mlp.layer{i}.bias"] = torch.randn(fan_out)
        if i < 3:
            for stat, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
                state[f"module.image_mlp.bn{i}.{stat}"] = torch.full((fan_out,), value)
            state[f"module.image_mlp.bn{i}.num_batches_tracked"] = torch.tensor(100)
    return state


def _save_slip(path: Path, state: dict[str, torch.Tensor], model: str = "SLIP_VITS16", **extra: object) -> Path:
    args = argparse.Namespace(model=model, ssl_mlp_dim=4096, ssl_emb_dim=256, ssl_scale=1.0, ssl_temp=0.1,
                              batch_size=64, lr=3e-3, epochs=25, dataset="yfcc15m")
    torch.save({"epoch": 25, "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 3e-3, "params": [0, 1]}]},
                "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 10},
                "best_acc1": 34.3, "args": args, **extra}, path)
    return path


@pytest.fixture(scope="module")
def slip_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_slip(tmp_path_factory.mktemp("slip") / "checkpoint_best.pt", _slip_state())


def _reference(state: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SLIP's image tower written out: tokens = norm(x) @ image_projection, last block's CLS row."""
    w = {k.removeprefix("module.visual."): v for k, v in state.items() if k.startswith("module.visual.")}

    def ln(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(t, (WIDTH,), w[f"{name}.weight"], w[f"{name}.bias"], eps=1e-6)

    x = F.conv2d(x, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=16)  # [B, D, h, w]
    x = x.flatten(2).transpose(1, 2)  # [B, N, D]
    x = torch.cat([w["cls_token"].expand(len(x), -1, -1), x], 1) + w["pos_embed"]  # [B, 1+N, D]
    for i in range(DEPTH):
        b = f"blocks.{i}"
        qkv = ln(x, f"{b}.norm1") @ w[f"{b}.attn.qkv.weight"].T + w[f"{b}.attn.qkv.bias"]  # [B, L, 3D]
        q, k, v = qkv.unflatten(-1, (3, HEADS, WIDTH // HEADS)).permute(2, 0, 3, 1, 4)  # [B, H, L, d] each
        attn = (q @ k.transpose(-2, -1) / (WIDTH // HEADS) ** 0.5).softmax(-1)  # [B, H, L, L]
        out = (attn @ v).transpose(1, 2).flatten(2)  # [B, L, D]
        x = x + out @ w[f"{b}.attn.proj.weight"].T + w[f"{b}.attn.proj.bias"]
        h = F.gelu(ln(x, f"{b}.norm2") @ w[f"{b}.mlp.fc1.weight"].T + w[f"{b}.mlp.fc1.bias"])
        x = x + h @ w[f"{b}.mlp.fc2.weight"].T + w[f"{b}.mlp.fc2.bias"]
    cls_attn = attn[:, :, 0, 1:].mean(1)  # last block: CLS query row, patch keys, head-averaged
    return ln(x, "norm") @ state["module.image_projection"], cls_attn


def test_slip_checkpoint_is_a_teacher_matching_the_written_out_forward(slip_checkpoint: Path) -> None:
    state = read_torch_file(slip_checkpoint, subject="test", expected="SLIP")["state_dict"]
    torch.manual_seed(1)
    images = torch.randn(2, 3, 224, 224)  # normalised with ImageNet statistics: SLIP's own
    want_tokens, want_attn = _reference(state, images)
    for spec in ("slip:SLIP_VITS16", "slip:ViT-S-16"):
        teacher = milan.build_teacher(spec, weights=slip_checkpoint)
        assert teacher.dim == EMBED and teacher.patch_size == 16
        out = teacher(images)
        assert out.tokens.shape == (2, 197, EMBED) and out.cls_attn.shape == (2, 196)
        torch.testing.assert_close(out.tokens, want_tokens, rtol=0, atol=1e-4)
        torch.testing.assert_close(out.cls_attn, want_attn, rtol=0, atol=1e-6)
    # A batch normalised with other statistics is brought to SLIP's (ImageNet's) first.
    pixels = images * torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1) + torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    clip_batch = (pixels - torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    teacher = milan.build_teacher("slip:SLIP_VITS16", weights=slip_checkpoint,
                                  input_mean=OPENAI_CLIP_MEAN, input_std=OPENAI_CLIP_STD)
    out = teacher(clip_batch)
    torch.testing.assert_close(out.tokens, want_tokens, rtol=0, atol=1e-4)
    torch.testing.assert_close(out.cls_attn, want_attn, rtol=0, atol=1e-6)


def test_clip_model_of_the_slip_repo_loads_without_prefix_or_ssl_head(tmp_path: Path) -> None:
    """CLIP_VIT*16 checkpoints have no image_mlp; one saved without DDP has no `module.` prefix."""
    state = {k.removeprefix("module."): v for k, v in _slip_state(seed=3).items() if "image_mlp" not in k}
    path = _save_slip(tmp_path / "clip.pt", state, model="CLIP_VITS16")
    images = torch.randn(1, 3, 64, 64)  # another grid: the position embedding is interpolated
    out = milan.build_teacher("slip:CLIP_VITS16", weights=path)(images)
    assert out.tokens.shape == (1, 17, EMBED) and torch.isfinite(out.tokens).all()
    assert torch.all(out.cls_attn >= 0) and torch.all(out.cls_attn.sum(1) < 1)


def test_simclr_and_mismatched_models_are_refused_with_the_fix(tmp_path: Path, slip_checkpoint: Path) -> None:
    simclr = {k: v for k, v in _slip_state().items() if k.startswith(("module.visual.", "module.image_mlp."))}
    path = _save_slip(tmp_path / "simclr.pt", simclr, model="SIMCLR_VITS16")
    for spec in ("slip:ViT-S-16", "slip:SLIP_VITS16"):
        with pytest.raises(TeacherError, match="SimCLR model.*no image_projection.*SLIP_\\* or CLIP_\\*"):
            milan.build_teacher(spec, weights=path)
    with pytest.raises(TeacherError, match="SimCLR"):
        milan.build_teacher("slip:SIMCLR_VITB16", weights=path)
    with pytest.raises(TeacherError, match=r"SLIP_VITS16 \(its args.model\).*teacher.spec=slip:SLIP_VITS16"):
        milan.build_teacher("slip:ViT-B-16", weights=slip_checkpoint)
    with pytest.raises(TeacherError, match="unknown SLIP model 'ViT-H-14'.*SLIP_VITB16"):
        milan.build_teacher("slip:ViT-H-14", weights=slip_checkpoint)
    with pytest.raises(TeacherError, match="needs weights="):
        milan.build_teacher("slip:SLIP_VITB16")


def test_a_malicious_pickle_beside_the_namespace_is_refused_unrun(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    state = {k: v for k, v in _slip_state().items() if not k.startswith("module.visual.blocks.")}
    path = _save_slip(tmp_path / "evil.pt", state, payload=Evil(str(marker)))
    with pytest.raises(TeacherError, match=r"pickled Python objects \((io|builtins)\.open\)"):
        milan.build_teacher("slip:SLIP_VITS16", weights=path)
    assert not marker.exists()


def test_pretrain_with_the_slip_teacher_lowers_the_loss(shapes_root: Path, slip_checkpoint: Path,
                                                        tmp_path: Path) -> None:
    """`milan pretrain` with teacher.spec=slip:...: the ViT-S/16 teacher sees 128 px for the 8 px student."""
    import json

    out = tmp_path / "run"
    cli(pretrain_args(shapes_root, out, "teacher.spec=slip:SLIP_VITS16", f"teacher.weights={slip_checkpoint}",
                      "optim.steps=24", "optim.warmup_steps=2", "run.log_every=8"))
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.02, losses
