"""Changing only filter settings and rerunning reuses the scores: no model load, no image
reading or decoding. (What that saves is measured by bench/, not asserted here: no
wall-clock limits in tests.)"""

import json

import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, cached_rows, run_cli, write_config

FILTERS_A = [
    {"caption": {"min_words": 2, "min_chars": 6}},
    {"image_size": {"min_side": 64, "max_aspect_ratio": 3.0}},
    {"any": [{"clip_score": {"top_fraction": 0.5}}, {"not": {"text_entities": {}}}]},
]
FILTERS_B = [
    {"clip_score": {"top_fraction": 0.3}},
    {"language": {"languages": ["en"], "candidates": ["en", "de", "fr", "es"]}},
]


@pytest.fixture
def no_model_no_images(monkeypatch):
    """Loading a model, reading a shard or decoding an image fails the test."""
    import filtering.io.reader as reader
    import filtering.models.clip as clip_models
    import filtering.stages.image_decode as decode
    import filtering.stages.webdataset as score

    def forbidden(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"a filter-only rerun {what}")

        return fail

    monkeypatch.setattr(clip_models, "load_clip", forbidden("loaded the model"))
    monkeypatch.setattr(reader, "iter_shard", forbidden("read a shard"))
    monkeypatch.setattr(score, "iter_shard", forbidden("read a shard"))
    for name in ("decode_in_order", "decode_image", "decode_images", "open_image"):
        monkeypatch.setattr(decode, name, forbidden("decoded an image"))


def run_filters(tmp_path, out_dir, filters, name):
    cfg = write_config(tmp_path / f"{name}.yaml", filters=filters, output={"dir": str(out_dir)})
    code, stdout, stderr = run_cli("run", cfg, "--quiet")
    assert code == 0, stderr
    return json.loads((out_dir / "manifest.json").read_text()), stderr


@pytest.mark.slow
def test_filter_only_rerun_loads_no_model_and_reads_no_images(tmp_path, rerun_dir, scored_sample, no_model_no_images):
    first = json.loads((scored_sample / "manifest.json").read_text())

    manifest, stderr = run_filters(tmp_path, rerun_dir, FILTERS_A, "a")
    assert "the model is not loaded" in stderr
    assert manifest["counts"]["input"] == first["counts"]["input"]
    assert manifest["counts"]["failed"] == first["counts"]["failed"]
    assert [f["name"] for f in manifest["counts"]["filters"]] == [
        "caption",
        "image_size",
        "any(clip_score, not(text_entities))",
    ]
    assert manifest["model"]["checkpoint_sha256"] == first["model"]["checkpoint_sha256"]

    # Scores in the new subset are the cached ones, not recomputed.
    cached = {r["uid"]: r["clip_score"] for r in cached_rows(scored_sample)}
    rerun = pq.read_table(rerun_dir / "subset").select(["uid", "clip_score"]).to_pylist()
    assert rerun and all(r["clip_score"] == cached[r["uid"]] for r in rerun)

    # And again with other settings, in the same directory.
    manifest_b, _ = run_filters(tmp_path, rerun_dir, FILTERS_B, "b")
    assert [f["name"] for f in manifest_b["counts"]["filters"]] == ["clip_score", "language"]
    assert manifest_b["counts"]["kept"] != manifest["counts"]["kept"]


@pytest.mark.slow
def test_the_monkeypatches_bite(tmp_path, no_model_no_images):
    """Without a cache the same run must score, and so hits the forbidden model loader."""
    cfg = write_config(tmp_path / "cold.yaml", filters=FILTERS_A, output={"dir": str(tmp_path / "cold")})
    code, _, stderr = run_cli("run", cfg, "--quiet")
    assert code == 1 and "a filter-only rerun" in stderr


def test_sample_basic_preset_exists():
    assert (REPO / "configs" / "sample_basic.yaml").is_file()
