"""The index of a run's kept rows and the search against it (``dedup: {against: [...]}``),
against brute force: every pool row matched to the closest reference row (then the first
reference, then the smallest uid), on partitions, batches and shards cut anyhow."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from filtering.dedup import against, hamming
from filtering.dedup import index as ix
from filtering.dedup.partitioned import SearchSettings, ShardKeys
from filtering.pool import Pool, ShardPart


def hexes(rng, n, nbytes):
    return ["".join(f"{b:02x}" for b in row) for row in rng.integers(0, 256, (n, nbytes))]


def write_reference(folder, uids, sha, phash, shards=3) -> ix.Reference:
    builder = ix.IndexBuilder(str(folder), "datacomp")
    cuts = np.linspace(0, len(uids), shards + 1).astype(int)
    for k in range(shards):
        a, b = cuts[k], cuts[k + 1]
        table = pa.table(
            {"uid": uids[a:b], "sha256": pa.array(sha[a:b], pa.string()), "phash": pa.array(phash[a:b], pa.uint64())}
        )
        builder.add(table, np.arange(b - a), k)
    builder.finish([f"s{k}" for k in range(shards)])
    return ix.read_reference(str(folder), str(folder))


def _emit_pool(args):
    return against.emit_pool(*args)


def match_shards(shards, n, settings, references, workers=1, work_dir=None):
    """:func:`against.match` (what the dedup phase runs) over key tables in memory: the
    map tasks as the phase groups shards (``partitioned.task_groups``), on the plan's task
    pool (``filtering.tasks.task_pool``) of ``workers`` processes, or here for one."""
    from filtering.dedup import partitioned
    from filtering.tasks import task_pool

    def emit_args(partitions, spill):
        groups = partitioned.task_groups([s.n for s in shards], workers)
        return [
            ([shards[k] for k in group], settings, partitions, partitioned.spill_path(spill, t))
            for t, group in enumerate(groups)
        ]

    if workers <= 1:
        return against.match(map, emit_args, _emit_pool, n, settings, references, workers, work_dir)
    with task_pool(None, workers) as tasks:
        return against.match(tasks.map, emit_args, _emit_pool, n, settings, references, workers, work_dir)


def shards_of(table, sizes):
    out, start = [], 0
    for size in sizes:
        out.append(ShardKeys(start, size, table=table.slice(start, size)))
        start += size
    return out


def test_sha256_bytes_parses_hex_and_rejects_the_rest():
    good = "ab" * 32
    digests, valid = ix.sha256_bytes(pa.array([good, good.upper(), None, "ab" * 31, "zz" * 32, ""]))
    assert valid.tolist() == [True, True, False, False, False, False]
    assert digests[0].tolist() == [0xAB] * 32 and digests[1].tolist() == [0xAB] * 32
    assert not digests[2:].any()


def test_index_rows_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    uids = hexes(rng, 50, 16)
    sha = hexes(rng, 50, 32)
    sha[3] = None
    phash = rng.integers(0, 2**64, 50, dtype=np.uint64)
    ref = write_reference(tmp_path / "ix", uids, sha, phash)
    assert ref.rows == 50
    from filtering.dedup.partitioned import read_batches

    back = pa.Table.from_batches(read_batches(ref.all_pieces()))
    got = sorted(zip(back.column("uid_hi").to_pylist(), back.column("phash").to_pylist(), strict=True))
    want = sorted((int(u[:16], 16), int(p)) for u, p in zip(uids, phash, strict=True))
    assert got == want
    # every batch holds one partition: the sha256's first byte (or the uid's without one)
    for url, parts in ref.files:
        for b, p in zip(read_batches([(url, np.arange(len(parts)))]), parts, strict=True):
            for row in b.to_pylist():
                first = row["sha256"][0] if row["sha256"] is not None else row["uid_hi"] >> 56
                assert first == p


def brute(pool, valid, refs, k):
    """Each valid pool hash's nearest reference row within ``k`` bits, by comparing every
    pair: ``{row: (reference, uid)}``, ties to the lowest (distance, reference, uid)."""
    want = {}
    for i in np.flatnonzero(valid):
        cands = []
        for r, (uids, ph) in enumerate(refs):
            d = hamming.popcount64(ph ^ pool[i])
            cands += [(int(dd), r, u) for dd, u in zip(d, uids, strict=True) if dd <= k]
        if cands:
            want[int(i)] = min(cands)[1:]
    return want


def brute_exact(pool_sha, refs):
    best = {}
    for r, (uids, sha) in enumerate(refs):
        for u, s in sorted(zip(uids, sha, strict=True)):
            if s is not None:
                best.setdefault(s.lower(), (r, u))
    return {i: best[s.lower()] for i, s in enumerate(pool_sha) if s is not None and s.lower() in best}


@pytest.mark.parametrize("workers", [1, 2])
def test_exact_matches_are_brute_force(tmp_path, workers):
    rng = np.random.default_rng(1)
    refs, readers = [], []
    for r in range(2):
        uids, sha = hexes(rng, 400, 16), hexes(rng, 400, 32)
        sha[:50] = sha[50:100]  # copies inside a reference: the smallest uid is named
        refs.append((uids, sha))
        readers.append(write_reference(tmp_path / f"r{r}", uids, sha, np.zeros(400, np.uint64)))
    # both references share some digests: the first reference is named
    shared = hexes(rng, 30, 32)
    refs[0][1][200:230] = shared
    refs[1][1][300:330] = shared
    readers = [write_reference(tmp_path / f"s{r}", *refs[r], np.zeros(400, np.uint64)) for r in range(2)]
    pool = hexes(rng, 600, 32)
    pick = rng.choice(400, 200)
    pool[:100] = [refs[0][1][k].upper() for k in pick[:100]]  # either case
    pool[100:200] = [refs[1][1][k] for k in pick[100:]]
    pool[200:230] = shared
    pool[250] = None
    table = pa.table({"sha256": pa.array(pool, pa.string())})
    m = match_shards(
        shards_of(table, [250, 0, 350]), 600, SearchSettings("exact"), readers, workers=workers, work_dir=str(tmp_path)
    )
    want = brute_exact(pool, refs)
    assert m.rows.tolist() == sorted(want)
    assert [(int(r), u) for r, u in zip(m.ref, m.uids(), strict=True)] == [want[i] for i in m.rows]


@pytest.mark.parametrize("k, flush", [(0, None), (3, None), (6, None), (6, 1024)])
def test_perceptual_matches_are_brute_force(tmp_path, monkeypatch, k, flush):
    """``flush``: the reference emit tasks flush their records after every batch."""
    if flush is not None:
        monkeypatch.setattr(against, "REFERENCE_FLUSH_BYTES", flush)
    rng = np.random.default_rng(k)
    refs, readers = [], []
    for r in range(2):
        uids = hexes(rng, 300, 16)
        ph = rng.integers(0, 2**64, 300, dtype=np.uint64)
        ph[:40] = ph[40:80] ^ np.uint64(1)  # near copies inside a reference
        refs.append((uids, ph))
        readers.append(write_reference(tmp_path / f"r{r}", uids, hexes(rng, 300, 32), ph))
    pool = rng.integers(0, 2**64, 500, dtype=np.uint64)
    src = np.r_[refs[0][1][:150], refs[1][1][:150]]
    flips = np.zeros(300, np.uint64)
    for _ in range(8):  # up to 8 bits: some within k, some not
        flips ^= np.where(
            rng.random(300) < 0.5, np.uint64(1) << rng.integers(0, 64, 300).astype(np.uint64), np.uint64(0)
        )
    pool[:300] = src ^ flips
    valid = np.ones(500, bool)
    valid[450:] = False
    table = pa.table({"phash": pa.array(pool, pa.uint64(), mask=~valid)})
    m = match_shards(
        shards_of(table, [123, 377]), 500, SearchSettings("perceptual", max_distance=k, key_column="phash"), readers
    )
    want = brute(pool, valid, refs, k)
    assert m.rows.tolist() == sorted(want)
    assert [(int(r), u) for r, u in zip(m.ref, m.uids(), strict=True)] == [want[i] for i in m.rows]


def test_index_follows_the_parts_whatever_the_tables(tmp_path):
    """One subset table for the whole pool (no late columns) is cut into one index file per
    source shard with kept rows, each with the rows' positions in its shard."""
    rng = np.random.default_rng(3)
    uids = hexes(rng, 30, 16)
    table = pa.table({"uid": uids, "sha256": pa.array(hexes(rng, 30, 32))})
    parts = [ShardPart("a", "a", 0, 10), ShardPart("b", "b", 10, 12), ShardPart("c", "c", 12, 30)]
    pool = Pool(table, parts)
    keep = rng.random(30) < 0.5
    keep[10:12] = False
    calls = []
    out = list(
        ix.shard_index_tables(pool, keep, [table.filter(pa.array(keep))], lambda t, r, k, p: calls.append((t, r, k)))
    )
    assert out[0].num_rows == keep.sum()
    assert [k for _, _, k in calls] == [0, 2]
    for t, r, k in calls:
        assert t.column("uid").to_pylist() == [uids[parts[k].start + i] for i in r]


def test_a_reference_without_the_key_is_an_error_and_a_partial_one_says_so(tmp_path):
    from filtering.errors import InputError

    rng = np.random.default_rng(4)
    uids, sha = hexes(rng, 20, 16), hexes(rng, 20, 32)
    builder = ix.IndexBuilder(str(tmp_path / "a"), "datacomp")
    builder.add(pa.table({"uid": uids, "sha256": sha}), np.arange(20), 0)  # no phash column
    builder.finish(["s0"])
    with pytest.raises(InputError, match="no perceptual hashes"):
        against.open_references([str(tmp_path / "a")], str(tmp_path / "cache"), print, "phash")
    sha[:5] = [None] * 5
    builder = ix.IndexBuilder(str(tmp_path / "b"), "datacomp")
    builder.add(pa.table({"uid": uids, "sha256": pa.array(sha, pa.string())}), np.arange(20), 0)
    builder.finish(["s0"])
    lines: list[str] = []
    (ref,) = against.open_references([str(tmp_path / "b")], str(tmp_path / "cache"), lines.append, "sha256")
    assert ref.with_keys == {"sha256": 15, "phash": 0}
    assert len(lines) == 1 and "5 of its 20 kept rows have no sha256" in lines[0]


@pytest.mark.parametrize("k", [1, 3])
def test_semantic_partition_is_brute_force_within_each_cluster(tmp_path, k):
    """``semantic``: each pool row's most similar reference row in its cluster at cosine >=
    the threshold (then the first reference, then the smallest uid), against numpy over
    every pair of the same cluster; the reference rows spilled in two files (two index
    files), the clusters compared in two partitions."""
    from filtering.clustering import normalize
    from filtering.dedup.semantic import spill_assigned

    rng = np.random.default_rng(3)
    dim, p_n, r_n, threshold = 8, 60, 90, 0.9
    pool = rng.standard_normal((p_n, dim)).astype(np.float32)
    ref = rng.standard_normal((r_n, dim)).astype(np.float32)
    ref[:30] = pool[:30] + 0.05 * rng.standard_normal((30, dim))  # near copies of 30 pool rows
    ref[30:35] = ref[0]  # the same embedding under five other uids: ties
    hi = rng.integers(0, 2**63, r_n, dtype=np.int64).astype(np.uint64)
    lo = rng.integers(0, 2**63, r_n, dtype=np.int64).astype(np.uint64)
    which = np.r_[np.zeros(45, np.int32), np.ones(45, np.int32)]  # two references
    centroids = normalize(rng.standard_normal((k, dim))) if k > 1 else None
    rows = np.arange(p_n) + 1000  # pool rows
    pool_prefix = str(tmp_path / "p")
    spill_assigned(pool, np.arange(p_n), rows, np.arange(p_n), centroids, k, pool_prefix)
    ref_prefixes = []
    for f, (a, b) in enumerate([(0, 50), (50, r_n)]):  # two index files
        ref_prefixes.append(str(tmp_path / f"r{f}"))
        extra = {"ref": which[a:b], "hi": hi[a:b], "lo": lo[a:b]}
        order = np.arange(b - a)
        spill_assigned(ref[a:b], order, order, order, centroids, k, ref_prefixes[-1], extra=extra)
    parts = [np.arange(k)[::2], np.arange(k)[1::2]]
    got = against.best_matches(against.semantic_partition([pool_prefix], ref_prefixes, c, threshold) for c in parts)
    # numpy: every pair in the same cluster (the labels the spills hold)
    plabel = np.empty(p_n, np.int64)
    plabel[np.load(f"{pool_prefix}.row.npy") - 1000] = np.load(f"{pool_prefix}.label.npy")
    rlabel = np.empty(r_n, np.int64)
    for f, a in enumerate((0, 50)):
        rlabel[a + np.load(f"{ref_prefixes[f]}.row.npy")] = np.load(f"{ref_prefixes[f]}.label.npy")
    sims = normalize(pool) @ normalize(ref).T
    want_rows, want_uid = [], []
    for i in range(p_n):
        cand = np.flatnonzero((rlabel == plabel[i]) & (sims[i] >= threshold))
        if len(cand):
            rounded = np.round(sims[i, cand], 5)  # equal embeddings tie (then the smallest uid)
            best = cand[rounded == rounded.max()]
            j = best[np.lexsort((lo[best], hi[best], which[best]))[0]]
            want_rows.append(rows[i])
            want_uid.append((which[j], hi[j], lo[j]))
    assert len(want_rows) >= 25
    assert got.rows.tolist() == want_rows
    assert list(zip(got.ref.tolist(), got.hi.tolist(), got.lo.tolist(), strict=True)) == [
        (int(a), int(b), int(c)) for a, b, c in want_uid
    ]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from /proc")
def test_release_memory_hands_freed_heap_back():
    """The reference search's tasks end with release_memory: without it a worker keeps the
    pages its search freed (glibc keeps a fragmented heap) into the run's later phases."""
    code = """
import json
from filtering.dedup.against import release_memory
def anon():
    return next(int(s.split()[1]) * 1024 for s in open("/proc/self/status") if s.startswith("RssAnon"))
keep, junk = [], []
for i in range(40_000):  # 160 MB of 4 KB blocks, one in 500 kept: the freed ones sit between them
    (keep if i % 500 == 0 else junk).append(bytearray(4000))
del junk
held = anon()
release_memory()
print(json.dumps([held, anon()]))
"""
    repo = str(Path(__file__).resolve().parents[3])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    held, after = json.loads(out.stdout)
    assert held - after > 100e6, (held, after)
