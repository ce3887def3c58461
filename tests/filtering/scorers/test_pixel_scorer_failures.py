"""A batched model scorer (``Needs.pixels``) whose ``score()`` raises never stops the run
nor loses rows silently (docs/guarantees.md): the batch is scored again
row by row, so only the rows that fail alone are left null; they are counted per scorer
in the manifest as an image scorer's failures are, and a filter on the column drops them
as ``<column>_missing``. CLIP, the source's own model, is not retried: its failure stops
the run (one line, exit 1), as before.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from filtering.models.transforms import PilTransform
from filtering.scorers.base import Batch, Needs, Scorer, register
from filtering.stages.image_decode import DecodedImage
from filtering.stages.webdataset import SampleBatch, score_batch
from tests.conftest import cached_rows, run_cli, write_config

SIDE = 8


@register
class EmptyCaptionFails(Scorer):
    """Mean pixel value of an 8x8 thumbnail, in [0, 1]; raises on a batch holding an empty
    caption (a model with a bug on some inputs)."""

    kind = "empty_caption_fails"

    def provides(self) -> tuple[str, ...]:
        return ("mean_pixel",)

    def needs(self) -> Needs:
        return Needs(pixels=True, captions=True)

    def transform(self):
        return PilTransform([("resize", [SIDE], None, 2), ("center_crop", (SIDE, SIDE)), ("convert", "RGB")])

    def score(self, batch: Batch) -> dict[str, np.ndarray]:
        for caption in batch.columns["caption"]:
            if not caption.strip():
                raise ValueError("empty caption")
        return {"mean_pixel": batch.pixels.reshape(batch.rows, -1).mean(axis=1).astype(np.float32) / 255.0}


def _batch(captions: list[str]) -> SampleBatch:
    rows = [{"key": f"{i:03d}", "caption": c} for i, c in enumerate(captions)]
    images = [
        DecodedImage(SIDE, SIDE, None, pixels={"empty_caption_fails": np.full((SIDE, SIDE, 3), 10 * i, np.uint8)})
        for i in range(len(captions))
    ]
    return SampleBatch("shard.tar", 0, rows, images)


def test_a_raising_batch_is_scored_again_row_by_row():
    scorer = EmptyCaptionFails(EmptyCaptionFails.Params(), None, "scorers[0].empty_caption_fails")
    scored = score_batch(_batch(["a cat", "", "a dog", " "]), [scorer], ("empty_caption_fails",))
    ok, arrays = scored.outputs["empty_caption_fails"]
    assert ok == [0, 2]  # the batch-mates of the bad rows keep their scores
    np.testing.assert_allclose(arrays["mean_pixel"], [0.0, 20 / 255], rtol=1e-6)
    failures = [d.failures for d in scored.images]
    assert failures == [{}, {"empty_caption_fails": "empty caption"}, {}, {"empty_caption_fails": "empty caption"}]


def test_a_batch_failing_on_every_row_leaves_the_scorer_out():
    scorer = EmptyCaptionFails(EmptyCaptionFails.Params(), None, "scorers[0].empty_caption_fails")
    scored = score_batch(_batch(["", ""]), [scorer], ("empty_caption_fails",))
    assert "empty_caption_fails" not in scored.outputs
    assert all(d.failures == {"empty_caption_fails": "empty caption"} for d in scored.images)


def test_the_source_model_failing_stops_the_run():
    """CLIP (``required``: the source's own scores) is never retried nor left null."""
    scorer = EmptyCaptionFails(EmptyCaptionFails.Params(), None, "model")
    with pytest.raises(ValueError, match="empty caption"):
        score_batch(
            _batch(["a cat", ""]), [scorer], ("empty_caption_fails",), required=frozenset({"empty_caption_fails"})
        )


@pytest.mark.slow
def test_a_raising_batched_scorer_is_counted_and_its_rows_dropped_with_a_reason(tmp_path, rerun_dir):
    from PIL import Image

    from filtering.io.reader import iter_shard

    cfg = write_config(
        tmp_path / "pixels.yaml",
        scorers=[{"empty_caption_fails": {}}],
        filters=[{"score": {"column": "mean_pixel", "min": 0}}],
        output={"dir": str(rerun_dir)},
    )
    code, _, err = run_cli("run", cfg, "--quiet")
    assert code == 0, err
    rows = cached_rows(rerun_dir, ("source_shard", "key", "caption", "mean_pixel", "error"))
    readable = [r for r in rows if r["error"] is None]
    empty = [r for r in readable if not r["caption"].strip()]
    assert empty and all(r["mean_pixel"] is None for r in empty)
    scored = [r for r in readable if r["caption"].strip()]
    assert all(r["mean_pixel"] is not None for r in scored)  # batch-mates of empty captions too

    # Each scored value is the thumbnail's mean, whether its batch ran whole or row by row.
    transform = EmptyCaptionFails(EmptyCaptionFails.Params(), None).transform()
    images = {(url, s.key): s.image for url in sorted({r["source_shard"] for r in rows}) for s in iter_shard(url)}
    for r in scored[::25]:  # decoded at full size (model.jpeg_draft is off by default)
        img = Image.open(io.BytesIO(images[(r["source_shard"], r["key"])]))
        expected = np.asarray(transform(img), np.uint8).mean() / 255.0
        assert r["mean_pixel"] == pytest.approx(expected, rel=1e-5)

    manifest = json.loads((rerun_dir / "manifest.json").read_text())
    failed = manifest["stages"]["scorers"]["empty_caption_fails"]["failed"]
    assert failed == {"count": len(empty), "first_error": "empty caption"}
    assert f"scorer empty_caption_fails failed on {len(empty)} image(s)" in err
    counts = manifest["counts"]
    funnel = {f["name"]: f for f in counts["filters"]}
    assert funnel["score"]["reasons"] == {"mean_pixel_missing": len(empty)}
    assert counts["kept"] == len(scored)
    assert counts["input"] == counts["kept"] + counts["failed"] + sum(f["dropped"] for f in counts["filters"])
