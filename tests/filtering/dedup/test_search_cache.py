"""The candidate search's cache entry (filtering/dedup/search_cache.py): read back as
written; missed by any change to what the search reads; an incomplete entry is a miss."""

import numpy as np
import pyarrow as pa

from filtering.dedup.partitioned import SearchSettings
from filtering.dedup.search_cache import SearchCache, shard_key, table_digest

EXACT = SearchSettings("exact")


def _shards(*tables):
    return [shard_key(f"pool/{i:05d}.tar", t) for i, t in enumerate(tables)]


def _table(*hashes):
    return pa.table({"sha256": pa.array(hashes, pa.string())})


def test_entry_reads_back_what_was_saved(tmp_path):
    shards = _shards(_table("a", "b", "a"), _table("b", None))
    labels = np.array([0, 1, 0, 1, 4], np.int64)
    pair_a, pair_b = np.array([0], np.int64), np.array([1], np.int64)
    cache = SearchCache(str(tmp_path), EXACT, shards)
    assert cache.load() is None
    cache.save(labels, pair_a, pair_b)
    found = SearchCache(str(tmp_path), EXACT, shards).load()
    assert found is not None
    for got, want in zip(found, (labels, pair_a, pair_b), strict=True):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == np.int64 and got.flags.writeable  # the survivors step may label into it
    assert (tmp_path / f"dedup-{cache.fingerprint}" / "spec.json").exists()


def test_any_change_to_what_the_search_reads_misses():
    a, b = _table("a", "b"), _table("b", "c")
    base = SearchCache("c", EXACT, _shards(a, b)).fingerprint
    changed = {
        "a shard added": SearchCache("c", EXACT, _shards(a, b, _table("d"))),
        "a shard removed": SearchCache("c", EXACT, _shards(a)),
        "the shards reordered": SearchCache(
            "c", EXACT, [shard_key("pool/00000.tar", b), shard_key("pool/00001.tar", a)]
        ),
        "a key changed": SearchCache("c", EXACT, _shards(a, _table("b", "d"))),
        "a null key": SearchCache("c", EXACT, _shards(a, _table("b", None))),
        "another method": SearchCache("c", SearchSettings("perceptual", 8, key_column="phash"), _shards(a, b)),
        "with the caption": SearchCache("c", SearchSettings("exact", with_caption=True), _shards(a, b)),
    }
    for what, cache in changed.items():
        assert cache.fingerprint != base, what
    radius = {
        SearchCache("c", SearchSettings("perceptual", d, key_column="phash"), _shards(a)).fingerprint for d in (4, 8)
    }
    assert len(radius) == 2
    # equal contents, however the table was built, give one key
    assert SearchCache("c", EXACT, _shards(_table("a", "b"), _table("b", "c"))).fingerprint == base


def test_digest_covers_values_types_and_nulls():
    u = pa.table({"phash": pa.array([1, 2, 3], pa.uint64())})
    assert table_digest(u) == table_digest(pa.table({"phash": pa.array([1, 2, 3], pa.uint64())}))
    assert table_digest(u) != table_digest(pa.table({"phash": pa.array([1, 2, 4], pa.uint64())}))
    assert table_digest(u) != table_digest(pa.table({"phash": pa.array([1, 2, 3], pa.int64())}))
    assert table_digest(u) != table_digest(pa.table({"phash": pa.array([1, 2, None], pa.uint64())}))


def test_incomplete_or_damaged_entry_is_a_miss(tmp_path):
    shards = _shards(_table("a", "a"))
    cache = SearchCache(str(tmp_path), EXACT, shards)
    cache.save(np.array([0, 0], np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    folder = tmp_path / f"dedup-{cache.fingerprint}"
    (folder / "pair_b.npy").write_bytes(b"not an array")
    assert cache.load() is None
    (folder / "pair_b.npy").unlink()
    assert cache.load() is None
    cache.save(np.array([0, 0], np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert cache.load() is not None
    (folder / "labels.npy").unlink()  # written last: without it the entry is not complete
    assert cache.load() is None
