"""An image scorer or a model preprocessing that fails on one image never loses the row
silently (docs/guarantees.md): a failure of the source's own steps (CLIP's
preprocessing, the perceptual hash) fails the sample as a corrupt image, as before they
were scorers; any other scorer's failure leaves its value null, is counted per scorer in
the manifest, and a filter on its column drops the row as ``<column>_missing``.
"""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest

from filtering.scorers.base import Batch, Needs, Scorer, register
from filtering.stages.image_decode import DecodePlan, decode_image
from tests.conftest import cached_rows, run_cli, write_config


@register
class OddWidthFails(Scorer):
    """Image width as a score; raises on images of odd width (a scorer with a bug)."""

    kind = "odd_width_fails"

    def provides(self) -> tuple[str, ...]:
        return ("even_width",)

    def needs(self) -> Needs:
        return Needs(images=True)

    def score(self, batch: Batch) -> dict[str, np.ndarray]:
        for img in batch.images:
            if img.size[0] % 2:
                raise ValueError(f"odd width {img.size[0]}")
        return {"even_width": np.array([img.size[0] for img in batch.images], dtype=np.float32)}


def _png(width: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, 4), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _broken_transform(img):
    raise OSError("image file is truncated")


def test_a_required_preprocessing_failure_fails_the_sample_as_a_corrupt_image():
    plan = DecodePlan(transforms={"clip": _broken_transform}, required=frozenset({"clip"}))
    for wanted in (("clip",), ("source",)):  # run whenever the rows are computed
        d = decode_image(_png(8), wanted, plan)
        assert d.error == "corrupt_image: image file is truncated"
        assert (d.width, d.height, d.values, d.pixels) == (None, None, {}, {})
    assert decode_image(_png(8), ("other",), plan).error is None  # not run: rows and clip cached


def test_another_scorer_failing_leaves_its_value_null_and_says_why():
    scorer = OddWidthFails(OddWidthFails.Params(), None, "scorers[0].odd_width_fails")
    plan = DecodePlan(scorers=[scorer], transforms={"head": _broken_transform})
    odd = decode_image(_png(7), ("odd_width_fails", "head"), plan)
    assert odd.error is None
    assert odd.values == {} and odd.pixels == {}
    assert odd.failures == {"odd_width_fails": "odd width 7", "head": "image file is truncated"}
    even = decode_image(_png(8), ("odd_width_fails",), plan)
    assert even.values == {"odd_width_fails": {"even_width": 8.0}} and even.failures == {}


@pytest.mark.slow
def test_a_failing_image_scorer_is_counted_and_its_rows_dropped_with_a_reason(tmp_path, rerun_dir):
    cfg = write_config(
        tmp_path / "odd.yaml",
        scorers=[{"odd_width_fails": {}}],
        filters=[{"score": {"column": "even_width", "min": 0}}],
        output={"dir": str(rerun_dir)},
    )
    code, _, err = run_cli("run", cfg, "--quiet")
    assert code == 0, err
    rows = cached_rows(rerun_dir, ("source_shard", "key", "width", "even_width", "error"))
    readable = [r for r in rows if r["error"] is None]
    # The scorer sees the image as decoded (model.jpeg_draft would shrink it), so its
    # failures are the readable rows it left null; every value it gave is even.
    odd = [r for r in readable if r["even_width"] is None]
    assert odd and len(odd) < len(readable)  # the sample has both
    assert all(r["even_width"] % 2 == 0 for r in readable if r["even_width"] is not None)

    manifest = json.loads((rerun_dir / "manifest.json").read_text())
    failed = manifest["stages"]["scorers"]["odd_width_fails"]["failed"]
    assert failed["count"] == len(odd)
    assert re.fullmatch(r"odd width \d*[13579]", failed["first_error"])
    assert f"scorer odd_width_fails failed on {len(odd)} image(s)" in err
    counts = manifest["counts"]
    funnel = {f["name"]: f for f in counts["filters"]}
    assert funnel["score"]["reasons"] == {"even_width_missing": len(odd)}
    assert counts["input"] == counts["kept"] + counts["failed"] + sum(f["dropped"] for f in counts["filters"])
    assert counts["kept"] == len(readable) - len(odd)
