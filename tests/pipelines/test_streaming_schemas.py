"""Shards whose schemas differ, on the shard plan: the pool's schema unified once from the
footers (``stream_prepare``) and each one-shard pool cast and filled to it, so the
outputs equal the recorded ones of the in-memory plan's permissive concatenation (nulls
where a shard lacks a column, promoted types; tests/golden.py); DataComp metadata and
cached WebDataset shards."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.bench_refilter import config, make_shards, write_caches
from pipelines.runner import run
from tests.datacomp_pool import make_datacomp_pool
from tests.pipelines.test_streaming import _table, assert_recorded_outputs
from tests.pipelines.test_streaming_webdataset import _config, _recorded

pytestmark = pytest.mark.slow  # runs the whole pipeline

B32 = "clip_b32_similarity_score"


def _rewrite(path, change) -> None:
    pq.write_table(change(pq.read_table(path)), path)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Three shards: the second with two extra columns (a number and a string, which the
    pool reads late), the third with ``original_width`` as int32 and the B/32 score as
    float64 (the others: int64 and float32)."""
    root = make_datacomp_pool(tmp_path_factory.mktemp("dcmixed") / "metadata", shards=3, rows=70, seed=8)
    first, second, third = sorted(root.glob("*.parquet"))
    rng = np.random.default_rng(1)

    def extra(t: pa.Table) -> pa.Table:
        t = t.append_column("aesthetic", pa.array(rng.random(t.num_rows).astype(np.float32)))
        return t.append_column("note", pa.array([f"n{i}" for i in range(t.num_rows)], pa.string()))

    def narrower(t: pa.Table) -> pa.Table:
        i = t.schema.get_field_index("original_width")
        t = t.set_column(i, "original_width", t.column(i).cast(pa.int32()))
        j = t.schema.get_field_index(B32)
        return t.set_column(j, B32, t.column(j).cast(pa.float64()))

    _rewrite(second, extra)
    _rewrite(third, narrower)
    return root


@pytest.mark.parametrize(
    "filters",
    [
        [{"caption": {"min_words": 2}}, {"clip_score": {"top_fraction": 0.5}}],
        [{"score": {"column": "original_width", "min": 600}}, {"score": {"column": B32, "top_fraction": 0.4}}],
    ],
    ids=["extra_columns", "promoted_types"],
)
def test_datacomp_shards_that_differ(tmp_path, mixed, filters):
    m = assert_recorded_outputs(mixed, tmp_path, filters, rows_per_part=30)
    assert 0 < m["counts"]["kept"] < m["counts"]["input"]
    subset = _table(tmp_path / "run" / "subset")
    assert subset.schema.field("original_width").type == pa.int64()
    assert subset.column("note").null_count > 0 and subset.column("note").null_count < subset.num_rows
    assert m["stages"]["datacomp"]["columns"][-2:] == ["aesthetic", "note"]


@pytest.fixture(scope="module")
def carried(tmp_path_factory):
    """Three cached WebDataset shards; the second's rows carry what img2dataset's parquet
    beside it would add (``merge_side_parquet``): a ``batch`` column and ``status``."""
    from filtering.stages.img2dataset import source_stamp
    from pipelines.runner import plan

    root = tmp_path_factory.mktemp("wdsmixed")
    pattern = make_shards(root / "shards", 150, shard_rows=50)
    cfg = config(pattern, root / "cache-src")
    write_caches(cfg, shard_rows=50)
    stage = plan(cfg, str(root / "cache-src" / "cache")).source
    url = stage.urls[1]
    rows = stage.cache.read_table(url)
    n = rows.num_rows
    rows = rows.set_column(rows.schema.get_field_index("status"), "status", pa.array(["success"] * n, pa.string()))
    rows = rows.append_column("batch", pa.array(np.arange(n) % 7, pa.int64()))
    stage.cache.write(url, rows, {}, source=source_stamp(url))
    return pattern, root / "cache-src" / "cache"


def test_webdataset_shards_that_differ_in_carried_columns(tmp_path, carried):
    pattern, cache = carried
    b = tmp_path / "run"
    shutil.copytree(cache, b / "cache")
    filters = [{"caption": {"min_words": 2}}, {"clip_score": {"top_fraction": 0.5}}]
    streamed = run(_config(pattern, b, filters), progress=False, log=lambda _m: None)
    _recorded(streamed, b)
    subset = _table(b / "subset")
    for column in ("batch", "status"):
        assert 0 < subset.column(column).null_count < subset.num_rows, column


def test_datacomp_shards_that_cannot_unify_name_the_column_and_two_shards(tmp_path):
    """A column that is a number in one shard and a boolean in another: one line naming
    the column, both types and the two shards, before any shard is filtered."""
    from filtering.errors import InputError
    from pipelines.config import parse_config

    root = make_datacomp_pool(tmp_path / "metadata", shards=3, rows=20, seed=2)
    first, _, third = sorted(root.glob("*.parquet"))
    i = pq.read_schema(third).get_field_index("original_width")
    _rewrite(third, lambda t: t.set_column(i, "original_width", t.column(i).cast(pa.bool_())))
    raw = {
        "input": {"datacomp_metadata": str(root)},
        "filters": [{"clip_score": {"top_fraction": 0.5}}],
        "output": {"dir": str(tmp_path / "run")},
    }
    with pytest.raises(InputError) as e:
        run(parse_config(raw), progress=False, log=lambda _m: None)
    assert str(e.value) == (
        f"input.datacomp_metadata: column 'original_width' is int64 in {first} but bool in {third}, "
        "which do not unify (make the shards' types agree)"
    )
    assert not (tmp_path / "run" / "subset.npy").exists()


def test_webdataset_shards_that_cannot_unify_name_the_column_and_two_shards(tmp_path, carried):
    from filtering.errors import InputError
    from filtering.stages.img2dataset import source_stamp
    from pipelines.runner import plan

    pattern, cache = carried
    shutil.copytree(cache, tmp_path / "run" / "cache")
    cfg = config(pattern, tmp_path / "run", [{"clip_score": {"top_fraction": 0.5}}])
    stage = plan(cfg, str(tmp_path / "run" / "cache")).source
    url = stage.urls[2]  # the second shard's batch is int64: this one's is a string
    rows = stage.cache.read_table(url)
    rows = rows.append_column("batch", pa.array([f"b{k}" for k in range(rows.num_rows)], pa.string()))
    stage.cache.write(url, rows, {}, source=source_stamp(url))
    with pytest.raises(InputError) as e:
        run(cfg, progress=False, log=lambda _m: None)
    assert str(e.value) == (
        f"input.shards: column 'batch' is int64 in {stage.urls[1]} but string in {url}, "
        "which do not unify (make the shards' types agree)"
    )
