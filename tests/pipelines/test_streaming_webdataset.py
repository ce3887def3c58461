"""The shard plan on a WebDataset pool (a re-filter of cached shards, or shards scored
first) against the outputs recorded from the in-memory plan it replaced (tests/golden.py:
subset.npy byte for byte, the subset and dropped rows in order, the manifest's counts,
failures, thresholds and uid report, the resharded tars byte for byte)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml

from bench.bench_refilter import config, make_shards, raw_config, write_caches
from pipelines.config import parse_config
from pipelines.runner import run
from tests.conftest import SAMPLE_CONFIG, write_config
from tests.golden import check_recorded

pytestmark = pytest.mark.slow  # runs the whole pipeline

ROW_LOCAL = [{"caption": {"min_words": 2}}, {"image_size": {"min_side": 64}}]


def _config(pattern: str, out: Path, filters, **output):
    raw = raw_config(pattern, out, filters)
    raw["output"].update(output)
    return parse_config(raw)


def _recorded(streamed, b: Path) -> None:
    """The run in ``b`` ran on the shard plan and wrote the recorded outputs."""
    assert streamed.manifest["execution"]["plan"] == "streaming"
    assert not (b / ".streaming").exists()
    check_recorded(b)


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[str, Path]:
    """Five shards of 120 samples (the last shorter), every shard's caches written."""
    root = tmp_path_factory.mktemp("wds")
    pattern = make_shards(root / "shards", 550, shard_rows=120)
    write_caches(config(pattern, root / "cache-src"), shard_rows=120)
    return pattern, root / "cache-src" / "cache"


@pytest.mark.parametrize("fraction", [0.3, 1.0, 0.0])
def test_generated_pool(tmp_path, generated, fraction):
    pattern, cache = generated
    b = tmp_path / "run"
    shutil.copytree(cache, b / "cache")
    filters = [*ROW_LOCAL, {"clip_score": {"top_fraction": fraction}}]
    streamed = run(_config(pattern, b, filters), progress=False, log=lambda _m: None)
    _recorded(streamed, b)
    assert streamed.manifest["counts"]["input"] == 550


def _sample_run(out: Path, filters, **output):
    cfg = write_config(out.parent / "run.yaml", SAMPLE_CONFIG, filters=filters, output={"dir": str(out), **output})
    return run(parse_config(yaml.safe_load(cfg.read_text())), progress=False, log=lambda _m: None)


@pytest.mark.parametrize(
    "filters",
    [
        [{"caption": {"min_words": 2}}, {"clip_score": {"top_fraction": 0.5}}],
        # failed rows carry zero embeddings: semantic dedup leaves them out
        [{"caption": {"min_words": 2}}, {"dedup": {"method": "semantic", "threshold": 0.9, "num_clusters": 2}}],
    ],
    ids=["top_fraction", "semantic_dedup"],
)
def test_bundled_sample_with_failed_rows(tmp_path, rerun_dir, filters):
    """The sample's corrupt images are failed rows: counted and listed as recorded."""
    streamed = _sample_run(rerun_dir, filters)
    _recorded(streamed, rerun_dir)
    assert streamed.manifest["counts"]["failed"] > 0
    assert streamed.manifest["counts"]["filters"][-1]["dropped"] > 0


def test_shards_not_cached_are_scored_first(tmp_path, generated):
    """A pool with a shard not cached streams under ``auto`` all the same: the shard is
    scored first, then every shard filtered on its own."""
    pattern, cache = generated
    b = tmp_path / "run"
    shutil.copytree(cache, b / "cache")
    [first] = sorted((b / "cache").glob("source-*"))
    sorted(first.glob("*.parquet"))[0].unlink()  # one shard's rows no longer cached
    filters = [{"clip_score": {"top_fraction": 0.3}}]
    said: list[str] = []
    streamed = run(_config(pattern, b, filters), progress=False, log=said.append)
    assert "scoring 1 of 5 shards (4 cached)" in said
    _recorded(streamed, b)


def _files_recorded(streamed, b: Path) -> None:
    """The resharded tars are there (their bytes: the recorded digest), and the manifest's
    records of every output file are the bytes on disk."""
    names = sorted(
        str(p.relative_to(b)) for sub in ("subset", "dropped", "shards", "index") for p in (b / sub).glob("*")
    )
    assert any(n.startswith("shards/") for n in names)
    assert sorted(streamed.manifest["files"]) == sorted([*names, "subset.npy"])
    for rel, record in streamed.manifest["files"].items():
        data = (b / rel).read_bytes()
        assert record["size"] == len(data), rel
        assert record.get("sha256", hashlib.sha256(data).hexdigest()) == hashlib.sha256(data).hexdigest(), rel


def test_resharded_tars_of_a_generated_pool(tmp_path, generated):
    """``output.webdataset`` on the shard plan: each worker copies its source shard's kept
    samples into tars of at most ``samples_per_shard``; the recorded tars."""
    pattern, cache = generated
    b = tmp_path / "run"
    shutil.copytree(cache, b / "cache")
    filters = [*ROW_LOCAL, {"clip_score": {"top_fraction": 0.5}}]
    cfg = _config(pattern, b, filters, webdataset=True, samples_per_shard=25, rows_per_part=40)
    streamed = run(cfg, progress=False, log=lambda _m: None)
    _recorded(streamed, b)
    _files_recorded(streamed, b)
    counts = [s["count"] for s in streamed.manifest["shards"]]
    assert max(counts) == 25 and min(counts) < 25 and sum(counts) == streamed.manifest["counts"]["kept"]
    assert all(len(s["sources"]) == 1 for s in streamed.manifest["shards"])  # one source shard each


def test_resharded_tars_of_the_bundled_sample(tmp_path, rerun_dir):
    """``configs/sample.yaml`` with ``output.webdataset: true``: the recorded tars."""
    filters = [{"clip_score": {"min": 0.55}}]
    streamed = _sample_run(rerun_dir, filters, webdataset=True, samples_per_shard=50)
    _recorded(streamed, rerun_dir)
    _files_recorded(streamed, rerun_dir)
