"""``dedup: {against: [...]}``: rows of the new pool that duplicate a kept row of an earlier run.

The references are earlier outputs' indexes (:mod:`filtering.dedup.index`); a reference
is never loaded whole. Both searches are the partitioned search's two steps
(:mod:`filtering.dedup.partitioned`), with the reference's rows on one side only: a pool
row is matched against reference rows, never reference rows against each other.

- ``exact``: the new pool's rows with a sha256 are spilled into the index's
  :data:`~filtering.dedup.index.PARTITIONS` partitions (the digest's first byte, as the
  index cuts its rows), then each partition joins its pool rows with the same partition
  of every reference (its record batches, memory-mapped): equal 32-byte digests.
  ``with_caption`` is not taken into account: the index holds no captions, so a copy of
  the image under another caption counts as a copy.
- ``perceptual``: one record per block of the hash on each side (multi-index hashing, as
  the in-pool search): the pool's spilled by partition; the references' read from their
  block tables (:mod:`filtering.dedup.ref_blocks`, written once beside the index, a
  partition being a range of one block's cells), or, for a reference on an fsspec file
  system or in a read-only folder without tables, re-made from its index batches and
  spilled beside the pool's. In each partition every pool value is compared with the
  reference values of the same block value (:func:`cross_pairs`), and a match is a full
  Hamming distance of at most ``max_distance``.

A matched pool row takes the closest reference row (then the earliest reference in the
list, then the smallest uid): its uid is the row's ``duplicate_of``, and the reference's
position in the list names which one. The driver holds only the matched rows.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from filtering.dedup import index as ix
from filtering.dedup import partitioned, ref_blocks
from filtering.dedup.hamming import _ball, _flip_masks, _Table, _widths, popcount64, probe
from filtering.io.paths import is_local, join

CANDIDATES_AT_A_TIME = 1 << 20  # pool-reference record pairs verified at once
PROBES_AT_A_TIME = 1 << 18  # table lookups at once in the cross search (~10 MB)
_NO_FLIP = np.zeros(1, np.uint64)
# Records per partition (perceptual): a quarter of the in-pool search's, so that a worker
# holding one adds less to the run's peak than the in-pool search's partitions do.
RECORDS_PER_PARTITION = 1 << 17
# A reference emit task writes 7 records of 36 bytes per reference row (115 MB for 455k
# rows): flushed every 16 MB rather than the spill writer's 64, whose buffer, concatenation
# and partition sort held ~190 MB per worker, the run's peak at 3.6M reference rows.
REFERENCE_FLUSH_BYTES = 16 << 20
# Perceptual searches against references on a local file system read their block tables
# (filtering/dedup/ref_blocks.py); False re-makes the references' records on every run, as
# references elsewhere (fsspec URLs) are searched.
USE_BLOCK_TABLES = True


@dataclass
class Matches:
    """Pool rows that duplicate a reference row, ascending, with which reference and which row (its uid)."""

    rows: np.ndarray  # int64 pool rows
    ref: np.ndarray  # int32: position of the reference in ``against``
    hi: np.ndarray  # uint64: the reference row's uid
    lo: np.ndarray

    @staticmethod
    def empty() -> Matches:
        z = np.zeros(0, np.uint64)
        return Matches(np.zeros(0, np.int64), np.zeros(0, np.int32), z, z.copy())

    def uids(self, at: np.ndarray | None = None) -> list[str]:
        hi, lo = (self.hi, self.lo) if at is None else (self.hi[at], self.lo[at])
        return [f"{int(h):016x}{int(low):016x}" for h, low in zip(hi, lo, strict=True)]

    def counts(self, n_refs: int) -> list[int]:
        return np.bincount(self.ref, minlength=n_refs).astype(int).tolist()


# -- step 1: emit ----------------------------------------------------------------------------


def pool_records(shard: partitioned.ShardKeys, settings: partitioned.SearchSettings, partitions):
    """One shard's records on the pool side and their partitions (``partitions``: a count,
    or the cuts of the references' block tables, :class:`~filtering.dedup.ref_blocks.CellPartitions`)."""
    if isinstance(partitions, ref_blocks.CellPartitions):
        table = shard.read([settings.key_column])
        key = table.column(settings.key_column)
        valid = key.is_valid().to_numpy(zero_copy_only=False)
        hashes = np.asarray(key.fill_null(0).to_numpy(), dtype=np.uint64)[valid]
        rows = shard.first_row + np.flatnonzero(valid)
        g, part = partitions.of(hashes)
        m = settings.max_distance + 1
        return pa.table({"g": g, "h": np.repeat(hashes, m), "r": np.repeat(rows, m)}), part
    if settings.method == "perceptual":
        return partitioned.shard_records(shard, settings, partitions)
    table = shard.read([settings.key_column])
    digests, valid = ix.sha256_bytes(table.column(settings.key_column))
    take = np.flatnonzero(valid)
    records = pa.table({"r": shard.first_row + take, "s": ix.fixed_digests(digests[take], np.ones(len(take), bool))})
    return records, digests[take, 0].astype(np.int64)


def emit_pool(shards: Iterable[partitioned.ShardKeys], settings, partitions, path: str) -> partitioned.Spilled:
    """One map task: its shards' pool-side records into one spill file."""
    writer = partitioned.SpillWriter(path, int(partitions))
    try:
        for shard in shards:
            writer.add(*pool_records(shard, settings, partitions))
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def emit_reference(
    pieces: Sequence[tuple[str, np.ndarray]], ref: int, settings, partitions: int, path: str
) -> partitioned.Spilled:
    """One map task (perceptual): some record batches of reference ``ref``'s index, each
    row's block records (the pool side's ``g``, ``h``) with its uid, into one spill file."""
    writer = partitioned.SpillWriter(path, partitions)
    m = settings.max_distance + 1
    try:
        for url, batches in pieces:
            for batch in partitioned.read_batches([(url, batches)]):
                ph = batch.column("phash")
                valid = ph.is_valid().to_numpy(zero_copy_only=False)
                if not valid.any():
                    continue
                h = np.asarray(ph.fill_null(0).to_numpy(), np.uint64)[valid]
                hi = batch.column("uid_hi").to_numpy()[valid]
                lo = batch.column("uid_lo").to_numpy()[valid]
                g = np.empty(len(h) * m, np.uint64)
                for b, (shift, width) in enumerate(partitioned.blocks(settings.max_distance)):
                    g[b::m] = (np.uint64(b) << np.uint64(56)) | ((h >> np.uint64(shift)) & np.uint64((1 << width) - 1))
                part = (partitioned.mix64(g) % np.uint64(partitions)).astype(np.int64)
                records = pa.table(
                    {
                        "g": g,
                        "h": np.repeat(h, m),
                        "hi": np.repeat(hi, m),
                        "lo": np.repeat(lo, m),
                        "ref": np.full(len(g), ref, np.int32),
                    }
                )
                writer.add(records, part)
                if writer.pending_bytes >= REFERENCE_FLUSH_BYTES:
                    writer.flush()
    except BaseException:
        writer.abort()
        raise
    return writer.close()


# -- step 2: reduce --------------------------------------------------------------------------


def _digest_keys(column) -> tuple[np.ndarray, np.ndarray]:
    """``binary(32)`` digests as ``(first 8 bytes as a uint64 key, the (N, 32) bytes)``."""
    digests, _ = ix.sha256_bytes(column)
    return digests[:, :8].copy().view(">u8").ravel().astype(np.uint64), digests


def reduce_exact(pool_pieces, ref_pieces: Sequence[tuple[int, list]]):
    """One partition: pool rows whose digest equals a reference row's (the first in
    (reference, uid) order): ``(rows, dist, ref, hi, lo)``."""
    empty = _empty_result()
    batches = partitioned.read_batches(pool_pieces)
    if not batches:
        return empty
    pool = pa.Table.from_batches(batches)
    rows = pool.column("r").to_numpy()
    pkey, pdig = _digest_keys(pool.column("s"))
    refs = []
    for ref, pieces in ref_pieces:
        for b in partitioned.read_batches(pieces):
            sha = b.column("sha256")
            valid = sha.is_valid().to_numpy(zero_copy_only=False)
            if valid.any():
                at = pa.array(np.flatnonzero(valid))
                refs.append((ref, b.column("uid_hi").take(at), b.column("uid_lo").take(at), sha.take(at)))
    if not refs:
        return empty
    rref = np.concatenate([np.full(len(r[1]), r[0], np.int32) for r in refs])
    rhi = np.concatenate([r[1].to_numpy() for r in refs])
    rlo = np.concatenate([r[2].to_numpy() for r in refs])
    rkey, rdig = _digest_keys(pa.concat_arrays([r[3] for r in refs]))
    del refs
    order = np.lexsort((rlo, rhi, rref, rkey))
    rkey = rkey[order]
    at = np.searchsorted(rkey, pkey, side="left")
    at_c = np.minimum(at, len(rkey) - 1)
    hit = rkey[at_c] == pkey
    # The first reference row with the same 64-bit key whose whole digest is equal.
    out_rows, out_j = [], []
    cand = np.flatnonzero(hit)
    step = 0
    while len(cand):
        j = order[at_c[cand] + step]
        same = (rdig[j] == pdig[cand]).all(axis=1)
        out_rows.append(cand[same])
        out_j.append(j[same])
        cand = cand[~same]
        step += 1
        nxt = at_c[cand] + step
        alive = nxt < len(rkey)
        cand, nxt = cand[alive], nxt[alive]
        cand = cand[rkey[nxt] == pkey[cand]]
    p = np.concatenate(out_rows) if out_rows else np.zeros(0, np.int64)
    j = np.concatenate(out_j) if out_j else np.zeros(0, np.int64)
    return rows[p], np.zeros(len(p), np.int64), rref[j], rhi[j], rlo[j]


class _RefTable(_Table):
    """:class:`~filtering.dedup.hamming._Table` without the stable sort: the order inside a
    bucket does not matter here (each pair is verified, the best chosen by a total order)."""

    def __init__(self, keys: np.ndarray, width: int, direct_bits: int):
        self.width = width
        self.direct = width <= direct_bits
        if width <= 16:  # numpy's radix sort: 1.5 times faster than quicksort on 100k keys
            self.order = np.argsort(keys.astype(np.uint16), kind="stable")
        else:
            self.order = np.argsort(keys.astype(np.uint32) if width <= 32 else keys)  # 32-bit keys sort faster
        if self.direct:
            counts = np.bincount(keys.astype(np.int64), minlength=1 << width)
            self.offsets = np.zeros((1 << width) + 1, np.int64)
            np.cumsum(counts, out=self.offsets[1:])
        else:
            self.sorted_keys = keys[self.order]


def substring_radii(m: int, max_distance: int) -> list[int]:
    """The radius probed in each of ``m`` substrings: ``r_i`` with ``sum(r_i + 1) >=
    max_distance + 1``, the larger ones first (on the wider substrings). Generalised
    pigeonhole (Qin et al., "GPH: Similarity Search in Hamming Space", ICDE 2018): if two
    values differed in more than ``r_i`` bits in every substring ``i``, they would differ in
    at least ``sum(r_i + 1) > max_distance`` bits; so a pair within ``max_distance`` is
    within ``r_i`` in some substring ``i``, and found by probing it. ``max_distance // m``
    each (multi-index hashing's rule) probes more: with ``m = 4`` and 6, radii 1, 1, 1, 0
    instead of 1, 1, 1, 1."""
    total = max(0, max_distance + 1 - m)
    base, extra = divmod(total, m)
    return [base + (1 if i < extra else 0) for i in range(m)]


def choose_cross_substrings(n: int, max_distance: int, bits: int, direct_bits: int, key_bits: int) -> int:
    """:func:`filtering.dedup.hamming.choose_substrings`' cost model (probes plus expected
    candidates, uniform values, ``n`` values per table group) with :func:`substring_radii`."""
    best, best_cost = 1, math.inf
    for m in range(1, min(max_distance + 1, 16) + 1):
        widths = _widths(m, bits)
        radii = substring_radii(m, max_distance)
        probes = sum(_ball(w, r) for w, r in zip(widths, radii, strict=True))
        if probes > 5_000:
            continue
        lookup = 1.0 if max(widths) + key_bits <= direct_bits else 8.0
        expected = sum(_ball(w, r) * n / 2.0**w for w, r in zip(widths, radii, strict=True))
        cost = probes * lookup + 2.0 * expected
        if cost < best_cost:
            best, best_cost = m, cost
    return best


def cross_pairs(
    q: np.ndarray,
    q_groups: np.ndarray,
    r: np.ndarray,
    r_groups: np.ndarray,
    max_distance: int,
    bits: int = 64,
    max_candidates: int = CANDIDATES_AT_A_TIME,
    direct_bits: int = partitioned.DIRECT_BITS,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)``: ``q[i]`` and ``r[j]`` in the same group within ``max_distance``
    (only the low ``bits`` bits may differ). Multi-index hashing as
    :func:`filtering.dedup.hamming.unique_pairs`, across the two sides only: the tables
    hold ``r``'s values, ``q``'s probe them, so no two values of one side are compared.
    Substring ``i`` is probed within :func:`substring_radii`'s ``r_i`` bits, not
    ``max_distance // m`` each: fewer probes, and still no pair missed."""
    empty = np.zeros(0, np.int64)
    if len(q) == 0 or len(r) == 0:
        return empty, empty
    q, r = np.asarray(q, np.uint64), np.asarray(r, np.uint64)
    uniq, inv = np.unique(np.concatenate([q_groups, r_groups]), return_inverse=True)
    inv = inv.ravel().astype(np.uint64)
    gq, gr = inv[: len(q)], inv[len(q) :]
    group_bits = max(1, int(len(uniq) - 1).bit_length())
    m = choose_cross_substrings(max(2, len(r) >> group_bits), max_distance, bits, direct_bits, group_bits)
    while max(_widths(m, bits)) + group_bits > 64:
        m += 1
    out_i, out_j = [empty], [empty]
    shift = 0
    for width, radius in zip(_widths(m, bits), substring_radii(m, max_distance), strict=True):
        mask = np.uint64((1 << width) - 1)
        rkeys = ((r >> np.uint64(shift)) & mask) | (gr << np.uint64(width))
        qkeys = ((q >> np.uint64(shift)) & mask) | (gq << np.uint64(width))
        shift += width
        table = _RefTable(rkeys, width + group_bits, direct_bits)
        # every flip of a chunk of queries looked up at once (one pass, not one per flip)
        flips = _flip_masks(width, radius)
        chunk = max(1, PROBES_AT_A_TIME // len(flips))
        for a in range(0, len(q), chunk):
            probes = (qkeys[a : a + chunk, None] ^ flips[None, :]).ravel()
            for at, j in probe(table, probes, _NO_FLIP, len(probes), max_candidates):
                i = a + at // len(flips)
                close = popcount64(q[i] ^ r[j]) <= max_distance
                out_i.append(i[close])
                out_j.append(j[close])
    i, j = np.concatenate(out_i).astype(np.int64), np.concatenate(out_j).astype(np.int64)
    code = np.unique(i * len(r) + j)  # a pair close in several substrings is found once per substring
    return code // len(r), code % len(r)


def reduce_perceptual(pool_pieces, ref_pieces, settings):
    """One partition: pool rows within ``max_distance`` of a reference row that shares one
    of their block values: ``(rows, dist, ref, hi, lo)``. The distinct (block, hash) values
    of the pool and of the references are paired by :func:`cross_pairs` (the block as the
    group and cut out of the bits searched, as the in-pool search does)."""
    empty = _empty_result()
    pb, rb = partitioned.read_batches(pool_pieces), partitioned.read_batches(ref_pieces)
    if not pb or not rb:
        return empty
    md = settings.max_distance
    g, h, r = (np.concatenate([b.column(c).to_numpy() for b in pb]) for c in ("g", "h", "r"))
    rg, rh, rhi, rlo, rref = (
        np.concatenate([b.column(c).to_numpy() for b in rb]) for c in ("g", "h", "hi", "lo", "ref")
    )
    del pb, rb
    # the pool's distinct (block, hash) values (the references' are not made distinct: a
    # reference rarely repeats a hash, and a sort of all its records would cost more)
    ug, uh, entry = _distinct_values(g, h)
    q_rest, bits = partitioned.without_block(uh, partitioned._block_of(ug, md), md)
    r_rest, _ = partitioned.without_block(rh, partitioned._block_of(rg, md), md)
    # the tables hold the pool's values (fewer to sort), the references probe them
    j, pe = cross_pairs(r_rest, rg, q_rest, ug, md, bits)
    del q_rest, r_rest
    if len(pe) == 0:
        return empty
    dd = popcount64(uh[pe] ^ rh[j]).astype(np.int64)
    order = np.lexsort((rlo[j], rhi[j], rref[j], dd, pe))
    pe, j, dd = pe[order], j[order], dd[order]
    best = np.r_[True, pe[1:] != pe[:-1]]
    pe, j, dd = pe[best], j[best], dd[best]
    # every pool record of a matched value
    at = np.minimum(np.searchsorted(pe, entry), len(pe) - 1)
    hit = pe[at] == entry
    k = j[at[hit]]
    return r[hit], dd[at[hit]], rref[k], rhi[k], rlo[k]


def _distinct_values(g: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct ``(block, hash)`` pairs of a partition's pool records, sorted, and each
    record's entry among them (``ug[entry[i]], uh[entry[i]] == g[i], h[i]``)."""
    order = np.lexsort((h, g))
    sg, sh_ = g[order], h[order]
    first = np.r_[True, (sg[1:] != sg[:-1]) | (sh_[1:] != sh_[:-1])]
    entry = np.empty(len(g), np.int64)
    entry[order] = np.cumsum(first) - 1
    return sg[first], sh_[first], entry


def reduce_blocks(pool_pieces, slices: Sequence[ref_blocks.RefSlice], settings):
    """One partition of a search against block tables (:mod:`filtering.dedup.ref_blocks`):
    as :func:`reduce_perceptual`, the reference records read from each reference's slice
    of its tables, and the tables of :func:`cross_pairs` holding the references' values
    (read, not spilled: the pool's fewer distinct values probe them)."""
    empty = _empty_result()
    pb = partitioned.read_batches(pool_pieces)
    if not pb or not slices:
        return empty
    md = settings.max_distance
    g, h, r = (np.concatenate([b.column(c).to_numpy() for b in pb]) for c in ("g", "h", "r"))
    del pb
    ug, uh, entry = _distinct_values(g, h)
    rh, rord, rref = [], [], []
    for s in slices:
        hashes, ordinals = ref_blocks.read_slice(s, md)
        rh.append(hashes)
        rord.append(ordinals)
        rref.append(np.full(len(hashes), s.ref, np.int32))
    rh, rord, rref = np.concatenate(rh), np.concatenate(rord), np.concatenate(rref)
    folders = {s.ref: s.folder for s in slices}
    block = slices[0].block
    shift, width = partitioned.blocks(md)[block]
    rg = ref_blocks.group_keys(rh, block, shift, width)
    q_rest, bits = partitioned.without_block(uh, partitioned._block_of(ug, md), md)
    r_rest, _ = partitioned.without_block(rh, np.full(len(rh), block, np.int64), md)
    pe, j = cross_pairs(q_rest, ug, r_rest, rg, md, bits)
    del q_rest, r_rest, rg
    if len(pe) == 0:
        return empty
    # the block is equal within a group: the distance is the rest's
    dd = popcount64(uh[pe] ^ rh[j]).astype(np.int64)
    hi, lo = np.zeros(len(j), np.uint64), np.zeros(len(j), np.uint64)
    for k, folder in folders.items():
        at = np.flatnonzero(rref[j] == k)
        hi[at], lo[at] = ref_blocks.read_uids(folder, rord[j[at]])
    ref = rref[j]
    order = np.lexsort((lo, hi, ref, dd, pe))
    pe, dd, ref, hi, lo = pe[order], dd[order], ref[order], hi[order], lo[order]
    best = np.r_[True, pe[1:] != pe[:-1]]
    pe, dd, ref, hi, lo = pe[best], dd[best], ref[best], hi[best], lo[best]
    at = np.minimum(np.searchsorted(pe, entry), len(pe) - 1)
    hit = pe[at] == entry
    k = at[hit]
    return r[hit], dd[k], ref[k], hi[k], lo[k]


def _empty_result():
    z = np.zeros(0, np.int64)
    return z, z.copy(), np.zeros(0, np.int32), np.zeros(0, np.uint64), np.zeros(0, np.uint64)


def best_matches(results: Iterable[tuple]) -> Matches:
    """Per pool row, the closest reference row, then the earliest reference, then the smallest uid."""
    parts = list(results)
    if not parts:
        return Matches.empty()
    rows, dist, ref, hi, lo = (np.concatenate([p[k] for p in parts]) for k in range(5))
    if len(rows) == 0:
        return Matches.empty()
    order = np.lexsort((lo, hi, ref, dist, rows))
    rows, ref, hi, lo = rows[order], ref[order], hi[order], lo[order]
    first = np.r_[True, rows[1:] != rows[:-1]]
    return Matches(rows[first].astype(np.int64), ref[first].astype(np.int32), hi[first], lo[first])


# -- both steps --------------------------------------------------------------------------------


def release_memory() -> None:
    """Hand the pages a finished step freed back to the system: Arrow's allocator and
    glibc's heap otherwise keep them, so a worker that ran the reference search would sit
    at that search's peak through the run's later phases (the filter-and-write pass then
    adds its own on top). Measured at 4M reference rows: issue 25's bench, docs/performance.md."""
    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where there is none (macOS, musl)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _released(result):
    """``result`` once the task's own arrays are gone and their pages handed back."""
    release_memory()
    return result


def _emit_reference_task(args):
    return _released(emit_reference(*args))


def _reduce_exact_task(args):
    return _released(reduce_exact(*args))


def _reduce_perceptual_task(args):
    return _released(reduce_perceptual(*args))


def _reduce_blocks_task(args):
    return _released(reduce_blocks(*args))


def _build_blocks_task(args):
    return _released(ref_blocks.build(*args))


def partitions_for(n: int, references: Sequence[ix.Reference], settings, workers: int) -> int:
    if settings.method == "exact":
        return ix.PARTITIONS
    records = (n + sum(r.rows for r in references)) * settings.records_per_row()
    return max(1, workers, -(-records // RECORDS_PER_PARTITION))


def match(
    run: Callable,
    emit_pool_args: Callable[[int, str], list],
    pool_emit: Callable,
    n: int,
    settings: partitioned.SearchSettings,
    references: Sequence[ix.Reference],
    workers: int,
    work_dir: str | None,
    log: Callable[[str], None] | None = None,
) -> Matches:
    """The pool rows that duplicate a reference row. ``run``: an ordered map (a task
    pool's, or ``map``); ``emit_pool_args(partitions, spill_dir)``: the pool side's map
    tasks, each run by ``pool_emit`` (a picklable function writing one spill file).
    Perceptual against references on a local file system: against their block tables
    (:mod:`filtering.dedup.ref_blocks`, made on first use, ``log`` saying so)."""
    if not references or n == 0:
        return Matches.empty()
    if settings.method == "perceptual" and USE_BLOCK_TABLES:
        usable = [ref_blocks.usable(r, settings.max_distance) for r in references]
        if all(usable):
            return _match_blocks(run, emit_pool_args, pool_emit, n, settings, references, workers, work_dir, log)
        if log is not None:
            for ref, ok in zip(references, usable, strict=True):
                if not ok and is_local(ref.folder):
                    log(
                        f"dedup against {ref.path}: its index folder is read-only and has no block tables for "
                        f"max_distance {settings.max_distance}; its records are re-made for this run"
                    )
    partitions = partitions_for(n, references, settings, workers)
    spill = partitioned.make_spill_dir(work_dir, "against-spill-")
    try:
        pool_spilled = list(run(pool_emit, emit_pool_args(partitions, spill)))
        if settings.method == "exact":
            args = (
                (pieces, [(k, ref.pieces(p)) for k, ref in enumerate(references)])
                for p, pieces in enumerate(partitioned.partition_pieces(pool_spilled, partitions))
            )
            return best_matches(run(_reduce_exact_task, args))
        ref_args = []
        t = 0
        for k, ref in enumerate(references):
            pieces = ref.all_pieces()
            per_task = max(1, -(-len(pieces) // max(1, partitioned.TASKS_PER_WORKER * workers)))
            for a in range(0, len(pieces), per_task):
                ref_args.append((pieces[a : a + per_task], k, settings, partitions, join_spill(spill, t)))
                t += 1
        ref_spilled = list(run(_emit_reference_task, ref_args))
        ref_parts = partitioned.partition_pieces(ref_spilled, partitions)
        args = (
            (pieces, next(ref_parts), settings) for pieces in partitioned.partition_pieces(pool_spilled, partitions)
        )
        return best_matches(run(_reduce_perceptual_task, args))
    finally:
        partitioned.remove_spill_dir(spill)
        release_memory()


def _match_blocks(run, emit_pool_args, pool_emit, n, settings, references, workers, work_dir, log) -> Matches:
    """:func:`match` (perceptual) against the references' block tables: each reference's
    tables made first where missing or stale (one task each), the pool's records spilled
    by the tables' cuts, each partition joined with its slice of every reference."""
    md = settings.max_distance
    build = []
    for ref in references:
        why = ref_blocks.state(ref, md)
        if why is not None:
            build.append((ref, md))
            if log is not None:
                folder = ref_blocks.folder_of(ref, md)
                log(
                    f"dedup against {ref.path}: making its block tables for max_distance {md} once, in {folder}"
                    if why == "none"
                    else f"dedup against {ref.path}: its block tables for max_distance {md} are {why}; remaking them in {folder}"
                )
    if build:
        list(run(_build_blocks_task, build))
    folders = [ref_blocks.folder_of(ref, md) for ref in references]
    cells = [ref_blocks.read_cells(f, md) for f in folders]
    partitions = ref_blocks.plan(cells, n, md, RECORDS_PER_PARTITION)
    spill = partitioned.make_spill_dir(work_dir, "against-spill-")
    try:
        pool_spilled = list(run(pool_emit, emit_pool_args(partitions, spill)))
        per_partition = ref_blocks.slices(folders, cells, partitions)
        args = (
            (pieces, per_partition[p], settings)
            for p, pieces in enumerate(partitioned.partition_pieces(pool_spilled, partitions.count))
        )
        return best_matches(run(_reduce_blocks_task, args))
    finally:
        partitioned.remove_spill_dir(spill)
        release_memory()


def join_spill(spill: str, t: int) -> str:
    return join(spill, f"r{t:06d}.arrow")


# -- references ------------------------------------------------------------------------------


def open_references(
    paths: Sequence[str], build_root: str, log: Callable[[str], None], key: str | None = None
) -> list[ix.Reference]:
    """Each ``against`` entry's index; an output folder without one (written before indexes
    existed) gets one built from its subset parts under ``build_root``, with one line saying so.
    ``key`` (``sha256`` or ``phash``): a reference none of whose rows has it is an error."""
    import hashlib

    from filtering.errors import InputError
    from filtering.io.atomic import exists

    refs = []
    for path in paths:
        folder = ix.find_index(path)
        if folder is None:
            if not exists(join(path, "manifest.json")):
                raise InputError(
                    f"filters.dedup.against: {path} is neither a poolsift output folder nor an index folder"
                )
            with_manifest = hashlib.sha256()
            from filtering.io.paths import open_file

            with open_file(join(path, "manifest.json")) as f:
                with_manifest.update(f.read())
            folder = join(build_root, f"reference-index-{with_manifest.hexdigest()[:16]}")
            if exists(join(folder, ix.META)):
                log(f"dedup against {path}: it has no index; using the one built from its subset before, {folder}")
            else:
                rows = ix.build_from_output(path, folder)
                log(
                    f"dedup against {path}: it has no index (an older output); built one from its subset ({rows:,} rows) in {folder}"
                )
        try:
            ref = ix.read_reference(path, folder)
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"filters.dedup.against: {path}: unreadable index ({e})") from e
        if key is not None and ref.with_keys is not None and ref.rows:
            have = ref.with_keys.get(key, 0)
            if have == 0:
                what = (
                    "perceptual hashes (its run computed no phash)" if key == "phash" else "sha256 of the image bytes"
                )
                raise InputError(f"filters.dedup.against: {path}: its {ref.rows:,} kept rows have no {what}")
            if have < ref.rows:
                log(
                    f"dedup against {path}: {ref.rows - have:,} of its {ref.rows:,} kept rows have no {key}; they match nothing"
                )
        refs.append(ref)
    return refs


def record(refs: Sequence[ix.Reference], matches: Matches, seconds: float, workers: int) -> dict:
    """The manifest's record of one search against references (``stage_info.dedup``)."""
    counts = matches.counts(len(refs))
    return {
        "against": [
            {"path": r.path, "index": r.folder, "rows": r.rows, "matched": c} for r, c in zip(refs, counts, strict=True)
        ],
        "matched": int(len(matches.rows)),
        "workers": workers,
        "seconds": round(seconds, 3),
    }


# -- semantic --------------------------------------------------------------------------------
#
# ``method: semantic``: SemDeDup's search with the references' kept rows on one side. The
# dedup phase (pipelines/executors/dedup_phase.py) trains k-means on the new pool's rows
# and assigns them to the centroids, spilled sorted by cluster
# (:func:`filtering.dedup.semantic.spill_assigned`); :func:`spill_reference` does the same
# for each reference index file's rows, their embeddings read where the reference's run
# found them (:func:`filtering.dedup.index.embedding_rows`); each partition of clusters
# is compared on one worker (:func:`semantic_partition`): a pool row within ``threshold``
# (cosine) of a reference row in its cluster matches it. A reference row sits in its two
# nearest clusters, so a pair is missed only when the new row's cluster is neither (SemDeDup
# misses every pair split across two clusters).

REF_EXTRA = ("ref", "hi", "lo")  # what a reference spill holds beside the embeddings
SIMILARITY_BYTES = 64 << 20  # a block of similarities compared at a time, at most about this
SIMILARITY_DECIMALS = 5  # the most similar reference rows: equal at this rounding
_ASSIGNERS: dict[str, object] = {}  # one Assigner per worker process (centroids path -> Assigner)


def semantic_column(paths: Sequence[str], threshold: float) -> str:
    """The manifest key (``stage_info.dedup``) of a semantic search against ``paths``."""
    import hashlib

    digest = hashlib.sha256("\0".join(paths).encode()).hexdigest()[:8]
    return f"dedup_ref_semantic_t{threshold:g}_{digest}"


def check_embeddings(refs: Sequence[ix.Reference], kind: str) -> None:
    """Each reference can give its kept rows' ``kind`` embeddings (its run had them)."""
    from filtering.errors import InputError

    for ref in refs:
        if ref.rows and ref.source is None:  # ix.build_from_output's: no input kind, no row positions
            raise InputError(
                f"filters.dedup.against: {ref.path}: its index was built from the subset parts (an older output), "
                "which do not say where each row's embedding is; rerun that output's config to write one"
            )
        if ref.rows and kind not in ref.embeddings:
            had = f"it had {list(ref.embeddings)}" if ref.embeddings else "it had none"
            raise InputError(f"filters.dedup.against: {ref.path}: its run had no {kind!r} embeddings ({had})")


def _assigner(centroids: str | None):
    if centroids is None:
        return None
    from filtering.clustering import Assigner

    found = _ASSIGNERS.get(centroids)
    if found is None:
        _ASSIGNERS.clear()
        found = _ASSIGNERS[centroids] = Assigner(np.load(centroids))
    return found


def spill_reference(
    ref: ix.Reference, k_ref: int, file: int, kind: str, dtype, centroids: str | None, k: int, prefix: str
) -> np.ndarray:
    """One map task: the rows of index file ``file`` of reference number ``k_ref`` (a source
    shard's kept rows) with their ``kind`` embeddings, assigned to the centroids and spilled
    sorted by cluster with their uid (:data:`REF_EXTRA`), each in its two nearest clusters
    (so that a new row just across a boundary still meets it). Rows whose embedding is all
    zero (not embedded) are left out. Returns the rows per cluster."""
    from filtering.dedup.semantic import spill_assigned
    from filtering.errors import InputError

    table = ix.file_records(ref, file)
    emb = ix.records_embeddings(ref, table, kind, dtype, "filters.dedup.against", "a semantic search")
    dim = emb.shape[1]
    assigner = _assigner(centroids)
    if centroids is not None and np.load(centroids, mmap_mode="r").shape[1] != dim:
        raise InputError(
            f"filters.dedup.against: {ref.path}: its {kind!r} embeddings have dimension {dim}, "
            f"the pool's {np.load(centroids, mmap_mode='r').shape[1]} (another model?)"
        )
    keep = np.flatnonzero(np.any(emb != 0, axis=1))
    extra = {
        "ref": np.full(len(keep), k_ref, np.int32),
        "hi": table.column("uid_hi").to_numpy()[keep],
        "lo": table.column("uid_lo").to_numpy()[keep],
    }
    label = None
    if assigner is not None and k > 1 and len(keep):
        # each reference row in its two nearest clusters: a new row near it but across the
        # boundary of its nearest cluster is still compared with it
        from filtering.clustering import assign

        first = assign(emb[keep], assigner)[0]
        c = np.load(centroids)
        sims = np.asarray(emb[keep], np.float32) @ c.T
        sims[np.arange(len(keep)), first] = -np.inf
        label = np.column_stack([first, sims.argmax(axis=1)]).ravel()
        del sims
        keep = np.repeat(keep, 2)
        extra = {name: np.repeat(v, 2) for name, v in extra.items()}
    order = np.arange(len(keep), dtype=np.int64)
    return spill_assigned(emb, keep, order, order, assigner, k, prefix, dtype, extra, label)


def semantic_partition(pool_prefixes: list[str], ref_prefixes: list[str], clusters: np.ndarray, threshold: float):
    """One partition of clusters: each pool row's most similar reference rows in its cluster
    with cosine >= ``threshold`` (every one that ties at :data:`SIMILARITY_DECIMALS`):
    ``(rows, dist, ref, hi, lo)``, ``dist`` the negated (rounded) cosine."""
    from filtering.clustering import normalize
    from filtering.dedup.semantic import cluster_bounds, gather_clusters

    label, row, x, _ = gather_clusters(pool_prefixes, clusters)
    rlabel, _, rx, extra = gather_clusters(ref_prefixes, clusters, REF_EXTRA)
    if x is None or rx is None:
        return _empty_result()
    if x.shape[1] != rx.shape[1]:
        from filtering.errors import InputError

        raise InputError(
            f"filters.dedup.against: the references' embeddings have dimension {rx.shape[1]}, "
            f"the pool's {x.shape[1]} (another model?)"
        )
    pb, rb = cluster_bounds(label), cluster_bounds(rlabel)
    _, ia, ib = np.intersect1d(label[pb[:-1]], rlabel[rb[:-1]], assume_unique=True, return_indices=True)
    out_p, out_r, out_d = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float64)]
    for a, b in zip(ia, ib, strict=True):
        q = normalize(x[pb[a] : pb[a + 1]])
        r = normalize(rx[rb[b] : rb[b + 1]])
        step = max(1, SIMILARITY_BYTES // (4 * len(r)))
        for lo in range(0, len(q), step):
            sims = q[lo : lo + step] @ r.T
            # compared at 1e-5: equal embeddings tie wherever the product put them (BLAS
            # may round a column differently by its place), then the smallest uid wins
            close = np.where(sims >= threshold, np.round(sims, SIMILARITY_DECIMALS), -np.inf)
            best = close.max(axis=1)
            i, j = np.nonzero((close == best[:, None]) & (best > -np.inf)[:, None])
            out_p.append(pb[a] + lo + i)
            out_r.append(rb[b] + j)
            out_d.append(-close[i, j].astype(np.float64))
    p, j = np.concatenate(out_p), np.concatenate(out_r)
    return row[p], np.concatenate(out_d), extra["ref"][j], extra["hi"][j], extra["lo"][j]


# -- min_similarity (perceptual) ---------------------------------------------------------------

UID = np.dtype([("hi", "<u8"), ("lo", "<u8")])  # a uid as one sortable value


def uid_keys(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    keys = np.empty(len(hi), UID)
    keys["hi"], keys["lo"] = hi, lo
    return keys


def spill_reference_rows(ref: ix.Reference, file: int, kind: str, dtype, wanted: np.ndarray, path: str) -> np.ndarray:
    """The rows of index file ``file`` whose uid is among ``wanted`` (:data:`UID`, sorted):
    their ``kind`` embeddings in ``dtype``, then float32 divided by their norm (as the
    filter confirms pairs), written to ``path``. Returns their uids, in that order."""
    import os

    table = ix.file_records(ref, file)
    keys = uid_keys(table.column("uid_hi").to_numpy(), table.column("uid_lo").to_numpy())
    take = np.flatnonzero(np.isin(keys, wanted))
    emb = ix.records_embeddings(ref, table.take(take), kind, dtype, "filters.dedup.against", "min_similarity")
    emb = emb.astype(np.float32) if len(take) else np.zeros((0, 1), np.float32)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    tmp = f"{path}.tmp.npy"
    np.save(tmp, emb)
    os.replace(tmp, path)
    return keys[take]
