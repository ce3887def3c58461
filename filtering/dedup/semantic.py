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


def brute_force_pairs(x: np.ndarray, threshold: float, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """All-pairs reference over every row (no clustering): O(N^2) similarities."""
    from filtering.clustering import normalize

    return cluster_pairs(normalize(x), threshold, block)


def balance(sizes: np.ndarray, parts: int) -> np.ndarray:
    """The partition (of ``parts``) of each cluster of ``sizes`` rows, balanced by comparisons
    (size^2): largest clusters first, each to the lightest partition so far."""
    load = np.zeros(max(1, parts))
    owner = np.empty(len(sizes), np.int64)
    for pos in np.argsort(-(np.asarray(sizes, np.float64) ** 2), kind="stable"):
        k = int(np.argmin(load))
        owner[pos] = k
        load[k] += float(sizes[pos]) ** 2
    return owner


# -- per shard, then per partition of clusters: the pool never in one process ---------------
#
# The plan's dedup phase (pipelines/executors/dedup_phase.py) runs SemDeDup's steps: k-means
# on a sample (:func:`filtering.clustering.train_kmeans`), then each shard's rows assigned
# and spilled sorted by cluster (:func:`spill_assigned`), then each partition of clusters
# (:func:`balance`) gathered from every shard's spill and compared
# (:func:`spilled_partition_pairs`), the rows of each cluster in canonical (uid) order, so
# the pairs do not depend on shard order.


class _Taken:
    """Rows ``local`` of ``emb`` in ``dtype``, read a slice at a time (as ``assign`` batches).
    A module-level class: one defined in the function would sit in a reference cycle and
    keep ``emb``'s memory map (its pages count in the worker's RSS) until a garbage collection."""

    def __init__(self, emb: np.ndarray, local: np.ndarray, dtype: np.dtype):
        self.emb, self.local, self.dtype = emb, local, dtype

    def __len__(self) -> int:
        return len(self.local)

    def __getitem__(self, at) -> np.ndarray:
        return np.asarray(self.emb[self.local[at]], dtype=self.dtype)


def spill_assigned(
    emb: np.ndarray,
    local: np.ndarray,
    rows: np.ndarray,
    rank: np.ndarray,
    centroids,
    k: int,
    prefix: str,
    dtype=None,
    extra: dict[str, np.ndarray] | None = None,
    label: np.ndarray | None = None,
) -> np.ndarray:
    """One shard's rows ``local`` of ``emb`` (its embeddings, e.g. memory-mapped; taken in
    ``dtype``, the search's), which are pool rows ``rows`` at positions ``rank`` of the
    canonical order, assigned to their nearest centroid (``centroids``: an array or
    :class:`filtering.clustering.Assigner`; None: one cluster) and written sorted by
    (cluster, rank) as ``prefix.{x,label,rank,row}.npy``, a batch of rows at a time (the
    shard's embeddings are never held whole), and each ``extra`` array (one value per row)
    as ``prefix.{name}.npy`` in the same order; ``label``: each row's cluster, given
    (instead of the nearest centroid). Returns the rows per cluster (``k``)."""
    import os

    from filtering.clustering import DEFAULT_BATCH, assign

    dtype = np.dtype(dtype or emb.dtype)
    taken = _Taken(emb, local, dtype)
    if label is None:
        label = assign(taken, centroids)[0] if centroids is not None and len(local) else np.zeros(len(local), np.int64)
    del taken
    order = np.lexsort((rank, label))
    tmp = f"{prefix}.x.tmp.npy"
    with open(tmp, "wb") as f:  # written, not memory-mapped: the pages are not the worker's
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False}
        np.lib.format.write_array_header_1_0(f, {**header, "shape": (len(local), emb.shape[1])})
        for lo in range(0, len(order), DEFAULT_BATCH):
            f.write(np.ascontiguousarray(emb[local[order[lo : lo + DEFAULT_BATCH]]], dtype=dtype).tobytes())
    os.replace(tmp, f"{prefix}.x.npy")
    for name, arr in (("label", label), ("rank", rank), ("row", rows), *(extra or {}).items()):
        tmp = f"{prefix}.{name}.tmp.npy"
        np.save(tmp, np.ascontiguousarray(arr[order]))
        os.replace(tmp, f"{prefix}.{name}.npy")
    return np.bincount(label, minlength=k)


def gather_clusters(
    prefixes: list[str], clusters: np.ndarray, extra: tuple[str, ...] = ()
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[str, np.ndarray]]:
    """The rows of ``clusters`` from every shard's spill (:func:`spill_assigned`), sorted by
    (cluster, rank): their ``label``, ``row``, embeddings ``x`` (None when no row) and each
    ``extra`` array. Each shard's embeddings are read once, straight into their places."""
    clusters = np.sort(np.asarray(clusters, np.int64))
    label, rank, row, src, local = [], [], [], [], []
    more: dict[str, list] = {name: [] for name in extra}
    for s, prefix in enumerate(prefixes):
        lab = np.load(f"{prefix}.label.npy")
        take = np.flatnonzero(np.isin(lab, clusters, assume_unique=False))
        if len(take) == 0:
            continue
        label.append(lab[take])
        rank.append(np.load(f"{prefix}.rank.npy", mmap_mode="r")[take])
        row.append(np.load(f"{prefix}.row.npy", mmap_mode="r")[take])
        for name in extra:
            more[name].append(np.load(f"{prefix}.{name}.npy", mmap_mode="r")[take])
        src.append(np.full(len(take), s, np.int64))
        local.append(take)
    empty = np.zeros(0, np.int64)
    if not label:
        return empty, empty, None, {name: empty for name in extra}
    label, rank, row = np.concatenate(label), np.concatenate(rank), np.concatenate(row)
    src, local = np.concatenate(src), np.concatenate(local)
    order = np.lexsort((rank, label))
    label, row, src, local = label[order], row[order], src[order], local[order]
    out = {name: np.concatenate(v)[order] for name, v in more.items()}
    del rank, order
    x = None
    for s in np.unique(src):
        mem = np.load(f"{prefixes[s]}.x.npy", mmap_mode="r")
        if x is None:
            x = np.empty((len(row), mem.shape[1]), mem.dtype)
        at = np.flatnonzero(src == s)
        x[at] = mem[local[at]]
        del mem
    return label, row, x, out


def cluster_bounds(label: np.ndarray) -> np.ndarray:
    """Where each cluster's run of rows starts and ends in ``label`` (sorted)."""
    return np.flatnonzero(np.r_[True, label[1:] != label[:-1], True])


def spilled_partition_pairs(
    prefixes: list[str], clusters: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (pool rows) inside each of ``clusters``, gathered from every shard's spill
    (:func:`spill_assigned`): a cluster's rows in canonical order, compared by
    :func:`cluster_pairs`."""
    from filtering.clustering import normalize

    label, row, x, _ = gather_clusters(prefixes, clusters)
    empty = np.zeros(0, np.int64)
    if x is None:
        return empty, empty
    bounds = cluster_bounds(label)
    out_i, out_j = [empty], [empty]
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if b - a > 1:
            ci, cj = cluster_pairs(normalize(x[a:b]), threshold)
            out_i.append(row[a + ci])
            out_j.append(row[a + cj])
    return np.concatenate(out_i), np.concatenate(out_j)
