"""The command line's rough edges: Ctrl-C and overrides written as options."""

from __future__ import annotations

import argparse

import pytest

from milan.tools import cli


def _fake_recipe(monkeypatch: pytest.MonkeyPatch, err: BaseException) -> None:
    def raises(args: argparse.Namespace) -> None:
        raise err

    monkeypatch.setattr(cli, "_run_recipe", raises)


def test_ctrl_c_is_one_line_with_the_step_and_status_130(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("MILAN_TRACEBACK", raising=False)
    err = KeyboardInterrupt()
    err.step = 42  # what the training loop records before re-raising
    _fake_recipe(monkeypatch, err)
    with pytest.raises(SystemExit) as exit_:
        cli.run(["pretrain", "--config", "pretrain_shapes", "optim.steps=100"])
    assert exit_.value.code == 130
    captured = capsys.readouterr()
    assert captured.err == ("milan pretrain: interrupted at step 42; rerun the same command to resume from the "
                            "newest checkpoint\n")
    assert captured.out == ""


def test_ctrl_c_without_a_step(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("MILAN_TRACEBACK", raising=False)
    _fake_recipe(monkeypatch, KeyboardInterrupt())
    with pytest.raises(SystemExit) as exit_:
        cli.run(["finetune", "optim.epochs=1"])
    assert exit_.value.code == 130
    assert capsys.readouterr().err == ("milan finetune: interrupted; rerun the same command to resume from the "
                                       "newest checkpoint\n")
    err = KeyboardInterrupt()
    err.step = "7"  # not an int: not reported as a step
    _fake_recipe(monkeypatch, err)
    with pytest.raises(SystemExit):
        cli.run(["knn", "data.path=/x"])
    assert capsys.readouterr().err == "milan knn: interrupted\n"  # nothing to resume
    monkeypatch.setenv("MILAN_TRACEBACK", "1")
    with pytest.raises(KeyboardInterrupt):
        cli.run(["knn"])


@pytest.mark.parametrize(("arg", "hint"), [("--data.path=/photos", "data.path=/photos"),
                                           ("--lr=0.1", "lr=0.1"), ("--data.path", "data.path=...")])
def test_overrides_written_as_options_name_the_form(arg: str, hint: str, capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MILAN_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_:
        cli.run(["knn", "model.weights=x.pt", arg])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"overrides are key=value, no leading dashes: {hint}" in err and "usage:" not in err
    assert len(err.strip().splitlines()) == 2  # the error and the MILAN_TRACEBACK hint


def test_other_unknown_options_keep_argparse_usage(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["info", "--verbose"])
    assert exit_.value.code == 2 and "unrecognized arguments: --verbose" in capsys.readouterr().err
