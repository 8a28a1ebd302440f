"""`milan teacher train-shapes`: train the small CLIP shipped as `builtin:shapes` (or, with
`--method slip`, the one shipped as `builtin:shapes-slip`).

Language supervision for real: open_clip's model construction, its BPE tokenizer (the vocabulary
ships in the wheel) and its contrastive loss, on the captions of the shapes dataset. `--method
slip` adds SLIP's self-supervised term (Mu et al. 2022, as its `SLIP` model and `SLIPLoss`): two
views of each image under SimCLR augmentations go through the same image tower, its pooled
(pre-projection) feature through a 3-layer MLP with BatchNorm, and an NT-Xent loss (temperature
0.1) is added to the CLIP loss with weight `--ssl-scale` (1.0). The captioned view stays the
plain image, as for `builtin:shapes`, so the two teachers differ only in the SimCLR term. Then it
measures what the teacher learned (zero-shot colour and shape accuracy on held-out images; how
much of the last layer's CLS attention lands on object patches, against their area share) and
exports the vision tower with a card. ≈10 minutes on 2 CPU cores with the defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torchvision.transforms import v2

import milan
from milan.data.shapes import (
    COLOURS,
    SHAPES,
    ShapesDataset,
    default_shapes_root,
    generate_shapes,
    load_instances,
)
from milan.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from milan.teacher import OpenCLIPTeacher
from milan.teacher.builtin import (
    ASSET_DIR,
    SHAPES_CLIP_CONFIG,
    SHAPES_CLIP_MEAN,
    SHAPES_CLIP_STD,
    build_shapes_clip,
    load_shapes_visual,
    sha256_file,
)
from milan.train.log import get_logger, progress
from milan.train.schedule import warmup_cosine

__all__ = ["add_arguments", "run_from_args", "train", "zero_shot", "zero_shot_classifiers",
           "attention_on_objects", "simclr_loss", "simclr_views", "SSLHead"]

#: method -> (file stem in milan/assets, builtin name)
METHODS = {"clip": ("shapes_clip", "shapes"), "slip": ("shapes_slip", "shapes-slip")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, help="shapes dataset folder (default: the cache; generated if missing)")
    p.add_argument("--out", type=Path, default=Path("runs/shapes_teacher"),
                   help="where to write the weights and card (--out src/milan/assets replaces the shipped teacher)")
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--num-train", type=int, default=50000, help="training images (a subset of the dataset)")
    p.add_argument("--eval-size", type=int, default=2000, help="held-out images for the zero-shot numbers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (fixed so the weights reproduce)")
    p.add_argument("--method", choices=list(METHODS), default="clip",
                   help="clip: CLIP loss (builtin:shapes); slip: CLIP loss + SimCLR loss on two augmented views "
                        "(builtin:shapes-slip)")
    p.add_argument("--ssl-scale", type=float, default=1.0, help="slip: weight of the SimCLR loss (SLIP's default)")
    p.add_argument("--ssl-temp", type=float, default=0.1, help="slip: SimCLR temperature (SLIP's default)")
    p.add_argument("--ssl-mlp-dim", type=int, default=512,
                   help="slip: hidden width of the SimCLR MLP (SLIP: 4096 for a 768-wide tower; 4× the width here)")
    p.add_argument("--ssl-emb-dim", type=int, default=128, help="slip: SimCLR embedding width (SLIP: 256)")


def run_from_args(args: argparse.Namespace) -> None:
    command = "milan teacher train-shapes " + " ".join(shlex.quote(a) for a in sys.argv[3:])
    train(
        data=args.data, out=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        warmup=args.warmup, weight_decay=args.weight_decay, num_train=args.num_train,
        eval_size=args.eval_size, seed=args.seed, threads=args.threads, command=command.strip(),
        method=args.method, ssl_scale=args.ssl_scale, ssl_temp=args.ssl_temp, ssl_mlp_dim=args.ssl_mlp_dim,
        ssl_emb_dim=args.ssl_emb_dim,
    )


def _load_split(root: Path, split: str, limit: int | None) -> tuple[torch.Tensor, list[str], Any]:
    """All images of a split as one uint8 tensor `[N, 3, H, W]`, plus captions and the dataset."""
    ds = ShapesDataset(root, split=split)
    n = len(ds) if limit is None else min(limit, len(ds))
    images = torch.from_numpy(np.stack([np.asarray(ds[i][0]) for i in range(n)])).permute(0, 3, 1, 2)
    return images.contiguous(), ds.captions[:n], ds


def _normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(SHAPES_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(SHAPES_CLIP_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


class SSLHead(torch.nn.Sequential):
    """SLIP's `image_mlp`: Linear-BN-ReLU, Linear-BN-ReLU, Linear on the pooled image feature."""

    def __init__(self, in_dim: int, mlp_dim: int, out_dim: int) -> None:
        super().__init__(
            torch.nn.Linear(in_dim, mlp_dim), torch.nn.BatchNorm1d(mlp_dim), torch.nn.ReLU(inplace=True),
            torch.nn.Linear(mlp_dim, mlp_dim), torch.nn.BatchNorm1d(mlp_dim), torch.nn.ReLU(inplace=True),
            torch.nn.Linear(mlp_dim, out_dim),
        )


def simclr_loss(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over two views a, b [B, E]: each embedding's positive is the other view of its image,
    its negatives every other embedding of both views (itself excluded); mean of both directions."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    labels = torch.arange(len(a), device=a.device)
    self_mask = torch.eye(len(a), device=a.device, dtype=torch.bool)
    aa = (a @ a.T / temperature).masked_fill(self_mask, float("-inf"))  # [B, B] same view, self excluded
    bb = (b @ b.T / temperature).masked_fill(self_mask, float("-inf"))
    ab = a @ b.T / temperature  # [B, B] diagonal: the positives
    loss_a = F.cross_entropy(torch.cat([ab, aa], dim=1), labels)  # [B, 2B] logits per row
    loss_b = F.cross_entropy(torch.cat([ab.T, bb], dim=1), labels)
    return (loss_a + loss_b) / 2


def simclr_views(images: torch.Tensor) -> torch.Tensor:
    """One SimCLR view per image of uint8 [B, 3, H, W] -> [B, 3, H, W] uint8: SLIP's augmentation
    (RandomResizedCrop scale 0.08–1, colour jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale p 0.2,
    Gaussian blur σ 0.1–2 px with p 0.5, horizontal flip) at the images' own size. Draws from
    torch's global generator, so a seeded run repeats."""
    size = images.shape[-2:]
    augment = v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=0.5),
        v2.RandomHorizontalFlip(),
    ])
    return torch.stack([augment(image) for image in images])  # parameters drawn per image


def _pooled(visual: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The tower's pooled feature before the projection [B, width] (SLIP's `self.visual(x)`)."""
    pooled, _ = visual._pool(visual.transformer(visual._embeds(x)))
    return pooled


@torch.no_grad()
def zero_shot_classifiers(model: torch.nn.Module, tokenizer: Any) -> dict[str, torch.Tensor]:
    """Text-tower class embeddings `[C, D]` for colour and shape, each a prompt ensemble over the
    other attribute ("a large red circle", "a large red square", ... for red)."""
    model.eval()

    def classes(prompts: list[list[str]]) -> torch.Tensor:
        emb = [F.normalize(model.encode_text(tokenizer(p), normalize=True).mean(0), dim=-1) for p in prompts]
        return torch.stack(emb)

    return {
        "colour": classes([[f"a large {c} {s}" for s in SHAPES] for c in COLOURS]),
        "shape": classes([[f"a large {c} {s}" for c in COLOURS] for s in SHAPES]),
    }


def zero_shot(image_features: torch.Tensor, classifiers: dict[str, torch.Tensor],
              labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """Zero-shot accuracy per label: nearest class embedding to the (pooled) image feature."""
    feats = F.normalize(image_features.float(), dim=-1)
    return {f"zero_shot_{name}": float(((feats @ w.T).argmax(1) == labels[name]).float().mean())
            for name, w in classifiers.items()}


@torch.no_grad()
def attention_on_objects(teacher: torch.nn.Module, root: Path, split: str, count: int) -> dict[str, float]:
    """Share of last-layer CLS attention on patches that hold object pixels vs their area share."""
    ds = ShapesDataset(root, split=split)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    mass, area = [], []
    for start in range(0, count, 256):
        idx = range(start, min(count, start + 256))
        images = torch.stack([torch.from_numpy(np.array(ds[i][0])).permute(2, 0, 1) for i in idx])
        attn = teacher((images.float() / 255 - mean) / std).cls_attn  # [B, N]
        grid = int(math.isqrt(attn.shape[1]))
        for row, i in zip(attn, idx):
            obj = torch.from_numpy(load_instances(root, split, i).masks.any(0)).float()[None, None]
            on = F.adaptive_max_pool2d(obj, grid).flatten() > 0  # [N] patch holds object pixels
            mass.append(float(row[on].sum() / row.sum()))
            area.append(float(on.float().mean()))
    return {"attention_on_objects": float(np.mean(mass)), "object_patch_share": float(np.mean(area))}


def train(
    *, data: Path | None = None, out: Path = ASSET_DIR, steps: int = 900, batch_size: int = 128,
    lr: float = 2e-3, warmup: int = 50, weight_decay: float = 0.1, num_train: int = 50000,
    eval_size: int = 2000, seed: int = 0, threads: int = 2, command: str = "milan teacher train-shapes",
    method: str = "clip", ssl_scale: float = 1.0, ssl_temp: float = 0.1, ssl_mlp_dim: int = 512,
    ssl_emb_dim: int = 128,
) -> dict[str, Any]:
    """Train, evaluate and export the shapes CLIP (`method="slip"`: the SLIP way); returns the card."""
    # lazy: open_clip is heavy and only needed to build an open_clip model
    import open_clip
    from open_clip.loss import ClipLoss

    log = get_logger()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    root = Path(data) if data else default_shapes_root()
    if not (root / "meta.json").is_file():
        generate_shapes(root)
    images, captions, _ = _load_split(root, "train", num_train)
    val_images, _, val_ds = _load_split(root, "val", eval_size)
    val_labels = {k: v[: len(val_images)] for k, v in val_ds.labels.items()}

    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=SHAPES_CLIP_CONFIG["text_cfg"]["context_length"])
    tokens = tokenizer(captions)  # [N, context]
    stem, builtin_name = METHODS[method]
    model = build_shapes_clip()
    loss_fn = ClipLoss()
    params = list(model.parameters())
    if method == "slip":  # SLIP's image_mlp on the pooled feature; trained, never exported
        ssl_head = SSLHead(SHAPES_CLIP_CONFIG["vision_cfg"]["width"], ssl_mlp_dim, ssl_emb_dim).train()
        params += list(ssl_head.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    order = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(images), generator=order)
    cursor = 0
    bar = progress(steps, desc="train-shapes")
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        if cursor + batch_size > len(perm):
            perm, cursor = torch.randperm(len(images), generator=order), 0
        idx = perm[cursor: cursor + batch_size]
        cursor += batch_size
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, total=steps, warmup=warmup, peak=lr)
        if method == "clip":
            img_f, txt_f, scale = model(_normalise(images[idx]), tokens[idx])  # scale is exp(logit_scale)
            loss = loss_fn(img_f, txt_f, scale)
        else:  # SLIP: the captioned image and two SimCLR views through the same tower, in one batch
            batch = torch.cat([images[idx], simclr_views(images[idx]), simclr_views(images[idx])])  # [3B, 3, H, W]
            pooled = _pooled(model.visual, _normalise(batch))  # [3B, width]
            img_f = F.normalize(pooled[:batch_size] @ model.visual.proj, dim=-1)  # [B, embed]
            txt_f = model.encode_text(tokens[idx], normalize=True)
            clip = loss_fn(img_f, txt_f, model.logit_scale.exp())
            aug1, aug2 = pooled[batch_size:].chunk(2)  # each view through the MLP alone (its own BN batch)
            ssl = simclr_loss(ssl_head(aug1), ssl_head(aug2), ssl_temp)
            loss = clip + ssl_scale * ssl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # CLIP's clamp of the learned temperature (logit_scale ≤ 100)
            model.logit_scale.clamp_(0, math.log(100))
        if step == 0:
            first_loss = loss.item()
        parts = {} if method == "clip" else {"clip_loss": clip.item(), "ssl_loss": ssl.item()}
        bar.update(1)
        if step % 20 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}", **{k: f"{v:.3f}" for k, v in parts.items()})
    bar.close()
    minutes = (time.perf_counter() - start) / 60

    model.eval()
    with torch.no_grad():
        val_feats = torch.cat([model.encode_image(_normalise(val_images[i:i + 256]))
                               for i in range(0, len(val_images), 256)])
    classifiers = zero_shot_classifiers(model, tokenizer)
    metrics = zero_shot(val_feats, classifiers, val_labels)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{stem}_visual.safetensors"
    state = {k: v.detach().contiguous() for k, v in model.visual.state_dict().items()}
    save_file(state, str(weights))
    zeroshot = out / f"{stem}_zeroshot.safetensors"
    save_file({k: v.contiguous() for k, v in classifiers.items()}, str(zeroshot))
    teacher = OpenCLIPTeacher(load_shapes_visual(weights), student_patch_size=8)
    metrics.update(attention_on_objects(teacher, root, "val", min(eval_size, 1000)))
    description = "small CLIP (open_clip, conv stem) trained on milan's captioned shapes data"
    if method == "slip":
        description += (" the SLIP way: CLIP loss + SimCLR loss (2 views, SLIP's augmentation) on the pooled "
                        "feature through a 3-layer MLP")
    card = {
        "name": f"builtin:{builtin_name}",
        "description": description,
        "method": method,
        "config": SHAPES_CLIP_CONFIG,
        "image_mean": SHAPES_CLIP_MEAN,
        "image_std": SHAPES_CLIP_STD,
        "command": command,
        "seed": seed,
        "train": {"steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup,
                  "weight_decay": weight_decay, "num_train": len(images), "threads": threads,
                  "minutes": round(minutes, 2), "first_loss": round(first_loss, 4),
                  "final_loss": round(loss.item(), 4), **{f"final_{k}": round(v, 4) for k, v in parts.items()},
                  **({"ssl": {"scale": ssl_scale, "temperature": ssl_temp, "mlp_dim": ssl_mlp_dim,
                              "emb_dim": ssl_emb_dim}} if method == "slip" else {})},
        "data": {"root_params": json.loads((root / "meta.json").read_text())["params"]},
        "metrics": {k: round(v, 4) for k, v in metrics.items()},
        "milan_version": milan.__version__,
        "torch_version": torch.__version__,
        "sha256": sha256_file(weights),
        "zeroshot_sha256": sha256_file(zeroshot),
    }
    card_file = out / f"{stem}.json"
    card_file.write_text(json.dumps(card, indent=2) + "\n")
    log.info("teacher: %s", json.dumps(card["metrics"]))
    log.info("wrote %s (%.1f MB) and %s", weights, weights.stat().st_size / 1e6, card_file)
    return card
