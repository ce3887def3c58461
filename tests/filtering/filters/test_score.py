"""score: a threshold on any score column, with DataComp's top-fraction tie rule."""

import numpy as np
import pyarrow as pa
import pytest

from filtering.errors import ConfigError
from filtering.filters.compose import apply_filters
from filtering.pool import Pool
from filtering.registry import parse_filters


def pool_of(scores, errors=None, dtype=None) -> Pool:
    n = len(scores)
    table = pa.table(
        {
            "uid": [f"{i:032x}" for i in range(n)],
            "aesthetic_score": pa.array(scores, dtype or pa.float32()),
            "error": pa.array(errors if errors is not None else [None] * n, pa.string()),
        }
    )
    return Pool(table=table, parts=[])


def run(spec, pool):
    return apply_filters(parse_filters([{"score": {"column": "aesthetic_score", **spec}}]), pool)


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 0.9])
def test_top_fraction_is_datacomps_rule_with_ties_kept(fraction):
    scores = np.round(np.random.default_rng(0).uniform(3, 7, 1001), 1)  # many ties, float64 column
    out = run({"top_fraction": fraction}, pool_of(scores, dtype=pa.float64()))
    threshold = -np.sort(-scores)[int(len(scores) * fraction)]
    np.testing.assert_array_equal(out.keep, scores >= threshold)
    assert out.keep.sum() > int(len(scores) * fraction)  # the ties at the threshold are all kept
    assert out.funnel[0]["reasons"] == {"aesthetic_score_below_top_fraction": int((scores < threshold).sum())}


def test_min_max_range_and_reason_codes():
    scores = np.array([1, 4, 5, 6, 9, np.nan, 5], dtype=np.float32)
    out = run({"min": 4, "max": 6}, pool_of(scores, errors=[None] * 6 + ["decode: bad"]))
    assert out.keep.tolist() == [False, True, True, True, False, False, False]
    assert out.drop_reason.tolist()[:6] == [
        "aesthetic_score_below_min",
        None,
        None,
        None,
        "aesthetic_score_above_max",
        "aesthetic_score_missing",
    ]
    assert out.funnel[0]["name"] == "score" and out.funnel[0]["in"] == 6  # the failed row never reaches it
    only_max = run({"max": 5}, pool_of(scores[:5]))
    assert only_max.keep.tolist() == [True, True, True, False, False]
    assert set(only_max.funnel[0]["reasons"]) == {"aesthetic_score_above_max"}


def test_threshold_returned_in_the_decision_for_report_and_sweep():
    pool = pool_of(np.arange(10, dtype=np.float32))
    assert run({"top_fraction": 0.3}, pool).thresholds == {"aesthetic_score": 6.0}  # sorted_desc[int(10 * 0.3)]
    pool = pool_of(np.arange(10, dtype=np.float32))
    assert run({"max": 0.5}, pool).thresholds == {"aesthetic_score": 0.5}
    assert "thresholds" not in pool.artifacts  # the pool is not written to: nothing for sweep to undo


@pytest.mark.parametrize(
    "spec, message",
    [
        ({}, "give min, max (or both), or top_fraction"),
        ({"top_fraction": 0.3, "min": 1}, "give top_fraction alone"),
        ({"min": 5, "max": 1}, "min (5.0) is above max (1.0)"),
        ({"top_fraction": 1.5}, "top_fraction"),
    ],
)
def test_bad_params(spec, message):
    with pytest.raises(ConfigError, match=r"filters\[0\]\.score") as e:
        parse_filters([{"score": {"column": "x", **spec}}])
    assert message in str(e.value)
