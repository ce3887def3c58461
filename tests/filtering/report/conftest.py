"""A run of the sample with the clusters stage and a dedup filter, shared by the report tests."""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import SAMPLE, run_cli, write_config


@pytest.fixture(scope="session")
def clustered_run(tmp_path_factory, scored_sample):
    """Output dir of ``[dedup perceptual, image_clusters]`` with ``output.report: true``
    (reusing the sample's score cache)."""
    root = tmp_path_factory.mktemp("clustered")
    out = root / "run"
    shutil.copytree(scored_sample / "cache", out / "cache")
    cfg = write_config(
        root / "c.yaml",
        clusters={"num_clusters": 16, "reference": str(SAMPLE / "reference")},
        filters=[{"dedup": {"method": "perceptual"}}, {"image_clusters": {}}],
        output={"dir": str(out), "report": True},
    )
    code, _, stderr = run_cli("run", cfg, "--quiet")
    assert code == 0, stderr
    return out
