"""SigLIP / SigLIP 2 and EVA-02-CLIP teachers, in every format they load from.

Each test writes a checkpoint with random weights using the original library (timm safetensors,
open_clip state dict, transformers save_pretrained), loads it through `build_teacher`, and checks:

- tokens against the library's own forward: the pooled embedding (timm `forward_head`, open_clip
  `encode_image`, transformers `pooler_output`) in the CLS slot; for SigLIP, each patch token
  against the library's own pooling head run on that token alone (a one-token sequence); for
  EVA, all tokens against timm's final norm + head;
- cls_attn against the pooling attention computed here with the full attention matrix (SigLIP's
  head written out, or transformers' own `need_weights=True`; EVA's last block on timm's
  unfused path, whose attention probabilities are captured).

Tiny models: the real timm architectures (`vit_base_patch16_siglip_224`,
`eva02_base_patch16_clip_224`) with small widths, registered under test names so that every spec
form can name them; the two real names are also loaded once at full size.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import open_clip
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.data.constants import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)
from timm.models import register_model

import milan
from milan.errors import TeacherError
from milan.teacher import EvaTeacher, SiglipTeacher, TeacherOutput, build_teacher

TOKENS_ATOL = 1e-4
ATTN_ATOL = 1e-5
SIGLIP_STATS = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
CLIP_STATS = (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)


# --------------------------------------------------------------------------------------------
# Tiny versions of the real timm architectures, under names every spec form can use
# --------------------------------------------------------------------------------------------


@register_model
def milan_test_siglip(pretrained: bool = False, **kwargs):
    return timm.create_model("vit_base_patch16_siglip_224", pretrained=False, **{**TINY, **kwargs})


@register_model
def milan_test_siglip_gap(pretrained: bool = False, **kwargs):
    return timm.create_model("vit_base_patch16_siglip_gap_224", pretrained=False, **{**TINY, **kwargs})


@register_model
def milan_test_eva02_clip(pretrained: bool = False, **kwargs):
    # EVA-02-CLIP: separate q/k/v projections, rope, SwiGLU, inner attention norm
    return timm.create_model("eva02_base_patch16_clip_224", pretrained=False, **{**TINY, **kwargs})


@register_model
def milan_test_eva02_clip_fused(pretrained: bool = False, **kwargs):
    # the same with EVA's fused qkv (q and v biases, a zero k-bias buffer) and a register token
    args = {**TINY, "qkv_fused": True, "num_reg_tokens": 1, **kwargs}
    return timm.create_model("eva02_base_patch16_clip_224", pretrained=False, **args)


OPENCLIP_TEXT = {
    "context_length": 16,
    "vocab_size": 100,
    "width": 32,
    "heads": 2,
    "layers": 1,
    "no_causal_mask": True,
    "proj_bias": True,
    "pool_type": "last",
}
OPENCLIP_CONFIGS = {
    "milan-test-SigLIP": {
        "embed_dim": 64,
        "init_logit_bias": -10,
        "custom_text": True,
        "vision_cfg": {
            "image_size": 32,
            "timm_model_name": "milan_test_siglip",
            "timm_model_pretrained": False,
            "timm_pool": "map",
            "timm_proj": "none",
        },
        "text_cfg": OPENCLIP_TEXT,
    },
    "milan-test-ViT": {  # a plain open_clip ViT tower, for the dispatch
        "embed_dim": 48,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 16},
        "text_cfg": {k: OPENCLIP_TEXT[k] for k in ("context_length", "vocab_size", "width", "heads", "layers")},
    },
    "milan-test-EVA02": {
        "embed_dim": 48,
        "custom_text": True,
        "vision_cfg": {
            "image_size": 32,
            "timm_model_name": "milan_test_eva02_clip",
            "timm_model_pretrained": False,
            "timm_pool": "token",
            "timm_proj": None,
        },
        "text_cfg": {**OPENCLIP_TEXT, "no_causal_mask": False, "pool_type": "argmax"},
    },
}


@pytest.fixture(scope="module", autouse=True)
def tiny_openclip_configs(tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("open_clip_configs")
    for name, cfg in OPENCLIP_CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)


# --------------------------------------------------------------------------------------------
# Helpers and the references
# --------------------------------------------------------------------------------------------


def _batch(b: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _to_teacher_stats(x: torch.Tensor, stats) -> torch.Tensor:
    """What the teacher should see: undo ImageNet normalisation, apply the teacher's."""
    m_in = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    s_in = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    m, s = (torch.tensor(v).view(1, 3, 1, 1) for v in stats)
    return (x * s_in + m_in - m) / s


def _assert_matches(out: TeacherOutput, tokens: torch.Tensor, attn: torch.Tensor, *, pooled: bool) -> None:
    assert isinstance(out, TeacherOutput)
    assert out.tokens.dtype == out.cls_attn.dtype == torch.float32
    assert out.tokens.shape == tokens.shape and out.cls_attn.shape == attn.shape
    torch.testing.assert_close(out.tokens, tokens.float(), atol=TOKENS_ATOL, rtol=0)
    torch.testing.assert_close(out.cls_attn, attn.float(), atol=ATTN_ATOL, rtol=0)
    assert (out.cls_attn >= 0).all()
    sums = out.cls_attn.sum(-1)
    if pooled:  # a pooling latent attends over the patches only: rows sum to 1
        torch.testing.assert_close(sums, torch.ones_like(sums))
    else:  # the CLS row also attends to CLS (and registers): rows sum to < 1
        assert (sums < 1).all()


def _full_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) for every query and key: [B, H, Lq, d], [B, H, L, d] -> [B, H, Lq, L]."""
    return (q @ k.transpose(-2, -1) * scale).softmax(dim=-1)


@torch.no_grad()
def _timm_map_reference(pool: torch.nn.Module, x: torch.Tensor, after=lambda t: t):
    """SigLIP through timm's own AttentionPoolLatent: x [B, N, D] final-norm patch tokens.

    pooled: the head on the whole sequence; patch i: the head on the sequence (x_i,) alone.
    importance: the head's attention matrix, written out ([B, H, 1, N]: one latent query).
    """
    b, n, d = x.shape
    pooled = after(pool(x))  # [B, D']
    alone = after(pool(x.reshape(b * n, 1, d))).reshape(b, n, -1)  # [B, N, D']
    h = pool.num_heads
    q = pool.q(pool.latent).reshape(1, 1, h, -1).transpose(1, 2)  # [1, H, 1, d]
    k = pool.kv(x)[..., : pool.kv.out_features // 2].reshape(b, n, h, -1).transpose(1, 2)
    attn = _full_attention(q, k, pool.head_dim**-0.5)  # [B, H, 1, N]
    return torch.cat([pooled[:, None], alone], dim=1), attn.mean(1)[:, 0]


@torch.no_grad()
def _eva_reference(trunk: torch.nn.Module, x: torch.Tensor, after=lambda t: t):
    """EVA through timm's own forward, the last block on its unfused path with its probabilities kept."""
    trunk = copy.deepcopy(trunk).eval()
    attn = trunk.blocks[-1].attn
    attn.fused_attn = False
    seen = {}
    attn.attn_drop.register_forward_hook(lambda m, args, out: seen.setdefault("attn", out))
    feats = trunk.forward_features(x)  # [B, prefix+N, D] after the final norm
    tokens = after(trunk.head(trunk.fc_norm(feats)))  # final norm + projection on every token
    pooled = after(trunk.forward_head(feats, pre_logits=False))  # timm's own image embedding
    torch.testing.assert_close(pooled, tokens[:, 0])
    prefix = trunk.num_prefix_tokens
    tokens = torch.cat([tokens[:, :1], tokens[:, prefix:]], dim=1)
    return tokens, seen["attn"][:, :, 0, prefix:].mean(1)  # [B, H, L, L] -> CLS row, patch keys


# --------------------------------------------------------------------------------------------
# SigLIP: timm
# --------------------------------------------------------------------------------------------


def _timm_model(name: str, seed: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def test_timm_siglip_from_safetensors(tmp_path: Path) -> None:
    model = _timm_model("milan_test_siglip", 0, num_classes=0)
    save_file(model.state_dict(), tmp_path / "siglip.safetensors")
    teacher = build_teacher("timm:milan_test_siglip", weights=tmp_path / "siglip.safetensors")
    assert isinstance(teacher, SiglipTeacher)
    assert teacher.dim == 64 and teacher.patch_size == 8

    x = _batch(2, 32)
    xt = _to_teacher_stats(x, SIGLIP_STATS)  # SigLIP's own statistics: mean = std = 0.5
    with torch.no_grad():
        feats = model.forward_features(xt)
        embedding = model.forward_head(feats, pre_logits=False)
    tokens, attn = _timm_map_reference(model.attn_pool, feats)
    torch.testing.assert_close(tokens[:, 0], embedding)  # the reference's CLS slot is timm's own
    _assert_matches(teacher(x), tokens, attn, pooled=True)


def test_timm_siglip_other_grid_interpolates_like_timm(tmp_path: Path) -> None:
    # 48 px with patch 8: a 6x6 grid from a 4x4 position embedding, resampled as timm does.
    model = _timm_model("milan_test_siglip", 1, num_classes=0, dynamic_img_size=True)
    torch.save(model.state_dict(), tmp_path / "siglip.pth")
    teacher = build_teacher("timm:milan_test_siglip", weights=tmp_path / "siglip.pth")
    x = _batch(2, 48, seed=1)
    with torch.no_grad():
        feats = model.forward_features(_to_teacher_stats(x, SIGLIP_STATS))
    out = teacher(x)
    assert out.tokens.shape == (2, 37, 64) and out.cls_attn.shape == (2, 36)
    _assert_matches(out, *_timm_map_reference(model.attn_pool, feats), pooled=True)


# --------------------------------------------------------------------------------------------
# SigLIP: open_clip (a timm trunk)
# --------------------------------------------------------------------------------------------


def _openclip_model(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return open_clip.create_model(name, pretrained=None).eval()


@pytest.mark.parametrize("layout", ["full_state_dict", "visual_safetensors"])
def test_openclip_siglip(tmp_path: Path, layout: str) -> None:
    model = _openclip_model("milan-test-SigLIP", 2)
    if layout == "full_state_dict":  # open_clip_train's checkpoint
        path = tmp_path / "epoch_1.pt"
        torch.save({"epoch": 1, "state_dict": model.state_dict()}, path)
    else:
        path = tmp_path / "visual.safetensors"
        save_file({f"visual.{k}": v.contiguous() for k, v in model.visual.state_dict().items()}, path)

    teacher = build_teacher("openclip:milan-test-SigLIP", weights=path)
    assert isinstance(teacher, SiglipTeacher) and teacher.dim == 64 and teacher.patch_size == 8
    x = _batch(3, 32, seed=2)
    xt = _to_teacher_stats(x, SIGLIP_STATS)
    trunk, head = model.visual.trunk, model.visual.head
    with torch.no_grad():
        embedding = model.encode_image(xt)  # open_clip's own image embedding
        feats = trunk.forward_features(xt)
    tokens, attn = _timm_map_reference(
        trunk.attn_pool, feats, after=lambda t: head(trunk.head(trunk.fc_norm(t)))
    )
    torch.testing.assert_close(tokens[:, 0], embedding)
    _assert_matches(teacher(x), tokens, attn, pooled=True)


# --------------------------------------------------------------------------------------------
# SigLIP / SigLIP 2: transformers
# --------------------------------------------------------------------------------------------

HF_VISION = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=8
)
HF_TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    vocab_size=100, max_position_embeddings=16,
)


def _save_hf(folder: Path, kind: str, seed: int, **vision) -> None:
    import transformers as tf

    torch.manual_seed(seed)
    vision = {**HF_VISION, **vision}
    if kind == "siglip_vision":
        model = tf.SiglipVisionModel(tf.SiglipVisionConfig(image_size=32, **vision))
    elif kind == "siglip":
        model = tf.SiglipModel(
            tf.SiglipConfig(text_config=HF_TEXT, vision_config={"image_size": 32, **vision})
        )
    elif kind == "siglip2_vision":  # NaFlex: a 4x4 position grid, resized to each image's grid
        model = tf.Siglip2VisionModel(tf.Siglip2VisionConfig(num_patches=16, **vision))
    else:
        model = tf.Siglip2Model(
            tf.Siglip2Config(text_config=HF_TEXT, vision_config={"num_patches": 16, **vision})
        )
    model.save_pretrained(folder)


@torch.no_grad()
def _hf_reference(folder: Path, kind: str, x: torch.Tensor):
    """transformers' own forward (eager attention) and its pooling head's own attention weights."""
    import transformers as tf
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

    cls = {
        "siglip_vision": tf.SiglipVisionModel,
        "siglip": tf.SiglipModel,
        "siglip2_vision": tf.Siglip2VisionModel,
        "siglip2": tf.Siglip2Model,
    }[kind]
    model = cls.from_pretrained(folder, attn_implementation="eager").eval()
    vision = getattr(model, "vision_model", model)
    if kind.startswith("siglip2"):  # patchified by transformers' own image-processor function
        p = vision.config.patch_size
        patches = torch.stack([convert_image_to_patches(img, p) for img in x])
        grid = torch.tensor([[x.shape[-2] // p, x.shape[-1] // p]] * len(x))
        mask = torch.ones(patches.shape[:2], dtype=torch.long)
        out = vision(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=grid)
    else:
        out = vision(pixel_values=x, interpolate_pos_encoding=True)
    hidden, head = out.last_hidden_state, vision.head  # after post_layernorm
    b, n, d = hidden.shape
    alone = head(hidden.reshape(b * n, 1, d)).reshape(b, n, d)  # each patch through the head alone
    probe = head.probe.expand(b, -1, -1)
    _, weights = head.attention(probe, hidden, hidden, need_weights=True, average_attn_weights=True)
    return torch.cat([out.pooler_output[:, None], alone], dim=1), weights[:, 0]  # [B, 1, N] -> [B, N]


@pytest.mark.parametrize("kind", ["siglip_vision", "siglip", "siglip2_vision", "siglip2"])
def test_hf_siglip(tmp_path: Path, kind: str) -> None:
    from milan.teacher import HFSiglipTeacher

    _save_hf(tmp_path, kind, seed=3)
    teacher = build_teacher(f"hf:{tmp_path}")
    assert isinstance(teacher, HFSiglipTeacher) and teacher.dim == 64 and teacher.patch_size == 8
    for size in (32, 48):  # the checkpoint's grid, and a 6x6 one (position embedding resized)
        x = _batch(2, size, seed=size)
        ref = _hf_reference(tmp_path, kind, _to_teacher_stats(x, SIGLIP_STATS))
        _assert_matches(teacher(x), *ref, pooled=True)


def test_hf_siglip_preprocessor_statistics(tmp_path: Path) -> None:
    _save_hf(tmp_path, "siglip_vision", seed=4)
    stats = ((0.4, 0.5, 0.6), (0.3, 0.3, 0.2))
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": stats[0], "image_std": stats[1]})
    )
    teacher = build_teacher(f"hf:{tmp_path}")
    x = _batch(2, 32)
    ref = _hf_reference(tmp_path, "siglip_vision", _to_teacher_stats(x, stats))
    _assert_matches(teacher(x), *ref, pooled=True)


# --------------------------------------------------------------------------------------------
# EVA-02-CLIP: timm and open_clip
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["milan_test_eva02_clip", "milan_test_eva02_clip_fused"])
def test_timm_eva02_clip(tmp_path: Path, name: str) -> None:
    model = _timm_model(name, 5, num_classes=48)  # the head is the CLIP projection
    save_file(model.state_dict(), tmp_path / "eva.safetensors")
    teacher = build_teacher(f"timm:{name}", weights=tmp_path / "eva.safetensors")
    assert isinstance(teacher, EvaTeacher) and teacher.dim == 48 and teacher.patch_size == 8

    x = _batch(2, 32, seed=5)
    _assert_matches(teacher(x), *_eva_reference(model, _to_teacher_stats(x, CLIP_STATS)), pooled=False)

    # another grid: timm's own dynamic-size model resamples the position embedding and the rope
    dynamic = _timm_model(name, 5, num_classes=48, dynamic_img_size=True)
    dynamic.load_state_dict(model.state_dict())
    x = _batch(2, 48, seed=6)
    out = teacher(x)
    assert out.cls_attn.shape == (2, 36)
    _assert_matches(out, *_eva_reference(dynamic, _to_teacher_stats(x, CLIP_STATS)), pooled=False)


def test_openclip_eva02(tmp_path: Path) -> None:
    model = _openclip_model("milan-test-EVA02", 6)
    torch.save(model.state_dict(), tmp_path / "eva02.pt")
    teacher = build_teacher("openclip:milan-test-EVA02", weights=tmp_path / "eva02.pt")
    assert isinstance(teacher, EvaTeacher) and teacher.dim == 48

    x = _batch(2, 32, seed=7)
    xt = _to_teacher_stats(x, CLIP_STATS)
    with torch.no_grad():
        embedding = model.encode_image(xt)  # open_clip's own image embedding
    tokens, attn = _eva_reference(model.visual.trunk, xt, after=model.visual.head)
    torch.testing.assert_close(tokens[:, 0], embedding)
    _assert_matches(teacher(x), tokens, attn, pooled=False)


@pytest.mark.parametrize(
    ("arch", "timm_name"),
    [("milan-test-SigLIP", "milan_test_siglip"), ("milan-test-EVA02", "milan_test_eva02_clip")],
)
def test_openclip_checkpoint_through_timm_spec(tmp_path: Path, arch: str, timm_name: str) -> None:
    # timm's own checkpoint filters read open_clip's `visual.trunk.` layout.
    model = _openclip_model(arch, 12)
    torch.save(model.state_dict(), tmp_path / "open_clip.pt")
    via_timm = build_teacher(f"timm:{timm_name}", weights=tmp_path / "open_clip.pt")
    via_openclip = build_teacher(f"openclip:{arch}", weights=tmp_path / "open_clip.pt")
    assert via_timm.dim == via_openclip.dim
    x = _batch(2, 32, seed=12)
    a, b = via_timm(x), via_openclip(x)
    torch.testing.assert_close(a.tokens, b.tokens, atol=TOKENS_ATOL, rtol=0)
    torch.testing.assert_close(a.cls_attn, b.cls_attn, atol=ATTN_ATOL, rtol=0)


def test_openclip_tower_teacher_for_an_open_clip_model() -> None:
    # What `milan bench speed` would need for random:<SigLIP / EVA02 arch>: a built tower in.
    from milan.teacher.openclip import OpenCLIPTeacher, openclip_tower_teacher

    siglip = openclip_tower_teacher("milan-test-SigLIP", _openclip_model("milan-test-SigLIP", 13).visual)
    eva = openclip_tower_teacher("milan-test-EVA02", _openclip_model("milan-test-EVA02", 13).visual)
    vit = openclip_tower_teacher("milan-test-ViT", _openclip_model("milan-test-ViT", 13).visual)
    assert isinstance(siglip, SiglipTeacher) and isinstance(eva, EvaTeacher)
    assert isinstance(vit, OpenCLIPTeacher)
    assert siglip(_batch(1, 48)).cls_attn.shape == (1, 36)  # any grid: the trunk is rebuilt dynamic


# --------------------------------------------------------------------------------------------
# The specs at full size
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["vit_base_patch16_siglip_224", "eva02_base_patch16_clip_224"]
)
def test_real_timm_names(tmp_path: Path, name: str) -> None:
    siglip = "siglip" in name
    model = _timm_model(name, 7, num_classes=0 if siglip else 512)
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    teacher = build_teacher(f"timm:{name}", weights=tmp_path / "w.safetensors", student_patch_size=16)
    assert teacher.patch_size == 16 and teacher.dim == (768 if siglip else 512)
    x = _batch(1, 224, seed=8)
    xt = _to_teacher_stats(x, SIGLIP_STATS if siglip else CLIP_STATS)
    if siglip:
        with torch.no_grad():
            ref = _timm_map_reference(model.attn_pool, model.forward_features(xt))
    else:
        ref = _eva_reference(model, xt)
    out = teacher(x)
    assert out.tokens.shape[1] == 197 and out.cls_attn.shape == (1, 196)
    _assert_matches(out, *ref, pooled=siglip)


# --------------------------------------------------------------------------------------------
# Unsupported variants: TeacherErrors that name the fix
# --------------------------------------------------------------------------------------------


def test_unsupported_variants_raise_teacher_errors(tmp_path: Path) -> None:
    import transformers as tf
    from timm.models.eva import Eva

    dummy = tmp_path / "dummy.safetensors"
    save_file({"w": torch.zeros(1)}, dummy)
    cases = {
        # avg-pooled SigLIP: no class token, no attention-pool head
        "timm:milan_test_siglip_gap": "siglip_224 rather than a \\*_siglip_gap_\\*",
        "timm:naflexvit_base_patch16_siglip": "NaFlexVit",  # variable-resolution tower
        "timm:convnext_atto": "not a supported teacher tower",  # not a ViT at all
    }
    for spec, message in cases.items():
        with pytest.raises(TeacherError, match=message):
            build_teacher(spec, weights=dummy)

    # An Eva that is not EVA-CLIP (average pooling, no CLS embedding)
    eva_avg = Eva(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, global_pool="avg")
    with pytest.raises(TeacherError, match="EVA-CLIP layout"):
        EvaTeacher(eva_avg)

    # A SigLIP folder saved without its pooling head
    no_head = tmp_path / "no_head"
    tf.SiglipVisionModel(
        tf.SiglipVisionConfig(image_size=32, vision_use_head=False, **HF_VISION)
    ).save_pretrained(no_head)
    with pytest.raises(TeacherError, match="vision_use_head=True"):
        build_teacher(f"hf:{no_head}")

    # A NaFlex position grid that is not square
    odd = tmp_path / "odd"
    tf.Siglip2VisionModel(tf.Siglip2VisionConfig(num_patches=12, **HF_VISION)).save_pretrained(odd)
    with pytest.raises(TeacherError, match="not a square grid"):
        build_teacher(f"hf:{odd}")

    # SigLIP weights under a SigLIP name of another size: the strict-load error, not a class error
    small = _timm_model("milan_test_siglip", 8, num_classes=0)
    save_file(small.state_dict(), tmp_path / "small.safetensors")
    with pytest.raises(TeacherError, match="do not fit timm 'vit_base_patch16_siglip_224'"):
        build_teacher("timm:vit_base_patch16_siglip_224", weights=tmp_path / "small.safetensors")


def test_teachers_are_frozen(tmp_path: Path) -> None:
    model = _openclip_model("milan-test-SigLIP", 9)
    torch.save(model.state_dict(), tmp_path / "siglip.pt")
    teacher = build_teacher("openclip:milan-test-SigLIP", weights=tmp_path / "siglip.pt", dtype=torch.bfloat16)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not torch.nn.ModuleDict({"t": teacher}).train()["t"].training
    out = teacher(_batch(2, 32).requires_grad_(True))
    assert out.tokens.dtype == torch.float32 and out.tokens.grad_fn is None
    assert teacher.state_dict().keys() == {f"backbone.{k}" for k in teacher.backbone.state_dict()}


# --------------------------------------------------------------------------------------------
# A short MILAN pretraining run with each family as the teacher
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["siglip", "eva02"])
def test_pretrain_smoke(tmp_path: Path, family: str) -> None:
    name = {"siglip": "milan_test_siglip", "eva02": "milan_test_eva02_clip"}[family]
    save_file(_timm_model(name, 10, num_classes=0 if family == "siglip" else 48).state_dict(),
              tmp_path / "t.safetensors")
    teacher = build_teacher(f"timm:{name}", weights=tmp_path / "t.safetensors", student_patch_size=8)
    torch.manual_seed(0)
    model = milan.build_model(
        "milan_vit_shapes_patch8", target_dim=teacher.dim, decoder_depth=1, decoder_dim=64,
        decoder_heads=2,
    )
    step = milan.MILAN(model, teacher=teacher)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = _batch(8, 64, seed=11)
    losses = []
    for i in range(15):
        out = step(images, generator=torch.Generator().manual_seed(i))
        assert out.teacher.tokens.shape == (8, 65, teacher.dim)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
