"""no_filter, uid for uid against DataComp's ``load_uids_helper`` (``baselines/apply_filter.py``
lines 337-352: every uid of every parquet), on a pool with odd captions and NaN scores."""

import numpy as np
import pytest

from tests.datacomp_pool import _parquets, make_datacomp_edge_pool, run_preset, uids_u8u8

pytestmark = pytest.mark.slow  # runs the CLI


def test_no_filter_preset_equals_datacomp(tmp_path):
    import pandas as pd

    metadata = make_datacomp_edge_pool(tmp_path / "metadata", shards=3, rows=120, seed=2)
    code, err = run_preset(tmp_path / "run", "no_filter.yaml", metadata)
    assert code == 0, err
    expected = np.concatenate(
        [uids_u8u8(pd.read_parquet(p, columns=["uid"])["uid"].values) for p in _parquets(metadata)]
    )
    expected.sort()
    assert len(expected) == 120 + 121 + 122
    np.testing.assert_array_equal(np.load(tmp_path / "run" / "subset.npy"), expected)
