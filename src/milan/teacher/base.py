"""What every teacher shares: the frozen wrapper, the CLS-row attention and the strict-load check.

`Teacher` re-normalises (and, for a different student patch size, resizes) the student's batch
and calls its backend's `_tokens_and_attn`; the backends (`openclip`, `hf`, `timm_vit`) and the
families (`eva`, `siglip`, `hf_siglip`) subclass it. `cls_attention` computes eq. 3 from the CLS
query row alone (`query_attention`: the same for any single pooling query, e.g. SigLIP's
attention-pool latent); `check_fits` is strict loading with an error that names the keys, the
shapes and the fix.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from milan.errors import TeacherError, TeacherFileNotFound
from milan.io.safe_load import read_safetensors, read_torch_file

__all__ = [
    "TeacherFileNotFound",
    "Teacher",
    "TeacherOutput",
    "TimmTowerTeacher",
    "check_fits",
    "download_hint",
    "from_pretrained",
    "hub_id",
    "out_dim",
    "square_patch",
    "cls_attention",
    "query_attention",
]


class TeacherOutput(NamedTuple):
    # [B, 1+N, Dt] the image-embedding space on all tokens, float32: final norm + projection
    # (CLIP, EVA-CLIP) or the attention-pool head (SigLIP, whose CLS slot holds the pooled embedding)
    tokens: Tensor
    # [B, N] the pooling query's attention over the patches, head-averaged, float32: the last
    # layer's CLS row (CLIP, EVA-CLIP) or the attention-pool head's latent query (SigLIP)
    cls_attn: Tensor


class Teacher(nn.Module):
    """Frozen teacher: re-normalise and resize the student's batch, then run a backend.

    Subclasses wrap one library's vision tower (`self.backbone`) and implement `_tokens_and_attn`.

    Args:
        backbone: the library's module; frozen here.
        dim: target dim Dt (the projection's output dim).
        patch_size: the teacher's patch size.
        mean, std: the statistics the teacher was trained with.
        input_mean, input_std: the statistics the incoming batch is normalised with.
        student_patch_size: the student's patch size; when it differs from the teacher's, the
            input is resized so both token grids match. None: the teacher keeps the input size.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int,
        patch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        input_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        input_std: Sequence[float] = IMAGENET_DEFAULT_STD,
        student_patch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.dim = dim
        self.patch_size = patch_size
        self.student_patch_size = student_patch_size
        # x_teacher = (x * input_std + input_mean - mean) / std, folded into one affine map.
        mean_t, std_t = torch.tensor(mean), torch.tensor(std)
        scale = torch.tensor(input_std) / std_t
        shift = (torch.tensor(input_mean) - mean_t) / std_t
        self.register_buffer("in_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", shift.view(1, 3, 1, 1), persistent=False)
        # Frozen for real: dropout / patch dropout off, no grads, nothing for an optimizer to find.
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Teacher:
        # model.train() on an enclosing module must not turn on the teacher's dropout.
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The size the teacher sees for a student batch of `height` x `width` pixels."""
        patch = self.student_patch_size or self.patch_size
        if height % patch or width % patch:
            raise TeacherError(
                f"image size {height}x{width} is not a multiple of the "
                f"{'student' if self.student_patch_size else 'teacher'} patch size {patch}"
            )
        return height // patch * self.patch_size, width // patch * self.patch_size

    @torch.no_grad()
    def forward(self, images: Tensor) -> TeacherOutput:
        """images [B, 3, H, W] normalised with input_mean/std -> TeacherOutput."""
        x = images.float() * self.in_scale + self.in_shift  # [B, 3, H, W] teacher statistics
        size = self.input_size(*x.shape[-2:])
        if size != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        tokens, cls_attn = self._tokens_and_attn(x.to(self.dtype))
        return TeacherOutput(tokens.float(), cls_attn.float())

    def _tokens_and_attn(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, 3, H, W] in teacher statistics -> tokens [B, 1+N, Dt], cls_attn [B, N]."""
        raise NotImplementedError


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """[B, L, H*d] -> [B, H, L, d]"""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def query_attention(q: Tensor, k: Tensor, scale: float, skip: int = 0) -> Tensor:
    """One query row's attention, head-averaged: q [B, H, 1, d], k [B, H, L, d] -> [B, L - skip].

    The query is whatever pools the image: a CLS token's row (`cls_attention`) or the latent query
    of an attention-pooling head (SigLIP's MAP head, which has no CLS token and attends over the
    patch keys only, so `skip=0`). Softmax over all L keys, mean over heads, then the first
    `skip` columns (CLS / register keys) are dropped. Only [B, H, 1, L] logits are formed, never
    an [L, L] matrix. Computed in float32 even for an fp16/bf16 teacher.
    """
    logits = q.float() @ k.float().transpose(-2, -1) * scale  # [B, H, 1, L]
    return logits.softmax(dim=-1).mean(dim=1)[:, 0, skip:]  # [B, L - skip]


def cls_attention(q_cls: Tensor, k: Tensor, scale: float, num_prefix: int = 1) -> Tensor:
    """Eq. 3 from the CLS query row alone: q_cls [B, H, 1, d], k [B, H, L, d] -> [B, L - prefix].

    Softmax over all L keys (CLS and any register tokens included, as in the attention itself),
    then only the patch columns are kept. Computed in float32 even for an fp16/bf16 teacher.
    """
    return query_attention(q_cls, k, scale, skip=num_prefix)  # [B, N]


def check_fits(
    model: nn.Module, state: dict[str, Tensor], what: str, path: Path, hint: str
) -> None:
    """Strict loading, but with an error that names the keys, the shapes and the fix."""
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    shapes = [
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        return

    def few(items: list[str]) -> str:
        return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

    problems = [
        f"{label}: {few(items)}"
        for label, items in (
            ("shape mismatch", shapes),
            ("missing", missing),
            ("unexpected", unexpected),
        )
        if items
    ]
    raise TeacherError(
        f"weights {path} do not fit {what}.\n  " + "\n  ".join(problems) + f"\n  {hint}"
    )


_HUB_ID = re.compile(r"^(?:hf[-_]hub:|https?://huggingface\.co/)?([A-Za-z0-9][\w.-]*/[\w.-]*[\w-])/?$")


def hub_id(text: str | Path) -> str | None:
    """The Hugging Face repo id `text` names (`org/name`, `hf-hub:org/name` or a huggingface.co URL)
    when it is not a path on this machine; None otherwise."""
    text = str(text)
    if Path(text).expanduser().exists():
        return None
    explicit = text.startswith(("hf-hub:", "hf_hub:", "http://", "https://"))
    if not explicit and Path(text).suffix in (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".pkl"):
        return None  # a missing weights file, not a repo
    match = _HUB_ID.match(text)
    return match.group(1) if match else None


def download_hint(repo: str, then: str, file: str | None = None) -> str:
    """How to get hub repo `repo` onto this machine (nothing is downloaded here), then `then`."""
    what = f"{repo} {file}" if file else repo
    return (f"nothing is downloaded: on a machine with internet run `huggingface-cli download {what} "
            f"--local-dir DIR` (or `hf download {what} --local-dir DIR`), copy DIR to this machine, then {then}")


def from_pretrained(cls: Any, path: Path, load: dict[str, Any]) -> Any:
    """`cls.from_pretrained(path, **load)` (transformers); when it fails on a weights file in `path`
    that cannot be read (junk, truncated, pickled objects), a TeacherError saying what that file is,
    never torch's or transformers' advice."""
    try:
        return cls.from_pretrained(path, **load)
    except Exception:
        expected = "a transformers weights file (model.safetensors or pytorch_model.bin, from save_pretrained)"
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))  # transformers' preference
        for file in files:
            read = read_safetensors if file.suffix == ".safetensors" else read_torch_file
            read(file, subject="teacher weights", expected=expected, error=TeacherError)  # raises when unreadable
        raise  # the files read: another problem, transformers' message stands


def out_dim(module: nn.Module, dim: int) -> int:
    """Output width of a per-token head (Linear, Mlp, Sequential of those, Identity) given `dim`."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else dim


def square_patch(patch_size: Any, what: str) -> int:
    """The patch side of a square patch; a TeacherError otherwise."""
    p = tuple(patch_size) if isinstance(patch_size, list | tuple) else (patch_size, patch_size)
    if p[0] != p[1]:
        raise TeacherError(f"{what} has non-square patches {p[0]}x{p[1]}; only square patches are supported")
    return int(p[0])


class TimmTowerTeacher(Teacher):
    """A timm tower (`backbone["trunk"]`) with an optional per-token `backbone["head"]` after timm's
    own head (open_clip's projection): what the EVA-CLIP and SigLIP teachers share.

    Args:
        model: the timm model; build it with `dynamic_img_size=True` to accept other grids.
        head: open_clip's `TimmModel.head`, or None for a plain timm model.
        width: the width timm's own head receives (its output width when it has none).
        mean, std: the family's input statistics, used when the model's pretrained_cfg has none.
        what: the tower's name in error messages.
        **kwargs: `Teacher` arguments.
    """

    def __init__(self, model: nn.Module, head: nn.Module | None, *, width: int, mean: Any, std: Any,
                 what: str, **kwargs: Any) -> None:
        head = head if head is not None else nn.Identity()
        cfg = getattr(model, "pretrained_cfg", None) or {}
        kwargs.setdefault("mean", cfg.get("mean", mean))
        kwargs.setdefault("std", cfg.get("std", std))
        super().__init__(nn.ModuleDict({"trunk": model, "head": head}), dim=out_dim(head, out_dim(model.head, width)),
                         patch_size=square_patch(model.patch_embed.patch_size, what), **kwargs)
