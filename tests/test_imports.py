"""Import structure: the package's layers import one way, and no module imports itself back.

    method core (encoder, decoder, masking, loss, model, teacher, ...) ← data ← io ← train ← recipes ← tools

Checked on the source with `ast` (nothing is imported). For the layer rules every import counts,
at any depth (a function-local or `TYPE_CHECKING` import of a layer above is still a dependency on
it). For cycles, the strict check counts what runs when a module is imported (module level, not
`if TYPE_CHECKING:`); a second one adds function-local imports, because a lazy import is how a
cycle is hidden, not removed (lazy imports are for start-up time, not for cycles).

Imports sit at the top of modules. A function-local import is a deliberate exception (it keeps
`milan --help` free of torch, or imports an optional extra or a heavy library only where it is used)
and says so: a `# lazy: <why>` comment on its line or on the line above it; one such comment above a
run of consecutive import lines covers the run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import milan

SRC = Path(milan.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module a (possibly relative) `from ... import` names."""
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The milan modules an import statement loads (`from milan.x import y` loads milan.x.y when
    y is a submodule, else milan.x)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = _resolve(module, node)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    return [n for n in names if n == "milan" or n.startswith("milan.")]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run at import time: module level, inside if/try/with blocks, but
    not in functions, classes or `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node):
                found += _module_level(node.body)
            found += _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                found += _module_level(block)
        elif isinstance(node, ast.With):
            found += _module_level(node.body)
    return found


def _run_time(node: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run (module level or in a function), `if TYPE_CHECKING:`
    blocks left out."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return [node]
    if isinstance(node, ast.If) and _is_type_checking(node):
        return [n for child in node.orelse for n in _run_time(child)]
    return [n for child in ast.iter_child_nodes(node) for n in _run_time(child)]


def _imports(which: str) -> dict[str, set[str]]:
    """module → the milan modules it imports; `which`: "all" (every import statement),
    "run_time" (`_run_time`) or "top_level" (`_module_level`)."""
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        if which == "all":
            nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        else:
            nodes = _run_time(tree) if which == "run_time" else _module_level(tree.body)
        graph[module] = {t for n in nodes for t in _targets(module, n)} - {module}
    return graph


ALL_IMPORTS = _imports("all")

# layer → the layers above it, which it must never import
FORBIDDEN = {
    "milan.data": ("milan.io", "milan.train", "milan.recipes", "milan.tools"),
    "milan.io": ("milan.train", "milan.recipes", "milan.tools"),
    "milan.train": ("milan.recipes", "milan.tools"),
}


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_source_tree_is_found() -> None:
    """The checks below see the real package (a wrong root would make them pass vacuously)."""
    assert {"milan.model", "milan.io.weights", "milan.train.checkpoint", "milan.recipes.pretrain",
            "milan.data.folder", "milan.tools.cli"} <= set(MODULES)
    assert "milan.model" in ALL_IMPORTS["milan.recipes.pretrain"] or any(
        _within(t, "milan.model") for t in ALL_IMPORTS["milan.recipes.pretrain"])


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downwards(layer: str) -> None:
    bad = sorted(f"{module} imports {target}" for module, targets in ALL_IMPORTS.items() if _within(module, layer)
                 for target in targets if any(_within(target, above) for above in FORBIDDEN[layer]))
    assert not bad, "\n".join(bad)


def test_recipes_do_not_import_each_other() -> None:
    bad = sorted(f"{module} imports {target}" for module, targets in ALL_IMPORTS.items()
                 if _within(module, "milan.recipes") and module != "milan.recipes"
                 for target in targets if _within(target, "milan.recipes"))
    assert not bad, "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    """The finder itself: a → b → c → a and d → d-free are told apart."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    """Among milan's modules, counting the imports that run when a module is imported."""
    graph = _imports("top_level")
    assert not _cycles(graph), _cycles(graph)


def test_no_cycles_hidden_by_lazy_imports() -> None:
    """Function-local imports counted too. A submodule importing its own package (`milan.data.folder`
    → `milan.data`) is left out: Python imports the package first whatever the submodule says, so
    that edge closes no cycle the package's `__init__` did not already decide on."""
    graph = {module: {t for t in targets if not module.startswith(t + ".")}
             for module, targets in _imports("run_time").items()}
    assert not _cycles(graph), _cycles(graph)


_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def _unmarked_local_imports(source: str) -> list[int]:
    """Line numbers of the function-local import statements of `source` without a `# lazy:` comment
    on their own lines or directly above them (through a run of consecutive import lines)."""
    lines = source.splitlines()
    local: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                local.append(child)
            visit(child, in_function or isinstance(child, _FUNCTIONS))

    visit(ast.parse(source), False)
    import_lines = {i for n in local for i in range(n.lineno, n.end_lineno + 1)}
    unmarked = []
    for node in local:
        above = node.lineno - 1
        while above in import_lines:
            above -= 1
        own = any("# lazy:" in lines[i - 1] for i in range(node.lineno, node.end_lineno + 1))
        if not own and not (above >= 1 and lines[above - 1].strip().startswith("# lazy:")):
            unmarked.append(node.lineno)
    return unmarked


def test_lazy_marker_finder() -> None:
    """The finder itself: module-level imports are free; a local import needs its comment, which
    covers the imports right under it but not one after a blank line or code."""
    source = """import os


def f():
    import json
    # lazy: why
    import torch
    from milan import model

    import timm
    x = 1  # lazy: on a code line, covers nothing below
    import yaml
    import safetensors  # lazy: why
    if x:
        # lazy: why
        from milan.data import (
            shapes,
        )
        import numpy
"""
    assert _unmarked_local_imports(source) == [5, 10, 12]


def test_function_local_imports_say_why() -> None:
    """Every function-local import in milan carries its `# lazy:` reason; anything else moves to the
    top of its module."""
    bad = [f"{path.relative_to(SRC.parent)}:{line}" for path in MODULES.values()
           for line in _unmarked_local_imports(path.read_text(encoding="utf-8"))]
    assert not bad, ("function-local imports without a '# lazy: <why>' comment (move them to the top of "
                     "the module, or say why they must stay lazy):\n" + "\n".join(bad))
