"""With ``model.jpeg_draft: true``, an image scorer added to a cached run decodes the
images at the draft size the rows were decoded at, recorded beside the rows' cache when
they were computed, without loading the CLIP model to learn it from its preprocessing.
"""

from __future__ import annotations

import numpy as np
import pytest

from filtering.scorers.base import Batch, Needs, Scorer, register
from filtering.stages.image_decode import PilTransform
from tests.conftest import cached_rows, run_cli, write_config


@register
class DecodedWidth(Scorer):
    """The width of the image as the decode pass hands it over (after JPEG draft decoding)."""

    kind = "decoded_width"

    def provides(self) -> tuple[str, ...]:
        return ("decoded_width",)

    def needs(self) -> Needs:
        return Needs(images=True)

    def score(self, batch: Batch) -> dict[str, np.ndarray]:
        return {"decoded_width": np.array([img.size[0] for img in batch.images], dtype=np.float32)}


def _no_model(*args, **kwargs):
    raise AssertionError("the CLIP model was loaded")


@pytest.mark.slow
def test_an_image_scorer_added_to_a_cached_run_loads_no_model(tmp_path, rerun_dir, monkeypatch):
    from filtering.io.reader import iter_shard
    from filtering.stages.image_decode import open_image

    monkeypatch.setattr("filtering.models.clip.load_clip", _no_model)
    cfg = write_config(
        tmp_path / "width.yaml",
        scorers=[{"decoded_width": {}}],
        filters=[{"clip_score": {"min": 0.55}}, {"score": {"column": "decoded_width", "min": 0}}],
        output={"dir": str(rerun_dir)},
    )
    code, _, err = run_cli("run", cfg, "--quiet")
    assert code == 0, err
    assert "scoring 4 of 4 shards (0 cached)" in err

    rows = cached_rows(rerun_dir, ("source_shard", "key", "original_width", "decoded_width", "error"))
    readable = [r for r in rows if r["error"] is None]
    images = {(url, s.key): s.image for url in sorted({r["source_shard"] for r in rows}) for s in iter_shard(url)}
    draft = 64  # the bundled model's input size (its preprocessing's Resize)
    expected = [open_image(images[(r["source_shard"], r["key"])], draft)[0].size[0] for r in readable]
    assert [r["decoded_width"] for r in readable] == expected
    full = [open_image(images[(r["source_shard"], r["key"])])[0].size[0] for r in readable]
    assert sum(e < f for e, f in zip(expected, full, strict=True)) > 100  # draft decoding did shrink many


def test_without_a_recorded_draft_size_the_model_gives_it(tmp_path):
    """A rows' cache written before the draft size was recorded: CLIP's preprocessing is
    needed (the model is loaded) to learn it; once recorded, it is not."""
    from pipelines.config import parse_config
    from pipelines.runner import plan

    (tmp_path / "00000.tar").write_bytes(b"")
    cfg = parse_config(
        {
            "input": {"shards": str(tmp_path / "00000.tar")},
            "model": {"arch": "poolsift-tiny", "pretrained": None, "jpeg_draft": True},
            "scorers": [{"decoded_width": {}}],
            "filters": [],
            "output": {"dir": str(tmp_path / "out")},
        }
    )
    source = plan(cfg, str(tmp_path / "out" / "cache")).source
    wanted = {"decoded_width"}
    assert source.transform_scorers(wanted) == [source.clip]
    clip_preprocessing = PilTransform([("resize", [64], None, 3), ("center_crop", (64, 64)), ("convert", "RGB")])
    assert source.decode_plan({"clip": clip_preprocessing}).draft == 64  # learnt from CLIP's transform, recorded
    assert source.transform_scorers(wanted) == []
    assert source.decode_plan({}).draft == 64
