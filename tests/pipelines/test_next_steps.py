"""``poolsift run`` (and so ``make demo``) ends with what it wrote and what to do next, in
commands the user can paste into the same shell."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.cli import commands, sweep_param
from tests.conftest import REPO, SAMPLE_CONFIG


@pytest.mark.slow  # names `-m pipelines.cli`, which test_slow_marks reads as running the CLI
def test_commands_name_the_venv_path_when_poolsift_is_not_on_path(tmp_path, monkeypatch):
    """After ``make demo`` the venv is not activated: ``poolsift`` alone is "command not found"."""
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("poolsift", "python"):
        (bin_dir / name).write_text("#!/bin/sh\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert commands(".venv/bin/poolsift") == (".venv/bin/poolsift", ".venv/bin/python")
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    assert commands(str(bin_dir / "poolsift")) == ("poolsift", "python")
    prog, python = commands(str(REPO / "pipelines" / "cli.py"))
    assert prog == f"{shlex.quote(sys.executable)} -m pipelines.cli" and python == shlex.quote(sys.executable)


def test_sweep_param_names_the_configs_clip_score_setting():
    filters = [{"language": {}}, {"clip_score": {"min": 0.6}}]
    assert sweep_param(filters) == "filters[1].clip_score.min=0.55,0.6,0.65"
    assert sweep_param([{"clip_score": {"top_fraction": 0.3}}]).startswith("filters[0].clip_score.top_fraction=")
    assert sweep_param([]) == "KEY.PATH=V1,V2,..."


def test_sweep_param_falls_back_to_a_score_filters_setting():
    """configs/sample_quality.yaml has no clip_score: its next steps named ``KEY.PATH=V1,V2,...``."""
    filters = [{"dedup": {"method": "exact"}}, {"score": {"column": "watermark_score", "max": 0.7}}]
    assert sweep_param(filters) == "filters[1].score.max=0.6,0.7,0.8"
    assert sweep_param([{"score": {"column": "aesthetic_score", "min": 5.0}}]) == "filters[0].score.min=4.5,5,5.5"
    assert (
        sweep_param([{"score": {"column": "a", "top_fraction": 0.3}}])
        == "filters[0].score.top_fraction=0.1,0.2,0.3,0.5"
    )
    both = [{"score": {"column": "a", "min": 1}}, {"clip_score": {"min": 0.3}}]
    assert sweep_param(both).startswith("filters[1].clip_score.min=")


@pytest.mark.slow
def test_run_ends_with_outputs_and_next_steps_that_run(rerun_dir, tmp_path):
    script = Path(sys.executable).parent / "poolsift"
    if not script.exists():
        pytest.skip("no poolsift console script beside this interpreter")
    env = {**os.environ, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [script, "run", SAMPLE_CONFIG, "--output", rerun_dir, "--quiet"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    tail = proc.stdout[proc.stdout.index("output:") :]
    for name in ("subset/", "subset.npy", "dropped/", "manifest.json"):
        assert f"  {name}" in tail
    prog = shlex.quote(str(script))
    steps = tail.splitlines()[tail.splitlines().index("next:") + 1 :]
    assert steps[0].startswith(f"  {prog} report {rerun_dir}")
    assert steps[1].startswith(
        f"  {prog} sweep {SAMPLE_CONFIG} --output {rerun_dir} --param 'filters[0].clip_score.min="
    )
    assert "pyarrow" in steps[2] and "duckdb" in steps[3]
    # The report and read commands work as printed (the sweep is tested in test_sweep.py);
    # the duckdb one with the duckdb Python package, the one its hint installs (no `duckdb` CLI).
    for step in (steps[0], steps[3], steps[2]):
        cmd = step.split("    #")[0].strip()
        done = subprocess.run(cmd, shell=True, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, (cmd, done.stderr)
    assert (rerun_dir / "report.html").exists()
    assert done.stdout.split()[0] == str(len(np.load(rerun_dir / "subset.npy")))
