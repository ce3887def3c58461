"""Configured scorers (a quality head over the run's CLIP embeddings) on the shard plan,
against the outputs recorded from the in-memory plan it replaced (tests/golden.py): subset.npy byte for byte, the subset and dropped rows in
order, the manifest's counts, thresholds and records; and a ``score`` ``top_fraction``
over the head's column, with failed rows and rows the head scores NaN."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines.config import parse_config
from pipelines.runner import run
from tests.conftest import REPO, write_config
from tests.golden import check_recorded

pytestmark = pytest.mark.slow  # runs the whole pipeline

QUALITY = REPO / "configs" / "sample_quality.yaml"


def _run(base: Path, out: Path, **sections):
    cfg = write_config(out.parent / f"{out.name}.yaml", base=base, output={"dir": str(out)}, **sections)
    return run(parse_config(yaml.safe_load(cfg.read_text())), progress=False, log=lambda _m: None)


def _without_head_cache(src: Path, out: Path) -> None:
    """``src``'s cache without the head's scores (the CLIP scores stay cached)."""
    shutil.copytree(src / "cache", out / "cache", ignore=shutil.ignore_patterns("scorer-watermark-*"))


def _recorded_run(base: Path, out: Path, suffix: str = "", **sections):
    """The run on the shard plan into ``out`` (its cache there), its outputs the recorded ones."""
    streamed = _run(base, out, **sections)
    assert streamed.manifest["execution"]["plan"] == "streaming"
    check_recorded(out, suffix)
    return streamed


@pytest.fixture(scope="module")
def scored_quality(tmp_path_factory) -> Path:
    """The quality sample's CLIP scores cached (the head's too: removed where a test needs)."""
    out = tmp_path_factory.mktemp("quality") / "run"
    _run(QUALITY, out)
    return out


def test_sample_quality(tmp_path, scored_quality):
    out = tmp_path / "run"
    _without_head_cache(scored_quality, out)
    streamed = _recorded_run(QUALITY, out)
    assert streamed.manifest["stages"]["scorers"]["watermark"]["cache"]["shards_scored"] == 1
    assert streamed.manifest["counts"]["filters"][0]["dropped"] > 0
    # a rerun reads the head's cache: the same outputs
    streamed = _recorded_run(QUALITY, out)
    assert streamed.manifest["stages"]["scorers"]["watermark"]["cache"]["shards_cached"] == 1


def test_top_fraction_over_a_head_column_with_failed_and_nan_rows(tmp_path, rerun_dir):
    """The bundled sample (four shards, its corrupt images failed rows), the watermark head
    over its image embeddings, a few of them NaN (the head scores those rows NaN, counted
    in N and sorted last): the threshold and every row's decision as recorded."""
    for npy in sorted((rerun_dir / "cache").glob("scorer-clip-*/*.image.npy"))[:2]:
        emb = np.load(npy)
        emb[[3, 7, 11]] = np.nan
        np.save(npy, emb)
    quality = yaml.safe_load(QUALITY.read_text())
    head = {
        "embedding_head": {
            **quality["scorers"][0]["embedding_head"],
            "weights": str(REPO / "sample_data/heads/poolsift-watermark.safetensors"),
        }
    }
    sections = {
        "scorers": [head],
        "filters": [{"caption": {"min_words": 2}}, {"score": {"column": "watermark_score", "top_fraction": 0.5}}],
    }
    streamed = _recorded_run(REPO / "configs" / "sample.yaml", rerun_dir, **sections)
    counts = streamed.manifest["counts"]
    assert counts["failed"] > 0
    score = counts["filters"][-1]
    assert score["reasons"]["watermark_score_missing"] > 0  # some NaN rows reach it (others fail the caption filter)
    assert score["reasons"]["watermark_score_below_top_fraction"] > 0
    assert np.isfinite(streamed.manifest["thresholds"]["watermark_score"])
    assert streamed.manifest["stages"]["scorers"]["watermark"]["cache"]["shards_scored"] == 4


def test_a_head_beside_image_clusters_writes_the_columns_in_the_in_memory_order(tmp_path):
    """DataComp metadata (l14_img of DataComp's width), a configured head and
    ``image_clusters`` (a global stage): each shard's column stages run in the plan's
    order, so the subset's columns come in the in-memory run's order."""
    from safetensors.numpy import save_file

    from tests.datacomp_pool import make_datacomp_pool, random_state_dict
    from tests.pipelines.test_streaming import assert_recorded_outputs

    metadata = make_datacomp_pool(tmp_path / "dc" / "metadata", shards=3, rows=40, dims=(16, 768))
    rng = np.random.default_rng(5)
    centroids = rng.standard_normal((6, 768)).astype(np.float32)
    np.save(tmp_path / "centroids.npy", centroids / np.linalg.norm(centroids, axis=1, keepdims=True))
    np.save(tmp_path / "reference.npy", rng.standard_normal((2, 768)).astype(np.float32))
    save_file(random_state_dict({"0": (8, 768), "1": (1, 8)}, seed=7), str(tmp_path / "head.safetensors"))
    head = {"embedding_head": {"name": "q", "preset": "mlp", "weights": str(tmp_path / "head.safetensors")}}
    clusters = {"centroids": str(tmp_path / "centroids.npy"), "reference": str(tmp_path / "reference.npy")}
    filters = [{"score": {"column": "q_score", "top_fraction": 0.6}}, {"image_clusters": {}}]
    m = assert_recorded_outputs(metadata, tmp_path, filters, clusters, scorers=[head])
    assert m["stages"]["scorers"]["q"]["cache"]["shards_scored"] == 3
