"""image_size: DataComp's basic rule (both sides >= 200 px, aspect ratio <= 3.0)."""

import numpy as np
import pyarrow as pa
import pytest

from filtering.filters.base import InputInfo
from filtering.filters.image_size import ImageSize, ImageSizeParams
from filtering.pool import Pool


def pool_of(original, decoded=None):
    cols = {
        "original_width": pa.array([w for w, _ in original], pa.int32()),
        "original_height": pa.array([h for _, h in original], pa.int32()),
    }
    if decoded is not None:
        cols["width"] = pa.array([w for w, _ in decoded], pa.int32())
        cols["height"] = pa.array([h for _, h in decoded], pa.int32())
    return Pool(pa.table(cols), parts=[])


def decide(pool, **params):
    d = ImageSize(ImageSizeParams(**params), InputInfo("webdataset")).apply(pool, np.ones(pool.n, bool))
    return d.keep.tolist(), d.reasons_for(~d.keep).tolist()


def test_datacomp_basic_rule_and_every_reason_code():
    pool = pool_of([(200, 200), (199, 400), (600, 200), (601, 200), (None, None), (0, 300), (300, 900)])
    keep, reasons = decide(pool, min_side=200, max_aspect_ratio=3.0)
    assert keep == [True, False, True, False, False, False, True]
    assert reasons == ["image_too_small", "image_aspect_ratio", "image_size_unknown", "image_size_unknown"]


def test_matches_datacomp_formula_on_random_sizes():
    rng = np.random.default_rng(0)
    w, h = rng.integers(1, 1200, 2000), rng.integers(1, 1200, 2000)
    keep, _ = decide(pool_of(list(zip(w.tolist(), h.tolist(), strict=True))), min_side=200, max_aspect_ratio=3.0)
    expect = (w >= 200) & (h >= 200) & (np.maximum(w / h, h / w) <= 3.0)
    assert keep == expect.tolist()


def test_original_size_first_then_decoded():
    pool = pool_of([(1000, 1000), (None, None), (None, 50)], decoded=[(100, 100), (300, 300), (300, 300)])
    assert decide(pool, min_side=200)[0] == [True, True, True]
    assert decide(pool, min_side=200, size_from="decoded")[0] == [False, True, True]
    keep, reasons = decide(pool, min_side=200, size_from="original")
    assert keep == [True, False, False]
    assert reasons == ["image_size_unknown", "image_size_unknown"]


def test_requires_original_size_unless_decoded():
    assert ImageSize(ImageSizeParams(min_side=1), InputInfo("datacomp")).requires() == {
        "original_width",
        "original_height",
    }
    assert ImageSize(ImageSizeParams(min_side=1, size_from="decoded"), InputInfo("webdataset")).requires() == {
        "width",
        "height",
    }


@pytest.mark.parametrize(
    "params", [{}, {"min_side": 0}, {"max_aspect_ratio": 0.5}, {"min_side": 200, "size_from": "exif"}]
)
def test_params_rejected(params):
    with pytest.raises(ValueError):
        ImageSizeParams(**params)
