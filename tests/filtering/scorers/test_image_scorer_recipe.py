"""A new image scorer is one scorer definition and one test: this one, defined here,
registered, run end to end on the bundled sample through the CLI, gives a column the
generic ``score`` filter thresholds, with no change anywhere else (docs/architecture.md,
"Add a scorer"). Added to a run whose caches hold CLIP and phash, it computes only
itself: the other scorers' caches are read, not rewritten.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from filtering.scorers.base import Batch, Needs, Scorer, register
from tests.conftest import cached_rows, run_cli, write_config


@register
class MeanBrightness(Scorer):
    """Mean luma of the image as decoded, in [0, 1] (PIL's ITU-R 601-2 ``L`` conversion)."""

    kind = "mean_brightness"

    def provides(self) -> tuple[str, ...]:
        return ("brightness",)

    def needs(self) -> Needs:
        return Needs(images=True)  # decoded images, scored in the decode workers

    def score(self, batch: Batch) -> dict[str, np.ndarray]:
        values = [np.asarray(img.convert("L"), dtype=np.float32).mean() / 255.0 for img in batch.images]
        return {"brightness": np.array(values, dtype=np.float32)}


def _reference(shards: list[str]) -> dict[tuple[str, str], float]:
    """Brightness of every readable image from a plain full-size PIL decode, by (shard, key)."""
    from PIL import Image

    from filtering.io.reader import iter_shard

    out = {}
    for url in shards:
        for s in iter_shard(url):
            try:
                img = Image.open(io.BytesIO(s.image))
                out[(url, s.key)] = float(np.asarray(img.convert("L"), dtype=np.float32).mean() / 255.0)
            except Exception:  # noqa: BLE001 — the sample's corrupt images have no reference
                continue
    return out


@pytest.mark.slow
def test_an_image_scorer_defined_in_a_test_runs_through_the_cli(tmp_path, rerun_dir):
    cached_before = {p: p.stat().st_mtime_ns for p in (rerun_dir / "cache").rglob("*") if p.is_file()}
    cfg = write_config(
        tmp_path / "bright.yaml",
        scorers=[{"mean_brightness": {}}],
        filters=[{"clip_score": {"min": 0.55}}, {"score": {"column": "brightness", "min": 0.3}}],
        output={"dir": str(rerun_dir)},
    )
    code, _, err = run_cli("run", cfg, "--quiet")
    assert code == 0, err
    assert "scoring 4 of 4 shards (0 cached)" in err  # the new scorer's pieces only

    # CLIP's and phash's caches were read, not rewritten; the new scorer has its own.
    assert {p: p.stat().st_mtime_ns for p in cached_before} == cached_before
    [own] = (rerun_dir / "cache").glob("scorer-mean_brightness-*")
    assert len(list(own.glob("*.parquet"))) == 4

    manifest = json.loads((rerun_dir / "manifest.json").read_text())
    funnel = {f["name"]: f for f in manifest["counts"]["filters"]}
    assert funnel["score"]["reasons"] == {"brightness_below_min": funnel["score"]["dropped"]}
    assert funnel["score"]["dropped"] > 0
    assert manifest["stages"]["scorers"]["mean_brightness"]["cache"]["dir"] == str(own)

    subset = pq.read_table(rerun_dir / "subset").to_pydict()
    assert min(subset["brightness"]) >= 0.3
    rows = cached_rows(rerun_dir, ("source_shard", "key", "brightness", "error"))
    assert len(rows) == manifest["counts"]["input"]
    ref = _reference(sorted({r["source_shard"] for r in rows}))
    readable = [r for r in rows if r["error"] is None]
    assert len(readable) == manifest["counts"]["input"] - manifest["counts"]["failed"]
    # The same full-size decode as the reference (model.jpeg_draft is off by default).
    np.testing.assert_allclose(
        [r["brightness"] for r in readable], [ref[(r["source_shard"], r["key"])] for r in readable], atol=0.01
    )
    assert all(r["brightness"] is None for r in rows if (r["source_shard"], r["key"]) not in ref)
    kept = dict(zip(subset["key"], subset["brightness"], strict=True))
    assert all(kept[r["key"]] == pytest.approx(r["brightness"]) for r in readable if r["key"] in kept)


def _plan(tmp_path, input_section, scorers):
    from pipelines.config import parse_config
    from pipelines.runner import plan

    cfg = parse_config(
        {"input": input_section, "scorers": scorers, "filters": [], "output": {"dir": str(tmp_path / "out")}}
    )
    return plan(cfg, str(tmp_path / "out" / "cache"))


def test_the_planner_hands_image_scorers_to_the_source(tmp_path):
    for name in ("00000.tar", "00001.tar"):
        (tmp_path / name).write_bytes(b"")  # planning only stats them
    the_plan = _plan(tmp_path, {"shards": str(tmp_path / "{00000..00001}.tar")}, [{"mean_brightness": {}}])
    assert the_plan.stages == []  # not a column stage: the source's decode pass runs it
    assert [s.kind for s in the_plan.source.scorers] == ["clip", "phash", "mean_brightness"]
    assert "brightness" in the_plan.source.provides()


def test_image_scorers_without_images_or_on_a_taken_column_are_config_errors(tmp_path):
    from filtering.errors import ConfigError

    with pytest.raises(ConfigError, match=r"scorers\[0\]\.mean_brightness: reads decoded images, which the datacomp"):
        _plan(tmp_path, {"datacomp_metadata": str(tmp_path)}, [{"mean_brightness": {}}])
    with pytest.raises(ConfigError, match=r"scorers\[0\]\.phash: column 'phash' is already written by the WebDataset"):
        _plan(tmp_path, {"shards": str(tmp_path / "00000.tar")}, [{"phash": {}}])
