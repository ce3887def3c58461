"""SemDeDup: semantic near-duplicates by clustering, then pairwise similarity within clusters.

Abbas et al., "SemDeDup: Data-efficient learning at web-scale through semantic
deduplication" (2023), §3: k-means the unit-norm image embeddings, then within each
cluster compare every pair by cosine similarity and mark pairs with similarity
``>= threshold`` as duplicates. Clustering turns an O(N^2) search into a sum of small
per-cluster problems (about N^2 / k pair comparisons for k balanced clusters); a pair
split across two clusters is missed, which the paper accepts. Here the pairs go on to
:mod:`filtering.dedup.groups` (connected components, one survivor per group).

k-means is :func:`filtering.clustering.train_kmeans` (spherical Lloyd, seeded) and the
assignment :func:`filtering.clustering.assign`; callers pass rows in a canonical order
(sorted by uid) so the result does not depend on shard order.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

TRAINING_POINTS_PER_CLUSTER = 64  # k-means only has to make clusters coherent, not optimal
BLOCK = 4096  # rows of a cluster compared at a time (bounds the similarity block to BLOCK x cluster size)


def default_num_clusters(n: int) -> int:
    """About sqrt(n) clusters (SemDeDup used 50,000 for LAION-440M), at least 1, at most n // 4."""
    return max(1, min(int(math.sqrt(n)), max(1, n // 4), 50_000))


def cluster_pairs(x: np.ndarray, threshold: float, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """All ``(i, j)``, ``i < j``, of the unit-norm rows of ``x`` with cosine ``>= threshold``."""
    from filtering.dedup.groups import upper_triangle_pairs

    return upper_triangle_pairs(len(x), lambda lo, hi: x[lo:hi] @ x[lo:].T >= threshold, block)


def semdedup_pairs(
    x: np.ndarray,
    threshold: float,
    num_clusters: int | None = None,
    niter: int = 10,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Duplicate pairs ``(i, j)`` among the rows of ``x`` (unit-norm float), and each row's cluster.

    ``x`` may be float16 or memory-mapped; clusters are compared in float32.
    ``progress(rows_done)`` is called after each cluster.
    """
    from filtering.clustering import assign, normalize, train_kmeans

    n = len(x)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(n, np.int64)
    k = min(num_clusters or default_num_clusters(n), n)
    if k > 1:
        training = min(n, TRAINING_POINTS_PER_CLUSTER * k)
        centroids = train_kmeans(x, k, niter=niter, seed=seed, max_training_points=training)
        labels, _ = assign(x, centroids)
    else:
        labels = np.zeros(n, np.int64)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1], True])
    out_i, out_j = [], []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        members = order[a:b]
        if len(members) > 1:
            ci, cj = cluster_pairs(normalize(x[members]), threshold)
            out_i.append(members[ci])
            out_j.append(members[cj])
        if progress is not None:
            progress(b - a)
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), labels
    i, j = np.concatenate(out_i), np.concatenate(out_j)
    return np.minimum(i, j), np.maximum(i, j), labels


def brute_force_pairs(x: np.ndarray, threshold: float, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """All-pairs reference over every row (no clustering): O(N^2) similarities."""
    from filtering.clustering import normalize

    return cluster_pairs(normalize(x), threshold, block)
