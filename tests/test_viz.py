"""`milan viz`: pure figure helpers (unit) and each subcommand end to end on a tiny checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from milan.errors import WeightsError
from milan.loss import feature_loss
from milan.masking import random_masking
from milan.tools import viz, viz_cli
from milan.tools.viz import masked_view

# --- unit --------------------------------------------------------------------------------------


def test_masked_view_dims_exactly_the_masked_cells() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(40, 256, size=(16, 16, 3), dtype=np.uint8)
    hidden = np.array([True, False, False, True])  # 2×2 grid of 8px patches, row-major
    out = masked_view(image, hidden, 8, dim=0.25)
    for idx, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        cell = (slice(8 * r, 8 * r + 8), slice(8 * c, 8 * c + 8))
        if hidden[idx]:
            expected = (image[cell].astype(np.float32) * 0.25).round().astype(np.uint8)
            np.testing.assert_array_equal(out[cell], expected)
            assert out[cell].mean() < image[cell].mean() * 0.5
        else:
            np.testing.assert_array_equal(out[cell], image[cell])


def test_mask_panel_marks_kept_patches_of_a_mask() -> None:
    mask = random_masking(1, 16, 0.75, generator=torch.Generator().manual_seed(1))
    image = np.full((32, 32, 3), 200, dtype=np.uint8)
    out = masked_view(image, mask.is_masked()[0].numpy(), 8)
    bright = (out.reshape(4, 8, 4, 8, 3).transpose(0, 2, 1, 3, 4).reshape(16, -1) == 200).all(1)
    assert set(np.nonzero(bright)[0].tolist()) == set(mask.keep[0].tolist())


def test_tsne_keeps_separated_clusters_separated() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 32)) * 10
    labels = np.repeat(np.arange(4), 25)
    feats = centres[labels] + rng.normal(size=(100, 32))
    coords = viz.tsne_embed(torch.tensor(feats, dtype=torch.float32), seed=0)
    assert coords.shape == (100, 2)
    d = ((coords[:, None] - coords[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    agreement = (labels[d.argmin(1)] == labels).mean()
    assert agreement > 0.9
    np.testing.assert_allclose(coords, viz.tsne_embed(feats, seed=0))  # fixed random_state


def test_student_attention_matches_timm_attention_weights() -> None:
    from milan.model import build_model

    encoder = build_model("mae_vit_shapes_patch8").encoder.eval()
    images = torch.randn(2, 3, 64, 64)
    attn = viz.student_cls_attention(encoder, images)
    assert attn.shape == (2, encoder.num_patches)
    assert (attn > 0).all() and (attn.sum(1) < 1).all()  # the CLS column is dropped
    # Reference: timm's own unfused path passes the softmaxed map [B, H, L, L] through attn_drop.
    last = encoder.blocks[-1].attn
    last.fused_attn = False
    seen: list[torch.Tensor] = []
    hook = last.attn_drop.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        encoder(images)
    hook.remove()
    torch.testing.assert_close(attn, seen[0].mean(1)[:, 0, 1:])


@pytest.mark.parametrize("decoder", ["prompting", "mae", "none"])
def test_teacher_width_is_read_off_the_decoder_head(decoder: str, tmp_path: Path) -> None:
    """A pretrain checkpoint rebuilds without its teacher (an older one, without the spec record, too)."""
    from milan import load_pretrained
    from milan.model import build_model

    model = build_model("milan_vit_shapes_patch8", target_dim=96, decoder=decoder)
    config = {"model": {"name": "milan_vit_shapes_patch8", "decoder": decoder, "masking": "semantic"}}
    torch.save({"model": model.state_dict(), "config": config, "step": 3}, tmp_path / "old.pt")
    rebuilt = load_pretrained(tmp_path / "old.pt").model()
    assert rebuilt.spec == model.spec
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in rebuilt.state_dict().items())


def _write_metrics(path: Path, rows: list[dict]) -> None:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="milan viz")
    viz_cli.add_arguments(p)
    return p


def _run(argv: list[str]) -> Path:
    args = _parser().parse_args(argv)
    return args.func(args)


def test_curves_from_two_runs(tmp_path: Path) -> None:
    _write_metrics(tmp_path / "a", [{"step": s, "loss": 1 / s, "lr": 0.1, "img_per_s": 50.0} for s in range(1, 6)])
    _write_metrics(tmp_path / "b", [{"step": s, "loss": 2 / s, "knn_acc": 0.1 * s} for s in range(1, 6)])
    out = _run(["curves", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "curves.png")])
    assert out == tmp_path / "curves.png"
    with Image.open(out) as im:
        assert 1000 <= im.width <= 1400
    runs = {"a": viz.read_metrics(tmp_path / "a"), "b": viz.read_metrics(tmp_path / "b")}
    assert len(runs["a"]) == 5 and runs["b"][-1]["knn_acc"] == pytest.approx(0.5)


def test_curves_missing_run_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        _run(["curves", str(tmp_path / "nope")])


def test_unknown_data_kind_is_rejected() -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["masks", "x.pt", "--data", "webdataset"])


# --- end to end on a tiny checkpoint -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from milan.data.shapes import generate_shapes
    from milan.tools.cli import main

    base = tmp_path_factory.mktemp("viz")
    root, out = base / "shapes", base / "run"
    generate_shapes(root, num_train=64, num_val=32, workers=1, progress=False)
    main(["pretrain", "--config", "pretrain_shapes", f"data.path={root}", f"run.out_dir={out}",
          "data.num_workers=0", "optim.batch_size=8", "optim.steps=2", "optim.warmup_steps=1",
          "run.tensorboard=false", "monitor.every=0", "model.decoder_depth=1"])
    return {"root": root, "run": out, "base": base}


def test_load_student_rebuilds_the_checkpoint(tiny: dict[str, Path]) -> None:
    student = viz_cli.load_student(tiny["run"])
    assert student.path.suffix == ".pt" and student.step == 2
    assert student.encoder_config.img_size == 64 and student.model().variant.target == "clip"
    assert student.spec == student.model().spec and student.spec.masking == "semantic"


def test_masks_png(tiny: dict[str, Path]) -> None:
    out = _run(["masks", str(tiny["run"]), "--data", "shapes", "--data-path", str(tiny["root"]), "--num", "3",
                "--out", str(tiny["base"] / "fig")])
    assert out.name.startswith("masks_") and out.suffix == ".png"
    with Image.open(out) as im:
        assert 1000 <= im.width <= 1400 and im.height > 200


def test_mask_and_loss_is_the_checkpoint_loss(tiny: dict[str, Path]) -> None:
    student = viz_cli.load_student(tiny["run"])
    model = student.model()
    teacher = viz_cli._teacher_for(student.config, model.patch_size)
    images = torch.randn(2, 3, 64, 64)
    semantic, _, loss, _ = viz_cli.mask_and_loss(student, teacher, images, seed=0)
    with torch.no_grad():
        out = teacher(images)
        pred = model(images, semantic, out.tokens).pred
    assert loss.shape == (2, model.num_patches)
    # MILAN's loss covers CLS + all patches; the map shows the patch tokens of the same prediction.
    torch.testing.assert_close(loss.mean(), feature_loss(pred[:, 1:], out.tokens[:, 1:]))


def test_attention_png(tiny: dict[str, Path]) -> None:
    out = _run(["attention", "--checkpoint", str(tiny["run"]), "--data-path", str(tiny["root"]), "--num", "2",
                "--out", str(tiny["base"] / "fig")])
    assert out.name.startswith("attention_builtin-shapes") and out.exists()
    with Image.open(out) as im:
        assert 1000 <= im.width <= 1400


def test_tsne_png(tiny: dict[str, Path]) -> None:
    out = _run(["tsne", str(tiny["run"]), "teacher:builtin:shapes", "random:milan_vit_shapes_patch8",
                "--data-path", str(tiny["root"]), "--classes", "4", "--per-class", "6",
                "--out", str(tiny["base"] / "fig")])
    assert out.name.startswith("tsne_") and out.exists()
    with Image.open(out) as im:
        assert 1000 <= im.width <= 1400


def test_missing_checkpoint_and_missing_config(tiny: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="weights not found"):
        _run(["masks", str(tmp_path / "missing.pt")])
    bare = tmp_path / "bare.pt"
    torch.save({"model": {}}, bare)
    with pytest.raises(WeightsError, match="holds no ViT encoder"):
        _run(["masks", str(bare)])
    export = tmp_path / "enc.safetensors"
    from milan.io.export import export_timm

    export_timm(tiny["run"], export)
    with pytest.raises(WeightsError, match="no pretraining config"):  # an encoder alone has no decoder to draw
        _run(["masks", str(export)])


def _capture(monkeypatch: pytest.MonkeyPatch) -> list:
    """Keep the matplotlib figures viz would save (to inspect their axes)."""
    figures: list = []
    real = viz._save_fixed

    def keep(fig, path, title, **kwargs):
        figures.append((fig, title))
        return real(fig, path, title, **kwargs)
    monkeypatch.setattr(viz, "_save_fixed", keep)
    return figures


def test_mask_loss_rows_share_one_colour_scale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from milan.masking import RandomMasking

    figures = _capture(monkeypatch)
    loss = torch.stack([torch.full((16,), 0.1), torch.linspace(0.5, 4.0, 16)])
    loss[0, 3] = float("nan")  # an unscored cell does not set the scale
    mask = RandomMasking(0.75)(2, 16, generator=torch.Generator().manual_seed(0))
    viz.plot_mask_loss(torch.rand(2, 3, 32, 32), mask, mask, loss, 8, tmp_path / "m.png")
    fig, _ = figures[0]
    heat = [ax.images[-1] for ax in fig.axes if ax.images and ax.images[-1].get_cmap().name == "magma"]
    assert len(heat) == 2
    for im in heat:
        assert im.get_clim() == pytest.approx((0.1, 4.0))


def test_knn_accuracy_axis_stops_at_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figures = _capture(monkeypatch)
    runs = {"a": [{"step": s, "loss": 1.0 / s, "knn_acc": 0.2 * s} for s in range(1, 6)]}
    viz.plot_curves(runs, tmp_path / "c.png")
    fig, _ = figures[0]
    knn = next(ax for ax in fig.axes if ax.get_title() == "kNN accuracy")
    assert knn.get_ylim() == (0.0, 1.0)


def test_masks_draw_the_checkpoints_own_data_and_say_so(tiny: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --data, viz masks draws from the data the run trained on (here an ImageFolder of the
    user's images, not the shapes cache) and names it, and the teacher, in the figure."""
    photos = tmp_path / "photos" / "things"
    photos.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (80, 64), (60 * i, 120, 200)).save(photos / f"p{i}.png")
    ckpt = torch.load(viz_cli.load_student(tiny["run"]).path, weights_only=False)
    ckpt["config"]["data"] = {"kind": "imagefolder", "path": str(tmp_path / "photos")}
    torch.save(ckpt, tmp_path / "checkpoint-2.pt")

    figures = _capture(monkeypatch)
    args = _parser().parse_args(["masks", str(tmp_path / "checkpoint-2.pt"), "--num", "2", "--out", str(tmp_path)])
    args.func(args)
    assert args.data_used.startswith(f"imagefolder {tmp_path / 'photos'}")
    _, title = figures[0]
    assert "teacher builtin:shapes" in title and str(tmp_path / "photos") in title
    args = _parser().parse_args(["masks", str(tiny["run"]), "--num", "2", "--out", str(tmp_path)])
    args.func(args)  # a shapes run: its own data.path, not the cache
    assert args.data_used.startswith(f"shapes {tiny['root']}")
