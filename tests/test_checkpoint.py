"""Checkpoint writes are atomic: a failed write keeps the previous file and leaves no partial one."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

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
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*checkpoint-00000010.pt"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
