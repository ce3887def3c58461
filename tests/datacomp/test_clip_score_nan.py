"""clip_score on DataComp pools with NaN scores, uid for uid against DataComp's own logic.

Reference: ``get_threshold`` (``baselines/apply_filter.py`` lines 375-394: N counts every
row, ``-np.sort(-scores)[int(N * f)]`` puts NaN last) and
``load_uids_with_clip_score_helper`` (lines 326-334: ``score >= threshold``), as
``tests/datacomp_pool.datacomp_clip_score_uids``. B/32 scores are float32 and L/14 float64,
rounded to 0.01 so that many rows tie at every threshold; 10% are NaN.
"""

import json
import math

import numpy as np
import pytest
import yaml

from tests.conftest import run_cli
from tests.datacomp_pool import datacomp_clip_score_uids, datacomp_threshold, make_datacomp_edge_pool, run_preset

pytestmark = pytest.mark.slow  # runs the CLI

B32, L14 = "clip_b32_similarity_score", "clip_l14_similarity_score"


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
    return make_datacomp_edge_pool(
        tmp_path_factory.mktemp("dc") / "metadata", shards=3, rows=300, seed=5, nan_fraction=0.1
    )


def _run(tmp_path, metadata, params, *extra):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "input": {"datacomp_metadata": str(metadata)},
                "filters": [{"clip_score": params}],
                "output": {"dir": str(tmp_path / "run")},
            }
        )
    )
    code, _, err = run_cli("run", path, "--quiet", *extra)
    assert code == 0, err
    return np.load(tmp_path / "run" / "subset.npy"), json.loads((tmp_path / "run" / "manifest.json").read_text())


@pytest.mark.parametrize("field", [B32, L14])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.5, 0.85])
def test_top_fraction_with_nan_equals_datacomp(tmp_path, metadata, field, fraction):
    got, manifest = _run(tmp_path, metadata, {"top_fraction": fraction, "field": field})
    expected = datacomp_clip_score_uids(metadata, field, fraction=fraction)
    np.testing.assert_array_equal(got, expected)
    assert manifest["thresholds"][field] == float(datacomp_threshold(metadata, field, fraction))
    n = manifest["counts"]["input"]
    assert len(expected) > int(n * fraction)  # ties at the threshold kept (and N counts the NaN rows)


def test_l14_30pct_preset_equals_datacomp(tmp_path, metadata):
    code, err = run_preset(tmp_path / "run", "clip_score_l14_30pct.yaml", metadata)
    assert code == 0, err
    np.testing.assert_array_equal(
        np.load(tmp_path / "run" / "subset.npy"), datacomp_clip_score_uids(metadata, L14, fraction=0.3)
    )


@pytest.mark.parametrize("field", [B32, L14])
def test_fraction_reaching_the_nan_rows_keeps_nothing_as_datacomp(tmp_path, metadata, field):
    """``int(N * 0.95)`` lands among the NaN rows: DataComp's threshold is NaN and keeps
    nothing. The manifest and the report still come out."""
    assert math.isnan(datacomp_threshold(metadata, field, 0.95))
    got, manifest = _run(tmp_path, metadata, {"top_fraction": 0.95, "field": field}, "--set", "output.report=true")
    assert len(got) == 0 == len(datacomp_clip_score_uids(metadata, field, fraction=0.95))
    assert math.isnan(manifest["thresholds"][field])
    assert (tmp_path / "run" / "report.html").stat().st_size > 0


@pytest.mark.parametrize("field", [B32, L14])
@pytest.mark.parametrize("threshold", [0.1, 0.25, 0.28, 0.3])
def test_min_with_nan_equals_datacomp(tmp_path, metadata, field, threshold):
    got, manifest = _run(tmp_path, metadata, {"min": threshold, "field": field})
    np.testing.assert_array_equal(got, datacomp_clip_score_uids(metadata, field, threshold=threshold))
    missing = sum(f["reasons"].get("clip_score_missing", 0) for f in manifest["counts"]["filters"])
    assert missing > 0  # NaN rows are dropped, and named
