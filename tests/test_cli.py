"""Every command has --help; `python -m milan` works; `milan info` lists what exists."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from milan.tools.cli import main

COMMANDS = [["pretrain"], ["demo"], ["data"], ["data", "shapes"], ["data", "shards"], ["teacher"], ["teacher", "train-shapes"], ["bench"], ["bench", "speed"], ["info"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: milan " + " ".join(command) in capsys.readouterr().out


def test_info_lists_models_and_configs(capsys: pytest.CaptureFixture[str]) -> None:
    main(["info"])
    out = capsys.readouterr().out
    assert "milan_vit_base_patch16" in out and "pretrain_vit_base" in out and "builtin:shapes" in out


def test_python_dash_m() -> None:
    done = subprocess.run([sys.executable, "-m", "milan", "--help"], capture_output=True, text=True, check=True)
    assert "pretrain" in done.stdout and "demo" in done.stdout


def test_print_config(capsys: pytest.CaptureFixture[str]) -> None:
    main(["pretrain", "--config", "pretrain_vit_base", "optim.epochs=7", "--print-config"])
    out = capsys.readouterr().out
    assert "epochs: 7" in out and "spec: openclip:ViT-B-16" in out


def test_recipe_help_lists_only_its_own_configs(capsys: pytest.CaptureFixture[str]) -> None:
    from milan.tools.cli import build_parser, config_recipe

    assert config_recipe("segment_shapes") == "segment" and config_recipe("detect_shapes") == "detect"
    assert config_recipe("pretrain_shapes") == config_recipe("kd_vit_base") == "pretrain"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["segment", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "segment_shapes" in text and "pretrain_shapes" not in text and "detect_shapes" not in text


def test_executable_prints_input_errors_as_one_line(tmp_path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from milan.tools.cli import run

    monkeypatch.delenv("MILAN_TRACEBACK", raising=False)
    args = ["pretrain", "--config", "pretrain_shapes", "data.kind=imagefolder", f"data.path={tmp_path / 'nope'}",
            f"run.out_dir={tmp_path / 'run'}"]
    with pytest.raises(SystemExit) as exit_info:
        run(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("milan pretrain: error: data path not found:") and "Traceback" not in "".join(err)
    assert "MILAN_TRACEBACK=1" in err[1] and len(err) == 2
    monkeypatch.setenv("MILAN_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError):  # the real exception, for debugging
        run(args)


def test_executable_keeps_tracebacks_of_errors_raised_outside_milan(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ValueError from inside torch may be a bug in milan: it is not reduced to one line."""
    import milan.tools.cli
    from milan.tools.cli import run

    def broken(_args) -> None:
        torch.nn.functional.cross_entropy(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))

    monkeypatch.delenv("MILAN_TRACEBACK", raising=False)
    monkeypatch.setattr(milan.tools.cli, "_cmd_info", broken)
    with pytest.raises(ValueError, match="batch_size"):
        run(["info"])


def test_only_the_entry_point_raises_system_exit() -> None:
    """The error contract: library code raises `milan.errors.UserError`s; only `milan.tools.cli.run`
    turns them into an exit status."""
    import re

    import milan

    root = Path(milan.__file__).parent
    raisers = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                     if re.search(r"raise SystemExit|SystemExit\(", p.read_text()))
    assert raisers == ["tools/cli.py"], raisers


def test_user_errors_print_one_line_for_every_kind(capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import milan.tools.cli
    from milan import errors
    from milan.tools.cli import run

    monkeypatch.delenv("MILAN_TRACEBACK", raising=False)
    for kind in (errors.ConfigError, errors.DataError, errors.WeightsError, errors.CheckpointError,
                 errors.TeacherError, errors.TrainingError, errors.DataNotFound):
        def broken(_args, kind=kind) -> None:
            raise kind(f"{kind.__name__} happened; do X")

        monkeypatch.setattr(milan.tools.cli, "_cmd_info", broken)
        with pytest.raises(SystemExit) as info:
            run(["info"])
        assert info.value.code == 2
        assert capsys.readouterr().err.splitlines()[0] == f"milan info: error: {kind.__name__} happened; do X"


def test_top_level_help_imports_no_torch() -> None:
    """`milan --help` (and `milan info`-like listing) must not import torch or timm: it stays instant.
    Each command's own `--help` still shows its arguments (it imports that command only)."""
    code = ("import sys\nfrom milan.tools import cli\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "viz" in out and "pretrain" in out  # every command is listed
    assert "HEAVY []" in out
    viz = subprocess.run([sys.executable, "-m", "milan", "viz", "masks", "--help"], capture_output=True, text=True)
    assert viz.returncode == 0 and "--data-path" in viz.stdout


def test_package_exports_resolve_lazily() -> None:
    import milan

    for name in milan.__all__:
        assert getattr(milan, name) is not None, name
    with pytest.raises(AttributeError):
        milan.no_such_name  # noqa: B018


def test_failed_start_leaves_no_run_folder(tmp_path: Path) -> None:
    """A command refused after its run folder was started removes that folder again; a folder that
    existed before (a resumed run) is never removed."""
    from milan.errors import UserError

    out = tmp_path / "knn"
    with pytest.raises(UserError, match="not an encoder preset"):
        main(["knn", "data.kind=shapes", "model.preset=vit_nope", f"run.out_dir={out}"])
    assert not out.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    with pytest.raises(UserError):
        main(["knn", "data.kind=shapes", "model.preset=vit_nope", f"run.out_dir={existing}"])
    assert (existing / "notes.txt").read_text() == "mine"
