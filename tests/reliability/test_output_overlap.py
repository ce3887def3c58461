"""A run never reads its own outputs back as shards (issue 14, finding 8): with
``input.shards: DIR/*`` and ``output.dir: DIR``, or a recursive glob over a folder that
holds the output, a rerun reads exactly the shards the first run read."""

from __future__ import annotations

import json
import shutil

import pytest

from filtering.errors import InputError
from filtering.io.paths import expand_shards, is_output_file
from tests.conftest import SAMPLE, run_cli, write_config


def run_twice(tmp_path, shards: str, out) -> list[dict]:
    cfg = write_config(
        tmp_path / "c.yaml",
        input={"shards": shards},
        output={"dir": str(out), "webdataset": True, "samples_per_shard": 50},
    )
    manifests = []
    for _ in range(2):
        code, _, err = run_cli("run", cfg, "--quiet")
        assert code == 0, err
        manifests.append(json.loads((out / "manifest.json").read_text()))
    return manifests


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["same_folder", "recursive_glob"])
def test_a_rerun_reads_the_same_shards(tmp_path, layout):
    data = tmp_path / "data"
    shutil.copytree(SAMPLE / "pool", data)
    if layout == "same_folder":
        shards, out = f"{data}/*", data
    else:
        shards, out = f"{tmp_path}/**/*.tar", tmp_path / "runs" / "one"
    first, second = run_twice(tmp_path, shards, out)
    paths = [i["path"] for i in first["inputs"]]
    assert paths == sorted(str(p) for p in data.glob("*.tar"))
    assert [i["path"] for i in second["inputs"]] == paths
    assert second["counts"] == first["counts"]
    assert (out / "shards" / "00000.tar").is_file()  # the outputs were there to be misread


def test_output_files_are_recognised(tmp_path):
    out = str(tmp_path / "out")
    for inside in [
        "manifest.json",
        "subset.npy",
        ".poolsift.lock",
        "subset/part-00000.parquet",
        "shards/00000.tar",
        "cache/score/x.arrow",
        "dropped/part-00000.parquet",
        ".tmp-1234-subset.npy",
    ]:
        assert is_output_file(f"{out}/{inside}", out), inside
    for outside in ["00000.tar", "pool/00000.tar", "subsets/x.tar"]:
        assert not is_output_file(f"{out}/{outside}", out), outside
    assert not is_output_file(f"{tmp_path}/elsewhere/shards/0.tar", out)
    assert is_output_file("s3://b/run/shards/0.tar", "s3://b/run")
    assert not is_output_file("s3://b/run/0.tar", "s3://b/run")


def test_a_spec_that_names_only_outputs_says_so(tmp_path):
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "00000.tar").write_bytes(b"")
    with pytest.raises(InputError, match="matches only the outputs in output.dir"):
        expand_shards(f"{out}/shards/*.tar", output_dir=str(out))
