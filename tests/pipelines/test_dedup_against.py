"""``dedup: {against: [...]}`` end to end (issue 25): a second pool holding exact and near
copies of rows a first run kept, and clean rows. Every planted copy is dropped as
``duplicate_of_reference`` naming the reference row it copies, no clean row is dropped, on
DataComp-metadata input (both plans, identical outputs) and on WebDataset input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from filtering.sample.datacomp import make_datacomp_sample
from pipelines.config import parse_config
from pipelines.runner import run
from tests.against_pools import datacomp_second_pool, kept_rows, webdataset_second_pool
from tests.conftest import REPO
from tests.pipelines.test_streaming import assert_same_outputs

pytestmark = pytest.mark.slow  # runs the whole pipeline


def dropped(out: Path) -> dict[str, tuple[str, str]]:
    t = pa.concat_tables([pq.read_table(p) for p in sorted((out / "dropped").glob("part-*.parquet"))])
    return {
        u: (r, d)
        for u, r, d in zip(t["uid"].to_pylist(), t["reason"].to_pylist(), t["duplicate_of"].to_pylist(), strict=True)
    }


def check_planted(out: Path, truth: dict, kinds: tuple[str, ...]) -> None:
    got = dropped(out)
    for kind in kinds:
        want = list(zip(truth[f"{kind}_uid"], truth[f"{kind}_of"], strict=True))
        hit = sum(got.get(u) == ("duplicate_of_reference", of) for u, of in want)
        assert hit >= 0.99 * len(want), (kind, hit, len(want))
    assert not set(truth["clean_uid"]) & set(got), "a clean row was dropped"


@pytest.fixture(scope="module")
def datacomp_first(tmp_path_factory):
    root = tmp_path_factory.mktemp("against-dc")
    make_datacomp_sample(root / "pool1", rows=1200, shards=3, phash=True)
    out = root / "out1"
    cfg = {
        "input": {"datacomp_metadata": str(root / "pool1")},
        "filters": [{"dedup": {"method": "exact"}}],
        "output": {"dir": str(out)},
    }
    run(parse_config(cfg), progress=False, log=lambda _m: None)
    return root, out


@pytest.mark.parametrize("method", ["exact", "perceptual"])
def test_datacomp_planted_copies_on_both_plans(tmp_path, datacomp_first, method):
    root, out1 = datacomp_first
    truth = datacomp_second_pool(tmp_path / "pool2", kept_rows(out1), exact=40, near=40, clean=200)
    filters = [{"dedup": {"method": method, "against": [str(out1)]}}]
    m = assert_same_outputs(tmp_path / "pool2", tmp_path, filters, search_record=False)
    check_planted(tmp_path / "run", truth, ("exact", "near") if method == "perceptual" else ("exact",))
    if method == "exact":  # near copies have other bytes
        assert not set(truth["near_uid"]) & set(dropped(tmp_path / "run"))
    step = m["counts"]["filters"][0]
    assert step["reasons"] == {"duplicate_of_reference": 80 if method == "perceptual" else 40}
    stages = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]  # m's dedup records were compared
    (record,) = [r for k, r in stages["dedup"].items() if k.startswith("dedup_ref_")]
    assert record["against"][0]["path"] == str(out1) and record["against"][0]["matched"] == step["dropped"]


def test_an_output_without_an_index_gets_one_built_with_a_line(tmp_path, datacomp_first):
    _, out1 = datacomp_first
    old = tmp_path / "old"
    shutil.copytree(out1, old)
    shutil.rmtree(old / "index")
    truth = datacomp_second_pool(tmp_path / "pool2", kept_rows(out1), exact=20, near=0, clean=50)
    lines: list[str] = []
    cfg = {
        "input": {"datacomp_metadata": str(tmp_path / "pool2")},
        "filters": [{"dedup": {"method": "exact", "against": [str(old)]}}],
        "output": {"dir": str(tmp_path / "out2")},
    }
    run(parse_config(cfg), progress=False, log=lines.append)
    assert len([line for line in lines if "has no index" in line]) == 1
    check_planted(tmp_path / "out2", truth, ("exact",))


def test_webdataset_planted_copies(tmp_path_factory):
    root = tmp_path_factory.mktemp("against-wds")
    model = {
        "arch": "poolsift-tiny",
        "pretrained": str(REPO / "sample_data" / "tiny_clip" / "poolsift-tiny.safetensors"),
    }
    first = {
        "input": {"shards": str(REPO / "sample_data" / "pool" / "{00000..00001}.tar")},
        "model": model,
        "filters": [{"dedup": {"method": "perceptual"}}],
        "output": {"dir": str(root / "out1")},
    }
    run(parse_config(first), progress=False, log=lambda _m: None)
    index = json.loads((root / "out1" / "index" / "index.json").read_text())
    assert index["rows"] == json.loads((root / "out1" / "manifest.json").read_text())["counts"]["kept"]
    truth = webdataset_second_pool(root / "pool2" / "00000.tar", root / "out1", exact=20, near=20, clean=20)
    second = {
        "input": {"shards": str(root / "pool2" / "00000.tar")},
        "model": model,
        "filters": [{"dedup": {"method": "perceptual", "against": [str(root / "out1")]}}],
        "output": {"dir": str(root / "out2")},
    }
    run(parse_config(second), progress=False, log=lambda _m: None)
    check_planted(root / "out2", truth, ("exact", "near"))


def test_decontaminate_against_an_earlier_output(tmp_path, datacomp_first):
    """``decontaminate: {reference: DIR}`` with an earlier output: its kept rows' hashes from
    its index; copies dropped as contaminated, ``duplicate_of`` naming the reference row."""
    _, out1 = datacomp_first
    truth = datacomp_second_pool(tmp_path / "pool2", kept_rows(out1), exact=30, near=30, clean=100)
    filters = [{"decontaminate": {"reference": str(out1), "method": "perceptual", "max_distance": 6}}]
    m = assert_same_outputs(tmp_path / "pool2", tmp_path, filters, fresh_cache=True)
    assert m["counts"]["filters"][0]["reasons"] == {"contaminated_perceptual": 60}
    got = dropped(tmp_path / "run")
    for kind in ("exact", "near"):
        for uid, of in zip(truth[f"{kind}_uid"], truth[f"{kind}_of"], strict=True):
            assert got[uid] == ("contaminated_perceptual", of)
    assert not set(truth["clean_uid"]) & set(got)


def test_poolsift_index_builds_one_for_an_old_output(tmp_path, datacomp_first):
    """``poolsift index DIR``: an output written before indexes gets ``DIR/index/``, listed in
    its manifest (the folder still verifies); a second call finds it there."""
    from filtering.writers.commit import verify
    from tests.conftest import run_cli

    _, out1 = datacomp_first
    old = tmp_path / "old"
    shutil.copytree(out1, old)
    shutil.rmtree(old / "index")
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("index/")}
    manifest["outputs"].pop("index")
    (old / "manifest.json").write_text(json.dumps(manifest))
    code, out, err = run_cli("index", old)
    assert code == 0, err
    assert f"({manifest['counts']['kept']:,} kept rows)" in out
    after = json.loads((old / "manifest.json").read_text())
    assert "index/index.json" in after["files"] and "index/part-00000.arrow" in after["files"]
    verify(str(old), after)
    code, out, _ = run_cli("index", old)
    assert code == 0 and "already there" in out
    code, _, err = run_cli("index", tmp_path / "nothing")
    assert code == 2 and "no manifest.json" in err
