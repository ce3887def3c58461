"""The report takes what depends on the input kind from the manifest's ``source`` record
(written by the source stage), and the score cache it names, never a guess."""

import os

import pyarrow as pa
import pyarrow.parquet as pq

from filtering.io.paths import shard_id
from filtering.report.data import score_field, score_sources, source_record


def _cache(out, name, url, mtime):
    d = out / "cache" / name
    d.mkdir(parents=True)
    path = d / f"{shard_id(url)}.parquet"
    pq.write_table(pa.table({"uid": ["a"], "clip_score": [0.3]}), path)
    os.utime(path, (mtime, mtime))
    return str(path)


def test_score_cache_named_by_the_manifest_wins_over_a_newer_one(tmp_path):
    url = str(tmp_path / "00000.tar")
    ours = _cache(tmp_path, "score-aaaa", url, 1_000)
    newer = _cache(tmp_path, "score-bbbb", url, 2_000)  # another model's cache, written later
    manifest = {
        "input_kind": "webdataset",
        "inputs": [{"path": url}],
        "source": {
            "kind": "webdataset",
            "score_field": "clip_score",
            "caption_column": "caption",
            "images": True,
            "score_cache": "cache/score-aaaa",
        },
    }
    assert score_sources(str(tmp_path), manifest, "clip_score") == [ours]
    legacy = {k: v for k, v in manifest.items() if k != "source"}  # written before the record existed
    assert score_sources(str(tmp_path), legacy, "clip_score") == [newer]


def test_manifests_without_a_source_record_get_their_kinds():
    dc = source_record({"input_kind": "datacomp"})
    assert (dc["caption_column"], dc["images"], dc["score_field"]) == ("text", False, "clip_l14_similarity_score")
    assert (
        score_field({"input_kind": "datacomp", "config": {"filters": [{"clip_score": {"top_fraction": 0.3}}]}})
        == "clip_l14_similarity_score"
    )
    assert source_record({"input_kind": "webdataset"})["images"] is True
