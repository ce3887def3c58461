"""``execution.workers``: the local process pool's worker count for the plan's tasks
(``filtering/tasks.py: plan_workers``), over ``POOLSIFT_WORKERS``; recorded in the manifest."""

import pytest

from filtering.errors import ConfigError
from filtering.tasks import plan_workers


def test_configured_workers_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("POOLSIFT_WORKERS", "3")
    assert plan_workers() == 3
    assert plan_workers(configured=5) == 5
    assert plan_workers(cap=2, configured=5) == 2  # never more than the shards


def test_workers_must_be_positive(tmp_path):
    from pipelines.config import parse_config

    raw = {"input": {"datacomp_metadata": str(tmp_path)}, "execution": {"workers": 0}}
    with pytest.raises(ConfigError, match=r"execution\.workers"):
        parse_config(raw)


@pytest.mark.slow  # runs the pipeline
def test_the_manifest_records_the_configured_workers(tmp_path, monkeypatch):
    import numpy as np

    from pipelines.config import parse_config
    from pipelines.runner import run
    from tests.datacomp_pool import datacomp_clip_score_uids, make_datacomp_pool

    monkeypatch.setenv("POOLSIFT_WORKERS", "2")
    metadata = make_datacomp_pool(tmp_path / "metadata", shards=3, rows=20)
    raw = {
        "input": {"datacomp_metadata": str(metadata)},
        "filters": [{"clip_score": {"top_fraction": 0.5}}],
        "output": {"dir": str(tmp_path / "run")},
        "execution": {"workers": 1},
    }
    m = run(parse_config(raw), progress=False, log=lambda _m: None).manifest
    assert (m["execution"]["plan"], m["execution"]["workers"]) == ("streaming", 1)
    expected = datacomp_clip_score_uids(metadata, "clip_l14_similarity_score", fraction=0.5)
    np.testing.assert_array_equal(np.load(tmp_path / "run" / "subset.npy"), expected)
