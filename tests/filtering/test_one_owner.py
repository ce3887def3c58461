"""Issue 27, point 4: ``filtering/tasks.py`` is the one owner of parallelism. No other module
in the library or the CLI makes a process or thread pool, imports ``multiprocessing`` or
counts the machine's cores; they ask ``filtering.tasks`` (``process_pool``, ``thread_pool``,
``task_pool``, ``worker_count``, ``plan_workers``, ``cores``, ``windowed``)."""

from __future__ import annotations

import ast

from tests.conftest import REPO

OWNER = "filtering/tasks.py"
# Names that make a pool or count cores, wherever they are used or imported from
# (``multiprocessing.Pool`` and its kin: the module itself is refused; importing an
# exception such as ``BrokenProcessPool`` to catch it is fine).
POOL_NAMES = {"cpu_count", "sched_getaffinity", "process_cpu_count", "ThreadPoolExecutor", "ProcessPoolExecutor"}
POOL_MODULES = {"multiprocessing"}
# Justified exceptions: path -> (the names it may use, why).
ALLOWED = {
    "filtering/procpool.py": (
        {"ProcessPoolExecutor"},
        "the ProcessPool class tasks.process_pool makes: it subclasses ProcessPoolExecutor to turn "
        "a killed worker into an error instead of a hang",
    ),
}


def _uses(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in POOL_NAMES:
            found.append((node.lineno, node.attr))
        elif isinstance(node, ast.Name) and node.id in POOL_NAMES:
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] in POOL_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            if node.module.split(".")[0] in POOL_MODULES:
                found.append((node.lineno, node.module))
            found += [(node.lineno, a.name) for a in node.names if a.name in POOL_NAMES]
    return found


def test_pools_and_core_counts_only_in_tasks():
    stray = []
    for path in sorted([*(REPO / "filtering").rglob("*.py"), *(REPO / "pipelines").rglob("*.py")]):
        rel = path.relative_to(REPO).as_posix()
        if rel == OWNER:
            continue
        allowed = ALLOWED.get(rel, (set(), ""))[0]
        stray += [
            f"{rel}:{line} {name}" for line, name in _uses(ast.parse(path.read_text(), rel)) if name not in allowed
        ]
    assert stray == [], "make pools and count workers in filtering/tasks.py:\n" + "\n".join(stray)


def test_the_check_sees_each_form():
    src = (
        "import os, multiprocessing as mp\nimport concurrent.futures as cf\n"
        "from concurrent.futures import ProcessPoolExecutor\nfrom multiprocessing import Pool\n"
        "os.cpu_count()\ncf.ThreadPoolExecutor(2)\n"
    )
    assert sorted(n for _, n in _uses(ast.parse(src))) == sorted(
        ["multiprocessing", "ProcessPoolExecutor", "multiprocessing", "cpu_count", "ThreadPoolExecutor"]
    )
    for path in ALLOWED:  # each exception names a file that exists and still needs it
        allowed = ALLOWED[path][0]
        assert {n for _, n in _uses(ast.parse((REPO / path).read_text()))} & allowed, path
