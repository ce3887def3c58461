"""The streaming plan (pipelines/executors/streaming.py) against the in-memory path on
DataComp-format pools: subset.npy and every subset and dropped part byte for byte,
the manifest's counts, thresholds and uid report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from filtering.errors import ConfigError
from pipelines.config import parse_config
from pipelines.runner import _json_default, run
from tests.datacomp_pool import make_datacomp_pool, repeat_uid, set_nan_scores

pytestmark = pytest.mark.slow  # runs the whole pipeline

B32, L14 = "clip_b32_similarity_score", "clip_l14_similarity_score"


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
    return make_datacomp_pool(tmp_path_factory.mktemp("dc") / "metadata", shards=4, rows=90)


@pytest.fixture(scope="module")
def nan_metadata(tmp_path_factory):
    root = make_datacomp_pool(tmp_path_factory.mktemp("dcnan") / "metadata", shards=3, rows=80, seed=3)
    set_nan_scores(root, L14, 0.2)
    set_nan_scores(root, B32, 0.5, seed=2)
    return root


def _run(metadata: Path, out: Path, filters, mode: str, **output):
    raw = {
        "input": {"datacomp_metadata": str(metadata)},
        "filters": filters,
        "output": {"dir": str(out), **output},
        "execution": {"mode": mode},
    }
    return run(parse_config(raw), progress=False, log=lambda _m: None)


def _table(folder: Path) -> pa.Table:
    parts = sorted(folder.glob("part-*.parquet"))
    assert parts
    return pa.concat_tables([pq.read_table(p) for p in parts]).replace_schema_metadata(None)


def assert_tables_equal(ta: pa.Table, tb: pa.Table) -> None:
    """Same rows in the same order; NaN equals NaN (``Table.equals`` says it does not)."""
    assert ta.num_rows == tb.num_rows
    for name in ta.column_names:
        a, b = ta.column(name), tb.column(name)
        assert a.null_count == b.null_count, name
        if pa.types.is_floating(a.type):
            np.testing.assert_array_equal(a.to_numpy(), b.to_numpy(), err_msg=name)
        else:
            assert a.to_pylist() == b.to_pylist(), name


def assert_same_outputs(metadata: Path, tmp_path: Path, filters, **output) -> dict:
    """Both plans into the same folder (the config, output.dir included, is the same); the
    in-memory run's outputs are copied aside first."""
    a, b = tmp_path / "memory", tmp_path / "run"
    mem = _run(metadata, b, filters, "memory", **output)
    shutil.copytree(b, a)
    streamed = _run(metadata, b, filters, "streaming", **output)
    assert streamed.pool is None and mem.pool is not None  # the plan that ran
    assert streamed.manifest["execution"]["plan"] == "streaming"
    assert not (b / ".streaming").exists()
    assert (a / "subset.npy").read_bytes() == (b / "subset.npy").read_bytes()
    for folder in ("subset", "dropped"):  # the same parts, byte for byte
        names = sorted(p.name for p in (a / folder).glob("part-*.parquet"))
        assert names == sorted(p.name for p in (b / folder).glob("part-*.parquet")), folder
        assert all((a / folder / n).read_bytes() == (b / folder / n).read_bytes() for n in names), folder
    for folder in ("subset", "dropped"):
        if (a / folder).exists():
            ta, tb = _table(a / folder), _table(b / folder)
            assert ta.schema == tb.schema
            assert_tables_equal(ta, tb)
    for key in (
        "counts",
        "thresholds",
        "uids",
        "stages",
        "inputs",
        "config",
        "config_sha256",
        "language_identifiers",
        "model",
    ):
        assert json.dumps(mem.manifest[key], default=_json_default) == json.dumps(
            streamed.manifest[key], default=_json_default
        ), key
    # the parquet metadata (provenance) is the same too
    pa_meta = pq.read_schema(sorted((a / "subset").glob("part-*"))[0]).metadata
    pb_meta = pq.read_schema(sorted((b / "subset").glob("part-*"))[0]).metadata
    assert pa_meta == pb_meta
    return streamed.manifest


@pytest.mark.parametrize("fraction", [0.3, 0.5, 1.0, 0.0])
def test_top_fraction_with_ties(tmp_path, metadata, fraction):
    m = assert_same_outputs(metadata, tmp_path, [{"clip_score": {"top_fraction": fraction}}])
    assert m["counts"]["kept"] > int(m["counts"]["input"] * fraction) or fraction == 1.0  # ties kept


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.95])
@pytest.mark.parametrize("field", [B32, L14])
def test_top_fraction_with_nan_scores(tmp_path, nan_metadata, field, fraction):
    """NaN rows count in N and are never kept; past the scored rows the threshold is NaN (nothing kept)."""
    m = assert_same_outputs(nan_metadata, tmp_path, [{"clip_score": {"top_fraction": fraction, "field": field}}])
    reasons = m["counts"]["filters"][0]["reasons"]
    assert reasons["clip_score_missing"] > 0
    if field == B32 and fraction == 0.95:
        assert m["counts"]["kept"] == 0


def test_min_and_row_local_chain(tmp_path, metadata):
    filters = [
        {"caption": {"min_words": 3}},
        {"image_size": {"min_side": 200, "max_aspect_ratio": 3}},
        {"clip_score": {"min": 0.25, "field": B32}},
        {"clip_score": {"top_fraction": 0.4}},  # after other filters: N is still the whole pool
    ]
    m = assert_same_outputs(metadata, tmp_path, filters, rows_per_part=5)
    assert [f["name"] for f in m["counts"]["filters"]][0] == "caption"
    assert len(m["outputs"]["dropped"]) > 4  # parts that span shards, cut where the in-memory writer cuts


def test_any_not_composition(tmp_path, metadata):
    filters = [
        {"any": [{"caption": {"min_words": 4}}, {"not": {"image_size": {"min_side": 500}}}]},
        {"all": [{"clip_score": {"top_fraction": 0.5}}, {"score": {"column": B32, "min": 0.15, "max": 0.38}}]},
    ]
    assert_same_outputs(metadata, tmp_path, filters)


def test_without_dropped_and_nothing_kept(tmp_path, metadata):
    assert_same_outputs(metadata, tmp_path, [{"clip_score": {"min": 5.0}}], dropped=False)


def test_repeated_uid_falls_back_to_memory(tmp_path):
    root = make_datacomp_pool(tmp_path / "metadata", shards=2, rows=40)
    uid = repeat_uid(root)
    raw = {
        "input": {"datacomp_metadata": str(root), "uid": {"duplicates": "keep_first"}},
        "filters": [{"clip_score": {"top_fraction": 0.5}}],
        "output": {"dir": str(tmp_path / "out")},
    }
    result = run(parse_config(raw), progress=False, log=lambda _m: None)
    assert result.pool is not None  # the in-memory path ran, and reported the copy
    assert result.manifest["uids"]["duplicates"]["rows"] == 1
    assert uid in json.dumps(result.manifest["uids"])


def test_auto_streams_only_row_local_trees(tmp_path, metadata):
    raw = {
        "input": {"datacomp_metadata": str(metadata)},
        "filters": [{"clip_score": {"top_fraction": 0.3}}],
        "output": {"dir": str(tmp_path / "a")},
    }
    assert run(parse_config(raw), progress=False, log=lambda _m: None).pool is None
    raw["filters"] = [{"score": {"column": B32, "top_fraction": 0.3}}]
    raw["output"]["dir"] = str(tmp_path / "b")
    assert run(parse_config(raw), progress=False, log=lambda _m: None).pool is not None
    raw["execution"] = {"mode": "streaming"}
    with pytest.raises(ConfigError, match="execution.mode"):
        run(parse_config(raw), progress=False, log=lambda _m: None)


def test_execution_is_not_part_of_the_config_identity(metadata):
    raw = {"input": {"datacomp_metadata": str(metadata)}, "filters": []}
    a = parse_config(raw)
    b = parse_config({**raw, "execution": {"mode": "memory"}})
    assert a.sha256() == b.sha256()


def test_top_fraction_refined_bin_by_bin(tmp_path, nan_metadata, monkeypatch):
    """The threshold's bin narrowed by further passes over the shards (forced: at most 2 scores gathered)."""
    from pipelines.executors import streaming

    monkeypatch.setattr(streaming, "GATHER_LIMIT", 2)
    assert_same_outputs(nan_metadata, tmp_path, [{"clip_score": {"top_fraction": 0.4}}])
