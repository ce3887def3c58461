"""Score caches of the layout before the per-scorer one (``DIR/cache/score-<fp>/``: one
table per shard holding the rows, ``phash`` and ``clip_score``, with the embeddings)
are never misread: the one this config wrote is reused (split into the new pieces, no
model loaded), any other is named in one line and the shards are scored again; both
give the outputs of a run from scratch."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from filtering.io.paths import shard_id
from tests.conftest import run_cli, write_config


def _old_layout_cache(out, scored_sample):
    """A ``score-*`` folder as the previous layout wrote it, scores deliberately wrong:
    reading it would change the subset."""
    old = out / "cache" / "score-0123456789abcdef"
    old.mkdir(parents=True)
    manifest = json.loads((scored_sample / "manifest.json").read_text())
    for url in (i["path"] for i in manifest["inputs"] if i["path"].endswith(".tar")):
        n = 250
        table = pa.table(
            {
                "uid": [f"{i:032x}" for i in range(n)],
                "key": [f"{i:09d}" for i in range(n)],
                "clip_score": pa.array(np.linspace(0.9, 1.0, n), pa.float32()),
                "error": pa.nulls(n, pa.string()),
            }
        )
        meta = {"source": {"size": 0}, "url": url, "spec": {"rows": 2}}
        pq.write_table(
            table.replace_schema_metadata({b"poolsift_cache": json.dumps(meta)}), old / f"{shard_id(url)}.parquet"
        )
        np.save(old / f"{shard_id(url)}.image.npy", np.zeros((n, 8), np.float16))
    return old


@pytest.mark.slow
def test_previous_layout_is_named_once_and_never_read(tmp_path, scored_sample):
    out = tmp_path / "run"
    old = _old_layout_cache(out, scored_sample)
    cfg = write_config(tmp_path / "sample.yaml", output={"dir": str(out)})
    code, _, err = run_cli("run", cfg, "--quiet")
    assert code == 0, err
    notes = [line for line in err.splitlines() if "previous cache layout" in line]
    assert len(notes) == 1 and "cache/score-0123456789abcdef" in notes[0], err
    assert "scoring 4 of 4 shards (0 cached)" in err
    assert (out / "subset.npy").read_bytes() == (scored_sample / "subset.npy").read_bytes()
    for folder in ("subset", "dropped"):
        ours = pq.read_table(out / folder).replace_schema_metadata(None)
        ref = pq.read_table(scored_sample / folder).replace_schema_metadata(None)
        assert ours.equals(ref), folder
    assert old.is_dir()  # left for the user to remove

    code, _, err = run_cli("run", cfg, "--quiet")  # everything cached now: no note, no scoring
    assert code == 0, err
    assert "previous cache layout" not in err and "the model is not loaded" in err


@pytest.mark.slow
def test_previous_layout_of_the_same_settings_is_reused_without_the_model(tmp_path, scored_sample, monkeypatch):
    """The previous layout's cache of this very config (built here from the run's pieces:
    rows with phash and clip_score in one table, the embeddings beside it) is split into
    the new pieces: no model, no image, the same outputs and the same new caches."""
    import filtering.models.clip as clip_models
    from filtering.cache import ShardCache
    from filtering.scorers.clip import model_spec
    from filtering.stages.img2dataset import source_stamp
    from pipelines.config import load_config
    from pipelines.runner import source_stage

    out = tmp_path / "run"
    cfg_path = write_config(tmp_path / "sample.yaml", output={"dir": str(out)})
    cfg = load_config(cfg_path)
    ref = source_stage(cfg, str(scored_sample / "cache"))
    old = ShardCache(str(out / "cache"), "score", {**model_spec(cfg.model), "rows": 2, "uid_field": "uid"})
    for url in ref.urls:
        arrays = {k: np.asarray(ref.scorer_cache(ref.clip).read_array(url, k)) for k in ("image", "text")}
        old.write(url, ref.read_shard(url), arrays, source=source_stamp(url))
    old.write_info(ref.scorer_cache(ref.clip).read_info())

    def no_model(*args, **kwargs):
        raise AssertionError("the previous layout's scores are reused: no model")

    monkeypatch.setattr(clip_models, "load_clip", no_model)
    code, _, err = run_cli("run", cfg_path, "--quiet")
    assert code == 0, err
    notes = [line for line in err.splitlines() if "previous cache layout" in line]
    assert len(notes) == 1 and f"4 shard(s) reused from cache/{old.dir.rsplit('/', 1)[-1]}" in notes[0], err
    assert "all 4 shards cached; the model is not loaded" in err
    assert (out / "subset.npy").read_bytes() == (scored_sample / "subset.npy").read_bytes()
    for folder in ("subset", "dropped"):
        ours = pq.read_table(out / folder).replace_schema_metadata(None)
        assert ours.equals(pq.read_table(scored_sample / folder).replace_schema_metadata(None)), folder
    ours = json.loads((out / "manifest.json").read_text())
    assert ours["model"] == json.loads((scored_sample / "manifest.json").read_text())["model"]
    for piece in (scored_sample / "cache").iterdir():  # the same pieces a run from scratch writes
        for path in sorted(piece.glob("*.parquet")):
            got = pq.read_table(out / "cache" / piece.name / path.name).replace_schema_metadata(None)
            assert got.equals(pq.read_table(path).replace_schema_metadata(None)), path
        for path in sorted(piece.glob("*.npy")):
            assert np.array_equal(np.load(out / "cache" / piece.name / path.name), np.load(path)), path
