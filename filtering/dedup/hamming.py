"""Near pairs of 64-bit hashes within a Hamming radius, by multi-index hashing.

Multi-index hashing (Norouzi, Punjani and Fleet, "Fast Search in Hamming Space with
Multi-Index Hashing", CVPR 2012): cut the 64 bits into ``m`` disjoint substrings. If two
hashes differ in at most ``k`` bits, then by the pigeonhole principle some substring
differs in at most ``k // m`` bits. So each substring gets a table (hash values grouped
by that substring), every hash probes each table with its own substring and every
variant within ``k // m`` flipped bits, and the candidates found are verified with the
full 64-bit distance. No pair within ``k`` is missed; ``m`` is chosen by a cost model
(probes plus expected candidates) for the number of hashes and ``k``.

Equal hash values are collapsed first (an identical-hash group is a distance-0 clique),
so a pool with many copies of one image costs no more than one copy. Everything is
vectorised numpy: a table is a sorted order plus bucket offsets, a probe is a gather.
"""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np

DIRECT_TABLE_BITS = 24  # substrings up to this width index a dense offset table; wider ones binary-search
MAX_CHUNK_CANDIDATES = 1 << 23  # candidate pairs verified at a time (bounds memory)


_BYTE_POPCOUNT = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint8)


def popcount64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.uint64)
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    return _BYTE_POPCOUNT[x[..., None].view(np.uint8)].sum(axis=-1, dtype=np.uint8)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise Hamming distance of two uint64 arrays."""
    return popcount64(np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64)))


def _widths(m: int, bits: int = 64) -> list[int]:
    base, extra = divmod(bits, m)
    return [base + (1 if i < extra else 0) for i in range(m)]


def _ball(bits: int, radius: int) -> int:
    return sum(math.comb(bits, r) for r in range(radius + 1))


def choose_substrings(
    n: int, max_distance: int, bits: int = 64, direct_bits: int = DIRECT_TABLE_BITS, key_bits: int = 0
) -> int:
    """The number of substrings ``m`` minimising probes + expected candidates (uniform hashes)."""
    best, best_cost = 1, math.inf
    for m in range(1, min(max_distance + 1, 16) + 1):
        widths = _widths(m, bits)
        r = max_distance // m
        probes = sum(_ball(w, r) for w in widths)
        if probes > 5_000:
            continue
        lookup = 1.0 if max(widths) + key_bits <= direct_bits else 8.0  # binary search costs ~log n gathers
        expected = sum(_ball(w, r) * n / 2.0**w for w in widths)
        cost = n * (probes * lookup + 2.0 * expected)
        if cost < best_cost:
            best, best_cost = m, cost
    return best


def _flip_masks(bits: int, radius: int) -> np.ndarray:
    masks = [0]
    for r in range(1, radius + 1):
        for pos in combinations(range(bits), r):
            masks.append(sum(1 << p for p in pos))
    return np.asarray(masks, dtype=np.uint64)


class _Table:
    """Hash values grouped by one substring: ``order`` sorted by key, bucket offsets per key."""

    def __init__(self, keys: np.ndarray, width: int, direct_bits: int = DIRECT_TABLE_BITS):
        self.width = width
        self.order = np.argsort(keys, kind="stable")
        self.sorted_keys = keys[self.order]
        self.direct = width <= direct_bits
        if self.direct:
            counts = np.bincount(keys.astype(np.int64), minlength=1 << width)
            self.offsets = np.zeros((1 << width) + 1, np.int64)
            np.cumsum(counts, out=self.offsets[1:])

    def buckets(self, probe: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.direct:
            p = probe.astype(np.int64)
            return self.offsets[p], self.offsets[p + 1]
        return np.searchsorted(self.sorted_keys, probe, "left"), np.searchsorted(self.sorted_keys, probe, "right")


def _expand(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(query index, position) for every position in ``[lo[q], hi[q])``."""
    counts = hi - lo
    total = int(counts.sum())
    q = np.repeat(np.arange(len(lo)), counts)
    starts = np.repeat(lo - np.r_[0, np.cumsum(counts)[:-1]], counts)
    return q, starts + np.arange(total)


def probe(table: _Table, qkeys: np.ndarray, flips, step: int, max_candidates: int):
    """Multi-index hashing's probe loop: for each flip mask, ``qkeys`` (a ``step`` at a time)
    with the mask xor-ed in looked up in ``table``; yields ``(q, j)``, the candidate pairs
    (positions in ``qkeys``, rows of the table's keys), at most ``max_candidates`` at a
    time (each costs ~80 bytes where it is verified)."""
    for flip in flips:
        for lo_q in range(0, len(qkeys), step):
            lo, hi = table.buckets(qkeys[lo_q : lo_q + step] ^ flip)
            hit = np.flatnonzero(hi > lo)
            if len(hit) == 0:
                continue
            total = np.cumsum(hi[hit] - lo[hit])
            cuts = np.searchsorted(total, np.arange(max_candidates, int(total[-1]), max_candidates), "right")
            for piece in np.split(hit, cuts):
                if len(piece) == 0:
                    continue
                q, pos = _expand(lo[piece], hi[piece])
                yield lo_q + piece[q], table.order[pos]


def unique_pairs(
    values: np.ndarray,
    max_distance: int,
    substrings: int | None = None,
    groups: np.ndarray | None = None,
    bits: int = 64,
    max_candidates: int = MAX_CHUNK_CANDIDATES,
    direct_bits: int = DIRECT_TABLE_BITS,
) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)``, ``i < j``, of the *distinct* uint64 ``values`` within ``max_distance``.

    ``values`` must be unique (within each group). Each pair is returned once. With
    ``groups`` (any integer label per value), only pairs in the same group: the group
    becomes the high part of every substring key, so each group is searched on its own
    in the same vectorised passes (the partitioned search, :mod:`filtering.dedup.partitioned`).
    ``bits``: only the low ``bits`` bits can differ (the others are cut into no substring).
    ``max_candidates``: candidate pairs verified at a time (memory: ~80 bytes each);
    ``direct_bits``: keys up to this width index a dense offset table (16 bytes per
    possible key), wider ones binary-search.
    """
    values = np.asarray(values, dtype=np.uint64)
    n = len(values)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    group_bits, group_rank = 0, None
    if groups is not None:
        uniq, group_rank = np.unique(np.asarray(groups), return_inverse=True)
        group_rank = group_rank.ravel().astype(np.uint64)
        group_bits = max(1, int(len(uniq) - 1).bit_length())
    m = substrings or choose_substrings(max(2, n >> group_bits), max_distance, bits, direct_bits, group_bits)
    while max(_widths(m, bits)) + group_bits > 64:  # a key is group and substring in one uint64
        m += 1
    radius = max_distance // m
    out_i, out_j = [], []
    shift = 0
    for width in _widths(m, bits):
        mask = np.uint64((1 << width) - 1)
        keys = (values >> np.uint64(shift)) & mask
        shift += width
        if group_rank is not None:
            keys |= group_rank << np.uint64(width)
        table = _Table(keys, width + group_bits, direct_bits)
        # Probe in key order: the probes of one flip then walk the offset table almost
        # sequentially instead of at random (several times faster on large tables).
        qkeys, qrows = table.sorted_keys, table.order
        step = max(1, min(n, max_candidates // max(1, 4 * ((n >> (width + group_bits)) + 1))))
        for q, j in probe(table, qkeys, _flip_masks(width, radius), step, max_candidates):
            i = qrows[q]
            # Each unordered pair is probed from both ends with the same flip: keep i < j.
            keep = i < j
            i, j = i[keep], j[keep]
            close = hamming(values[i], values[j]) <= max_distance
            out_i.append(i[close])
            out_j.append(j[close])
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    i = np.concatenate(out_i).astype(np.int64)
    j = np.concatenate(out_j).astype(np.int64)
    # A pair close in several substrings is found once per substring: deduplicate.
    code = np.unique(i * n + j)
    return code // n, code % n


def near_pairs(hashes: np.ndarray, max_distance: int, substrings: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs ``(i, j)``, ``i < j``, of ``hashes`` (uint64, repeats allowed) within ``max_distance``.

    Repeated values are linked through their first occurrence (a star, not a clique):
    enough for connected components, and linear in the number of copies.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    uniq, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    rows = np.arange(len(hashes))
    star = rows != first[inverse]
    ui, uj = unique_pairs(uniq, max_distance, substrings)
    a = np.concatenate([first[inverse][star], first[ui]])
    b = np.concatenate([rows[star], first[uj]])
    return np.minimum(a, b), np.maximum(a, b)


def brute_force_pairs(hashes: np.ndarray, max_distance: int, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """All-pairs reference: every ``(i, j)``, ``i < j``, within ``max_distance`` (O(n^2))."""
    from filtering.dedup.groups import upper_triangle_pairs

    hashes = np.asarray(hashes, dtype=np.uint64)
    return upper_triangle_pairs(
        len(hashes), lambda lo, hi: hamming(hashes[lo:hi, None], hashes[None, lo:]) <= max_distance, block
    )


def nearest(queries: np.ndarray, reference: np.ndarray, block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """For each query hash, the minimum Hamming distance to ``reference`` and the index of a
    reference at that distance, by faiss's exhaustive binary index (popcount, multithreaded)."""
    import faiss

    queries = np.ascontiguousarray(queries, dtype=np.uint64)
    reference = np.ascontiguousarray(reference, dtype=np.uint64)
    dist = np.full(len(queries), 65, np.int32)
    idx = np.full(len(queries), -1, np.int64)
    if len(reference) == 0 or len(queries) == 0:
        return dist, idx
    index = faiss.IndexBinaryFlat(64)
    index.add(reference.view(np.uint8).reshape(-1, 8))
    for lo in range(0, len(queries), block):
        q = queries[lo : lo + block].view(np.uint8).reshape(-1, 8)
        d, i = index.search(q, 1)
        dist[lo : lo + block] = d[:, 0]
        idx[lo : lo + block] = i[:, 0]
    return dist, idx
