"""Recipe-level tests of `milan pretrain`: CLI runs, exact resume, DDP parity, bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from _pretrain_cli import pretrain_args as _args
from milan.errors import CheckpointError, ConfigError, DataError, TrainingError
from milan.tools.cli import main as cli
from milan.train.checkpoint import latest_checkpoint, step_checkpoints


def _losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.parametrize(
    ("target", "decoder", "masking"),
    [("clip", "prompting", "semantic"), ("clip", "mae", "random"), ("pixel", "prompting", "random"),
     ("pixel", "mae", "semantic"), ("clip", "none", "random")],
)
def test_pretrain_cli_variants(shapes_root: Path, tmp_path: Path, target: str, decoder: str, masking: str) -> None:
    out = tmp_path / "run"
    cli(_args(shapes_root, out, f"model.target={target}", f"model.decoder={decoder}", f"model.masking={masking}"))
    losses = _losses(out)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    found = latest_checkpoint(out)
    assert found is not None and found[1]["step"] == 4
    assert found[1]["variant"] == [target, decoder, masking]
    assert found[1]["config"]["model"]["target"] == target
    assert (out / "config.yaml").is_file()
    # the frozen teacher is never part of the student's checkpoint
    assert not any(k.startswith("teacher") for k in found[1]["model"])


def test_loss_decreases(shapes_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cli(_args(shapes_root, out, "optim.steps=24", "optim.warmup_steps=2", "run.log_every=8"))
    losses = _losses(out)
    assert losses[-1] < losses[0] - 0.02, losses


@pytest.mark.parametrize("masking", ["semantic", "random"])
def test_masks_come_from_the_teachers_cls_attention(shapes_root: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch, masking: str) -> None:
    """Semantic masks are drawn from the very cls_attn the teacher returned for this batch (eq. 3 →
    sampling); random masking never reads it."""
    import milan
    import milan.masking

    attns: list[torch.Tensor] = []
    passed: list[torch.Tensor] = []
    calls = {"random": 0}
    build_teacher = milan.build_teacher
    semantic_masking, random_masking = milan.masking.semantic_masking, milan.masking.random_masking

    def spy_teacher(*args, **kwargs):
        teacher = build_teacher(*args, **kwargs)
        teacher.register_forward_hook(lambda _m, _i, out: attns.append(out.cls_attn))
        return teacher

    def spy_semantic(cls_attn, *args, **kwargs):
        passed.append(cls_attn)
        return semantic_masking(cls_attn, *args, **kwargs)

    def spy_random(*args, **kwargs):
        calls["random"] += 1
        return random_masking(*args, **kwargs)

    monkeypatch.setattr(milan, "build_teacher", spy_teacher)
    monkeypatch.setattr(milan.masking, "semantic_masking", spy_semantic)  # what the step's samplers call
    monkeypatch.setattr(milan.masking, "random_masking", spy_random)
    cli(_args(shapes_root, tmp_path / "run", "optim.steps=2", f"model.masking={masking}"))
    assert len(attns) == 2
    if masking == "semantic":
        assert len(passed) == 2 and all(p is a for p, a in zip(passed, attns)) and calls["random"] == 0
    else:
        assert passed == [] and calls["random"] == 2


def test_resume_is_exact(shapes_root: Path, tmp_path: Path) -> None:
    steps = ["optim.steps=6", "run.ckpt_every=100"]  # 8 steps/epoch: checkpoints only where we stop
    full, part = tmp_path / "full", tmp_path / "part"
    cli(_args(shapes_root, full, *steps))
    cli(_args(shapes_root, part, *steps, "run.max_steps=3"))
    assert latest_checkpoint(part)[1]["step"] == 3
    cli(_args(shapes_root, part, *steps))  # resume=auto picks up step 3
    assert _losses(part) == _losses(full)
    a, b = latest_checkpoint(full)[1], latest_checkpoint(part)[1]
    assert a["step"] == b["step"] == 6
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_crash_between_checkpoints_resumes_with_the_same_log(shapes_root: Path, tmp_path: Path) -> None:
    """Killed after step 5 with the newest checkpoint at step 3: the resumed metrics.jsonl drops the
    records of steps 4–5 that the crashed run wrote, and logs the same window averages as a run
    that never stopped (the open window is part of the checkpoint)."""
    steps = ["optim.steps=6", "run.log_every=2", "run.ckpt_every=3"]
    full, part = tmp_path / "full", tmp_path / "part"
    cli(_args(shapes_root, full, *steps))
    cli(_args(shapes_root, part, *steps, "run.max_steps=5"))
    (part / "checkpoint-00000005.pt").unlink()  # the crash: step 5 ran and was logged, not saved
    with (part / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 0.')  # and its last line was cut short
    cli(_args(shapes_root, part, *steps))

    def records(run: Path) -> list[tuple[int, float, int]]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"], r["bad_images"]) for r in map(json.loads, lines) if "loss" in r]

    assert [r[0] for r in records(full)] == [2, 4, 6]
    assert records(part) == records(full)


def test_rerunning_a_finished_run_does_nothing(shapes_root: Path, tmp_path: Path) -> None:
    from milan.recipes.pretrain import CONFIG, main
    from milan.train.config import CONFIG_DIR, load_config

    out = tmp_path / "run"
    args = _args(shapes_root, out, "optim.steps=2")
    cli(args)
    before = (out / "metrics.jsonl").read_text(), sorted(p.name for p in out.iterdir())
    import logging

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("milan").addHandler(handler)
    try:
        result = main(load_config(CONFIG, CONFIG_DIR / "pretrain_shapes.yaml", args[3:]))  # same run again
    finally:
        logging.getLogger("milan").removeHandler(handler)
    assert result["step"] == 2
    assert any(m.startswith("nothing to do:") and "at step 2, the run stops at 2" in m for m in records), records
    assert ((out / "metrics.jsonl").read_text(), sorted(p.name for p in out.iterdir())) == before


def _shards(root: Path, out: Path) -> Path:
    from milan.data.wds import write_shards

    rows = (root / "train" / "labels.jsonl").read_text().splitlines()
    samples = ((f"s{i:04d}", (root / "train" / json.loads(r)["image"]).read_bytes(), json.loads(r)["shape"])
               for i, r in enumerate(rows))
    write_shards(samples, out, per_shard=8)
    return out


def test_webdataset_pretrain_and_exact_resume(shapes_root: Path, tmp_path: Path) -> None:
    shards = _shards(shapes_root, tmp_path / "shards")
    wds = ["data.kind=webdataset", f"data.path={shards}", "data.num_workers=2", "optim.steps=6",
           "run.ckpt_every=100"]
    full, part = tmp_path / "full", tmp_path / "part"
    cli(_args(shapes_root, full, *wds))
    cli(_args(shapes_root, part, *wds, "run.max_steps=3"))
    cli(_args(shapes_root, part, *wds))
    assert _losses(part) == _losses(full) and len(_losses(full)) == 6
    a, b = latest_checkpoint(full)[1]["model"], latest_checkpoint(part)[1]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_knn_monitor_logs_accuracy(shapes_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cli(_args(shapes_root, out, "monitor.every=2", "monitor.train_size=64", "monitor.val_size=16"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    accs = [(r["step"], r["knn_acc"]) for r in records if "knn_acc" in r]
    assert [s for s, _ in accs] == [2, 4] and all(0.0 <= a <= 1.0 for _, a in accs)


def test_truncated_checkpoint_is_skipped(shapes_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cli(_args(shapes_root, out, "run.ckpt_every=2", "run.keep_last=5"))
    newest = step_checkpoints(out)[-1]
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # a crash mid-copy, say
    with pytest.warns(UserWarning, match="unreadable checkpoint"):
        path, state = latest_checkpoint(out)
    assert state["step"] == 2 and path != newest


def test_unknown_key_and_bad_values_fail_early(shapes_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown config key optim\.lrr.*valid keys: .*lr"):
        cli(_args(shapes_root, tmp_path, "optim.lrr=1"))
    with pytest.raises(ConfigError, match=r"model\.masking='semantik' is not valid; choose one of: 'semantic', 'random'"):
        cli(_args(shapes_root, tmp_path, "model.masking=semantik"))
    with pytest.raises(ConfigError, match=r"optim\.batch_size='big' should be an integer"):
        cli(_args(shapes_root, tmp_path, "optim.batch_size=big"))
    with pytest.raises(ConfigError, match="config 'nope' not found"):
        cli(["pretrain", "--config", "nope"])


@pytest.mark.parametrize(("override", "message"), [
    ("optim.batch_size=0", r"optim\.batch_size=0 must be at least 1"),
    ("optim.accum_steps=0", r"optim\.accum_steps=0 must be at least 1"),
    ("run.log_every=0", r"run\.log_every=0 must be at least 1"),
    ("run.ckpt_every=0", r"run\.ckpt_every=0 must be at least 1"),
    ("model.mask_ratio=1.0", r"model\.mask_ratio=1\.0 must be in \(0, 1\)"),
    ("optim.warmup_steps=9", r"optim\.warmup_steps=9 exceeds optim\.steps=4"),
    ("data.crop_scale=[0.9,0.2]", r"data\.crop_scale=\[0\.9, 0\.2\] must satisfy"),
])
def test_unusable_values_fail_before_anything_is_built(shapes_root: Path, tmp_path: Path, override: str,
                                                       message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cli(_args(shapes_root, tmp_path / "run", override))
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_resume_refuses_a_checkpoint_of_another_model(shapes_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cli(_args(shapes_root, out, "optim.steps=1"))
    before = (out / "config.yaml").read_text()
    with pytest.raises(CheckpointError, match=r"checkpoint of another model \(model milan_vit_shapes_patch8, variant "
                                              r"clip/prompting/semantic; this run: model milan_vit_shapes_patch8, "
                                              r"variant pixel/prompting/semantic\)\. Use a new run\.out_dir, or "
                                              r"run\.resume=none"):
        cli(_args(shapes_root, out, "optim.steps=2", "model.target=pixel"))
    with pytest.raises(CheckpointError, match=r"does not fit this model \(.*shape mismatches.*\)\. Use a new run\.out_dir"):
        cli(_args(shapes_root, out, "optim.steps=2", "model.decoder_dim=32"))
    assert (out / "config.yaml").read_text() == before  # a refused resume leaves the folder as it was


def test_resume_from_an_older_checkpoint_into_the_same_folder_is_refused(shapes_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cli(_args(shapes_root, out, "run.ckpt_every=2", "run.keep_last=5"))
    with pytest.raises(CheckpointError, match=r"run\.resume=.*checkpoint-00000002\.pt is older than checkpoint-00000004\.pt"):
        cli(_args(shapes_root, out, f"run.resume={out / 'checkpoint-00000002.pt'}"))
    with pytest.raises(CheckpointError, match=r"cannot resume: checkpoint not found"):
        cli(_args(shapes_root, tmp_path / "other", f"run.resume={tmp_path / 'missing.pt'}"))


def test_missing_data_path_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data path not found"):
        cli(["pretrain", "--config", "pretrain_shapes", "data.kind=imagefolder",
             f"data.path={tmp_path / 'missing'}", f"run.out_dir={tmp_path / 'r'}"])


def _image_folder(root: Path, *, good: int, corrupt: int) -> Path:
    """An ImageFolder with RGB, grayscale, CMYK, palette and RGBA images, plus corrupt files."""
    cls = root / "things"
    cls.mkdir(parents=True)
    modes = ["RGB", "L", "CMYK", "P", "RGBA"]
    g = torch.Generator().manual_seed(0)
    for i in range(good):
        arr = (torch.rand(40, 48, 3, generator=g) * 255).byte().numpy()
        img = Image.fromarray(arr).convert(modes[i % len(modes)])
        img.save(cls / f"img{i:03d}.{'jpg' if img.mode == 'CMYK' else 'png'}")
    for i in range(corrupt):  # named to sort between the good ones
        (cls / f"img{i:03d}_bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def test_bad_images_are_skipped_and_counted(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "imgs", good=70, corrupt=2)
    out = tmp_path / "run"
    cli(_args(root, out, "data.kind=imagefolder", "data.max_bad_fraction=0.2", "optim.steps=3"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 3


def test_too_many_bad_images_stop_the_run(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "imgs", good=40, corrupt=40)
    with pytest.raises(DataError, match=r"unreadable or too small .* data\.max_bad_fraction=0\.01"):
        cli(_args(root, tmp_path / "run", "data.kind=imagefolder", "optim.steps=8"))


def test_unreadable_folder_names_the_problem(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "imgs", good=0, corrupt=40)
    with pytest.raises(DataError, match=r"16 consecutive unreadable or too small images .*img0\d\d_bad\.jpg"):
        cli(_args(root, tmp_path / "run", "data.kind=imagefolder", "optim.steps=2"))


def test_non_finite_loss_stops_without_poisoned_checkpoint(shapes_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"NaN/inf at step \d+"):
        cli(_args(shapes_root, out, "optim.lr=1e12", "optim.warmup_steps=0", "optim.steps=8",
                  "run.ckpt_every=1", "run.keep_last=100"))
    for path in step_checkpoints(out):
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_ddp_two_processes_match_one(shapes_root: Path, tmp_path: Path) -> None:
    common = _args(shapes_root, tmp_path, "optim.steps=3")
    one, two = tmp_path / "one", tmp_path / "two"
    cli([*common, f"run.out_dir={one}"])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # two processes, stopped after step 2 and resumed (rank 0 picks the checkpoint, both load it)
    for stop in ("run.max_steps=2", "run.resume=auto"):
        subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
             "-m", "milan", *common, f"run.out_dir={two}", "optim.batch_size=4", "run.device=cpu", stop],
            check=True, env=env, cwd=tmp_path, capture_output=True, timeout=300,
        )
    assert [r["step"] for r in map(json.loads, (two / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3]
    assert torch.allclose(torch.tensor(_losses(one)), torch.tensor(_losses(two)), atol=1e-5)
    a, b = latest_checkpoint(one)[1]["model"], latest_checkpoint(two)[1]["model"]
    for key in a:
        x, y = a[key], b[key]
        if key.endswith("qkv.bias"):
            # The key bias gets an exactly-zero gradient (softmax ignores a shift shared by all
            # keys); AdamW turns the float noise around that zero into lr-sized steps, so it is
            # not reproducible across reduction orders. Compare the q and v thirds only.
            q, _, v = x.chunk(3)
            q2, _, v2 = y.chunk(3)
            x, y = torch.cat([q, v]), torch.cat([q2, v2])
        assert torch.allclose(x, y, atol=1e-5), key


def test_mae_name_trains_mae_without_a_teacher(shapes_root: Path, tmp_path: Path, monkeypatch) -> None:
    import milan

    def no_teacher(*args, **kwargs):
        raise AssertionError("MAE (pixel target, random masking) must not build a teacher")

    monkeypatch.setattr(milan, "build_teacher", no_teacher)
    out = tmp_path / "run"
    cli(_args(shapes_root, out, "model.name=mae_vit_shapes_patch8", "optim.steps=2"))
    state = latest_checkpoint(out)[1]
    assert state["variant"] == ["pixel", "mae", "random"] and state["spec"]["masking"] == "random"
    assert state["kind"] == "pretrain" and state["identity"]["model"] == "mae_vit_shapes_patch8"


def test_bench_and_pretrain_run_the_same_step(shapes_root: Path) -> None:
    """`milan pretrain` and `milan bench speed` give the same loss for the same batch, mask and weights,
    and that loss is the paper's path written out: teacher → semantic mask → model → eq. 1."""
    from milan.loss import feature_loss
    from milan.masking import semantic_masking
    from milan.recipes import pretrain
    from milan.tools.bench import build_bench_step
    from milan.train.config import config_path, load_config

    cfg = load_config(pretrain.CONFIG, config_path("pretrain_shapes"), [f"data.path={shapes_root}"])
    cpu = torch.device("cpu")
    torch.manual_seed(1)
    step = pretrain.build_step(cfg, cpu)
    bench = build_bench_step(step.spec, step.teacher, batch_size=4, device=cpu, seed=5)
    bench.model.load_state_dict(step.model.state_dict())
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    noise = pretrain.mask_noise(0, 3, 0, (4, step.model.num_patches))

    out = step(images, noise=noise)
    loss_bench = bench(images, None, noise=noise)  # (it also runs backward and AdamW: after the loss)
    assert torch.equal(out.loss.detach(), loss_bench)

    teacher = step.teacher(images)
    mask = semantic_masking(teacher.cls_attn, cfg.model.mask_ratio, noise=noise)
    assert torch.equal(mask.keep, out.mask.keep)
    by_hand = feature_loss(step.model(images, mask, teacher.tokens).pred, teacher.tokens)
    torch.testing.assert_close(out.loss, by_hand, rtol=0, atol=0)
    torch.testing.assert_close(out.token_loss.mean(), out.loss)  # every token scored, uniformly (eq. 1)
