"""Issue 27, "done when": every run's manifest carries the same ``execution`` record
(``plan``, ``executor``, ``workers``, ``seconds`` per phase) on the shard plan and in memory
(``pipelines/manifest.py: execution_record``), its worker count from ``filtering/tasks.py``
(``POOLSIFT_WORKERS``)."""

import json
import shutil

import pytest

from tests.conftest import write_config
from tests.datacomp_pool import make_datacomp_pool

pytestmark = pytest.mark.slow  # runs the pipeline

KEYS = {"plan", "executor", "workers", "seconds"}
MEMORY_PHASES = ["source", "stages", "filter", "write"]


def _check(manifest: dict, plan: str, workers: int) -> dict:
    record = manifest["execution"]
    assert set(record) == KEYS
    assert record["plan"] == plan and record["executor"] == "local" and record["workers"] == workers
    assert record["seconds"] and all(isinstance(v, float) and v >= 0 for v in record["seconds"].values())
    if plan == "memory":
        assert list(record["seconds"]) == MEMORY_PHASES
    return record


def test_datacomp_runs_record_their_plan(tmp_path, monkeypatch):
    from pipelines.config import parse_config
    from pipelines.runner import run

    monkeypatch.setenv("POOLSIFT_WORKERS", "3")
    metadata = make_datacomp_pool(tmp_path / "metadata", shards=2, rows=30)
    manifests = {}
    for mode in ("memory", "streaming"):
        out = tmp_path / mode
        raw = {
            "input": {"datacomp_metadata": str(metadata)},
            "filters": [{"clip_score": {"top_fraction": 0.5}}],
            "output": {"dir": str(out)},
            "execution": {"mode": mode},
        }
        run(parse_config(raw), progress=False, log=lambda _m: None)
        manifests[mode] = json.loads((out / "manifest.json").read_text())
    _check(manifests["memory"], "memory", 3)  # POOLSIFT_WORKERS
    _check(manifests["streaming"], "streaming", 2)  # at most one task per shard
    assert manifests["memory"]["counts"] == manifests["streaming"]["counts"]


def test_webdataset_run_in_memory_records_its_phases(tmp_path, scored_sample, monkeypatch):
    from pipelines.config import load_config
    from pipelines.runner import run

    monkeypatch.setenv("POOLSIFT_WORKERS", "2")
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(scored_sample / "cache", out / "cache")
    cfg = load_config(write_config(tmp_path / "s.yaml", output={"dir": str(out)}, execution={"mode": "memory"}))
    run(cfg, progress=False, log=lambda _m: None)
    _check(json.loads((out / "manifest.json").read_text()), "memory", 2)
