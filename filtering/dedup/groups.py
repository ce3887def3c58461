"""Duplicate groups and which copy survives.

Pairs of duplicate rows (from any method) are joined into groups by connected
components (union-find semantics, via ``scipy.sparse.csgraph``). In each group one row
survives, chosen by a total order that does not depend on row order, so results are the
same across reruns and shard orderings:

- ``highest_clip_score``: the highest score; missing scores last; ties by smallest uid.
- ``smallest_uid``: the smallest uid.

Every other row of the group is dropped, recording the survivor's uid (``duplicate_of``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

KEEP_POLICIES: tuple[str, ...] = ("highest_clip_score", "smallest_uid")


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Component label of each of ``n`` nodes given undirected edges ``(i, j)``."""
    if len(i) == 0:
        return np.arange(n)
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(i), np.int8), (np.asarray(i), np.asarray(j))), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels


def keep_rank(uids: np.ndarray, scores: np.ndarray | None, policy: str) -> np.ndarray:
    """Rank of each row under ``policy`` (0 = most preferred); a strict total order when uids are unique."""
    if policy not in KEEP_POLICIES:
        raise ValueError(f"unknown keep policy {policy!r}; choose one of {list(KEEP_POLICIES)}")
    uid_order = np.argsort(np.asarray(uids, dtype=str), kind="stable")
    uid_rank = np.empty(len(uids), np.int64)
    uid_rank[uid_order] = np.arange(len(uids))
    if policy == "smallest_uid":
        return uid_rank
    s = np.asarray(scores, dtype=np.float64)
    s = np.where(np.isnan(s), -np.inf, s)
    order = np.lexsort((uid_rank, -s))  # last key first: score descending, then uid
    rank = np.empty(len(uids), np.int64)
    rank[order] = np.arange(len(uids))
    return rank


def survivors(labels: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """For each row, the index of its group's best-ranked row (itself for singletons)."""
    labels = np.asarray(labels)
    if len(labels) == 0:  # nothing reached the filter (np.r_ below would make one group)
        return np.zeros(0, np.int64)
    order = np.lexsort((rank, labels))  # by group, best rank first
    first = np.r_[True, labels[order][1:] != labels[order][:-1]]
    best_of_group = np.empty(labels.max() + 1 if len(labels) else 0, np.int64)
    best_of_group[labels[order][first]] = order[first]
    return best_of_group[labels]


def resolve(n: int, i: np.ndarray, j: np.ndarray, uids: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(keep, duplicate_of)`` over ``n`` rows from duplicate pairs ``(i, j)``.

    ``duplicate_of`` (object) holds the survivor's uid for dropped rows, None elsewhere.
    """
    best = survivors(components(n, i, j), rank)
    keep = best == np.arange(n)
    dup = np.full(n, None, dtype=object)
    dup[~keep] = np.asarray(uids, dtype=object)[best[~keep]]
    return keep, dup


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
