"""Multi-index hashing finds exactly the pairs an all-pairs scan finds."""

import numpy as np
import pytest

from filtering.dedup import hamming
from filtering.dedup.partitioned import components_of


def planted(n: int, k: int, seed: int = 0) -> np.ndarray:
    """Random hashes plus copies with 0..k flipped bits and a few exact repeats."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, np.iinfo(np.uint64).max, size=n, dtype=np.uint64, endpoint=True)
    src = rng.integers(0, n, n // 10)
    near = base[src].copy()
    for row, flips in enumerate(rng.integers(0, k + 1, len(src))):
        for bit in rng.choice(64, size=flips, replace=False):
            near[row] ^= np.uint64(1) << np.uint64(bit)
    return np.concatenate([base, near, base[:20]])


def as_set(pairs) -> set[tuple[int, int]]:
    return set(zip(*(p.tolist() for p in pairs), strict=True))


@pytest.mark.parametrize("k", [0, 2, 5, 8, 13])
def test_unique_pairs_equal_brute_force(k):
    values = np.unique(planted(1500, k, seed=k))
    found = hamming.unique_pairs(values, k)
    assert as_set(found) == as_set(hamming.brute_force_pairs(values, k))
    assert len(found[0]) == len(as_set(found))  # each pair once


@pytest.mark.parametrize("m", [2, 3, 4, 7])
def test_any_number_of_substrings_is_exact(m):
    values = np.unique(planted(800, 6, seed=m))
    assert as_set(hamming.unique_pairs(values, 6, substrings=m)) == as_set(hamming.brute_force_pairs(values, 6))


def test_near_pairs_with_repeats_give_brute_force_components():
    hashes = planted(1000, 6, seed=3)
    n = len(hashes)
    ours = components_of(np.arange(n), *hamming.near_pairs(hashes, 6))
    ref = components_of(np.arange(n), *hamming.brute_force_pairs(hashes, 6))
    # Same partition: each of our groups maps to exactly one reference group and back.
    joint = {(a, b) for a, b in zip(ours.tolist(), ref.tolist(), strict=True)}
    assert len(joint) == len(set(ours.tolist())) == len(set(ref.tolist()))
    assert len(set(ours.tolist())) < n  # planted pairs were found


def test_many_copies_of_one_hash_are_linear():
    hashes = np.full(50_000, 12345, dtype=np.uint64)
    i, j = hamming.near_pairs(hashes, 4)
    assert len(i) == len(hashes) - 1  # a star, not 1.25e9 clique edges
    assert (components_of(np.arange(len(hashes)), i, j) == 0).all()


def test_nearest_matches_brute_force():
    rng = np.random.default_rng(5)
    ref = rng.integers(0, np.iinfo(np.uint64).max, 300, dtype=np.uint64, endpoint=True)
    queries = np.concatenate([ref[:50] ^ np.uint64(0b101), rng.integers(0, 2**63, 200, dtype=np.uint64)])
    dist, idx = hamming.nearest(queries, ref)
    brute = hamming.hamming(queries[:, None], ref[None, :])
    np.testing.assert_array_equal(dist, brute.min(axis=1))
    np.testing.assert_array_equal(brute[np.arange(len(queries)), idx], dist)
    assert (dist[:50] <= 2).all()


def test_choose_substrings_follows_the_cost_model():
    assert hamming.choose_substrings(1_000_000, 0) == 1  # exact equality: one sorted table
    assert hamming.choose_substrings(1_000_000, 8) == 3  # Norouzi et al.: m ~ 64 / log2(n)
