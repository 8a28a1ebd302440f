"""Docs that cannot rot: every `milan ...` command on README.md and docs/*.md is checked against the
command line, every Python block marked `<!-- runnable -->` runs, and the site builds strictly.

A command is checked without running it: the subcommand and its flags must parse
(`milan.tools.cli.build_parser`), every `key=value` override must name a key of that recipe's config
(`CONFIG` dataclass of the recipe module), every `--config NAME` must be a shipped config of that
recipe (or a file), and overrides with concrete values must pass the config loader's type checks
(`load_config`, what `--print-config` runs). Placeholder values (`...`, `DIR`, `<arch>`) skip only the
type check; their keys are still checked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = "<!-- runnable -->"
#: code-block languages that never hold shell commands
NOT_SHELL = {"python", "py", "text", "yaml", "json", "toml"}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    body: str
    runnable: bool


def fenced_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a markdown file, with the runnable marker of the line before."""
    blocks: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(```+)\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        start = i
        prev = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        blocks.append(Block(path, start + 1, lang.lower(), "\n".join(body) + "\n", prev == RUNNABLE))
        i += 1
    return blocks


def shell_lines(block: Block) -> list[tuple[int, str]]:
    """Logical lines of a shell block: `\\` continuations joined, (first line number, text)."""
    out: list[tuple[int, str]] = []
    pending, first = "", 0
    for k, raw in enumerate(block.body.splitlines()):
        if not pending:
            first = block.line + 1 + k
        stripped = raw.rstrip()
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        out.append((first, pending + stripped))
        pending = ""
    if pending:
        out.append((first, pending))
    return out


def milan_argv(tokens: list[str]) -> list[str] | None:
    """The arguments given to `milan` by one shell command, or None when it does not run milan.

    Understands `milan ...`, `.venv/bin/milan ...`, `ENV=1 milan ...`, `time milan ...`,
    `python -m milan ...`, `torchrun [flags] -m milan ...` and `sbatch [flags] scripts/slurm/milan.sbatch ...`.
    """
    while tokens and (re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]) or tokens[0] in ("time", "exec")):
        tokens = tokens[1:]
    if not tokens:
        return None
    head = tokens[0]
    if head == "milan" or head.endswith("/milan"):
        return tokens[1:]
    if head == "torchrun" or re.fullmatch(r"(.*/)?python[0-9.]*", head):
        for k in range(1, len(tokens) - 1):
            if tokens[k] == "-m":
                return tokens[k + 2:] if tokens[k + 1] == "milan" else None
        return None
    if head == "sbatch":
        for k, tok in enumerate(tokens):
            if tok.endswith("milan.sbatch"):
                return tokens[k + 1:]
    return None


@dataclass(frozen=True)
class Command:
    where: str  # file:line
    text: str
    argv: tuple[str, ...]
    error: str = ""  # the shell could not split it


def collect_commands() -> list[Command]:
    commands: list[Command] = []
    for path in DOC_FILES:
        for block in fenced_blocks(path):
            if block.lang in NOT_SHELL:
                continue
            for line, text in shell_lines(block):
                try:
                    tokens = shlex.split(text, comments=True)
                except ValueError as err:  # unbalanced quotes: only a problem on a milan line
                    if re.search(r"\bmilan\b", text.split("#")[0]):
                        commands.append(Command(f"{path.relative_to(ROOT)}:{line}", text.strip(), (), str(err)))
                    continue
                argv = milan_argv(tokens)
                if argv is not None:
                    commands.append(Command(f"{path.relative_to(ROOT)}:{line}", text.strip(), tuple(argv)))
    return commands


def collect_runnable() -> list[Block]:
    return [b for path in DOC_FILES for b in fenced_blocks(path) if b.runnable]


COMMANDS = collect_commands()
RUNNABLE_BLOCKS = collect_runnable()


def is_placeholder(value: str) -> bool:
    """A value the docs leave for the reader to fill in: its key is checked, its type is not."""
    return ("..." in value or "…" in value or "<" in value or "DIR" in value
            or re.fullmatch(r"[A-Z][A-Z_]*", value) is not None)


def config_keys(cls: type, prefix: str = "") -> set[str]:
    """Every dotted key of a config dataclass, sections included."""
    keys: set[str] = set()
    hints = get_type_hints(cls)
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        keys.add(key)
        tp = hints[field.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            keys |= config_keys(tp, key + ".")
    return keys


def parse(argv: list[str]) -> Any:
    """argparse's namespace for `milan argv`; its error message (not SystemExit) on a bad command line."""
    from milan.tools.cli import build_parser

    parser = build_parser(argv)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args, unknown = parser.parse_known_args(argv)
    except SystemExit:
        pytest.fail(f"does not parse: {err.getvalue().strip().splitlines()[-1]}")
    if unknown:
        pytest.fail(f"unknown option(s) {unknown}")
    return args


def check_command(command: Command) -> None:
    from milan.train.config import config_path, config_recipe, load_config, shipped_configs

    assert not command.error, f"not a valid shell line ({command.error})"
    argv = [a for a in command.argv if a not in ("...", "…")]  # `milan pretrain ... key=value`
    if argv[-1:] in (["--help"], ["-h"]):
        argv = argv[:-1]
    args = parse(argv)
    if not hasattr(args, "config_cls"):
        return  # a tool command: argparse has checked its arguments and flags
    name = args.command
    module = importlib.import_module(args.config_cls)
    if args.config is not None:
        if args.config in shipped_configs():
            assert config_recipe(args.config) == name, (
                f"--config {args.config} is a {config_recipe(args.config)} config, not {name}'s")
        path = config_path(args.config)
    else:
        path = None
    keys = config_keys(module.CONFIG)
    concrete: list[str] = []
    for item in args.overrides:
        key, sep, value = item.partition("=")
        assert sep, f"{item!r} is not key=value"
        assert key in keys, f"{key} is not a key of milan {name}'s config ({module.CONFIG.__name__})"
        if not is_placeholder(value):
            concrete.append(item)
    load_config(module.CONFIG, path, concrete)  # types and choices, as --print-config checks them


def test_collects_every_form() -> None:
    """The collector finds the commands (a broken one would check nothing and pass)."""
    texts = [c.text for c in COMMANDS]
    assert len(COMMANDS) >= 45, len(COMMANDS)
    assert any(t.startswith("torchrun") for t in texts)
    assert any(t.startswith("sbatch") for t in texts)
    assert any(t.startswith("milan ") for t in texts)
    joined = [c for c in COMMANDS if c.argv and c.argv[0] == "pretrain" and "teacher.weights=ViT-B-16.pt" in c.argv
              and c.where.startswith("README.md")]
    assert joined, "a `\\`-continued README command was not joined"
    assert {c.argv[0] for c in COMMANDS} >= {"pretrain", "knn", "linprobe", "finetune", "eval", "export", "viz",
                                             "data", "bench", "segment", "detect", "demo", "info", "teacher"}
    assert len(RUNNABLE_BLOCKS) >= 2


@pytest.mark.parametrize(("line", "argv"), [
    ("milan knn data.path=x", ["knn", "data.path=x"]),
    (".venv/bin/milan demo", ["demo"]),
    ("MILAN_CPU_BF16=1 time milan bench speed", ["bench", "speed"]),
    ("python -m milan info", ["info"]),
    ("torchrun --nproc_per_node=8 -m milan pretrain a=1", ["pretrain", "a=1"]),
    ("sbatch --nodes=4 scripts/slurm/milan.sbatch pretrain a=1", ["pretrain", "a=1"]),
    ("python -m pytest tests/test_cli.py", None),
    ("pip install 'milan-mim[wandb]'", None),
])
def test_command_forms(line: str, argv: list[str] | None) -> None:
    assert milan_argv(shlex.split(line)) == argv


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command(command: Command) -> None:
    check_command(command)


@pytest.mark.parametrize("argv", [
    ["pretrain", "--config", "pretrain_folder", "data.pth=photos"],  # a misspelt key
    ["pretrain", "--config", "finetune_vit_base"],  # another recipe's config
    ["pretrain", "--config", "no_such_config"],
    ["knn", "--no-such-flag"],
    ["no-such-command"],
    ["export", "runs/x", "--to", "onnx"],  # a choice argparse knows
    ["pretrain", "data.decode=jpeg"],  # a value outside a Literal
    ["bogus", "-m", "milan"],
])
def test_checker_catches(argv: list[str]) -> None:
    """Each kind of rot the checker exists for makes it fail."""
    if argv[0] == "bogus":  # not a milan command at all
        assert milan_argv(argv) is None
        return
    with pytest.raises((AssertionError, pytest.fail.Exception, ValueError)):
        check_command(Command("test", " ".join(argv), tuple(argv)))


def test_no_unchecked_commands() -> None:
    """A `milan` command in an indented (unfenced) code block would escape the checks: fence it."""
    for path in DOC_FILES:
        fence = False
        for k, line in enumerate(path.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                fence = not fence
            elif not fence and re.match(r"^(    |\t)\s*(milan|torchrun|sbatch) ", line):
                pytest.fail(f"{path.relative_to(ROOT)}:{k}: command outside a fenced block: {line.strip()}")


@pytest.mark.parametrize("block", RUNNABLE_BLOCKS, ids=[f"{b.path.name}:{b.line}" for b in RUNNABLE_BLOCKS])
def test_runnable_block(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert block.lang in ("python", "py"), "only Python blocks are marked runnable"
    monkeypatch.chdir(tmp_path)
    exec(compile(block.body, f"{block.path.name}:{block.line}", "exec"), {"__name__": "__docs__"})


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None
                    or importlib.util.find_spec("mkdocstrings_handlers") is None,
                    reason="the docs extra is not installed (pip install -e '.[docs]')")
def test_site_builds_strictly(tmp_path: Path) -> None:
    """`mkdocs build --strict`: a broken link, a page missing from the nav, a missing include or a
    docstring mkdocstrings cannot read fails the build."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for page in ("index.html", "api/index.html", "teachers/index.html", "ARCHITECTURE/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    assert "semantic_masking" in (tmp_path / "site" / "api" / "index.html").read_text()
