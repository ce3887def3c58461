"""Every test that runs the CLI or the whole pipeline is marked ``slow``, so
``make test-fast`` (``pytest -m "not slow"``) leaves exactly those out.

Found statically: a test runs the CLI when it calls ``run_cli`` / ``run_cli_subprocess``,
``pipelines.cli`` / ``pipelines.runner.run`` / ``pipelines.sweep.sweep``, or uses a fixture
or helper that does (followed through conftest fixtures and module-level functions).
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ENTRY_POINTS = {"run_cli", "run_cli_subprocess"}
ENTRY_IMPORTS = {("pipelines.runner", "run"), ("pipelines.sweep", "sweep"), ("pipelines.cli", "main")}


def _names(node: ast.AST) -> set[str]:
    """Names and attribute names a function reads, and its parameters (fixtures)."""
    out = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    out |= {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
    if isinstance(node, ast.FunctionDef):
        out |= {a.arg for a in node.args.args}
    if any(
        isinstance(n, ast.Constant) and isinstance(n.value, str) and "pipelines.cli" in n.value for n in ast.walk(node)
    ):
        out.add("run_cli_subprocess")
    return out


def _is_slow(decorators: list[ast.expr]) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr == "slow" for d in decorators for n in ast.walk(d))


def _functions(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            yield node, []
        elif isinstance(node, ast.ClassDef):
            marks = [*node.decorator_list]
            for sub in node.body:
                if isinstance(sub, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in sub.targets):
                    marks.append(sub.value)
            yield from ((sub, marks) for sub in node.body if isinstance(sub, ast.FunctionDef))


def _runners(trees: list[ast.Module], known: set[str]) -> set[str]:
    """Function and fixture names (in ``trees``) that run the CLI, directly or through ``known``."""
    entry = set(known)
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                entry |= {a.asname or a.name for a in node.names if (node.module, a.name) in ENTRY_IMPORTS}
    funcs = [(f, _names(f)) for tree in trees for f, _ in _functions(tree)]
    while True:
        more = {f.name for f, names in funcs if f.name not in entry and names & entry}
        if not more:
            return entry
        entry |= more


def test_every_cli_running_test_is_marked_slow():
    conftests = [ast.parse(p.read_text()) for p in sorted(TESTS.rglob("conftest.py"))]
    shared = _runners(conftests, ENTRY_POINTS)
    unmarked = []
    for path in sorted(TESTS.rglob("test_*.py")):
        if path == Path(__file__).resolve():
            continue  # this file's own code names the entry points it looks for
        tree = ast.parse(path.read_text())
        module_marks = [
            n.value
            for n in tree.body
            if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
        ]
        runners = _runners([tree], shared)
        for f, class_marks in _functions(tree):
            marked = _is_slow([*module_marks, *class_marks, *f.decorator_list])
            if f.name.startswith("test_") and f.name in runners and not marked:
                unmarked.append(f"{path.relative_to(TESTS)}::{f.name}")
    assert unmarked == [], "mark these @pytest.mark.slow (they run the CLI): " + ", ".join(unmarked)


def test_the_check_sees_fixtures_helpers_and_marks():
    code = (
        "import pytest\n"
        "from pipelines.runner import run\n"
        "def helper(p): return run(p)\n"
        "def test_a(scored_sample): pass\n"
        "def test_b(): helper(1)\n"
        "@pytest.mark.slow\n"
        "def test_c(): run_cli('x')\n"
        "def test_d(tmp_path): pass\n"
    )
    runners = _runners([ast.parse(code)], _runners([ast.parse((TESTS / "conftest.py").read_text())], ENTRY_POINTS))
    tests = {f.name: f for f, _ in _functions(ast.parse(code))}
    assert {n for n in tests if n in runners} == {"helper", "test_a", "test_b", "test_c"}
    assert [n for n, f in tests.items() if _is_slow(f.decorator_list)] == ["test_c"]
