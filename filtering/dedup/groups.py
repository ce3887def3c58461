"""Duplicate groups and which copy survives.

Pairs of duplicate rows (from any method) are joined into groups by connected
components (:func:`filtering.dedup.partitioned.components_of`). In each group one row
survives, chosen by a total order that does not depend on row order, so results are the
same across reruns and shard orderings (:func:`survivors`):

- ``highest_clip_score``: the highest score; missing scores last; ties by smallest uid.
- ``smallest_uid``: the smallest uid.

Every other row of the group is dropped, recording the survivor's uid (``duplicate_of``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def survivors(comp: np.ndarray, neg_score, hi: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Over rows in components ``comp`` (from :func:`filtering.dedup.partitioned.components_of`):
    the positions dropped, and for each its survivor's position. The rule: score descending
    (``neg_score``: the negated scores, NaN for a missing one, so last; None for
    ``smallest_uid``), then the smallest uid (``hi``, ``lo``: its two uint64 halves, so
    uids compare as their 128-bit numbers), then the first row.

    Only the rows of components of two or more are sorted (a singleton survives itself)."""
    if len(comp) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    size = np.bincount(comp)
    multi = np.flatnonzero(size[comp] > 1)
    del size
    c = comp[multi]
    keys = (lo[multi], hi[multi]) + ((neg_score[multi],) if neg_score is not None else ()) + (c,)
    order = np.lexsort(keys)  # by component, best first; stable, so ties keep row order
    del keys
    c = c[order]
    first = np.empty(len(c), bool)
    first[:1] = True
    np.not_equal(c[1:], c[:-1], out=first[1:])
    del c
    group = np.cumsum(first)
    group -= 1
    best = order[np.flatnonzero(first)][group]  # per sorted position: its component's best
    del group, first
    loser = np.flatnonzero(best != order)
    # positions of the dropped rows and of their survivors, by row
    dropped, survivor = multi[order[loser]], multi[best[loser]]
    del order, best, loser
    by_row = np.argsort(dropped, kind="stable")
    return dropped[by_row], survivor[by_row]


def unit_rows(emb: np.ndarray) -> np.ndarray:
    """Embeddings as ``min_similarity`` compares them: float32, each row divided by its norm
    (at least 1e-12, so an all-zero row stays zero)."""
    emb = np.asarray(emb).astype(np.float32)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb


def close_pairs(a: np.ndarray, b: np.ndarray, min_similarity: float) -> np.ndarray:
    """``min_similarity`` (perceptual dedup): which hash neighbours ``(a[k], b[k])`` (rows
    of :func:`unit_rows`) are also close in content, cosine >= ``min_similarity``."""
    return np.einsum("ij,ij->i", a, b) >= min_similarity


def label_edges(labels: np.ndarray, pair_a: np.ndarray, pair_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges ``(i, j)``, ``i < j``, among rows with group ``labels`` (the partitioned
    search's, :mod:`filtering.dedup.partitioned`) and pairs of labels ``(pair_a, pair_b)``.

    Rows sharing a label are linked through the first row of the label (a star); a pair
    of labels links the first rows of the two labels, and only when both labels occur in
    ``labels``: the rows here may be a subset of those searched. These are the edges the
    in-memory search (:func:`filtering.dedup.hamming.near_pairs`: a star per hash value,
    first occurrences for pairs of values) gives over the same rows in the same order.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    uniq, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    first_of = first[inverse.ravel()]
    rows = np.arange(n)
    star = first_of != rows
    i, j = [first_of[star]], [rows[star]]
    if len(pair_a) and len(uniq):
        ia = np.minimum(np.searchsorted(uniq, pair_a), len(uniq) - 1)
        ib = np.minimum(np.searchsorted(uniq, pair_b), len(uniq) - 1)
        present = (uniq[ia] == pair_a) & (uniq[ib] == pair_b)
        i.append(first[ia[present]])
        j.append(first[ib[present]])
    a, b = np.concatenate(i).astype(np.int64), np.concatenate(j).astype(np.int64)
    return np.minimum(a, b), np.maximum(a, b)


def exact_groups(keys: list[np.ndarray]) -> np.ndarray:
    """Group label per row: rows sharing every key column share a label (None is a value too)."""
    label = np.zeros(len(keys[0]), np.int64)
    for key in keys:
        values = np.asarray(["\0none" if v is None else v for v in key], dtype=str)
        _, inverse = np.unique(values, return_inverse=True)
        _, label = np.unique(label * (int(inverse.max(initial=0)) + 1) + inverse.ravel(), return_inverse=True)
    return label.ravel()


def upper_triangle_pairs(n: int, hits: Callable[[int, int], np.ndarray], block: int) -> tuple[np.ndarray, np.ndarray]:
    """All ``(i, j)``, ``i < j < n``, that ``hits`` marks, a block of rows at a time.

    ``hits(lo, hi)`` is the boolean matrix of rows ``[lo, hi)`` against rows ``[lo, n)``,
    so only the upper triangle is ever computed.
    """
    out_i, out_j = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for lo in range(0, n, block):
        i, j = np.nonzero(hits(lo, min(n, lo + block)))
        i += lo
        j += lo
        keep = i < j
        out_i.append(i[keep].astype(np.int64))
        out_j.append(j[keep].astype(np.int64))
    return np.concatenate(out_i), np.concatenate(out_j)
