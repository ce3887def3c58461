"""Configured scorers (a quality head over the run's CLIP embeddings) on the shard plan,
against the in-memory plan: subset.npy byte for byte, the subset and dropped rows in
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
from tests.pipelines.test_streaming_webdataset import _same_outputs

pytestmark = pytest.mark.slow  # runs the whole pipeline

QUALITY = REPO / "configs" / "sample_quality.yaml"


def _run(base: Path, out: Path, mode: str, **sections):
    cfg = write_config(
        out.parent / f"{out.name}-{mode}.yaml",
        base=base,
        output={"dir": str(out)},
        execution={"mode": mode},
        **sections,
    )
    return run(parse_config(yaml.safe_load(cfg.read_text())), progress=False, log=lambda _m: None)


def _without_head_cache(src: Path, out: Path) -> None:
    """``src``'s cache without the head's scores (the CLIP scores stay cached)."""
    shutil.copytree(src / "cache", out / "cache", ignore=shutil.ignore_patterns("scorer-watermark-*"))


def _both_plans(base: Path, out: Path, **sections):
    """The run in memory, then on the shard plan, in the same folder (the manifests name
    it) from the same cache, and their outputs compared."""
    cache, kept = out.parent / f"{out.name}-cache", out.parent / f"{out.name}-memory"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(kept, ignore_errors=True)
    shutil.copytree(out / "cache", cache)
    mem = _run(base, out, "memory", **sections)
    shutil.move(out, kept)
    shutil.move(cache, out / "cache")
    streamed = _run(base, out, "streaming", **sections)
    _same_outputs(mem, streamed, kept, out)
    return streamed


@pytest.fixture(scope="module")
def scored_quality(tmp_path_factory) -> Path:
    """The quality sample's CLIP scores cached (the head's too: removed where a test needs)."""
    out = tmp_path_factory.mktemp("quality") / "run"
    _run(QUALITY, out, "memory")
    return out


def test_sample_quality_equal_on_both_plans(tmp_path, scored_quality):
    out = tmp_path / "run"
    _without_head_cache(scored_quality, out)
    streamed = _both_plans(QUALITY, out)
    assert streamed.manifest["stages"]["scorers"]["watermark"]["cache"]["shards_scored"] == 1
    assert streamed.manifest["counts"]["filters"][0]["dropped"] > 0
    # a rerun reads the head's cache, on both plans
    streamed = _both_plans(QUALITY, out)
    assert streamed.manifest["stages"]["scorers"]["watermark"]["cache"]["shards_cached"] == 1


def test_top_fraction_over_a_head_column_with_failed_and_nan_rows(tmp_path, rerun_dir):
    """The bundled sample (four shards, its corrupt images failed rows), the watermark head
    over its image embeddings, a few of them NaN (the head scores those rows NaN, counted
    in N and sorted last): the threshold and every row's decision as in memory."""
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
    streamed = _both_plans(REPO / "configs" / "sample.yaml", rerun_dir, **sections)
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
    from tests.pipelines.test_streaming import assert_same_outputs

    metadata = make_datacomp_pool(tmp_path / "dc" / "metadata", shards=3, rows=40, dims=(16, 768))
    rng = np.random.default_rng(5)
    centroids = rng.standard_normal((6, 768)).astype(np.float32)
    np.save(tmp_path / "centroids.npy", centroids / np.linalg.norm(centroids, axis=1, keepdims=True))
    np.save(tmp_path / "reference.npy", rng.standard_normal((2, 768)).astype(np.float32))
    save_file(random_state_dict({"0": (8, 768), "1": (1, 8)}, seed=7), str(tmp_path / "head.safetensors"))
    head = {"embedding_head": {"name": "q", "preset": "mlp", "weights": str(tmp_path / "head.safetensors")}}
    clusters = {"centroids": str(tmp_path / "centroids.npy"), "reference": str(tmp_path / "reference.npy")}
    filters = [{"score": {"column": "q_score", "top_fraction": 0.6}}, {"image_clusters": {}}]
    m = assert_same_outputs(metadata, tmp_path, filters, clusters, fresh_cache=True, scorers=[head])
    assert m["stages"]["scorers"]["q"]["cache"]["shards_scored"] == 3
