"""The set-up that ``make demo`` and ``make test`` run (``pip install -e .``) prints no warnings."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_editable_install_prints_no_setuptools_warning_box(tmp_path):
    """setuptools' editable install of a flat layout without ``package-dir`` picks a meta-path
    finder and prints a "folders in your working directory with the same name as your
    package" box on every fresh set-up; with ``package-dir = {"" = "."}`` it writes a plain
    ``.pth`` entry and stays quiet. Built here with the venv's setuptools, offline."""
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, tmp_path / name)
    for name in ("filtering", "pipelines"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [
            sys.executable,
            "-W",
            "default",
            "-c",
            "from setuptools import build_meta as b; print(b.build_editable('dist'))",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = build.stdout.strip().splitlines()[-1]
    assert wheel.endswith(".whl") and (tmp_path / "dist" / wheel).exists()
    assert "same name" not in build.stdout + build.stderr
    assert "meta path finder" not in build.stdout + build.stderr
