"""filtering.sample.datacomp: DataComp's metadata layout, deterministic to the byte."""

from __future__ import annotations

import time
import zipfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from filtering.sample.datacomp import EMBEDDING_DIMS, make_datacomp_sample
from filtering.stages.datacomp import EMBEDDING_ARRAYS, METADATA_COLUMNS


def _files(root):
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_the_pool_has_datacomps_columns_keys_and_dtypes(tmp_path):
    make_datacomp_sample(tmp_path, rows=103, shards=3, seed=1, phash=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"{s:08d}.{ext}" for s in range(3) for ext in ("npz", "parquet")
    ]
    sizes = []
    for s in range(3):
        table = pq.read_table(tmp_path / f"{s:08d}.parquet")
        expected = [c for c in METADATA_COLUMNS if c != "key"] + ["phash"]
        assert sorted(table.column_names) == sorted(expected)
        assert str(table.schema.field("clip_l14_similarity_score").type) == "float"  # float32, as DataComp ships
        assert str(table.schema.field("phash").type) == "uint64"
        uids = table.column("uid").to_pylist()
        assert all(len(u) == 32 and int(u, 16) >= 0 for u in uids) and len(set(uids)) == len(uids)
        with np.load(tmp_path / f"{s:08d}.npz") as npz:
            assert sorted(npz.files) == sorted(EMBEDDING_ARRAYS)
            for name, dim in EMBEDDING_DIMS.items():
                emb = npz[name]
                assert emb.dtype == np.float16 and emb.shape == (table.num_rows, dim)
                np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1, atol=2e-3)
        sizes.append(table.num_rows)
    assert sizes == [35, 34, 34]


def test_captions_give_the_caption_and_language_filters_work(tmp_path):
    make_datacomp_sample(tmp_path, rows=2000, shards=1, seed=0)
    text = pq.read_table(tmp_path / "00000000.parquet").column("text").to_pylist()
    words = np.array([len(t.split()) for t in text])
    assert (words == 0).sum() > 10 and ((words > 0) & (words <= 2)).sum() > 50 and (words >= 9).sum() > 1000
    assert sum("Strand" in t or "plage" in t or "playa" in t for t in text) > 20
    sha = pq.read_table(tmp_path / "00000000.parquet").column("sha256").to_pylist()
    assert 10 < len(sha) - len(set(sha)) < 100  # exact duplicates, about 2%


def test_without_phash_no_phash_column(tmp_path):
    make_datacomp_sample(tmp_path, rows=10, shards=1)
    assert "phash" not in pq.read_table(tmp_path / "00000000.parquet").column_names


def test_same_arguments_same_bytes_at_another_time(tmp_path, monkeypatch):
    """The npz members carry a fixed timestamp, not the clock's (numpy.savez's)."""
    make_datacomp_sample(tmp_path / "a", rows=50, shards=2, seed=7, phash=True)
    later = time.time() + 86_400 * 400
    monkeypatch.setattr(time, "time", lambda: later)
    make_datacomp_sample(tmp_path / "b", rows=50, shards=2, seed=7, phash=True)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    with zipfile.ZipFile(tmp_path / "a" / "00000000.npz") as zf:
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    make_datacomp_sample(tmp_path / "c", rows=50, shards=2, seed=8, phash=True)
    assert _files(tmp_path / "a") != _files(tmp_path / "c")


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError):
        make_datacomp_sample(tmp_path, rows=0)
