"""Issue 27, "done when": every run's manifest carries the same ``execution`` record
(``plan``, ``executor``, ``workers``, ``seconds`` per phase; ``pipelines/manifest.py:
execution_record``), its worker count from ``filtering/tasks.py`` (``POOLSIFT_WORKERS``),
on DataComp metadata and on a WebDataset pool."""

import json
import shutil

import numpy as np
import pytest

from tests.conftest import write_config
from tests.datacomp_pool import datacomp_clip_score_uids, make_datacomp_pool

pytestmark = pytest.mark.slow  # runs the pipeline

KEYS = {"plan", "executor", "workers", "seconds"}


def _check(manifest: dict, plan: str, workers: int) -> dict:
    record = manifest["execution"]
    assert set(record) == KEYS
    assert record["plan"] == plan and record["executor"] == "local" and record["workers"] == workers
    assert record["seconds"] and all(isinstance(v, float) and v >= 0 for v in record["seconds"].values())
    return record


def test_datacomp_runs_record_their_plan(tmp_path, monkeypatch):
    from pipelines.config import parse_config
    from pipelines.runner import run

    monkeypatch.setenv("POOLSIFT_WORKERS", "3")
    metadata = make_datacomp_pool(tmp_path / "metadata", shards=2, rows=30)
    out = tmp_path / "run"
    raw = {
        "input": {"datacomp_metadata": str(metadata)},
        "filters": [{"clip_score": {"top_fraction": 0.5}}],
        "output": {"dir": str(out)},
    }
    run(parse_config(raw), progress=False, log=lambda _m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    _check(manifest, "streaming", 2)  # at most one task per shard
    want = datacomp_clip_score_uids(metadata, "clip_l14_similarity_score", fraction=0.5)  # DataComp's arithmetic
    assert np.load(out / "subset.npy").tolist() == want.tolist()


def test_webdataset_run_records_its_phases(tmp_path, scored_sample, monkeypatch):
    from pipelines.config import load_config
    from pipelines.runner import run

    monkeypatch.setenv("POOLSIFT_WORKERS", "2")
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(scored_sample / "cache", out / "cache")
    cfg = load_config(write_config(tmp_path / "s.yaml", output={"dir": str(out)}))
    run(cfg, progress=False, log=lambda _m: None)
    _check(json.loads((out / "manifest.json").read_text()), "streaming", 2)
