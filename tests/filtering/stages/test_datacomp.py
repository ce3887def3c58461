import numpy as np
import pyarrow.parquet as pq
import pytest

from filtering.errors import InputError
from filtering.stages.base import RunContext
from filtering.stages.datacomp import METADATA_COLUMNS, DataCompStage
from tests.datacomp_pool import make_datacomp_pool


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    return make_datacomp_pool(tmp_path_factory.mktemp("dc") / "metadata", shards=3, rows=50)


def _read(metadata_dir, request=()):
    """The pool as the shard plan reads it: the layout from every footer in the driver
    (``stream_prepare``), then each shard's own pool (``shard_pool``), in shard order."""
    stage = DataCompStage(str(metadata_dir), cache_root="")
    stage.request(set(request))
    ctx = RunContext(out_dir="", cache_dir="", log=lambda m: None)
    stage.stream_prepare(ctx)
    return [stage.shard_pool(shard, ctx) for shard in stage.stream_shards()], ctx


def _column(pools, name) -> list:
    """``name`` over the shards' pools, in pool order."""
    return [v for pool in pools for v in pool.column(name).tolist()]


def test_pool_carries_datacomp_columns_in_shard_order(pool_dir):
    pools, ctx = _read(pool_dir)
    parquets = sorted(pool_dir.glob("*.parquet"))
    raw = [pq.read_table(p) for p in parquets]
    assert [pool.n for pool in pools] == [t.num_rows for t in raw] == [50, 51, 52]
    assert _column(pools, "uid") == [u for t in raw for u in t.column("uid").to_pylist()]
    assert _column(pools, "caption") == [u for t in raw for u in t.column("text").to_pylist()]
    assert _column(pools, "key") == [u for t in raw for u in t.column("key").to_pylist()]
    assert _column(pools, "source_shard") == [
        str(p) for p, t in zip(parquets, raw, strict=True) for _ in range(t.num_rows)
    ]
    for pool in pools:
        # scores keep their native dtypes: no rounding before thresholds
        assert pool.table.schema.field("clip_b32_similarity_score").type == "float"
        assert pool.table.schema.field("clip_l14_similarity_score").type == "double"
        assert "face_bboxes" not in pool.table.column_names  # bulky lists only on request
    assert [[(p.sid, p.start, p.stop) for p in pool.parts] for pool in pools] == [
        [("00000000", 0, 50)],
        [("00000001", 0, 51)],
        [("00000002", 0, 52)],
    ]
    assert [i["path"] for i in ctx.inputs] == [str(p) for s in parquets for p in (s, s.with_suffix(".npz"))]
    assert all(i["size"] > 0 for i in ctx.inputs)


def test_embeddings_come_from_the_npz_on_demand(pool_dir):
    pools, _ = _read(pool_dir)
    assert {pool.embedding_kinds for pool in pools} == {("b32_img", "b32_txt", "l14_img", "l14_txt")}
    assert {pool.default_embedding for pool in pools} == {"l14_img"}
    expected = [np.load(p)["l14_img"].astype(np.float32) for p in sorted(pool_dir.glob("*.npz"))]
    for pool, want in zip(pools, expected, strict=True):
        np.testing.assert_array_equal(pool.embeddings(), want)
    rows = np.array([0, 49])  # the first shard's first and last rows; the others' first and last too
    np.testing.assert_array_equal(pools[0].embeddings("l14_img", rows), expected[0][rows])
    np.testing.assert_array_equal(pools[1].embeddings("l14_img", np.array([0])), expected[1][[0]])
    np.testing.assert_array_equal(pools[2].embeddings("l14_img", np.array([51])), expected[2][[51]])
    assert [pool.embeddings("b32_txt").shape for pool in pools] == [(50, 16), (51, 16), (52, 16)]
    with pytest.raises(KeyError, match="choose one of"):
        pools[0].embeddings("h14_img")


def test_requested_nested_column_is_read_and_missing_one_is_named(pool_dir, tmp_path):
    pools, _ = _read(pool_dir, request={"face_bboxes", "text"})
    assert all(pool.column("face_bboxes")[0] is not None for pool in pools)
    assert _column(pools, "text") == _column(pools, "caption")

    bare = tmp_path / "bare"
    bare.mkdir()
    t = pq.read_table(pool_dir / "00000000.parquet", columns=["uid", "text"])
    pq.write_table(t, bare / "00000000.parquet")
    (pool,), _ = _read(bare)
    assert pool.column("key").tolist() == pool.column("uid").tolist()  # no key column: the uid stands in
    assert pool.embedding_kinds == ()  # no npz
    with pytest.raises(InputError, match="clip_l14_similarity_score"):
        _read(bare, request={"clip_l14_similarity_score"})


def test_listing_errors_are_clear(tmp_path):
    with pytest.raises(InputError, match="no .parquet files"):
        _read(tmp_path)
    with pytest.raises(InputError, match="no such directory"):
        _read(tmp_path / "missing")


def test_provides_is_static_and_reads_nothing(tmp_path):
    stage = DataCompStage(str(tmp_path / "does-not-exist"), cache_root="")
    assert set(METADATA_COLUMNS) <= stage.provides()
    assert {"caption", "source_shard", "clip_l14_similarity_score"} <= stage.provides()


def test_uncompressed_npz_is_memory_mapped_and_compressed_npz_still_loads(pool_dir, tmp_path):
    pools, _ = _read(pool_dir)
    part, emb = next(pools[0].iter_embeddings("b32_img"))
    assert isinstance(emb, np.memmap)  # np.savez output: rows are read only when touched

    import shutil

    packed = tmp_path / "packed"
    shutil.copytree(pool_dir, packed)
    for npz in packed.glob("*.npz"):
        arrays = dict(np.load(npz))
        np.savez_compressed(npz, **arrays)
    pools2, _ = _read(packed)
    for pool2, pool in zip(pools2, pools, strict=True):
        np.testing.assert_array_equal(pool2.embeddings("b32_img"), pool.embeddings("b32_img"))


def test_fsspec_urls_are_read_like_local_folders(pool_dir):
    import fsspec

    fs = fsspec.filesystem("memory")
    for p in pool_dir.iterdir():
        fs.pipe(f"/dcpool/{p.name}", p.read_bytes())
    try:
        remote, ctx = _read("memory://dcpool")
        local, _ = _read(pool_dir)
        assert _column(remote, "uid") == _column(local, "uid")
        assert remote[0].parts[0].url == "memory:///dcpool/00000000.parquet"
        assert ctx.inputs[1]["path"] == "memory:///dcpool/00000000.npz"
        for r, lo in zip(remote, local, strict=True):
            np.testing.assert_array_equal(r.embeddings("l14_txt"), lo.embeddings("l14_txt"))
    finally:
        fs.rm("/dcpool", recursive=True)


def test_bulky_strings_stay_on_disk_until_asked_for(pool_dir):
    pools, _ = _read(pool_dir, request={"clip_l14_similarity_score"})
    for pool in pools:
        assert {"url", "caption", "sha256"}.isdisjoint(pool.table.column_names)  # late columns
        assert {"uid", "key", "source_shard", "clip_l14_similarity_score", "original_width"} <= set(
            pool.table.column_names
        )
        assert pool.has_column("url") and pool.has_column("caption")
        assert pool.column_names == [
            "uid", "key", "source_shard", "caption", "url", "original_width", "original_height",
            "clip_b32_similarity_score", "clip_l14_similarity_score", "sha256",
        ]  # fmt: skip
    raw = [pq.read_table(p) for p in sorted(pool_dir.glob("*.parquet"))]
    assert _column(pools, "url") == [u for t in raw for u in t.column("url").to_pylist()]
    for pool in pools:
        assert "url" in pool.table.column_names and "sha256" not in pool.table.column_names


def test_shards_with_different_columns_and_types_give_one_subset_schema(tmp_path):
    import pyarrow as pa

    from filtering.writers.parquet import subset_stream

    root = make_datacomp_pool(tmp_path / "m", shards=3, rows=20)
    odd = root / "00000001.parquet"
    t = pq.read_table(odd).drop(["sha256"])
    t = t.set_column(t.column_names.index("url"), "url", t.column("url").cast(pa.large_string()))
    pq.write_table(t, odd)
    pools, _ = _read(root)
    keep = np.zeros(sum(pool.n for pool in pools), dtype=bool)
    keep[::3] = True
    schemas, tables, start = [], [], 0
    for pool in pools:
        schema, parts = subset_stream(pool, keep[start : start + pool.n])
        schemas.append(schema)
        tables.extend(parts)
        start += pool.n
    assert all(s.equals(schemas[0]) for s in schemas)  # every shard's subset has the whole pool's schema
    subset = pa.concat_tables(tables)
    assert subset.schema.equals(schemas[0]) and subset.num_rows == keep.sum()
    raw = [pq.read_table(p) for p in sorted(root.glob("*.parquet"))]
    urls = np.array([u for t in raw for u in t.column("url").to_pylist()], dtype=object)
    assert subset.column("url").to_pylist() == urls[keep].tolist()
    sha = subset.column("sha256").to_pylist()
    rows = np.flatnonzero(keep)
    assert all((v is None) == (20 <= r < 41) for v, r in zip(sha, rows, strict=True))  # the odd shard has none
