"""The streaming plan's reductions against the in-memory functions they replace."""

from __future__ import annotations

import numpy as np
import pytest

from filtering.filters.clip_score import top_fraction_threshold
from pipelines.executors.streaming import KEY_BITS, _select, part_pieces, score_keys


def test_score_keys_order_like_the_values():
    v = np.array([-np.inf, -3.5, -1e-300, -0.0, 0.0, 1e-300, 0.25, 7.0, np.inf])
    keys = score_keys(v)
    assert (np.diff(keys.astype(np.float64)) >= 0).all() and keys[3] == keys[4]  # -0.0 == 0.0
    assert (np.argsort(keys, kind="stable") == np.argsort(v, kind="stable")).all()


def _threshold(scores: np.ndarray, fraction: float, shards: int = 5):
    """The streaming reduction: per-shard histograms, then the values of one bin."""
    parts = np.array_split(scores, shards)
    nan = sum(int(np.isnan(p).sum()) for p in parts)
    hist = sum(np.bincount((score_keys(p[~np.isnan(p)]) >> np.uint64(64 - KEY_BITS)).astype(np.int64), minlength=1 << KEY_BITS) for p in parts)
    pick = _select(hist, nan, len(scores), fraction, scores.dtype)
    if not isinstance(pick, tuple):
        return pick
    b, rank = pick
    cand = np.concatenate([p[~np.isnan(p)][(score_keys(p[~np.isnan(p)]) >> np.uint64(64 - KEY_BITS)) == b] for p in parts])
    return np.partition(cand, rank)[rank]


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.3, 0.5, 0.77, 0.999, 1.0])
def test_threshold_equals_in_memory(dtype, fraction):
    rng = np.random.default_rng(7)
    for scores in (
        np.round(rng.uniform(0.1, 0.4, 5000), 2).astype(dtype),  # many ties
        rng.normal(0, 1, 5000).astype(dtype),  # negatives
        np.where(rng.random(5000) < 0.3, np.nan, rng.uniform(0, 1, 5000)).astype(dtype),  # NaN counted in N
        np.full(1000, 0.25, dtype),
        np.full(10, np.nan, dtype),
    ):
        want = top_fraction_threshold(scores, fraction)
        got = _threshold(scores, fraction)
        if want is None:
            assert got is None
        elif np.isnan(want):
            assert np.isnan(got) and got.dtype == scores.dtype
        else:
            assert got == want and got.dtype == want.dtype


@pytest.mark.parametrize("rows_per_part", [1, 3, 7, 100])
def test_part_pieces_cut_like_the_in_memory_writer(rows_per_part):
    counts = [5, 0, 3, 9, 0, 1]
    parts = part_pieces(counts, rows_per_part)
    rows = [(s, lo + k) for pieces in parts for s, lo, n in pieces for k in range(n)]
    assert rows == [(s, k) for s, c in enumerate(counts) for k in range(c)]  # every row once, in pool order
    assert all(sum(n for _, _, n in p) == rows_per_part for p in parts[:-1])
    assert part_pieces([0, 0], 10) == [[]]  # one empty part
