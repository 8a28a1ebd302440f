"""Teachers: every checkpoint format loads, and tokens / cls_attn match the original libraries.

Each test writes a checkpoint with random weights using the original library, loads it through
`build_teacher`, and compares against values computed by that library's own modules (explicit,
non-fused attention with `need_weights=True` / `output_attentions=True` / timm's unfused path).
"""

from __future__ import annotations

import copy
import json
import pickle
import zipfile
from pathlib import Path

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.data.constants import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)
from timm.layers import resample_abs_pos_embed

from _evil import Evil
from milan.errors import TeacherError, TeacherFileNotFound, UserError
from milan.io.safe_load import load_weights
from milan.teacher import (
    Teacher,
    TeacherOutput,
    TimmTeacher,
    build_teacher,
)

TOKENS_ATOL = 1e-4
ATTN_ATOL = 1e-5
TINY = "milan-test-tiny"  # width 64, 2 layers, patch 8, image 32, embed 48
TINY_WIDE = "milan-test-tiny-wide"  # width 96: the wrong architecture for TINY's weights
TINY_QUICK = f"{TINY}-quickgelu"  # TINY with QuickGELU, as open_clip names OpenAI's architectures


def _tiny_cfg(width: int) -> dict:
    return {
        "embed_dim": 48,
        "vision_cfg": {
            "image_size": 32,
            "layers": 2,
            "width": width,
            "patch_size": 8,
            "head_width": 16,
        },
        "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
    }


@pytest.fixture(scope="module", autouse=True)
def tiny_configs(tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("open_clip_configs")
    for name, width in ((TINY, 64), (TINY_WIDE, 96)):
        (folder / f"{name}.json").write_text(json.dumps(_tiny_cfg(width)))
    (folder / f"{TINY_QUICK}.json").write_text(json.dumps({**_tiny_cfg(64), "quick_gelu": True}))
    open_clip.add_model_config(folder)


def _student_batch(b: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _to_teacher_stats(x: torch.Tensor, mean, std) -> torch.Tensor:
    """What the teacher should see: undo ImageNet normalisation, apply the teacher's."""
    m_in, s_in = (
        torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1),
        torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1),
    )
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (x * s_in + m_in - m) / s


def _assert_matches(out: TeacherOutput, tokens: torch.Tensor, attn: torch.Tensor) -> None:
    assert isinstance(out, TeacherOutput)
    assert out.tokens.shape == tokens.shape and out.cls_attn.shape == attn.shape
    torch.testing.assert_close(out.tokens, tokens.float(), atol=TOKENS_ATOL, rtol=0)
    torch.testing.assert_close(out.cls_attn, attn.float(), atol=ATTN_ATOL, rtol=0)
    assert (out.cls_attn >= 0).all() and (out.cls_attn.sum(-1) < 1).all()


# --------------------------------------------------------------------------------------------
# open_clip
# --------------------------------------------------------------------------------------------


def _openclip_model(
    name: str = TINY, *, quick_gelu: bool = False, seed: int = 0
) -> torch.nn.Module:
    torch.manual_seed(seed)
    return open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu).eval()


@torch.no_grad()
def _openclip_reference(
    visual: torch.nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Library forward; the last block's input is captured and its attention re-run with weights."""
    seen = {}
    last = visual.transformer.resblocks[-1]
    hooks = [
        last.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0])),
        visual.transformer.register_forward_hook(lambda m, args, out: seen.setdefault("out", out)),
    ]
    visual(x)
    for h in hooks:
        h.remove()
    h = last.ln_1(seen["x"])  # [B, L, D] (batch_first)
    _, weights = last.attn(h, h, h, need_weights=True, average_attn_weights=True)  # [B, L, L]
    tokens = visual.ln_post(seen["out"]) @ visual.proj  # [B, L, Dt]
    return tokens, weights[:, 0, 1:]


class _Holder(torch.nn.Module):
    """The OpenAI archive layout: a traced module whose attributes are `visual`, `logit_scale`, ..."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.visual, self.logit_scale = model.visual, model.logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


def _activations(teacher: Teacher) -> set[str]:
    return {type(block.mlp.gelu).__name__ for block in teacher.backbone.transformer.resblocks}


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("quick_gelu", [True, False])
def test_openclip_openai_torchscript_archive(tmp_path: Path, quick_gelu: bool) -> None:
    # OpenAI ships traced archives of QuickGELU models; the activation is read from the archive's code.
    model = _openclip_model(quick_gelu=quick_gelu)
    path = tmp_path / "ViT-tiny.pt"
    traced = torch.jit.trace(_Holder(model).eval(), torch.randn(1, 3, 32, 32), check_trace=False)
    torch.jit.save(traced, path)

    assert load_weights(path)[1] == ("quick_gelu" if quick_gelu else "gelu")
    teacher = build_teacher(f"openclip:{TINY}", weights=path)
    assert _activations(teacher) == {"QuickGELU" if quick_gelu else "GELU"}
    x = _student_batch(2, 32)
    ref = _openclip_reference(model.visual, _to_teacher_stats(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
    _assert_matches(teacher(x), *ref)
    assert teacher.dim == 48 and teacher.patch_size == 8


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("arch", [TINY, TINY_QUICK])
@pytest.mark.parametrize("quick_gelu", [False, True])
def test_openclip_scripted_archive_computes_what_the_archive_computes(
    tmp_path: Path, quick_gelu: bool, arch: str
) -> None:
    # torch.jit.save(torch.jit.script(model)) of a GELU or a QuickGELU model: whichever
    # architecture name is given, the teacher computes what the archive's own code computes.
    model = _openclip_model(quick_gelu=quick_gelu, seed=3)
    with torch.no_grad():  # MLP inputs where GELU and QuickGELU differ (random init keeps them near 0)
        for block in model.visual.transformer.resblocks:
            block.mlp.c_fc.weight.mul_(4)
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(model), path)

    assert load_weights(path)[1] == ("quick_gelu" if quick_gelu else "gelu")
    teacher = build_teacher(f"openclip:{arch}", weights=path)
    assert _activations(teacher) == {"QuickGELU" if quick_gelu else "GELU"}
    x = _student_batch(2, 32)
    seen = _to_teacher_stats(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    with torch.no_grad():
        own = torch.jit.load(path).visual(seen)  # the archive's own pooled (CLS) embedding
    out = teacher(x)
    torch.testing.assert_close(out.tokens[:, 0], own, atol=TOKENS_ATOL, rtol=0)
    _assert_matches(out, *_openclip_reference(model.visual, seen))

    # The other activation gives other targets: a wrong decision could not pass the check above.
    other = open_clip.transformer.QuickGELU if not quick_gelu else torch.nn.GELU
    for block in model.visual.transformer.resblocks:
        block.mlp.gelu = other()
    with torch.no_grad():
        wrong = model.visual(seen)
    assert (wrong - own).abs().max() > 50 * TOKENS_ATOL


class _Swish(torch.nn.Module):
    """x * sigmoid(x): neither GELU nor QuickGELU, so the archive does not say which it is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_openclip_archive_with_an_unknown_activation_is_refused(tmp_path: Path) -> None:
    model = _openclip_model(quick_gelu=True, seed=4)
    for block in model.visual.transformer.resblocks:
        block.mlp.gelu = _Swish()
    path = tmp_path / "visual_only.pt"
    torch.jit.save(torch.jit.script(model.visual), path)  # a visual tower alone: no `visual.` prefix

    assert load_weights(path)[1] == "unknown"
    with pytest.raises(TeacherError) as info:
        build_teacher(f"openclip:{TINY}", weights=path)
    message = str(info.value)
    assert "does not show whether its MLP activation is QuickGELU" in message
    assert f"teacher.spec=openclip:{TINY_QUICK}" in message and f"openclip:{TINY} for GELU" in message
    assert "state_dict()" in message and "\n" not in message
    # Naming the QuickGELU architecture is a choice the archive does not contradict.
    assert _activations(build_teacher(f"openclip:{TINY_QUICK}", weights=path)) == {"QuickGELU"}


def test_openclip_openai_plain_state_dict(tmp_path: Path) -> None:
    # What `torch.jit.load(...).state_dict()` gives: full CLIP keys plus input_resolution & co.
    model = _openclip_model(quick_gelu=True, seed=1)
    state = dict(
        model.state_dict(), input_resolution=torch.tensor(32), context_length=torch.tensor(16)
    )
    torch.save(state, tmp_path / "openai.pt")

    teacher = build_teacher(f"openclip:{TINY}", weights=tmp_path / "openai.pt")
    x = _student_batch(2, 32)
    _assert_matches(
        teacher(x),
        *_openclip_reference(model.visual, _to_teacher_stats(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)),
    )


@pytest.mark.parametrize("layout", ["bare", "wrapped_module_prefix", "safetensors"])
def test_openclip_checkpoint_layouts(tmp_path: Path, layout: str) -> None:
    model = _openclip_model(seed=2)
    state = model.state_dict()
    if layout == "bare":
        path = tmp_path / "ckpt.pt"
        torch.save(state, path)
    elif layout == "wrapped_module_prefix":  # open_clip_train's checkpoint, saved under DDP
        path = tmp_path / "epoch_1.pt"
        torch.save(
            {"epoch": 1, "name": "run", "state_dict": {f"module.{k}": v for k, v in state.items()}},
            path,
        )
    else:
        path = tmp_path / "open_clip_model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, path)

    teacher = build_teacher(f"openclip:{TINY}", weights=path)
    x = _student_batch(3, 32, seed=1)
    _assert_matches(
        teacher(x),
        *_openclip_reference(model.visual, _to_teacher_stats(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)),
    )


def test_openclip_vit_b16(tmp_path: Path) -> None:
    # The real architecture once: ViT-B-16, visual keys only, {"state_dict": module.-prefixed}.
    model = _openclip_model("ViT-B-16", seed=3)
    visual = {f"module.visual.{k}": v for k, v in model.visual.state_dict().items()}
    torch.save({"state_dict": visual}, tmp_path / "b16.pt")

    teacher = build_teacher("openclip:ViT-B-16", weights=tmp_path / "b16.pt", student_patch_size=16)
    assert teacher.dim == 512 and teacher.patch_size == 16
    x = _student_batch(2, 224, seed=2)
    ref = _openclip_reference(model.visual, _to_teacher_stats(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
    out = teacher(x)
    assert out.tokens.shape == (2, 197, 512) and out.cls_attn.shape == (2, 196)
    _assert_matches(out, *ref)


def test_resize_to_student_grid(tmp_path: Path) -> None:
    # Student patch 16 at 64 px -> 4x4 grid; the patch-8 teacher must see 32 px to match it.
    model = _openclip_model(seed=4)
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    teacher = build_teacher(f"openclip:{TINY}", weights=tmp_path / "ckpt.pt", student_patch_size=16)
    x = _student_batch(2, 64)
    x_ref = _to_teacher_stats(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    x_ref = F.interpolate(x_ref, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    out = teacher(x)
    assert out.tokens.shape == (2, 1 + 16, 48) and out.cls_attn.shape == (2, 16)
    _assert_matches(out, *_openclip_reference(model.visual, x_ref))


def test_positional_embedding_is_interpolated(tmp_path: Path) -> None:
    # A 32 px teacher fed 64 px (same patch size): the 4x4 pos-embed is resampled to 8x8.
    model = _openclip_model(seed=5)
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    teacher = build_teacher(f"openclip:{TINY}", weights=tmp_path / "ckpt.pt")
    x = _student_batch(2, 64)

    visual = copy.deepcopy(model.visual)
    pos = resample_abs_pos_embed(
        visual.positional_embedding[None], new_size=[8, 8], old_size=[4, 4]
    )
    visual.positional_embedding = torch.nn.Parameter(pos[0])
    out = teacher(x)
    assert out.cls_attn.shape == (2, 64)
    _assert_matches(
        out, *_openclip_reference(visual, _to_teacher_stats(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
    )


def test_bf16_weights_keep_float32_outputs(tmp_path: Path) -> None:
    model = _openclip_model(seed=6)
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    teacher = build_teacher(f"openclip:{TINY}", weights=tmp_path / "ckpt.pt", dtype=torch.bfloat16)
    assert teacher.dtype == torch.bfloat16
    x = _student_batch(2, 32)
    out = teacher(x)
    tokens, attn = _openclip_reference(
        model.visual, _to_teacher_stats(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    )
    assert out.tokens.dtype == out.cls_attn.dtype == torch.float32
    assert F.cosine_similarity(out.tokens, tokens, dim=-1).min() > 0.99
    torch.testing.assert_close(out.cls_attn, attn, atol=1e-2, rtol=0)


# --------------------------------------------------------------------------------------------
# Hugging Face transformers
# --------------------------------------------------------------------------------------------

HF_VISION = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)


@torch.no_grad()
def _hf_reference(folder: Path, full: bool, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection

    config = json.loads((folder / "config.json").read_text())
    cls = (
        CLIPModel
        if full
        else CLIPVisionModel
        if config["architectures"] == ["CLIPVisionModel"]
        else CLIPVisionModelWithProjection
    )
    model = cls.from_pretrained(folder, attn_implementation="eager").eval()
    vision = getattr(model, "vision_model", model)
    out = vision(pixel_values=x, output_attentions=True)
    tokens = vision.post_layernorm(out.last_hidden_state)
    if hasattr(model, "visual_projection"):
        tokens = model.visual_projection(tokens)
    return tokens, out.attentions[-1][:, :, 0, 1:].mean(1)


def test_hf_vision_with_projection_and_preprocessor(tmp_path: Path) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(projection_dim=48, **HF_VISION)).save_pretrained(
        tmp_path
    )
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": mean, "image_std": std})
    )

    teacher = build_teacher(f"hf:{tmp_path}")
    assert teacher.dim == 48 and teacher.patch_size == 8
    x = _student_batch(2, 32)
    _assert_matches(teacher(x), *_hf_reference(tmp_path, False, _to_teacher_stats(x, mean, std)))


def test_hf_vision_without_projection(tmp_path: Path) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(1)
    CLIPVisionModel(CLIPVisionConfig(**HF_VISION)).save_pretrained(tmp_path)
    teacher = build_teacher(f"hf:{tmp_path}")
    assert teacher.dim == 64
    x = _student_batch(2, 32)
    _assert_matches(
        teacher(x),
        *_hf_reference(tmp_path, False, _to_teacher_stats(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)),
    )


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hf_full_clip_model(tmp_path: Path, fmt: str) -> None:
    from transformers import CLIPConfig, CLIPModel

    text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=100,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(2)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=HF_VISION, projection_dim=40))
    if fmt == "safetensors":
        model.save_pretrained(tmp_path)
    else:
        model.config.save_pretrained(tmp_path)
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")

    teacher = build_teacher(f"hf:{tmp_path}")
    assert teacher.dim == 40
    x = _student_batch(2, 32)
    _assert_matches(
        teacher(x),
        *_hf_reference(tmp_path, True, _to_teacher_stats(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)),
    )


def test_hf_folder_without_vision_tower(tmp_path: Path) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=100,
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no CLIP vision tower"):
        build_teacher(f"hf:{tmp_path}")
    with pytest.raises(TeacherError, match=str(tmp_path / "missing")):
        build_teacher(f"hf:{tmp_path / 'missing'}")


# --------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def _timm_reference(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's own forward_features with the last attention on its explicit (unfused) path."""
    model = copy.deepcopy(model).eval()
    attn = model.blocks[-1].attn
    attn.fused_attn = False
    seen = {}
    attn.attn_drop.register_forward_hook(
        lambda m, args, out: seen.setdefault("attn", out)
    )  # [B, H, L, L]
    tokens = model.head(model.fc_norm(model.forward_features(x)))
    prefix = model.num_prefix_tokens
    tokens = torch.cat([tokens[:, :1], tokens[:, prefix:]], dim=1)
    return tokens, seen["attn"][:, :, 0, prefix:].mean(1)


@pytest.mark.parametrize("head", [64, 0])
def test_timm_vit_from_file(tmp_path: Path, head: int) -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=head).eval()
    if head:
        save_file(model.state_dict(), tmp_path / "vit.safetensors")
        path = tmp_path / "vit.safetensors"
    else:
        torch.save(model.state_dict(), tmp_path / "vit.pth")
        path = tmp_path / "vit.pth"

    teacher = build_teacher("timm:vit_tiny_patch16_224", weights=path)
    assert teacher.dim == (head or 192) and teacher.patch_size == 16
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    x = _student_batch(2, 224)
    _assert_matches(teacher(x), *_timm_reference(model, _to_teacher_stats(x, mean, std)))


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_timm_archive_with_another_activation_is_refused(tmp_path: Path) -> None:
    # A traced timm ViT's archive says its activation; a timm model built with another is refused
    # (it would give wrong targets), one built with the same loads.
    torch.manual_seed(0)
    for act, name in (("quick_gelu", "quick.pt"), ("gelu", "gelu.pt")):
        model = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, num_classes=0, act_layer=act, img_size=32
        )  # small to trace: timm resamples the position embedding to the named model's grid
        traced = torch.jit.trace(model.eval(), torch.randn(1, 3, 32, 32), check_trace=False)
        torch.jit.save(traced, tmp_path / name)
        assert load_weights(tmp_path / name)[1] == act
    with pytest.raises(TeacherError, match=r"quick\.pt were trained with QuickGELU .* but "
                                           r"timm:vit_tiny_patch16_224 builds GELU, which would give wrong targets"):
        build_teacher("timm:vit_tiny_patch16_224", weights=tmp_path / "quick.pt")
    teacher = build_teacher("timm:vit_tiny_patch16_224", weights=tmp_path / "gelu.pt")
    assert {type(block.mlp.act).__name__ for block in teacher.backbone.blocks} == {"GELU"}


def test_timm_register_tokens_are_dropped() -> None:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, reg_tokens=2, num_classes=24
    ).eval()
    teacher = TimmTeacher(model, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    x = _student_batch(2, 32)
    out = teacher(x)
    assert out.tokens.shape == (2, 17, 24) and out.cls_attn.shape == (2, 16)
    _assert_matches(
        out, *_timm_reference(model, _to_teacher_stats(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
    )


# --------------------------------------------------------------------------------------------
# Frozen, safe, helpful
# --------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_ckpt(tmp_path: Path) -> Path:
    torch.save(_openclip_model(seed=7).state_dict(), tmp_path / "tiny.pt")
    return tmp_path / "tiny.pt"


def test_teacher_is_frozen(tiny_ckpt: Path) -> None:
    teacher = build_teacher(f"openclip:{TINY}", weights=tiny_ckpt)
    assert isinstance(teacher, Teacher)
    assert not any(p.requires_grad for p in teacher.parameters())
    enclosing = torch.nn.ModuleDict({"teacher": teacher}).train()
    assert not any(m.training for m in enclosing["teacher"].modules())
    assert teacher.train(True) is teacher and not teacher.training
    out = teacher(_student_batch(2, 32).requires_grad_(True))
    assert out.tokens.grad_fn is None and out.cls_attn.grad_fn is None
    assert teacher.state_dict().keys() == {f"backbone.{k}" for k in teacher.backbone.state_dict()}


@pytest.mark.parametrize("name", ["garbage.pt", "garbage.safetensors", "truncated.pt"])
def test_unreadable_weights_name_the_file_and_the_formats(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name == "truncated.pt":
        torch.save({"w": torch.zeros(64)}, tmp_path / "whole.pt")
        data = (tmp_path / "whole.pt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
        said = r"is a truncated or damaged zip archive .*copy or download it again"
    else:
        path.write_text("this is not a checkpoint\n")
        said = (r"is not a weights file \(it starts with b'this is not a ch'\): expected a torch state dict or "
                r"checkpoint \(torch\.save\), a \.safetensors file or a TorchScript archive")
    with pytest.raises(ValueError, match=rf"teacher weights .*{name} {said}") as info:
        build_teacher(f"openclip:{TINY}", weights=path)
    assert "pickle" not in str(info.value) and "weights_only" not in str(info.value)


def test_builtin_teacher_with_unreadable_weights_says_so(tmp_path: Path) -> None:
    (tmp_path / "w.safetensors").write_text("nope")
    with pytest.raises(ValueError, match=r"cannot read the shapes teacher weights .*w\.safetensors"):
        build_teacher("builtin:shapes", weights=tmp_path / "w.safetensors")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"visual.proj": torch.zeros(2), "payload": Evil(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"holds pickled Python objects \((io|builtins)\.open\).*refused") as info:
        build_teacher(f"openclip:{TINY}", weights=tmp_path / "evil.pt")
    assert not marker.exists() and "weights_only" not in str(info.value)

    # The same payload inside a TorchScript-looking archive: the restricted unpickler refuses it.
    with zipfile.ZipFile(tmp_path / "evil_ts.pt", "w") as archive:
        archive.writestr("evil_ts/data.pkl", pickle.dumps({"x": Evil(str(marker))}, protocol=2))
        archive.writestr("evil_ts/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr("evil_ts/code/__torch__.py", "")
    with pytest.raises(ValueError, match=r"holds pickled Python objects \((io|builtins)\.open\).*refused"):
        build_teacher(f"openclip:{TINY}", weights=tmp_path / "evil_ts.pt")
    assert not marker.exists()

    # In a Hugging Face folder, as pytorch_model.bin: transformers loads it with weights_only too.
    from transformers import CLIPVisionConfig

    hf = tmp_path / "hf"
    CLIPVisionConfig(**HF_VISION).save_pretrained(hf)
    torch.save({"payload": Evil(str(marker))}, hf / "pytorch_model.bin")
    with pytest.raises(TeacherError, match=r"pytorch_model\.bin holds pickled Python objects .*refused") as info:
        build_teacher(f"hf:{hf}")
    assert not marker.exists() and "weights_only" not in str(info.value)
    (hf / "pytorch_model.bin").write_bytes(bytes(range(7, 99)))  # junk: not called unsafe
    with pytest.raises(TeacherError, match=r"pytorch_model\.bin is not a weights file .*expected a transformers "
                                           r"weights file") as info:
        build_teacher(f"hf:{hf}")
    assert "weights_only" not in str(info.value)

    # And as a bare pickle file, not a torch.save zip.
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Evil(str(marker))))
    with pytest.raises(ValueError, match=r"holds pickled Python objects \((io|builtins)\.open\).*refused"):
        build_teacher(f"openclip:{TINY}", weights=tmp_path / "evil.pkl")
    assert not marker.exists()


def test_error_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "ViT-B-16.pt"
    with pytest.raises(UserError, match=str(missing)):
        build_teacher(f"openclip:{TINY}", weights=missing)
    with pytest.raises(ValueError, match="needs weights="):
        build_teacher(f"openclip:{TINY}")


def test_hub_ids_and_release_tags_say_what_to_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no folder openai/clip-vit-base-patch16 here
    laion = "laion/CLIP-ViT-B-16-laion2B-s34B-b88K"
    openai = "timm/vit_base_patch16_clip_224.openai"
    cases = {
        "hf:openai/clip-vit-base-patch16": (
            lambda: build_teacher("hf:openai/clip-vit-base-patch16"), TeacherFileNotFound,
            ["huggingface-cli download openai/clip-vit-base-patch16 --local-dir DIR", "teacher.spec=hf:DIR",
             "nothing is downloaded"]),
        "open_clip hub name": (
            lambda: build_teacher(f"openclip:hf-hub:{laion}"), TeacherError,
            [f"huggingface-cli download {laion} --local-dir DIR", "teacher.spec=openclip:ViT-B-16 ",
             "teacher.weights=DIR/open_clip_model.safetensors"]),
        "open_clip release tag": (
            lambda: build_teacher("openclip:ViT-B-16", weights="openai"), TeacherFileNotFound,
            ["release tag", f"huggingface-cli download {openai} --local-dir DIR",
             "teacher.spec=openclip:ViT-B-16-quickgelu (this release was trained with QuickGELU)"]),
        "open_clip hub name of a QuickGELU release": (
            lambda: build_teacher(f"openclip:hf-hub:{openai}"), TeacherError,
            [f"huggingface-cli download {openai} --local-dir DIR",
             "teacher.spec=openclip:ViT-B-16-quickgelu (this release was trained with QuickGELU)"]),
        "open_clip hub id as weights": (
            lambda: build_teacher("openclip:ViT-B-16", weights=f"hf-hub:{laion}"), TeacherFileNotFound,
            [f"huggingface-cli download {laion} --local-dir DIR", "teacher.weights=DIR/"]),
        "open_clip without weights": (
            lambda: build_teacher("openclip:ViT-B-16"), TeacherError,
            ["needs weights=", f"huggingface-cli download {openai} --local-dir DIR"]),
        "timm hub name": (
            lambda: build_teacher(f"timm:hf-hub:{openai}"), TeacherError,
            [f"huggingface-cli download {openai} --local-dir DIR",
             "teacher.spec=timm:vit_base_patch16_clip_224.openai", "teacher.weights=DIR/model.safetensors"]),
        "timm without weights": (
            lambda: build_teacher("timm:vit_base_patch16_clip_224.openai"), TeacherError,
            [f"huggingface-cli download {openai} --local-dir DIR", "timm:vit_base_patch16_clip_quickgelu_224",
             "teacher.weights=DIR/model.safetensors"]),
    }
    for what, (build, error, needed) in cases.items():
        with pytest.raises(error) as info:
            build()
        message = str(info.value)
        assert all(text in message for text in needed), (what, message)
        assert "\n" not in message, what


def test_hf_cache_folder_names_its_snapshot(tmp_path: Path) -> None:
    cache = tmp_path / "models--openai--clip-vit-base-patch16"
    (cache / "snapshots" / "abc123").mkdir(parents=True)
    (cache / "snapshots" / "abc123" / "config.json").write_text("{}")
    with pytest.raises(TeacherFileNotFound, match=rf"cache folder.*teacher\.spec=hf:{cache}/snapshots/abc123"):
        build_teacher(f"hf:{cache}")


def test_error_wrong_architecture_suggests_the_right_one(tmp_path: Path) -> None:
    torch.save(_openclip_model(TINY_WIDE).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(ValueError) as info:
        build_teacher(f"openclip:{TINY}", weights=tmp_path / "wide.pt")
    message = str(info.value)
    assert "conv1.weight: checkpoint [96, 3, 8, 8] vs model [64, 3, 8, 8]" in message
    assert "width 96, patch 8, 2 layers" in message and f"openclip:{TINY_WIDE}" in message


def test_error_unknown_spec_lists_valid_forms() -> None:
    for spec in ("ViT-B-16", "clip:ViT-B-16", "openclip:"):
        with pytest.raises(ValueError) as info:
            build_teacher(spec)
        assert all(
            form in str(info.value)
            for form in ("openclip:<arch>", "hf:", "timm:", "builtin:shapes")
        )
    with pytest.raises(ValueError, match="close matches"):
        build_teacher("openclip:ViT-B-61", weights="x.pt")


def test_builtin_shapes_missing_names_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import milan.teacher.builtin

    missing = tmp_path / "shapes_clip_visual.safetensors"
    with pytest.raises(TeacherError, match=r"shapes_clip_visual\.safetensors.*milan teacher train-shapes"):
        build_teacher("builtin:shapes", weights=missing)
    monkeypatch.setattr(milan.teacher.builtin, "WEIGHTS_FILE", missing)  # a broken install
    with pytest.raises(TeacherError, match="milan teacher train-shapes"):
        build_teacher("builtin:shapes")
    with pytest.raises(ValueError, match="unknown builtin teacher"):
        build_teacher("builtin:cats")


def test_input_size_must_fit_the_patch_grid(tiny_ckpt: Path) -> None:
    teacher = build_teacher(f"openclip:{TINY}", weights=tiny_ckpt, student_patch_size=16)
    with pytest.raises(ValueError, match="student patch size 16"):
        teacher(_student_batch(1, 40))


def test_user_errors_are_one_line_errors_for_the_cli(tmp_path: Path) -> None:
    # `milan` prints a UserError as one line (exit 2); anything else keeps its traceback.
    cases = {
        "bad spec": lambda: build_teacher("clip:ViT-B-16"),
        "missing weights file": lambda: build_teacher(f"openclip:{TINY}", weights=tmp_path / "no.pt"),
        "missing hf folder": lambda: build_teacher(f"hf:{tmp_path / 'no_folder'}"),
        "unreadable weights": lambda: build_teacher("timm:vit_tiny_patch16_224", weights=tmp_path / "x.pt"),
    }
    (tmp_path / "x.pt").write_text("not a checkpoint")
    for what, build in cases.items():
        with pytest.raises(UserError) as info:
            build()
        assert isinstance(info.value, ValueError), what  # `except ValueError` keeps working
        # a missing file or folder stays a FileNotFoundError, as before
        assert isinstance(info.value, FileNotFoundError) == what.startswith("missing"), what
        assert str(info.value), what


def test_cls_attention_is_public_and_matches_full_attention() -> None:
    from milan.teacher import cls_attention

    q, k = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    full = (q @ k.transpose(-2, -1) * 0.5).softmax(-1).mean(1)  # [B, L, L]
    torch.testing.assert_close(cls_attention(q[:, :, :1], k, 0.5), full[:, 0, 1:])
    torch.testing.assert_close(cls_attention(q[:, :, :1], k, 0.5, num_prefix=3), full[:, 0, 3:])
