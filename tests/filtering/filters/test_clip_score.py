"""clip_score: DataComp's threshold semantics (baselines/apply_filter.py, get_threshold)."""

import numpy as np
import pyarrow as pa
import pytest

from filtering.errors import ConfigError
from filtering.filters.compose import apply_filters
from filtering.filters.top_fraction import threshold as top_fraction_threshold
from filtering.pool import Pool
from filtering.registry import parse_filters


def datacomp_threshold(scores: np.ndarray, fraction: float) -> float:
    """DataComp's own rule, verbatim in spirit: sort descending, take index int(N * f)."""
    n = int(len(scores) * fraction)
    return -np.sort(-scores)[n]


def pool_of(scores, errors=None) -> Pool:
    n = len(scores)
    table = pa.table(
        {
            "uid": [f"{i:032x}" for i in range(n)],
            "key": [str(i) for i in range(n)],
            "source_shard": ["s.tar"] * n,
            "clip_score": pa.array(scores, pa.float32()),
            "error": pa.array(errors if errors is not None else [None] * n, pa.string()),
        }
    )
    return Pool(table=table, parts=[])


def run(spec, pool):
    return apply_filters(parse_filters([{"clip_score": spec}]), pool)


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.333, 0.5, 0.77, 0.9])
def test_top_fraction_matches_datacomp_rule(fraction):
    rng = np.random.default_rng(1)
    scores = rng.normal(0.3, 0.05, 1003).astype(np.float32)  # N * f is rarely an integer
    out = run({"top_fraction": fraction}, pool_of(scores))
    expected = scores >= datacomp_threshold(scores, fraction)
    np.testing.assert_array_equal(out.keep, expected)
    assert out.keep.sum() == int(1003 * fraction) + 1  # distinct scores: the threshold row itself is kept


def test_ties_at_threshold_are_all_kept():
    scores = np.array([0.9, 0.5, 0.5, 0.5, 0.5, 0.1, 0.0, 0.2], np.float32)
    # N=8, f=0.25 -> index 2 of [0.9,0.5,0.5,0.5,0.5,0.2,0.1,0.0] = 0.5: all four 0.5s kept
    out = run({"top_fraction": 0.25}, pool_of(scores))
    assert out.keep.tolist() == [True, True, True, True, True, False, False, False]
    np.testing.assert_array_equal(out.keep, scores >= datacomp_threshold(scores, 0.25))


def test_fraction_zero_keeps_only_the_maximum_and_its_ties():
    scores = np.array([0.2, 0.7, 0.7, 0.1], np.float32)
    out = run({"top_fraction": 0.0}, pool_of(scores))
    assert out.keep.tolist() == [False, True, True, False]


def test_fraction_one_keeps_everything():
    scores = np.array([0.2, 0.7, -0.3, 0.1], np.float32)
    out = run({"top_fraction": 1.0}, pool_of(scores))
    assert out.keep.all()
    assert top_fraction_threshold(scores, 1.0) is None


def test_min_keeps_scores_at_or_above():
    scores = np.array([0.28, 0.2799, 0.3, 0.1], np.float32)
    out = run({"min": 0.28}, pool_of(scores))
    assert out.keep.tolist() == [True, False, True, False]
    assert out.funnel[0]["reasons"] == {"clip_score_below_min": 2}


def test_failed_rows_are_not_counted_in_n_nor_kept():
    scores = np.array([0.9, 0.8, 0.7, 0.6, np.nan], np.float32)
    pool = pool_of(scores, errors=[None, None, None, None, "corrupt_image: truncated"])
    out = run({"top_fraction": 0.5}, pool)
    # N = 4 scored rows, index 2 -> 0.7
    assert out.keep.tolist() == [True, True, True, False, False]
    assert out.funnel[0]["in"] == 4


def test_params_are_validated():
    with pytest.raises(ConfigError, match=r"filters\[0\].clip_score.top_fraction"):
        parse_filters([{"clip_score": {"top_fraction": 1.5}}])
    with pytest.raises(ConfigError, match="exactly one of min or top_fraction"):
        parse_filters([{"clip_score": {"min": 0.2, "top_fraction": 0.3}}])
    with pytest.raises(ConfigError, match="did you mean top_fraction"):
        parse_filters([{"clip_score": {"top_fracton": 0.3}}])
