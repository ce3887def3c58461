"""A failed rerun never leaves outputs that disagree with a manifest (issue 14, finding
10): the manifest is removed before any output is written and written last, listing
every output file; readers check the files against it."""

from __future__ import annotations

import errno
import json
import shutil
import tarfile

import numpy as np
import pytest

from tests.conftest import run_cli, write_config

pytestmark = pytest.mark.slow  # every test runs the pipeline


def config(tmp_path, out, **output):
    return write_config(tmp_path / f"{out.name}.yaml", output={"dir": str(out), **output})


def good_run(cfg, out) -> dict:
    code, _, err = run_cli("run", cfg, "--quiet")
    assert code == 0, err
    return json.loads((out / "manifest.json").read_text())


def assert_no_result(out, err):
    lines = err.strip().splitlines()
    assert lines[-1].startswith("poolsift: error: cannot write "), err
    assert lines[-1].endswith("No space left on device (errno 28)"), err
    assert not (out / "manifest.json").exists(), "an old manifest beside new outputs"
    code, _, err = run_cli("report", out)
    assert code == 2
    assert err.strip() == (
        f"poolsift: error: {out}: no manifest.json (not a poolsift output directory, or its last run did not finish)"
    )


def test_the_manifest_lists_every_output_file(tmp_path, rerun_dir):
    out = rerun_dir
    manifest = good_run(config(tmp_path, out, webdataset=True, samples_per_shard=100), out)
    on_disk = sorted(str(p.relative_to(out)) for sub in ("subset", "dropped", "shards") for p in (out / sub).iterdir())
    assert sorted(manifest["files"]) == sorted([*on_disk, "subset.npy"])
    for rel, record in manifest["files"].items():
        assert record["size"] == (out / rel).stat().st_size
        assert ("sha256" in record) == (not rel.startswith("shards/"))
    assert run_cli("report", out)[0] == 0


def test_disk_full_writing_subset_npy_on_a_rerun(tmp_path, rerun_dir, monkeypatch):
    out = rerun_dir
    cfg = config(tmp_path, out, report=True)
    good_run(cfg, out)
    assert (out / "report.html").is_file()
    import filtering.writers.uids as uids

    def full(f, arr, *a, **k):
        f.write(b"\x93NUMPY" + b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(uids.np, "save", full)
    code, _, err = run_cli("run", cfg, "--quiet", "--set", "filters[0].clip_score.min=0.3")
    assert code == 1
    assert_no_result(out, err)
    assert not (out / "report.html").exists(), "the old run's report beside the new outputs"


def test_disk_full_while_resharding_on_a_rerun(tmp_path, rerun_dir, monkeypatch):
    out = rerun_dir
    cfg = config(tmp_path, out, webdataset=True, samples_per_shard=40)
    good_run(cfg, out)
    calls = {"n": 0}
    real = tarfile.TarFile.addfile

    def addfile(self, tarinfo, fileobj=None, *a, **k):
        calls["n"] += 1
        if calls["n"] > 100:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tarinfo, fileobj, *a, **k)

    monkeypatch.setattr(tarfile.TarFile, "addfile", addfile)
    code, _, err = run_cli("run", cfg, "--quiet", "--set", "filters[0].clip_score.min=0.3")
    assert code == 1
    assert_no_result(out, err)
    monkeypatch.undo()
    manifest = good_run(cfg, out)  # the next run commits again
    assert run_cli("report", out)[0] == 0
    assert manifest["counts"]["kept"] == len(np.load(out / "subset.npy"))


def test_readers_refuse_files_that_disagree_with_the_manifest(tmp_path, rerun_dir):
    out = rerun_dir
    cfg = config(tmp_path, out)
    good_run(cfg, out)
    other = tmp_path / "other"
    shutil.copytree(out, other)
    code, _, err = run_cli("run", config(tmp_path, other), "--quiet", "--set", "filters[0].clip_score.min=0.3")
    assert code == 0, err

    shutil.copy(other / "subset.npy", out / "subset.npy")  # another run's subset beside this manifest
    code, _, err = run_cli("report", out)
    assert code == 1
    assert err.strip().startswith(f"poolsift: error: {out}/subset.npy: ")
    assert "manifest.json says" in err and len(err.strip().splitlines()) == 1

    good_run(cfg, out)
    (out / "subset" / "part-00007.parquet").write_bytes((out / "subset" / "part-00000.parquet").read_bytes())
    code, _, err = run_cli("report", out)
    assert code == 1
    assert err.strip() == (
        f"poolsift: error: {out}/subset/part-00007.parquet: not listed in manifest.json; "
        "the folder was changed after its run, or a later run did not finish; rerun poolsift run"
    )


@pytest.mark.parametrize("missing", ["subset.npy", "subset/part-00000.parquet"])
def test_a_missing_output_is_named(tmp_path, rerun_dir, missing):
    out = rerun_dir
    good_run(config(tmp_path, out), out)
    (out / missing).unlink()
    code, _, err = run_cli("report", out)
    assert code == 1
    assert err.strip().startswith(f"poolsift: error: {out}/{missing}: listed in manifest.json but missing")
