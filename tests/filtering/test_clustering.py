"""Clustering: DataComp's image-cluster rule, k-means determinism, centroid/reference loaders."""

from __future__ import annotations

import numpy as np
import pytest

from filtering import clustering
from filtering.clustering import Assigner, assign, load_centroids, load_reference_embeddings, normalize, target_clusters


def blobs(n: int, k: int, d: int, seed: int, noise: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = normalize(rng.standard_normal((k, d)))
    x = normalize(centers[rng.integers(0, k, n)] + noise * rng.standard_normal((n, d)))
    return x.astype(np.float16), centers


def datacomp_rule(pool: np.ndarray, reference: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """DataComp's rule, written out directly (apply_filter.py: einsum, argmax, unique, keep)."""
    pool_ids = np.argmax(pool.astype(np.float32) @ centroids.T, axis=1)
    target = np.unique(np.argmax(reference.astype(np.float32) @ centroids.T, axis=1))
    return np.isin(pool_ids, target)


@pytest.mark.parametrize("backend", ["faiss", "bf16-screen"])
def test_selection_equals_datacomp_rule(backend):
    pool, _ = blobs(6000, 40, 64, seed=0)
    centroids = clustering.train_kmeans(pool, 50, niter=8, seed=3)
    reference, _ = blobs(300, 40, 64, seed=1)  # its own centres: overlaps part of the pool
    reference = reference[:120]
    assigner = Assigner(centroids, backend)
    ids, sims = assign(pool, assigner, batch=1000)
    keep = np.isin(ids, target_clusters(reference, assigner))
    expected = datacomp_rule(pool, reference, centroids)
    np.testing.assert_array_equal(keep, expected)
    assert 0 < keep.sum() < len(keep)
    scores = pool.astype(np.float32) @ centroids.T
    np.testing.assert_array_equal(ids, scores.argmax(axis=1))
    np.testing.assert_allclose(sims, scores.max(axis=1), atol=1e-5)


@pytest.mark.parametrize("backend", ["faiss", "bf16-screen"])
def test_assignment_exact_on_near_ties_and_unnormalised_centroids(backend):
    """Random directions (many near-ties), raw (not unit) centroids, a zero row: still numpy's argmax."""
    rng = np.random.default_rng(5)
    centroids = rng.standard_normal((300, 32)).astype(np.float32) * rng.uniform(0.5, 2.0, (300, 1)).astype(np.float32)
    x = rng.standard_normal((2000, 32)).astype(np.float32)
    x[7] = 0
    ids, _ = assign(x, centroids, batch=512, backend=backend)
    expected = (x @ centroids.T).argmax(axis=1)
    np.testing.assert_array_equal(ids[np.arange(len(x)) != 7], expected[np.arange(len(x)) != 7])
    if backend == "bf16-screen":
        assert ids[7] == 0  # argmax of an all-zero row, as numpy


def test_kmeans_is_seeded_and_deterministic():
    x, _ = blobs(3000, 20, 32, seed=2)
    a = clustering.train_kmeans(x, 24, niter=5, seed=7, max_training_points=2000)
    b = clustering.train_kmeans(x, 24, niter=5, seed=7, max_training_points=2000)
    c = clustering.train_kmeans(x, 24, niter=5, seed=8, max_training_points=2000)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (24, 32) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)


def test_kmeans_recovers_separated_clusters_and_fills_empty_ones():
    x, centers = blobs(4000, 10, 32, seed=4, noise=0.05)
    centroids = clustering.train_kmeans(x, 10, niter=15, seed=0)
    ids, _ = assign(x, centroids)
    truth = (x.astype(np.float32) @ centers.T).argmax(axis=1)
    # Each true blob maps to one cluster, and (nearly) every cluster is used.
    purity = sum(np.bincount(ids[truth == t]).max() for t in range(10)) / len(x)
    assert purity > 0.95
    assert len(np.unique(ids)) >= 9


def test_training_size_rules():
    assert clustering.training_size(1000, 10) == 1000
    assert clustering.training_size(10_000, 10) == 2560  # faiss's 256 points per centroid
    assert clustering.training_size(1000, 10, sample_fraction=0.3) == 300
    assert clustering.training_size(1000, 10, sample_fraction=0.3, max_training_points=100) == 100
    with pytest.raises(ValueError, match="num_clusters=50"):
        clustering.train_kmeans(np.ones((20, 4), np.float32), 50)


def test_loaders_npy_and_datacomp_pt(tmp_path):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    cent = rng.standard_normal((5, 8)).astype(np.float32)
    feats = rng.standard_normal((7, 8)).astype(np.float16)

    np.save(tmp_path / "c.npy", cent)
    torch.save(torch.from_numpy(cent), tmp_path / "c_tensor.pt")
    torch.save(cent, tmp_path / "c_numpy.pt")  # DataComp's centroid files pickle a numpy array
    for name in ("c.npy", "c_tensor.pt", "c_numpy.pt"):
        np.testing.assert_array_equal(load_centroids(str(tmp_path / name)), cent)

    np.save(tmp_path / "r.npy", feats)
    torch.save({"image_features": torch.from_numpy(feats), "labels": torch.arange(7)}, tmp_path / "r.pt")
    for name in ("r.npy", "r.pt"):
        got = load_reference_embeddings(str(tmp_path / name))
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, feats.astype(np.float32))

    torch.save({"something_else": torch.zeros(2, 2)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="image_features"):
        load_reference_embeddings(str(tmp_path / "bad.pt"))
    with pytest.raises(ValueError, match="unsupported"):
        load_centroids(str(tmp_path / "c.txt"))


def test_screen_overflow_rows_keep_their_argmax():
    """More than SCREEN_TOP centroids within the bf16 bound of the best: the full-row fallback
    must still rescore them (it once cleared its own overflow mask and answered centroid 0, 0.0)."""
    rng = np.random.default_rng(11)
    d, near = 32, 40
    base = normalize(rng.standard_normal((3, d)))
    # 40 centroids around each of 3 directions, scores ~1e-3 apart: inside the bf16 error bound
    # (~2e-2) yet far apart for fp32.
    tight = normalize(np.repeat(base, near, axis=0) + 1e-2 * rng.standard_normal((3 * near, d)).astype(np.float32))
    centroids = np.concatenate([normalize(rng.standard_normal((200, d))), tight])
    x = normalize(base[rng.integers(0, 3, 500)] + 1e-2 * rng.standard_normal((500, d)).astype(np.float32))
    ids, sims = assign(x, centroids, batch=128, backend="bf16-screen")
    scores = x.astype(np.float64) @ centroids.astype(np.float64).T
    np.testing.assert_array_equal(ids, scores.argmax(axis=1))
    np.testing.assert_allclose(sims, scores.max(axis=1), rtol=1e-6)
    assert (ids >= 200).all()


# --- exactness at DataComp's cluster counts, every backend the auto rule can pick ------------

BACKEND_CASES = [
    pytest.param("faiss", None, id="faiss"),
    pytest.param("bf16-screen", False, id="bf16-emulated"),  # runs on any CPU
    pytest.param(
        "bf16-screen",
        True,
        id="bf16-native",
        marks=pytest.mark.skipif(not clustering.native_bf16(), reason="CPU without native bf16 (AVX512-BF16/AMX)"),
    ),
    pytest.param(
        "faiss-gpu",
        None,
        id="faiss-gpu",
        marks=pytest.mark.skipif(clustering.faiss_gpus() == 0, reason="no faiss GPU build or no GPU"),
    ),
]


def float64_argmax(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The float64 argmax of ``x @ centroids.T``, ties to the lowest id. A tie is a gap below
    1e-12, far under any gap the inputs hold and far over float64's rounding, so BLAS's
    summation order cannot make two equal scores (duplicate centroids) look different."""
    c64 = centroids.astype(np.float64)
    ids = np.empty(len(x), np.int64)
    best = np.empty(len(x), np.float64)
    for lo in range(0, len(x), 128):
        s = x[lo : lo + 128].astype(np.float64) @ c64.T
        best[lo : lo + 128] = s.max(axis=1)
        ids[lo : lo + 128] = np.argmax(s >= best[lo : lo + 128, None] - 1e-12, axis=1)
    return ids, best


def random_case(k: int, n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return normalize(rng.standard_normal((n, d))), normalize(rng.standard_normal((k, d)))


def clustered_case(k: int, n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Centroids in tight groups of ~16 around shared centres (most of a group inside the bf16
    bound of its best member), exact duplicates, and near-duplicates whose scores differ
    below fp32's resolution; embeddings drawn around the same centres, plus a zero row."""
    rng = np.random.default_rng(seed)
    centres = normalize(rng.standard_normal((k // 16, d)))
    centroids = normalize(centres[rng.integers(0, len(centres), k)] + 0.02 * rng.standard_normal((k, d)))
    dup = rng.choice(k, size=(k // 50, 2), replace=False)
    centroids[dup[:, 1]] = centroids[dup[:, 0]]  # exact ties: the lowest id wins
    near = rng.choice(k, size=(k // 50, 2), replace=False)
    centroids[near[:, 1]] = centroids[near[:, 0]]
    centroids[near[:, 1], 0] = np.nextafter(centroids[near[:, 1], 0], np.float32(2))  # one ulp apart
    x = normalize(centres[rng.integers(0, len(centres), n)] + 0.02 * rng.standard_normal((n, d)))
    x[: n // 4] = centroids[rng.integers(0, k, n // 4)]  # rows sitting on centroids: top scores near 1
    x[5] = 0
    return x.astype(np.float16).astype(np.float32), centroids


@pytest.mark.parametrize("k,n", [(8192, 3000), (100_000, 1200)], ids=["8192", "100000"])
@pytest.mark.parametrize("make", [random_case, clustered_case], ids=["random", "clustered"])
@pytest.mark.parametrize("backend,native", BACKEND_CASES)
def test_assignment_is_the_float64_argmax(backend, native, make, k, n):
    x, centroids = make(k, n, 48, seed=k + n)
    expected, best = float64_argmax(x, centroids)
    assigner = Assigner(centroids, backend)
    assigner.native_bf16 = native
    ids, sims = assign(x, assigner, batch=1000)
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_array_equal(sims, best.astype(np.float32))
    if make is clustered_case:
        # The inputs do stress the screens: rows with more candidates inside the bf16 bound
        # than the top list holds, and rows whose fp32 argmax is not the float64 one.
        s32 = x[:300] @ centroids.T
        within = (s32 >= s32.max(axis=1, keepdims=True) - 2 * 3 * 2.0**-8).sum(axis=1)
        assert (within > clustering.SCREEN_TOP).sum() > 10
        assert (np.argmax(s32, axis=1) != expected[:300]).any()


def test_centroid_sums_in_chunks_are_the_one_shot_sums(monkeypatch):
    """k-means sums its clusters a few thousand rows at a time: bit for bit the one-shot
    ``np.add.reduceat`` (segments larger than a chunk, single rows, one segment)."""
    from filtering import clustering

    rng = np.random.default_rng(1)
    for m, k, rows in [(5000, 40, 256), (3000, 3, 100), (100, 50, 1), (10, 1, 4)]:
        monkeypatch.setattr(clustering, "SUM_ROWS", rows)
        data = rng.standard_normal((m, 24), dtype=np.float32)
        ids = rng.integers(0, k, m)
        ids[: m // 2] = 0  # one segment larger than a chunk
        order = np.argsort(ids, kind="stable")
        counts = np.bincount(ids, minlength=k)
        starts = np.r_[0, np.cumsum(counts[np.flatnonzero(counts)])[:-1]]
        one_shot = np.add.reduceat(data[order], starts, axis=0, dtype=np.float64)
        assert np.array_equal(clustering._segment_sums(data, order, starts), one_shot)
