"""DataComp's ``top_fraction`` threshold (``baselines/apply_filter.py``): the value at index
``int(N * fraction)`` of the N scores sorted in descending order, NaN counted in N and
sorted last. One implementation, whether the scores are one array or spread over shards:
per-shard histograms of the scores' order-preserving bit keys are summed, the bin holding
the rank is narrowed, and only the scores in that bin are gathered (the shard plan runs
the histograms and gathers as tasks, ``pipelines/executors/streaming.py``;
:func:`threshold` runs them over one array in this process)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

KEY_BITS = 16  # histogram of the top bits of each score's order-preserving key
GATHER_LIMIT = 1 << 20  # scores gathered at most (8 MB), except exact ties


def score_keys(values: np.ndarray) -> np.ndarray:
    """uint64 keys ordered as the (non-NaN) float values: sign-flipped IEEE bits; -0.0 as 0.0."""
    bits = (np.asarray(values, dtype=np.float64) + 0.0).view(np.uint64)
    neg = (bits >> np.uint64(63)).astype(bool)
    return np.where(neg, ~bits, bits | np.uint64(1 << 63))


def key_value(key: int, dtype: np.dtype):
    """The score whose key is ``key`` (the inverse of :func:`score_keys`), in ``dtype``."""
    k = np.uint64(key)
    bits = k & np.uint64((1 << 63) - 1) if k >> np.uint64(63) else ~k
    return dtype.type(np.array([bits], dtype=np.uint64).view(np.float64)[0])


def histogram(scores: np.ndarray) -> tuple[np.ndarray, int]:
    """One shard's share: the histogram of the top KEY_BITS bits of its non-NaN scores' keys, and its NaN count."""
    nan = np.isnan(scores)
    keys = score_keys(scores[~nan])
    return np.bincount((keys >> np.uint64(64 - KEY_BITS)).astype(np.int64), minlength=1 << KEY_BITS), int(nan.sum())


def keys_under(scores: np.ndarray, prefix: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The non-NaN scores whose key starts with ``prefix`` (its top ``bits`` bits), and their keys."""
    scores = scores[~np.isnan(scores)]
    keys = score_keys(scores)
    if bits:
        hit = (keys >> np.uint64(64 - bits)) == np.uint64(prefix)
        scores, keys = scores[hit], keys[hit]
    return scores, keys


def refine_histogram(scores: np.ndarray, prefix: int, bits: int) -> np.ndarray:
    """One shard's histogram of the next KEY_BITS key bits, among its scores under ``prefix``."""
    _, keys = keys_under(scores, prefix, bits)
    shift = np.uint64(64 - bits - KEY_BITS)
    return np.bincount(((keys >> shift) & np.uint64((1 << KEY_BITS) - 1)).astype(np.int64), minlength=1 << KEY_BITS)


def select_threshold(
    hist: np.ndarray,
    nan: int,
    total: int,
    fraction: float,
    dtype: np.dtype,
    refine: Callable[[int, int], np.ndarray],
    gather: Callable[[int, int], np.ndarray],
):
    """The threshold from counts: None (index past the end: keep all), NaN (index among the
    NaN rows), or the exact value at ``sorted_desc[int(N * fraction)]``, in ``dtype``.

    ``hist`` counts the non-NaN scores by the top KEY_BITS bits of their key (summed over
    the shards). While the bin holding the rank has more than GATHER_LIMIT scores,
    ``refine(prefix, bits)`` (the summed histogram of the next bits under that prefix)
    narrows it; then ``gather(prefix, bits)`` returns the scores under the prefix and
    ``np.partition`` picks the value. A prefix of all 64 bits is one value: no gathering at all."""
    n = int(total * fraction)
    if n >= total:
        return None
    scored = total - nan
    if n >= scored:
        return dtype.type(np.nan)
    rank = scored - 1 - n  # ascending rank of sorted_desc[n] among the scored rows
    prefix, bits = 0, 0
    while True:
        cum = np.cumsum(hist)
        b = int(np.searchsorted(cum, rank, side="right"))
        rank -= int(cum[b - 1]) if b else 0
        prefix, bits = (prefix << KEY_BITS) | b, bits + KEY_BITS
        if bits == 64:
            return key_value(prefix, dtype)
        if int(hist[b]) <= GATHER_LIMIT:
            scores = gather(prefix, bits)
            return np.partition(scores, rank)[rank]
        hist = refine(prefix, bits)


def threshold(scores: np.ndarray, fraction: float):
    """The threshold over one array of scores (the rows not failed), in this process: the
    reduction above with the array as its only shard."""
    hist, nan = histogram(scores)
    return select_threshold(
        hist,
        nan,
        len(scores),
        fraction,
        scores.dtype,
        lambda prefix, bits: refine_histogram(scores, prefix, bits),
        lambda prefix, bits: keys_under(scores, prefix, bits)[0],
    )
