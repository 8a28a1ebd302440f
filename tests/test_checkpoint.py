"""Checkpoint writes are atomic: a failed write keeps the previous file and leaves no partial one."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest
import torch

from _evil import Evil
from milan.train import checkpoint
from milan.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def test_round_trip_and_no_temp_file(tmp_path: Path) -> None:
    path = save_checkpoint({"step": 3, "w": torch.arange(4)}, tmp_path / "checkpoint-last.pt")
    state = load_checkpoint(path)
    assert state["step"] == 3 and torch.equal(state["w"], torch.arange(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-last.pt"]


def test_disk_full_keeps_the_old_checkpoint_and_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_checkpoint({"step": 1}, tmp_path / "checkpoint-last.pt")

    def full_disk(obj, f):  # write half a file, then fail as a full disk does
        f.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"No space left on device.*previous checkpoint is intact.*free space in .*resume from it"):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1  # the previous checkpoint is intact
    assert not path.with_name(path.name + ".tmp").exists()


def test_unreadable_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "checkpoint-00000010.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"checkpoint .*checkpoint-00000010.pt is not a weights file \(it "
                                              r"starts with b'not a checkpoint'\): expected a checkpoint written by "
                                              r"milan .*run\.resume=auto.*run\.resume=none"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_check_resumable_refuses_another_kind_model_or_shape_in_one_line(tmp_path: Path) -> None:
    from milan.train.checkpoint import CheckpointRecord, check_resumable

    model = torch.nn.Linear(4, 3)
    identity = {"encoder": {"embed_dim": 192, "depth": 6, "patch_size": 8, "img_size": 64}, "num_classes": 3}
    state = CheckpointRecord("segment", 5, {}, identity).state(model=model.state_dict(), optimizer={})
    path = tmp_path / "checkpoint-last.pt"
    fix = "Use a new run.out_dir"

    def check(state: dict, **kwargs) -> None:
        check_resumable(path, state, **{"kind": "segment", "identity": identity, "expected": model.state_dict(),
                                        "fix": fix, **kwargs})

    check(state)  # ours: no error
    refusals = [
        (dict(kind="detect"), r"checkpoint-last\.pt is not a resumable detect checkpoint \(kind 'segment'\)\. "),
        (dict(needs=("optimizer", "scaler")), r"is not a resumable segment checkpoint \(no scaler\)\. "),
        (dict(identity={**identity, "num_classes": 5}),
         r"is a checkpoint of another model \(encoder 192/6/8/64, num_classes 3; this run: encoder 192/6/8/64, "
         r"num_classes 5\)\. "),
        (dict(expected=torch.nn.Linear(4, 5).state_dict()),
         r"does not fit this model \(2 shape mismatches, 0 missing/unexpected keys, e\.g\. weight\)\. "),
    ]
    for kwargs, message in refusals:
        with pytest.raises(CheckpointError, match=message + "Use a new run\\.out_dir$") as err:
            check(state, **kwargs)
        assert "\n" not in str(err.value)
    # a checkpoint that predates the record (no identity) is still checked for its kind and weights
    old = {"kind": "segment", "model": model.state_dict(), "optimizer": {}, "step": 5}
    check(old, identity={**identity, "num_classes": 5})
    with pytest.raises(CheckpointError, match="does not fit this model"):
        check(old, expected=torch.nn.Linear(2, 3).state_dict())


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_resume_from_a_file_that_is_not_a_checkpoint_names_its_problem(
    shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `milan pretrain run.resume=FILE`: one line naming what FILE is, not "every node must see the folder".
    from _pretrain_cli import pretrain_args
    from milan.tools.cli import run

    marker = tmp_path / "pwned"
    (tmp_path / "junk.pt").write_bytes(b"\x13\x37 definitely not a checkpoint")
    torch.save({"model": {}, "step": 1, "payload": Evil(str(marker))}, tmp_path / "evil.pt")
    torch.save({"w": torch.zeros(512)}, tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    said = {
        "junk.pt": r"is not a weights file \(it starts with b'\\x137 definitely no'\): expected a checkpoint "
                   r"written by milan",
        "evil.pt": r"holds pickled Python objects \((io|builtins)\.open\) .*arbitrary code.*refused",
        "cut.pt": r"is a truncated or damaged zip archive .*stopped early",
    }
    for name, problem in said.items():
        with pytest.raises(SystemExit) as exit_info:
            run(pretrain_args(shapes_root, tmp_path / f"run_{name}", f"run.resume={tmp_path / name}"))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        error_line = err.splitlines()[0]
        assert re.match(rf"milan pretrain: error: cannot resume: checkpoint {re.escape(str(tmp_path / name))} "
                        rf"{problem}.*run\.resume=auto.*run\.resume=none\)?$", error_line), error_line
        assert "Every node must see" not in err and "weights_only" not in err
        assert len(err.strip().splitlines()) == 2  # the error and the MILAN_TRACEBACK hint
    assert not marker.exists()


def test_shared_storage_hint_only_when_another_rank_cannot_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from milan.train import distributed as distr
    from milan.train.run import agree_on_checkpoint

    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"junk junk junk")
    rank0 = distr.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(CheckpointError) as info:  # rank 0 cannot read the file: its problem, no storage hint
        agree_on_checkpoint(lambda: (bad, load_checkpoint(bad)), rank0)
    assert "is not a weights file" in str(info.value) and "Every node must see" not in str(info.value)

    # Rank 1 of 2: rank 0 chose a file that rank 1 does not see.
    good = save_checkpoint({"step": 1}, tmp_path / "checkpoint-1.pt")
    gathered = iter([[(str(tmp_path / "elsewhere.pt"), None), None], [None, "filled below"]])

    def all_gather(obj):
        rows = next(gathered)
        return [rows[0], obj] if rows[1] == "filled below" else rows

    monkeypatch.setattr(distr, "all_gather_object", all_gather)
    rank1 = distr.DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    with pytest.raises(CheckpointError, match=r"cannot resume: rank 1: checkpoint not found: .*elsewhere\.pt.*"
                                              r"Every node must see the run folder"):
        agree_on_checkpoint(lambda: (good, load_checkpoint(good)), rank1)
