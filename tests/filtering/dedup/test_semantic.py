"""SemDeDup as the plan's dedup phase runs it (pipelines/executors/dedup_phase.py:
``_semantic_pairs``): k-means on a sample, each shard's rows assigned and spilled sorted by
cluster (:func:`semantic.spill_assigned`), partitions of clusters (:func:`semantic.balance`)
gathered from every spill and compared (:func:`semantic.spilled_partition_pairs`). Checked
against a numpy oracle: every pair of rows with the same nearest centroid (float64 argmax)
and cosine >= threshold."""

import numpy as np
import pytest

from filtering.clustering import train_kmeans
from filtering.dedup import semantic


def planted(n=3000, d=32, dups=150, noise=0.02, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, d)).astype(np.float32)
    x = centres[rng.integers(0, 20, n)] + 0.5 * rng.normal(size=(n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    src = rng.choice(n, dups, replace=False)
    near = x[src] + noise * rng.normal(size=(dups, d)).astype(np.float32)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    return np.concatenate([x, near]), {(int(s), n + r) for r, s in enumerate(src)}


def centroids_of(x, k, seed):
    m = min(len(x), semantic.TRAINING_POINTS_PER_CLUSTER * k)
    return train_kmeans(x, k, niter=10, seed=seed, max_training_points=m) if k > 1 else None


def plan_pairs(x, threshold, centroids, k, tmp_path, cuts, parts=3, shuffle_seed=0):
    """The phase's steps on canonical rows ``x`` held by a pool in a shuffled order, cut
    into shards at ``cuts``: the pairs as (smaller, larger) canonical positions."""
    rank_of_row = np.random.default_rng(shuffle_seed).permutation(len(x))  # pool row r is canonical row rank_of_row[r]
    emb = x[rank_of_row]
    prefixes, sizes = [], np.zeros(k, np.int64)
    for s, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
        rows = np.arange(a, b)
        prefixes.append(str(tmp_path / f"{shuffle_seed}-{id(centroids)}-s{s}"))
        sizes += semantic.spill_assigned(emb[a:b], rows - a, rows, rank_of_row[rows], centroids, k, prefixes[-1])
    assert sizes.sum() == len(x)
    clusters = np.flatnonzero(sizes > 1)
    owner = semantic.balance(sizes[clusters], parts)
    got = set()
    for q in range(parts):
        a, b = semantic.spilled_partition_pairs(prefixes, clusters[owner == q], threshold)
        ra, rb = rank_of_row[a], rank_of_row[b]
        got |= set(zip(np.minimum(ra, rb).tolist(), np.maximum(ra, rb).tolist(), strict=True))
    return got


def oracle_pairs(x, threshold, centroids):
    """Every pair in the same cluster (float64 argmax of x @ centroids.T) with cosine >= threshold."""
    x32 = np.asarray(x, np.float32)
    label = np.zeros(len(x), np.int64) if centroids is None else np.argmax(x32.astype(np.float64) @ centroids.T, axis=1)
    u = x32 / np.linalg.norm(x32, axis=1, keepdims=True)
    i, j = np.nonzero(np.triu((u @ u.T >= threshold) & (label[:, None] == label[None, :]), k=1))
    return set(zip(i.tolist(), j.tolist(), strict=True))


@pytest.mark.parametrize("k", [1, 6])
def test_spilled_shards_give_the_oracle_pairs(tmp_path, k):
    """float16 rows (as the phase reads them) in a shuffled pool order, shards of one row
    and more, three partitions: exactly the oracle's pairs, the same for another shard order."""
    x, _ = planted(n=1200, dups=200, seed=5)
    x = x.astype(np.float16)
    centroids = centroids_of(x, k, seed=2)
    want = oracle_pairs(x, 0.9, centroids)
    assert len(want) > 100
    assert plan_pairs(x, 0.9, centroids, k, tmp_path, [0, 300, 301, 700, len(x)]) == want
    assert plan_pairs(x, 0.9, centroids, k, tmp_path, [0, 900, len(x)], parts=1, shuffle_seed=1) == want


def test_finds_planted_pairs_and_only_true_pairs(tmp_path):
    x, truth = planted()
    centroids = centroids_of(x, 20, seed=0)
    found = plan_pairs(x, 0.95, centroids, 20, tmp_path, [0, 1000, 2000, len(x)])
    brute = set(zip(*(p.tolist() for p in semantic.brute_force_pairs(x, 0.95)), strict=True))
    assert found <= brute  # every reported pair really is that similar
    assert len(found & truth) >= 0.95 * len(truth)  # clustering loses at most a few split pairs
    i, j = np.array(sorted(found)).T
    assert (np.einsum("ij,ij->i", x[i], x[j]) >= 0.95 - 1e-6).all()


def test_centroids_deterministic_for_a_seed():
    x, _ = planted(seed=1)
    np.testing.assert_array_equal(centroids_of(x, 10, seed=3), centroids_of(x, 10, seed=3))


def test_brute_force_is_the_oracle_in_one_cluster():
    x, _ = planted(n=400, dups=30)
    bi, bj = semantic.brute_force_pairs(x, 0.9)
    assert set(zip(bi.tolist(), bj.tolist(), strict=True)) == oracle_pairs(x, 0.9, None)


def test_default_num_clusters_is_about_sqrt_n():
    assert semantic.default_num_clusters(1_000_000) == 1000
    assert semantic.default_num_clusters(10) == 2


def test_balance_spreads_comparisons():
    """Largest first, each to the lightest partition: loads (size^2) within the largest cluster's."""
    sizes = np.array([10, 9, 8, 3, 3, 2, 1, 1])
    owner = semantic.balance(sizes, 3)
    loads = np.bincount(owner, weights=sizes.astype(float) ** 2, minlength=3)
    assert sorted(owner[:3].tolist()) == [0, 1, 2]
    assert loads.max() - loads.min() <= 100
