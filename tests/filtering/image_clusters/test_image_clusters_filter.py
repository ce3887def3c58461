"""image_clusters: keeps rows in target clusters; [clip_score, image_clusters] is DataComp's intersection."""

import numpy as np
import pyarrow as pa
import pytest

from filtering.errors import ConfigError
from filtering.filters.compose import apply_filters
from filtering.pool import Pool
from filtering.registry import parse_filters


def pool_of(scores, target) -> Pool:
    n = len(scores)
    table = pa.table(
        {
            "uid": [f"{i:032x}" for i in range(n)],
            "clip_score": pa.array(scores, pa.float32()),
            "cluster_target": pa.array(target, pa.bool_()),
            "error": pa.array([None] * n, pa.string()),
        }
    )
    return Pool(table=table, parts=[])


def test_keeps_target_rows_with_reason():
    pool = pool_of([0.1, 0.2, 0.3, 0.4], [True, False, True, False])
    out = apply_filters(parse_filters([{"image_clusters": {}}]), pool)
    np.testing.assert_array_equal(out.keep, [True, False, True, False])
    assert out.funnel[0]["reasons"] == {"image_cluster_not_in_target": 2}


@pytest.mark.parametrize("order", ["clip_first", "clusters_first"])
def test_intersection_with_pool_wide_clip_top_fraction(order):
    rng = np.random.default_rng(0)
    scores = rng.normal(0.3, 0.05, 1001).astype(np.float32)
    target = rng.random(1001) < 0.4
    pool = pool_of(scores, target)
    specs = [{"clip_score": {"top_fraction": 0.3}}, {"image_clusters": {}}]
    out = apply_filters(parse_filters(specs if order == "clip_first" else specs[::-1]), pool)
    threshold = -np.sort(-scores)[int(len(scores) * 0.3)]  # DataComp: over the whole pool
    np.testing.assert_array_equal(out.keep, (scores >= threshold) & target)


def test_rejects_parameters():
    with pytest.raises(ConfigError, match="image_clusters"):
        parse_filters([{"image_clusters": {"threshold": 1}}])
