"""Partitioned dedup search (spill files per partition) against the all-pairs search
(``hamming.near_pairs``, ``groups.exact_groups``): the same groups on pools built with many
collisions, transitive perceptual chains, missing keys, any subset of rows, and the same
survivors (ties included) as a plain-Python oracle."""

import numpy as np
import pyarrow as pa
import pytest

from filtering.dedup import groups, hamming, partitioned
from filtering.dedup.partitioned import SearchSettings, ShardKeys


def shards_of(table: pa.Table, sizes) -> list[ShardKeys]:
    out, start = [], 0
    for size in sizes:
        out.append(ShardKeys(start, size, table=table.slice(start, size)))
        start += size
    assert start == table.num_rows
    return out


def same_grouping(a: np.ndarray, b: np.ndarray) -> bool:
    """Two labelings put the same rows together."""
    return len(np.unique(np.stack([a, b], axis=1), axis=0)) == len(np.unique(a)) == len(np.unique(b))


def exact_table(rng, n):
    sha = rng.integers(0, n // 4, n).astype(str).astype(object)  # about 4 copies per key
    sha[rng.random(n) < 0.05] = None
    caption = rng.integers(0, 3, n).astype(str).astype(object)
    caption[rng.random(n) < 0.2] = None
    return pa.table({"sha256": pa.array(sha, pa.string()), "caption": pa.array(caption, pa.string())})


@pytest.mark.parametrize("with_caption", [False, True])
@pytest.mark.parametrize("partitions", [1, 3, 16])
def test_exact_labels_are_the_in_memory_groups(with_caption, partitions):
    rng = np.random.default_rng(partitions)
    n = 3000
    table = exact_table(rng, n)
    s = SearchSettings("exact", with_caption=with_caption)
    labels, a, b = partitioned.search_keys(shards_of(table, [1000, 1, 999, 1000]), n, s, partitions=partitions)
    assert len(a) == len(b) == 0
    keys = [np.asarray(table.column("sha256").to_pylist(), object)]
    if with_caption:
        keys.append(np.asarray(table.column("caption").to_pylist(), object))
    expected = groups.exact_groups(keys)
    missing = np.asarray([k is None for k in keys[0]])
    expected = np.where(missing, expected.max() + 1 + np.arange(n), expected)
    assert same_grouping(labels, expected)
    # The label is the group's smallest row; rows without sha256 are their own group.
    assert np.all(labels <= np.arange(n)) and np.all(labels[labels] == labels)
    assert np.all(labels[missing] == np.flatnonzero(missing))


def chained_hashes(rng, n_seeds, max_distance):
    """Seeds, exact copies, near copies within the radius, and chains whose links are within
    the radius while their ends are not (groups only by transitivity), plus random hashes."""
    seeds = rng.integers(0, 2**63, n_seeds, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    out = [seeds, seeds]  # exact copies
    for _ in range(3):
        bits = rng.integers(0, 64, (n_seeds, max_distance))
        flip = np.zeros(n_seeds, np.uint64)
        for c in range(rng.integers(1, max_distance + 1)):
            flip |= np.uint64(1) << bits[:, c].astype(np.uint64)
        out.append(seeds ^ flip)
    link = seeds.copy()
    for _ in range(4):  # a chain: each link flips max_distance fresh bits
        bits = rng.permutation(64)[:max_distance]
        link = link ^ np.uint64(sum(1 << int(x) for x in bits))
        out.append(link.copy())
    out.append(rng.integers(0, 2**63, 4 * n_seeds, dtype=np.int64).astype(np.uint64))
    return rng.permutation(np.concatenate(out))


def perceptual_table(hashes, rng, null_fraction=0.03):
    null = rng.random(len(hashes)) < null_fraction
    return pa.table({"phash": pa.array(hashes, pa.uint64(), mask=null)}), null


def reference_components(hashes, null, rows, max_distance):
    """Components of the in-memory search (near_pairs) over ``rows`` in that order."""
    ok = np.flatnonzero(~null[rows])
    i, j = hamming.near_pairs(hashes[rows[ok]], max_distance)
    return partitioned.components_of(np.arange(len(rows)), ok[i], ok[j]), (ok[i], ok[j])


@pytest.mark.parametrize(("max_distance", "partitions"), [(0, 2), (1, 1), (4, 5), (6, 3), (10, 2)])
def test_perceptual_groups_equal_the_in_memory_search_on_any_subset(max_distance, partitions):
    rng = np.random.default_rng(max_distance)
    hashes = chained_hashes(rng, 150, max(1, max_distance))
    n = len(hashes)
    table, null = perceptual_table(hashes, rng)
    s = SearchSettings("perceptual", max_distance=max_distance, key_column="phash")
    labels, a, b = partitioned.search_keys(
        shards_of(table, [n // 3, n // 3, n - 2 * (n // 3)]), n, s, partitions=partitions
    )
    assert np.all(a < b) and len(np.unique(np.stack([a, b], 1), axis=0)) == len(a)  # each pair once
    assert np.all(hamming.hamming(hashes[a], hashes[b]) <= max_distance)
    for trial in range(4):
        # The rows that reach the filter (a subset), in the filter's canonical (uid) order.
        alive = rng.random(n) < (1.0 if trial == 0 else 0.6)
        rows = rng.permutation(np.flatnonzero(alive))
        expected, (ei, ej) = reference_components(hashes, null, rows, max_distance)
        i, j = groups.label_edges(labels[rows], a, b)
        assert same_grouping(partitioned.components_of(np.arange(len(rows)), i, j), expected)
        # The very edges of the in-memory search (which min_similarity then checks pair by pair).
        assert set(zip(i.tolist(), j.tolist(), strict=True)) == set(zip(ei.tolist(), ej.tolist(), strict=True))
    if max_distance >= 4:  # the generator built chains: some group only holds by transitivity
        comp = partitioned.components_of(np.arange(n), *groups.label_edges(labels, a, b))
        direct = hamming.hamming(hashes[:, None], hashes[None, :]) <= max_distance
        assert any(
            not direct[np.ix_(members, members)].all()
            for c in np.unique(comp)
            if len(members := np.flatnonzero(comp == c)) > 2
        )


def test_string_hash_is_equal_for_equal_strings_across_chunks_and_slices():
    values = ["", "a", "ab", None, "ba", "ab", "é", ""]
    whole = partitioned.string_hash64(pa.array(values))
    chunked = partitioned.string_hash64(pa.chunked_array([pa.array(values[:3]), pa.array(values[3:])]))
    sliced = partitioned.string_hash64(pa.array(["x"] + values).slice(1))
    assert np.array_equal(whole, chunked) and np.array_equal(whole, sliced)
    assert whole[2] == whole[5] and whole[0] == whole[7] and len({int(whole[k]) for k in (0, 1, 2, 4, 6)}) == 5


def test_grouped_unique_pairs_stay_within_groups():
    rng = np.random.default_rng(1)
    values = rng.integers(0, 2**63, 400, dtype=np.int64).astype(np.uint64)
    values[200:] = values[:200] ^ np.uint64(3)  # near copies, but in the other group
    grp = np.r_[np.zeros(200, int), np.ones(200, int)]
    grp[:20] = 1  # these twenty meet their copies
    i, j = hamming.unique_pairs(values, 2, groups=grp)
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == [(k, 200 + k) for k in range(20)]


def test_workers_give_the_same_result_as_one_process(tmp_path):
    rng = np.random.default_rng(5)
    hashes = chained_hashes(rng, 300, 4)
    table, _ = perceptual_table(hashes, rng)
    n = len(hashes)
    s = SearchSettings("perceptual", max_distance=4, key_column="phash")
    one = partitioned.search_keys(shards_of(table, [n // 2, n - n // 2]), n, s, partitions=4, work_dir=str(tmp_path))
    two = partitioned.search_keys(
        shards_of(table, [n // 2, n - n // 2]), n, s, workers=2, partitions=4, work_dir=str(tmp_path)
    )
    for x, y in zip(one, two, strict=True):
        assert np.array_equal(x, y)
    assert list(tmp_path.iterdir()) == []  # spill files removed


def test_shards_read_from_parquet_files(tmp_path):
    import pyarrow.parquet as pq

    rng = np.random.default_rng(2)
    table = exact_table(rng, 1000)
    paths = []
    for k in range(4):
        paths.append(str(tmp_path / f"{k}.parquet"))
        pq.write_table(table.slice(250 * k, 250), paths[-1])
    s = SearchSettings("exact", with_caption=True)
    from_files = partitioned.search_keys([ShardKeys(250 * k, 250, path=p) for k, p in enumerate(paths)], 1000, s)
    in_memory = partitioned.search_keys(shards_of(table, [250] * 4), 1000, s)
    assert np.array_equal(from_files[0], in_memory[0])


@pytest.mark.parametrize("keep", ["highest_clip_score", "smallest_uid"])
@pytest.mark.parametrize("method", ["exact", "perceptual"])
def test_survivors_over_the_searched_labels_equal_the_oracle(method, keep):
    """components_of over the partitioned search's labels and pairs (the alive rows only),
    then groups.survivors (integers: negated scores, uid halves), pick the survivor the
    plain-Python oracle picks over the alive rows in uid order: ties in score, missing
    scores, duplicated uids, chains, rows not alive."""
    from filtering.uid import uids_to_u8u8
    from tests.filtering.dedup.test_groups import survivor_oracle

    rng = np.random.default_rng(11)
    hashes = chained_hashes(rng, 120, 4)
    n = len(hashes)
    table, null = perceptual_table(hashes, rng)
    uids = np.asarray([f"{v:032x}" for v in rng.permutation(n)], object)
    uids[rng.random(n) < 0.02] = uids[0]  # a few repeated uids: ties broken by row
    scores = rng.choice([0.1, 0.2, 0.3, np.nan, -0.0, 0.0], n).astype(np.float32)
    table = table.append_column("sha256", pa.array((hashes % np.uint64(97)).astype(str).astype(object), pa.string()))
    alive = rng.random(n) < 0.8
    s = (
        SearchSettings("exact")
        if method == "exact"
        else SearchSettings("perceptual", max_distance=4, key_column="phash")
    )
    labels, a, b = partitioned.search_keys(shards_of(table, [n // 2, n - n // 2]), n, s, partitions=3)
    rows = np.flatnonzero(alive)
    comp = partitioned.components_of(labels, a, b, alive)[rows]
    u = uids_to_u8u8(uids[rows])
    neg = -scores[rows].astype(np.float64) if keep == "highest_clip_score" else None
    drop, best = groups.survivors(comp, neg, u["f0"], u["f1"])
    got = np.full(n, -1, np.int64)
    got[rows] = rows
    got[rows[drop]] = rows[best]

    crow = rows[np.argsort(np.asarray(uids[rows], dtype=str), kind="stable")]
    i, j = groups.label_edges(labels[crow], a, b)
    oracle = survivor_oracle(len(crow), i, j, uids[crow], scores[crow] if keep == "highest_clip_score" else None, keep)
    expected = np.full(n, -1, np.int64)
    expected[crow] = crow[oracle]
    assert (expected[rows] != rows).sum() > 50  # many rows are dropped as copies
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("max_distance", [1, 6, 12])
def test_cutting_out_a_shared_block_keeps_the_distance(max_distance):
    rng = np.random.default_rng(max_distance)
    u = rng.integers(0, 2**63, 500, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    v = rng.integers(0, 2**63, 500, dtype=np.int64).astype(np.uint64) * np.uint64(3)
    block = rng.integers(0, max_distance + 1, 500)
    for b in range(max_distance + 1):  # make v equal to u on its block
        shift, width = partitioned.blocks(max_distance)[b]
        mask = np.uint64(((1 << width) - 1) << shift)
        on = block == b
        v[on] = (v[on] & ~mask) | (u[on] & mask)
    cu, bits = partitioned.without_block(u, block, max_distance)
    cv, _ = partitioned.without_block(v, block, max_distance)
    assert np.array_equal(hamming.hamming(cu, cv), hamming.hamming(u, v))
    assert bits == 64 - min(w for _, w in partitioned.blocks(max_distance))
    assert np.all(cu >> np.uint64(bits) == 0)  # the unique_pairs search covers every bit left


class InProcessTasks:
    """A task pool (``filtering/tasks.py``) that runs each task here when it is submitted and
    counts the spill files under ``root`` (a local folder or an fsspec URL) at every submit."""

    def __init__(self, root: str, workers: int = 2):
        self.root, self.workers = root, workers
        self.most_files = 0
        self.paths: set[str] = set()

    def _count(self) -> None:
        if "://" in self.root:
            from filtering.io.paths import get_fs

            fs, path = get_fs(self.root)
            found = fs.find(path) if fs.exists(path) else []
        else:
            import os

            found = [os.path.join(d, f) for d, _, files in os.walk(self.root) for f in files]
        self.paths.update(found)
        self.most_files = max(self.most_files, len(found))

    def submit(self, fn, *args):
        import concurrent.futures as cf

        self._count()
        out: cf.Future = cf.Future()
        out.set_result(fn(*args))
        return out

    def map(self, fn, args):
        return (self.submit(fn, a).result() for a in args)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def test_spill_files_are_one_per_map_task_not_per_shard_and_partition(tmp_path, monkeypatch):
    """Forty shards and sixteen partitions: shards x partitions would be 640 files; the map
    tasks write one each (a few per worker), with the in-memory search's result, also when
    a task flushes its records many times (memory bounded)."""
    rng = np.random.default_rng(8)
    hashes = chained_hashes(rng, 200, 3)
    table, _ = perceptual_table(hashes, rng)
    n = len(hashes)
    sizes = [n // 40] * 39 + [n - 39 * (n // 40)]
    s = SearchSettings("perceptual", max_distance=3, key_column="phash")
    expected = partitioned.search_keys(shards_of(table, sizes), n, s, partitions=16)
    pool = InProcessTasks(str(tmp_path))
    got = partitioned.search_keys(
        shards_of(table, sizes), n, s, workers=2, partitions=16, work_dir=str(tmp_path), executor=pool
    )
    assert 1 <= pool.most_files <= 2 * 4  # two workers, TASKS_PER_WORKER map tasks each
    for x, y in zip(expected, got, strict=True):
        assert np.array_equal(x, y)
    monkeypatch.setattr(partitioned, "FLUSH_BYTES", 2000)  # a flush every shard or two
    small = partitioned.search_keys(shards_of(table, sizes), n, s, workers=2, partitions=16, executor=pool)
    for x, y in zip(expected, small, strict=True):
        assert np.array_equal(x, y)
    assert list(tmp_path.iterdir()) == []  # spill files removed


def test_spill_files_go_to_a_remote_work_dir_and_are_removed():
    """An fsspec URL as ``work_dir`` (the output's file system, which every Ray node sees):
    the spill files are written and read there, the result is the local one's, and nothing
    is left behind."""
    import fsspec

    rng = np.random.default_rng(9)
    n = 2000
    table = exact_table(rng, n)
    s = SearchSettings("exact", with_caption=True)
    sizes = [500, 500, 1000]
    expected = partitioned.search_keys(shards_of(table, sizes), n, s, partitions=5)
    pool = InProcessTasks("memory://spill-test/cache")
    got = partitioned.search_keys(
        shards_of(table, sizes), n, s, workers=2, partitions=5, work_dir="memory://spill-test/cache", executor=pool
    )
    for x, y in zip(expected, got, strict=True):
        assert np.array_equal(x, y)
    assert pool.most_files >= 1
    assert all(p.startswith("/spill-test/cache/dedup-spill-") for p in pool.paths)
    fs = fsspec.filesystem("memory")
    assert fs.find("/spill-test/cache") == []
