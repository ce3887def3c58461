"""clip_score top_fraction with NaN scores, counted as DataComp counts them.

DataComp (baselines/apply_filter.py:390-392, get_threshold): ``n = int(len(df) * fraction)``
over every row, NaN included, and ``threshold = -np.sort(-df[key].values)[n]``: numpy sorts
NaN last, so NaN rows take the bottom places. Rows are then kept by ``df[key] >= threshold``
(line 331), which is False for a NaN score, and for every row once the index lands among
the NaNs (the threshold is NaN).
"""

import numpy as np
import pytest

from filtering.filters.top_fraction import threshold as top_fraction_threshold
from tests.filtering.filters.test_clip_score import pool_of, run


def datacomp_keep(scores: np.ndarray, fraction: float) -> np.ndarray:
    n = int(len(scores) * fraction)  # apply_filter.py:391
    threshold = -np.sort(-scores)[n]  # apply_filter.py:392
    with np.errstate(invalid="ignore"):
        return scores >= threshold  # apply_filter.py:331


def test_nan_rows_count_in_n_and_sort_last():
    scores = np.array([0.9, np.nan, 0.8, 0.7, np.nan, 0.6], np.float32)
    # DataComp: N = 6, n = 3, sorted [0.9, 0.8, 0.7, 0.6, nan, nan] -> threshold 0.6
    out = run({"top_fraction": 0.5}, pool_of(scores))
    assert out.keep.tolist() == [True, False, True, True, False, True]
    np.testing.assert_array_equal(out.keep, datacomp_keep(scores, 0.5))
    assert out.funnel[0]["reasons"] == {"clip_score_missing": 2}


def test_index_among_the_nans_keeps_nothing_as_datacomp_does():
    scores = np.array([0.9, np.nan, 0.8, 0.7, np.nan, 0.6], np.float32)
    # n = int(6 * 0.7) = 4 -> sorted[4] is NaN: DataComp's threshold is NaN and keeps no row
    out = run({"top_fraction": 0.7}, pool_of(scores))
    assert not out.keep.any()
    assert np.isnan(top_fraction_threshold(scores, 0.7))


def test_fraction_one_keeps_every_scored_row():
    # DataComp raises IndexError here (sorted[N]); poolsift keeps every row with a score.
    scores = np.array([0.9, np.nan, 0.1], np.float32)
    out = run({"top_fraction": 1.0}, pool_of(scores))
    assert out.keep.tolist() == [True, False, True]


@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.3, 0.5, 0.69, 0.7, 0.71, 0.9, 0.99])
def test_random_pools_with_nans_and_ties_match_datacomp(fraction):
    rng = np.random.default_rng(7)
    scores = np.round(rng.uniform(0.1, 0.4, 1001), 2).astype(np.float32)  # many ties
    scores[rng.random(1001) < 0.3] = np.nan
    out = run({"top_fraction": fraction}, pool_of(scores))
    np.testing.assert_array_equal(out.keep, datacomp_keep(scores, fraction))
