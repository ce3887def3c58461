"""SemDeDup finds planted near duplicates and agrees with the all-pairs scan on them."""

import numpy as np

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


def test_finds_planted_pairs_and_only_true_pairs():
    x, truth = planted()
    i, j, labels = semantic.semdedup_pairs(x, 0.95, num_clusters=20, seed=0)
    found = set(zip(i.tolist(), j.tolist(), strict=True))
    brute = set(zip(*(p.tolist() for p in semantic.brute_force_pairs(x, 0.95)), strict=True))
    assert found <= brute  # every reported pair really is that similar
    assert len(found & truth) >= 0.95 * len(truth)  # clustering loses at most a few split pairs
    assert len(set(labels.tolist())) == 20
    sims = np.einsum("ij,ij->i", x[i], x[j])
    assert (sims >= 0.95 - 1e-6).all()


def test_deterministic_for_a_seed():
    x, _ = planted(seed=1)
    a = semantic.semdedup_pairs(x, 0.9, num_clusters=10, seed=3)
    b = semantic.semdedup_pairs(x, 0.9, num_clusters=10, seed=3)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)


def test_one_cluster_is_the_brute_force():
    x, _ = planted(n=400, dups=30)
    i, j, _ = semantic.semdedup_pairs(x, 0.9, num_clusters=1)
    bi, bj = semantic.brute_force_pairs(x, 0.9)
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == set(zip(bi.tolist(), bj.tolist(), strict=True))


def test_default_num_clusters_is_about_sqrt_n():
    assert semantic.default_num_clusters(1_000_000) == 1000
    assert semantic.default_num_clusters(10) == 2


def test_cluster_partitions_on_workers_give_the_pairs_of_one_process(tmp_path):
    """Partitions of clusters compared on worker processes (float16 input, as the filter
    passes it): the same pairs and clusters, every row counted once by progress."""
    x, _ = planted(n=3000, dups=300, seed=4)
    x = x.astype(np.float16)
    one = semantic.semdedup_pairs(x, 0.9, num_clusters=12, seed=1)
    done = []
    two = semantic.semdedup_pairs(
        x, 0.9, num_clusters=12, seed=1, workers=2, work_dir=str(tmp_path), progress=done.append
    )
    assert len(one[0]) > 100
    assert sorted(zip(one[0].tolist(), one[1].tolist(), strict=True)) == sorted(
        zip(two[0].tolist(), two[1].tolist(), strict=True)
    )
    np.testing.assert_array_equal(one[2], two[2])
    assert sum(done) == len(x)
    assert list(tmp_path.iterdir()) == []  # spill files removed


def test_spilled_shards_give_the_pairs_of_one_process(tmp_path):
    """The streaming plan's steps (rows assigned and spilled per shard, partitions of
    clusters gathered from every shard's spill) on rows in a shuffled pool order: the
    pairs of :func:`semantic.semdedup_pairs` over the rows in canonical order."""
    from filtering.clustering import assign, train_kmeans

    x, _ = planted(n=1200, dups=200, seed=5)
    x = x.astype(np.float16)
    k = 6
    one_i, one_j, labels = semantic.semdedup_pairs(x, 0.9, num_clusters=k, seed=2)
    m = min(len(x), semantic.TRAINING_POINTS_PER_CLUSTER * k)
    centroids = train_kmeans(x, k, niter=10, seed=2, max_training_points=m)
    np.testing.assert_array_equal(assign(x, centroids)[0], labels)
    for cents, want in ((centroids, (one_i, one_j)), (None, semantic.semdedup_pairs(x, 0.9, num_clusters=1)[:2])):
        rank_of_row = np.random.default_rng(0).permutation(len(x))  # pool row r holds canonical row rank_of_row[r]
        cuts = [0, 300, 301, 700, len(x)]  # shards, one of a single row
        prefixes, sizes = [], np.zeros(k, np.int64)
        for s, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
            rows = np.arange(a, b)
            prefixes.append(str(tmp_path / f"{id(cents)}-s{s}"))
            emb = x[rank_of_row]  # the pool in its own order; this shard's rows are rows a:b
            sizes += semantic.spill_assigned(emb, rows, rows, rank_of_row[rows], cents, k, prefixes[-1])
        assert sizes.sum() == len(x)
        clusters = np.flatnonzero(sizes > 1)
        owner = semantic.balance(sizes[clusters], 3)
        got = set()
        for q in range(3):
            a, b = semantic.spilled_partition_pairs(prefixes, clusters[owner == q], 0.9)
            ra, rb = rank_of_row[a], rank_of_row[b]
            got |= set(zip(np.minimum(ra, rb).tolist(), np.maximum(ra, rb).tolist(), strict=True))
        assert len(got) > 100
        assert got == set(zip(want[0].tolist(), want[1].tolist(), strict=True))
