"""The streaming plan on a WebDataset pool (a re-filter of cached shards, or shards
scored first) against the in-memory path: subset.npy byte for byte, the subset and
dropped tables row for row, the manifest's counts, failures, thresholds, uid report and
records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from bench.bench_refilter import config, make_shards, raw_config, write_caches
from pipelines.config import parse_config
from pipelines.manifest import json_default
from pipelines.runner import run
from tests.conftest import SAMPLE_CONFIG, write_config
from tests.pipelines.test_streaming import _table, _timeless, assert_tables_equal

pytestmark = pytest.mark.slow  # runs the whole pipeline

ROW_LOCAL = [{"caption": {"min_words": 2}}, {"image_size": {"min_side": 64}}]


def _same_outputs(mem, streamed, a: Path, b: Path) -> None:
    assert streamed.pool is None and mem.pool is not None  # the plan that ran
    assert streamed.manifest["execution"]["plan"] == "streaming"
    assert (a / "subset.npy").read_bytes() == (b / "subset.npy").read_bytes()
    for folder in ("subset", "dropped"):
        ta, tb = _table(a / folder), _table(b / folder)
        assert ta.schema == tb.schema
        assert_tables_equal(ta, tb)
    for key in (
        "counts",
        "failures",
        "failures_truncated",
        "thresholds",
        "uids",
        "stages",
        "inputs",
        "model",
        "source",
    ):
        assert json.dumps(_timeless(mem.manifest[key]), default=json_default) == json.dumps(
            _timeless(streamed.manifest[key]), default=json_default
        ), key


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[str, Path]:
    """Five shards of 120 samples (the last shorter), every shard's caches written."""
    root = tmp_path_factory.mktemp("wds")
    pattern = make_shards(root / "shards", 550, shard_rows=120)
    write_caches(config(pattern, root / "cache-src", "auto"), shard_rows=120)
    return pattern, root / "cache-src" / "cache"


@pytest.mark.parametrize("fraction", [0.3, 1.0, 0.0])
def test_generated_pool(tmp_path, generated, fraction):
    pattern, cache = generated
    a, b = tmp_path / "memory", tmp_path / "run"
    shutil.copytree(cache, b / "cache")
    filters = [*ROW_LOCAL, {"clip_score": {"top_fraction": fraction}}]
    mem = run(config(pattern, b, "memory", filters), progress=False, log=lambda _m: None)
    shutil.copytree(b, a)
    streamed = run(config(pattern, b, "streaming", filters), progress=False, log=lambda _m: None)
    _same_outputs(mem, streamed, a, b)
    assert streamed.manifest["counts"]["input"] == 550


def _sample_run(out: Path, mode: str, filters, **output):
    cfg = write_config(
        out.parent / f"{mode}.yaml",
        SAMPLE_CONFIG,
        filters=filters,
        output={"dir": str(out), **output},
        execution={"mode": mode},
    )
    return run(parse_config(yaml.safe_load(cfg.read_text())), progress=False, log=lambda _m: None)


@pytest.mark.parametrize(
    "filters",
    [
        [{"caption": {"min_words": 2}}, {"clip_score": {"top_fraction": 0.5}}],
        # failed rows carry zero embeddings: semantic dedup leaves them out, as in memory
        [{"caption": {"min_words": 2}}, {"dedup": {"method": "semantic", "threshold": 0.9, "num_clusters": 2}}],
    ],
    ids=["top_fraction", "semantic_dedup"],
)
def test_bundled_sample_with_failed_rows(tmp_path, rerun_dir, filters):
    """The sample's corrupt images are failed rows: counted and listed as in memory."""
    mem = _sample_run(rerun_dir, "memory", filters)
    a = tmp_path / "memory"
    shutil.copytree(rerun_dir, a)
    streamed = _sample_run(rerun_dir, "streaming", filters)
    _same_outputs(mem, streamed, a, rerun_dir)
    assert streamed.manifest["counts"]["failed"] > 0
    assert streamed.manifest["counts"]["filters"][-1]["dropped"] > 0


def test_shards_not_cached_are_scored_first(tmp_path, generated):
    """A pool with a shard not cached streams under ``auto`` all the same: the shard is
    scored first, as the in-memory source scores it, then every shard filtered on its own."""
    pattern, cache = generated
    a, b = tmp_path / "memory", tmp_path / "run"
    for out in (a, b):
        shutil.copytree(cache, out / "cache")
        [first] = sorted((out / "cache").glob("source-*"))
        sorted(first.glob("*.parquet"))[0].unlink()  # one shard's rows no longer cached
    filters = [{"clip_score": {"top_fraction": 0.3}}]
    mem = run(config(pattern, a, "memory", filters), progress=False, log=lambda _m: None)
    said: list[str] = []
    streamed = run(config(pattern, b, "auto", filters), progress=False, log=said.append)
    assert "scoring 1 of 5 shards (4 cached)" in said
    _same_outputs(mem, streamed, a, b)


def _same_files(mem, streamed, a: Path, b: Path) -> None:
    """Every output file byte for byte (the tars: the same members, in the same order, with
    the same bytes), under the same names, and the manifest's records of them."""

    def names(d: Path) -> list[str]:
        return sorted(
            str(p.relative_to(d)) for sub in ("subset", "dropped", "shards", "index") for p in (d / sub).glob("*")
        )

    assert names(a) == names(b)
    assert any(n.startswith("shards/") for n in names(b))
    for rel in [*names(a), "subset.npy"]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    for key in ("outputs", "shards", "files"):
        assert mem.manifest[key] == streamed.manifest[key], key
    assert sorted(streamed.manifest["files"]) == sorted([*names(b), "subset.npy"])
    assert not (b / ".streaming").exists()


def test_resharded_tars_of_a_generated_pool(tmp_path, generated):
    """``output.webdataset`` on the shard plan: each worker copies its source shard's kept
    samples into tars of at most ``samples_per_shard``; the same tars as in memory."""
    pattern, cache = generated
    a, b = tmp_path / "memory", tmp_path / "run"
    shutil.copytree(cache, b / "cache")
    filters = [*ROW_LOCAL, {"clip_score": {"top_fraction": 0.5}}]

    def cfg(mode):
        raw = raw_config(pattern, b, mode, filters)
        raw["output"].update(webdataset=True, samples_per_shard=25, rows_per_part=40)
        return parse_config(raw)

    mem = run(cfg("memory"), progress=False, log=lambda _m: None)
    shutil.copytree(b, a)
    streamed = run(cfg("streaming"), progress=False, log=lambda _m: None)
    _same_outputs(mem, streamed, a, b)
    _same_files(mem, streamed, a, b)
    counts = [s["count"] for s in streamed.manifest["shards"]]
    assert max(counts) == 25 and min(counts) < 25 and sum(counts) == streamed.manifest["counts"]["kept"]
    assert all(len(s["sources"]) == 1 for s in streamed.manifest["shards"])  # one source shard each


def test_resharded_tars_of_the_bundled_sample(tmp_path, rerun_dir):
    """``configs/sample.yaml`` with ``output.webdataset: true``: the same tars on both plans."""
    filters = [{"clip_score": {"min": 0.55}}]
    mem = _sample_run(rerun_dir, "memory", filters, webdataset=True, samples_per_shard=50)
    a = tmp_path / "memory"
    shutil.copytree(rerun_dir, a)
    streamed = _sample_run(rerun_dir, "streaming", filters, webdataset=True, samples_per_shard=50)
    _same_outputs(mem, streamed, a, rerun_dir)
    _same_files(mem, streamed, a, rerun_dir)
