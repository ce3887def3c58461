"""Shared fixtures: the bundled sample, its ground truth, and a CLI runner.

The sample pool is scored once per test session (``scored_sample``); tests that only
change filters copy its cache into a fresh output directory, as a user rerunning with
new filter settings would, instead of rescoring.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.loopback_http import closed_port

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "sample_data"
SAMPLE_CONFIG = REPO / "configs" / "sample.yaml"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tests never read or write the user's cache folder, and a fastText model missing there is
# "downloaded" from a closed loopback port (refused at once), never from the internet.
os.environ["POOLSIFT_CACHE"] = tempfile.mkdtemp(prefix="poolsift-test-cache-")
atexit.register(shutil.rmtree, os.environ["POOLSIFT_CACHE"], ignore_errors=True)
os.environ["POOLSIFT_LID176_URL"] = f"http://127.0.0.1:{closed_port()}/lid.176.bin"


def cached_rows(out_dir: Path, columns=("uid", "clip_score", "error")) -> list[dict]:
    """Every cached row of a WebDataset run (``cache/source-*``) with the scorer columns
    asked for (from each ``cache/scorer-*`` holding them), in shard order, uids as read."""
    import pyarrow.parquet as pq

    [rows_dir] = (Path(out_dir) / "cache").glob("source-*")
    out = []
    for path in sorted(rows_dir.glob("*.parquet")):
        table = pq.read_table(path)
        for scorer_dir in sorted((Path(out_dir) / "cache").glob("scorer-*")):
            piece = scorer_dir / path.name
            if piece.exists():
                extra = pq.read_table(piece)
                for name in extra.column_names:
                    if name in columns:
                        table = table.append_column(name, extra.column(name))
        out += table.select([c for c in columns if c in table.column_names]).to_pylist()
    return out


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run ``poolsift`` in this process; returns (exit code, stdout, stderr)."""
    from pipelines.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse usage errors
            code = e.code if isinstance(e.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def run_cli_subprocess(*args: str, cwd: Path = REPO, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """Run ``poolsift`` as a separate process (for crash, lock and exit-code tests)."""
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def write_config(path: Path, base: Path = SAMPLE_CONFIG, **sections) -> Path:
    """Write a copy of ``base`` with top-level sections replaced; relative paths made
    absolute (``base``'s against its folder, those in ``sections`` against the repo)."""
    from pipelines.config import resolve_paths

    cfg = yaml.safe_load(base.read_text())
    resolve_paths(cfg, base.parent, absolute=True)
    cfg.update(sections)
    resolve_paths(cfg, REPO, absolute=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def read_truth(pool_dir: Path = SAMPLE / "pool") -> dict[str, dict]:
    """uid -> the sample's ``.json`` (with ``truth``), straight from the shards."""
    out = {}
    for shard in sorted(pool_dir.glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    meta = json.load(tf.extractfile(m))
                    out[meta["uid"]] = meta
    return out


@pytest.fixture(scope="session")
def truth() -> dict[str, dict]:
    return read_truth()


@pytest.fixture(scope="session")
def scored_sample(tmp_path_factory) -> Path:
    """An output directory where the sample config has run once (scores cached)."""
    out = tmp_path_factory.mktemp("scored") / "run"
    cfg = write_config(out.parent / "sample.yaml", output={"dir": str(out)})
    code, stdout, stderr = run_cli("run", cfg, "--quiet")
    assert code == 0, stderr
    return out


@pytest.fixture
def rerun_dir(tmp_path, scored_sample) -> Path:
    """A fresh output directory that already holds the sample's scoring cache."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(scored_sample / "cache", out / "cache")
    return out


def pytest_collection_modifyitems(config, items):
    """The Ray modules (one xdist group: one worker, in turn) first: ``--dist loadgroup``
    hands work out in collection order, so a group collected late keeps one worker busy
    for minutes after the other has run out of tests; first, the other worker runs the
    rest beside it."""

    def ray_group(item) -> bool:
        return any(m.args == ("ray",) for m in item.iter_markers("xdist_group"))

    items.sort(key=lambda item: not ray_group(item))  # stable: each side keeps its order
