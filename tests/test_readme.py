"""The README works as written: its commands on the bundled sample run, and it stays short.

Convention (what the README marks, with an HTML comment on the line just before a fence):

- ``<!-- readme-test: sample -->`` before a ```` ```bash ```` or ```` ```python ```` block: the
  block touches only the bundled sample (``configs/``, ``sample_data/``, ``runs/``) and runs
  as written, in document order, in one temporary copy of the repository's ``configs/`` and
  ``sample_data/``, whose ``.venv`` is a link to the environment running the tests (so
  ``.venv/bin/poolsift`` and ``source .venv/bin/activate`` work) and whose ``PATH`` starts
  with that environment's ``bin`` (``poolsift``, ``python``). bash blocks run with
  ``set -euo pipefail``; python blocks with this interpreter. Each block must exit 0.
- ``<!-- readme-test: skip: REASON -->``: not run (``make demo`` and ``make test`` build
  ``.venv``, which takes minutes; CI runs ``make test`` on a fresh machine).
- ``<!-- readme-test: file PATH -->`` before any fenced block: its text is written to
  ``PATH`` in the copy before the next blocks run (a config the README shows, then runs).

A bash block that names the bundled sample (``configs/sample``, ``runs/sample``,
``sample_data``) without a mark fails the test: mark it, or make it not need the sample.
Blocks about other data (DataComp pools, img2dataset, Ray clusters) stay unmarked.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
MAX_LINES = 600

MARK = re.compile(r"^<!--\s*readme-test:\s*(sample|skip\b.*?|file\s+(\S+))\s*-->\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")
SAMPLE_WORDS = ("configs/sample", "runs/sample", "sample_data")


def readme_blocks(text: str) -> list[dict]:
    """Every fenced block of ``text``: its language, body, first line number and mark."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        mark = MARK.match(lines[i - 1]) if i > 0 else None
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        blocks.append(
            {
                "lang": m.group(1),
                "body": "\n".join(lines[i + 1 : j]) + "\n",
                "line": i + 1,
                "mark": None if mark is None else "file" if mark.group(2) else mark.group(1).split()[0],
                "path": mark.group(2) if mark else None,
            }
        )
        i = j + 1
    return blocks


def test_readme_is_at_most_600_lines():
    n = len(README.read_text().splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines; at most {MAX_LINES} (move reference text to docs/)"


def test_readme_blocks_that_need_the_sample_are_marked():
    blocks = readme_blocks(README.read_text())
    unmarked = [
        f"README.md:{b['line']}"
        for b in blocks
        if b["lang"] == "bash" and b["mark"] is None and any(w in b["body"] for w in SAMPLE_WORDS)
    ]
    assert unmarked == [], "bash blocks on the bundled sample without <!-- readme-test: sample -->"
    marked = [b for b in blocks if b["mark"] == "sample"]
    assert all(b["lang"] in ("bash", "python") for b in marked), "only bash and python blocks can run"
    assert len(marked) >= 3


def test_readme_quickstart_is_make_demo_and_make_test():
    text = README.read_text()
    setup = text[: text.index("## What a run writes")]
    assert "make demo" in setup and "make test" in setup
    assert ".venv/bin/poolsift" in setup and "source .venv/bin/activate" in setup


@pytest.mark.slow
def test_readme_sample_blocks_run_as_written(tmp_path):
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("configs", "sample_data"):
        shutil.copytree(REPO / name, work / name)
    (work / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    bindir = Path(sys.executable).parent
    assert (bindir / "poolsift").exists(), f"no poolsift in {bindir}: install poolsift (pip install -e .)"
    env = {
        **os.environ,
        "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO),  # this checkout's code, whatever the environment was installed from
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("VIRTUAL_ENV", None)
    ran = 0
    for block in readme_blocks(README.read_text()):
        if block["mark"] == "file":
            target = work / block["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block["body"])
            continue
        if block["mark"] != "sample":
            continue
        if block["lang"] == "bash":
            cmd = ["bash", "-c", "set -euo pipefail\n" + block["body"]]
        else:
            cmd = [sys.executable, "-c", block["body"]]
        done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (
            f"README.md:{block['line']} ({block['lang']}) exited {done.returncode}\n"
            f"{block['body']}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
        )
        ran += 1
    assert ran >= 3
    assert (work / "runs" / "sample" / "manifest.json").exists()
