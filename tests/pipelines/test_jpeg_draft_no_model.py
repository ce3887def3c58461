"""An image scorer added to a cached run decodes the images as the rows were decoded,
without loading the CLIP model: at full size by default, and with ``model.jpeg_draft:
true`` at the draft size recorded beside the rows' cache when they were computed (not
learnt from the model's preprocessing). Draft-decoded rows and scores are cached apart
from full-size ones: neither run takes the other's.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from filtering.models.transforms import PilTransform
from filtering.scorers.base import Batch, Needs, Scorer, register
from tests.conftest import REPO, SAMPLE_CONFIG, cached_rows, run_cli, write_config

SAMPLE_MODEL = {
    **yaml.safe_load(SAMPLE_CONFIG.read_text())["model"],
    "pretrained": str(REPO / "sample_data/tiny_clip/poolsift-tiny.safetensors"),
}


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


def _widths(rows, draft: int | None) -> list[int]:
    """The width each readable row's image has when decoded with ``draft``, from the shards."""
    from filtering.io.reader import iter_shard
    from filtering.stages.image_decode import open_image

    images = {(url, s.key): s.image for url in sorted({r["source_shard"] for r in rows}) for s in iter_shard(url)}
    return [open_image(images[(r["source_shard"], r["key"])], draft)[0].size[0] for r in rows]


def _cached(config, out, columns, column) -> tuple[list[dict], list]:
    """The cached rows (``columns``) and one scorer ``column`` of ``config``'s run in ``out``,
    from the caches that config's plan reads (several runs' caches lie side by side)."""
    from pipelines.config import load_config
    from pipelines.runner import plan

    source = plan(load_config(config), str(out / "cache")).source
    [scorer] = [s for s in source.scorers if column in s.provides()]
    rows, values = [], []
    for url in source.urls:
        rows += source.cache.read_table(url, list(columns)).to_pylist()
        values += source.scorer_cache(scorer).read_table(url, [column]).column(column).to_pylist()
    return rows, values


def _width_config(path, out, **model):
    return write_config(
        path,
        model={**SAMPLE_MODEL, **model},
        scorers=[{"decoded_width": {}}],
        filters=[{"clip_score": {"min": 0.55}}, {"score": {"column": "decoded_width", "min": 0}}],
        output={"dir": str(out)},
    )


@pytest.mark.slow
def test_by_default_an_added_image_scorer_sees_full_size_images_and_loads_no_model(tmp_path, rerun_dir, monkeypatch):
    monkeypatch.setattr("filtering.models.clip.load_clip", _no_model)
    code, _, err = run_cli("run", _width_config(tmp_path / "width.yaml", rerun_dir), "--quiet")
    assert code == 0, err
    assert "scoring 4 of 4 shards (0 cached)" in err

    rows = cached_rows(rerun_dir, ("source_shard", "key", "original_width", "decoded_width", "error"))
    readable = [r for r in rows if r["error"] is None]
    assert [r["decoded_width"] for r in readable] == _widths(readable, None) == [r["original_width"] for r in readable]


@pytest.mark.slow
def test_draft_decoding_is_cached_apart_and_an_added_scorer_loads_no_model(
    tmp_path, rerun_dir, scored_sample, monkeypatch
):
    """``jpeg_draft: true`` on a run cached without it rescores every shard; an image
    scorer added then decodes at the recorded draft size without the model; the run
    without draft decoding then reads its own cache again, not the drafted one."""
    drafted = write_config(
        tmp_path / "draft.yaml", model={**SAMPLE_MODEL, "jpeg_draft": True}, output={"dir": str(rerun_dir)}
    )
    code, _, err = run_cli("run", drafted, "--quiet")
    assert code == 0, err
    assert "scoring 4 of 4 shards (0 cached)" in err
    draft_scores = pq.read_table(rerun_dir / "subset", columns=["uid", "clip_score"]).to_pydict()

    monkeypatch.setattr("filtering.models.clip.load_clip", _no_model)
    width = _width_config(tmp_path / "width.yaml", rerun_dir, jpeg_draft=True)
    code, _, err = run_cli("run", width, "--quiet")
    assert code == 0, err
    assert "scoring 4 of 4 shards (0 cached)" in err
    rows, widths = _cached(width, rerun_dir, ("source_shard", "key", "error"), "decoded_width")
    readable, widths = zip(*[(r, w) for r, w in zip(rows, widths, strict=True) if r["error"] is None], strict=True)
    draft = 64  # the bundled model's input size (its preprocessing's Resize)
    assert list(widths) == _widths(readable, draft)
    full = _widths(readable, None)
    assert sum(e < f for e, f in zip(widths, full, strict=True)) > 100  # draft decoding did shrink many

    code, _, err = run_cli("run", write_config(tmp_path / "sample.yaml", output={"dir": str(rerun_dir)}), "--quiet")
    assert code == 0, err
    assert "all 4 shards cached; the model is not loaded" in err
    assert (rerun_dir / "subset.npy").read_bytes() == (scored_sample / "subset.npy").read_bytes()
    scores = pq.read_table(rerun_dir / "subset", columns=["uid", "clip_score"]).to_pydict()
    assert scores == pq.read_table(scored_sample / "subset", columns=["uid", "clip_score"]).to_pydict()
    assert scores != draft_scores


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
