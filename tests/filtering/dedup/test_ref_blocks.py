"""A reference's perceptual block tables (``INDEX/blocks-d<k>/``): made once on first use
with one line, read after, made again when stale or foreign; the search against them
finds what brute force finds, however the cells are cut into partitions."""

import json
import os

import numpy as np
import pyarrow as pa
import pytest

from filtering.dedup import against, hamming, ref_blocks
from filtering.dedup.partitioned import SearchSettings
from tests.filtering.dedup.test_against import _emit_pool, brute, hexes, shards_of, write_reference


def pool_near(rng, refs, n=400, copies=250):
    """``n`` hashes, the first ``copies`` reference hashes with up to 8 bits flipped (a fifth with none)."""
    pool = rng.integers(0, 2**64, n, dtype=np.uint64)
    src = np.concatenate([ph for _, ph in refs])[rng.integers(0, sum(len(ph) for _, ph in refs), copies)]
    flips = np.zeros(copies, np.uint64)
    for _ in range(8):
        flips ^= np.where(
            rng.random(copies) < 0.5, np.uint64(1) << rng.integers(0, 64, copies).astype(np.uint64), np.uint64(0)
        )
    flips[: copies // 5] = 0  # exact copies
    pool[:copies] = src ^ flips
    return pool


def make_refs(tmp_path, rng, sizes, tag="r"):
    refs, readers = [], []
    for r, size in enumerate(sizes):
        uids = hexes(rng, size, 16)
        ph = rng.integers(0, 2**64, size, dtype=np.uint64)
        ph[: size // 8] = ph[size // 8 : 2 * (size // 8)] ^ np.uint64(2)  # near copies inside a reference
        refs.append((uids, ph))
        readers.append(write_reference(tmp_path / f"{tag}{r}", uids, hexes(rng, size, 32), ph))
    return refs, readers


def search(pool, valid, readers, k, log=None, workers=1, tmp_path=None):
    """:func:`against.match` as the dedup phase runs it (``test_against.match_shards``), with ``log``."""
    from filtering.dedup import partitioned
    from filtering.tasks import task_pool

    table = pa.table({"phash": pa.array(pool, pa.uint64(), mask=~valid)})
    shards = shards_of(table, [len(pool) // 3, len(pool) - len(pool) // 3])
    settings = SearchSettings("perceptual", max_distance=k, key_column="phash")
    work_dir = None if tmp_path is None else str(tmp_path)

    def emit_args(partitions, spill):
        groups = partitioned.task_groups([s.n for s in shards], workers)
        return [
            ([shards[g] for g in group], settings, partitions, partitioned.spill_path(spill, t))
            for t, group in enumerate(groups)
        ]

    if workers <= 1:
        return against.match(map, emit_args, _emit_pool, len(pool), settings, readers, workers, work_dir, log)
    with task_pool(None, workers) as tasks:
        return against.match(tasks.map, emit_args, _emit_pool, len(pool), settings, readers, workers, work_dir, log)


def as_dict(m):
    return {int(i): (int(r), u) for i, r, u in zip(m.rows, m.ref, m.uids(), strict=True)}


@pytest.mark.parametrize("k, per_partition", [(6, 40), (6, 1 << 17), (2, 25), (0, 30)])
def test_matches_are_brute_force_however_the_cells_are_cut(tmp_path, monkeypatch, k, per_partition):
    """``per_partition`` 25 to 40 records: each block's cells cut into tens of partitions,
    some holding one reference and not the other."""
    monkeypatch.setattr(against, "RECORDS_PER_PARTITION", per_partition)
    rng = np.random.default_rng(10 + k)
    refs, readers = make_refs(tmp_path, rng, [300, 200])
    pool = pool_near(rng, refs)
    valid = np.ones(len(pool), bool)
    valid[380:] = False
    m = search(pool, valid, readers, k)
    assert as_dict(m) == brute(pool, valid, refs, k)
    assert len(m.rows) > 20


def test_tables_made_once_with_a_line_then_read(tmp_path):
    rng = np.random.default_rng(1)
    refs, readers = make_refs(tmp_path, rng, [300])
    pool = pool_near(rng, refs)
    valid = np.ones(len(pool), bool)
    lines = []
    first = as_dict(search(pool, valid, readers, 6, lines.append))
    folder = tmp_path / "r0" / "blocks-d6"
    assert len(lines) == 1 and "making its block tables for max_distance 6 once" in lines[0] and str(folder) in lines[0]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["rows"] == 300 and meta["max_distance"] == 6
    stamp = (folder / "meta.json").stat().st_mtime_ns
    lines.clear()
    assert as_dict(search(pool, valid, readers, 6, lines.append)) == first == brute(pool, valid, refs, 6)
    assert lines == [] and (folder / "meta.json").stat().st_mtime_ns == stamp
    # another max_distance: its own tables beside the first
    assert as_dict(search(pool, valid, readers, 3, lines.append)) == brute(pool, valid, refs, 3)
    assert len(lines) == 1 and (tmp_path / "r0" / "blocks-d3" / "meta.json").exists()
    assert sorted(p.name for p in (tmp_path / "r0").iterdir() if p.name.startswith("blocks")) == [
        "blocks-d3",
        "blocks-d6",
    ]


def test_stale_or_foreign_tables_are_made_again(tmp_path):
    rng = np.random.default_rng(2)
    refs, readers = make_refs(tmp_path, rng, [300])
    pool = pool_near(rng, refs)
    valid = np.ones(len(pool), bool)
    search(pool, valid, readers, 6)
    # a run rewriting the output (other rows) removes the tables made from its earlier index
    uids = hexes(rng, 300, 16)
    ph = rng.integers(0, 2**64, 300, dtype=np.uint64)
    readers = [write_reference(tmp_path / "r0", uids, hexes(rng, 300, 32), ph)]
    assert not (tmp_path / "r0" / "blocks-d6").exists()
    pool = pool_near(rng, [(uids, ph)])
    lines = []
    assert as_dict(search(pool, valid, readers, 6, lines.append)) == brute(pool, valid, [(uids, ph)], 6)
    assert len(lines) == 1 and "once" in lines[0]
    # an index file changed since the tables were made (written anew, whatever its bytes): remade
    part = tmp_path / "r0" / "part-00000.arrow"
    os.utime(part, ns=(part.stat().st_atime_ns, part.stat().st_mtime_ns + 10**9))
    lines.clear()
    assert as_dict(search(pool, valid, readers, 6, lines.append)) == brute(pool, valid, [(uids, ph)], 6)
    assert len(lines) == 1 and "from an earlier index; remaking them" in lines[0]
    # foreign or broken: another version, unreadable
    meta_path = tmp_path / "r0" / "blocks-d6" / "meta.json"
    for broken in (json.dumps({**json.loads(meta_path.read_text()), "version": 99}), "{not json"):
        meta_path.write_text(broken)
        lines.clear()
        assert as_dict(search(pool, valid, readers, 6, lines.append)) == brute(pool, valid, [(uids, ph)], 6)
        assert len(lines) == 1 and "remaking" in lines[0]
        assert ref_blocks.state(readers[0], 6) is None
    leftovers = [p.name for p in (tmp_path / "r0").iterdir() if ".tmp-" in p.name or ".stale-" in p.name]
    assert leftovers == []


def test_a_second_maker_keeps_the_first_tables(tmp_path):
    """Two runs making the same tables at once: the second's rename finds good ones there and keeps them."""
    rng = np.random.default_rng(3)
    _, readers = make_refs(tmp_path, rng, [100])
    assert ref_blocks.build(readers[0], 4) == 100
    stamp = os.stat(tmp_path / "r0" / "blocks-d4" / "meta.json").st_mtime_ns
    assert ref_blocks.build(readers[0], 4) == 100
    assert os.stat(tmp_path / "r0" / "blocks-d4" / "meta.json").st_mtime_ns == stamp
    assert sorted(os.listdir(tmp_path / "r0")).count("blocks-d4") == 1
    assert not [n for n in os.listdir(tmp_path / "r0") if ".tmp-" in n]


@pytest.mark.parametrize("workers", [1, 2])
def test_block_tables_and_remade_records_agree(tmp_path, monkeypatch, workers):
    """The search against block tables and the one re-making the references' records (as
    references on fsspec file systems are searched) name the same reference rows."""
    rng = np.random.default_rng(4)
    refs, readers = make_refs(tmp_path, rng, [250, 250])
    refs[1][1][:50] = refs[0][1][:50]  # the same hashes in both: the first reference is named
    readers[1] = write_reference(tmp_path / "r1b", refs[1][0], hexes(rng, 250, 32), refs[1][1])
    pool = pool_near(rng, refs)
    valid = np.ones(len(pool), bool)
    with_tables = as_dict(search(pool, valid, readers, 5, workers=workers, tmp_path=tmp_path))
    monkeypatch.setattr(against, "USE_BLOCK_TABLES", False)
    remade = as_dict(search(pool, valid, readers, 5, workers=workers, tmp_path=tmp_path))
    assert with_tables == remade == brute(pool, valid, refs, 5)


@pytest.mark.parametrize("k", [0, 3, 6, 9])
def test_substring_radii_keep_the_pigeonhole(k):
    """Two values within ``k`` are within ``r_i`` in some substring, for every substring count."""
    from filtering.dedup.hamming import _widths

    rng = np.random.default_rng(k)
    for m in range(1, k + 3):
        radii = against.substring_radii(m, k)
        assert sum(r + 1 for r in radii) >= k + 1 and radii == sorted(radii, reverse=True)
        # spread k flipped bits as evenly as possible over the substrings: the hardest case
        widths = _widths(m, 55)
        starts = np.r_[0, np.cumsum(widths)[:-1]]
        for _ in range(20):
            diff = 0
            for t in range(k):
                s = t % m
                diff |= 1 << int(starts[s] + rng.integers(0, widths[s]))
            per = [bin((diff >> int(a)) & ((1 << w) - 1)).count("1") for a, w in zip(starts, widths, strict=True)]
            assert any(p <= r for p, r in zip(per, radii, strict=True))


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7])
def test_cross_pairs_is_brute_force_for_every_substring_count(monkeypatch, m):
    monkeypatch.setattr(against, "choose_cross_substrings", lambda *a, **k: m)
    rng = np.random.default_rng(m)
    r = rng.integers(0, 2**40, 300, dtype=np.uint64)
    q = r[rng.integers(0, 300, 200)]
    for _ in range(5):
        q ^= np.where(rng.random(200) < 0.6, np.uint64(1) << rng.integers(0, 40, 200).astype(np.uint64), np.uint64(0))
    qg, rg = rng.integers(0, 3, 200).astype(np.uint64), rng.integers(0, 3, 300).astype(np.uint64)
    i, j = against.cross_pairs(q, qg, r, rg, 4, bits=40)
    d = hamming.popcount64(q[:, None] ^ r[None, :])
    want = np.argwhere((d <= 4) & (qg[:, None] == rg[None, :]))
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == [tuple(x) for x in want.tolist()]
    assert len(want) > 50


def test_a_read_only_reference_is_searched_without_tables(tmp_path, monkeypatch):
    """A reference whose folder this process may not write in (and has no tables): its
    records are re-made for the run, with one line; nothing is written beside it."""
    rng = np.random.default_rng(5)
    refs, readers = make_refs(tmp_path, rng, [200])
    monkeypatch.setattr(ref_blocks, "writable", lambda folder: False)
    pool = pool_near(rng, refs)
    valid = np.ones(len(pool), bool)
    lines = []
    assert as_dict(search(pool, valid, readers, 6, lines.append)) == brute(pool, valid, refs, 6)
    assert len(lines) == 1 and "read-only" in lines[0]
    assert not [p for p in (tmp_path / "r0").iterdir() if p.name.startswith("blocks")]
