"""A rerun never loses the last good result, and the manifest always matches the files
beside it (issue 14, finding 10; issue 23, finding 3): the new result is written beside
the old one and switched into place whole (filtering/writers/commit.py); a rerun that
fails at any output step leaves the old result byte for byte and says so in one line;
readers check the files against the manifest."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from filtering.writers import commit
from tests.conftest import run_cli, write_config
from tests.datacomp_pool import make_datacomp_pool

pytestmark = pytest.mark.slow  # every test runs the pipeline


def config(tmp_path, out, **output):
    return write_config(tmp_path / f"{out.name}.yaml", output={"dir": str(out), **output})


def good_run(cfg, out) -> dict:
    code, _, err = run_cli("run", cfg, "--quiet")
    assert code == 0, err
    return json.loads((out / "manifest.json").read_text())


def test_the_manifest_lists_every_output_file(tmp_path, rerun_dir):
    out = rerun_dir
    manifest = good_run(config(tmp_path, out, webdataset=True, samples_per_shard=100), out)
    on_disk = sorted(
        str(p.relative_to(out)) for sub in ("subset", "dropped", "shards", "index") for p in (out / sub).iterdir()
    )
    assert sorted(manifest["files"]) == sorted([*on_disk, "subset.npy"])
    for rel, record in manifest["files"].items():
        assert record["size"] == (out / rel).stat().st_size
        assert ("sha256" in record) == (not rel.startswith("shards/"))
    assert run_cli("report", out)[0] == 0


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


# Each output step, by the names of the files it writes (their temporary names included;
# the streaming plan writes parts under its spill folder first).
STEPS = {
    "subset parts": r"/subset/(\d+/)?[^/]*part-\d+\.parquet$",
    "dropped parts": r"/dropped/(\d+/)?[^/]*part-\d+\.parquet$",
    "shards": r"/shards/(\d+/)?[^/]*\d+\.tar$",
    "subset.npy": r"subset\.npy$",
    "report": r"report\.html$",
    "manifest": r"manifest\.json$",
}


class _FullDisk:
    """A file that takes half of the first write, then says the disk is full."""

    def __init__(self, f):
        self._f = f

    def write(self, data) -> int:
        self._f.write(bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def disk_full_at(monkeypatch, step: str) -> None:
    """Every file of ``step`` fails to write with ENOSPC: the atomic writes (parts, tars,
    subset.npy, report, manifest) and the streaming plan's memory-mapped subset.npy."""
    import filtering.io.atomic as atomic

    pattern = re.compile(STEPS[step])

    def full_open(path, mode="r", *a, **k):
        f = open(path, mode, *a, **k)  # noqa: SIM115 — the caller closes it
        return _FullDisk(f) if "w" in mode and pattern.search(str(path)) else f

    real_memmap = np.lib.format.open_memmap

    def full_memmap(path, mode="r+", *a, **k):
        if "w" in mode and pattern.search(str(path)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_memmap(path, mode, *a, **k)

    monkeypatch.setattr(atomic, "open", full_open, raising=False)
    monkeypatch.setattr(np.lib.format, "open_memmap", full_memmap)


class _InProcessTasks:
    """The streaming plan's task pool run in this process, so the injected faults reach the
    tasks that write the parts."""

    workers = 2

    def map(self, fn, args):
        return [fn(a) for a in args]

    def submit(self, fn, *args):
        import concurrent.futures as cf

        future: cf.Future = cf.Future()
        future.set_result(fn(*args))
        return future


def snapshot(out: Path) -> dict[str, str]:
    """Every file and folder under ``out`` but the cache and the lock, with its sha256."""
    found = {}
    for d, dirs, names in os.walk(out):
        rel = Path(d).relative_to(out).as_posix()
        if rel == "cache":
            dirs.clear()
            continue
        for n in names:
            p = Path(d) / n
            key = p.relative_to(out).as_posix()
            if key != ".poolsift.lock":
                found[key] = hashlib.sha256(p.read_bytes()).hexdigest()
        found.update({(Path(d) / n).relative_to(out).as_posix() + "/": "folder" for n in dirs if n != "cache"})
    return found


def assert_whole(out: Path) -> dict:
    """The folder holds one result: its manifest lists exactly the files beside it, with
    their sizes and hashes."""
    manifest = json.loads((out / "manifest.json").read_text())
    hashed = tuple(rel for rel, record in manifest["files"].items() if "sha256" in record)
    commit.verify(str(out), manifest, hashes=hashed)
    outputs = {rel for rel in snapshot(out) if not rel.endswith("/")} - {"manifest.json", "report.html"}
    assert outputs == set(manifest["files"]), "files beside the manifest that it does not list"
    return manifest


def _rerun_fails_at_each_step(out: Path, steps, run, monkeypatch) -> None:
    before = snapshot(out)
    for step in steps:
        with monkeypatch.context() as m:
            disk_full_at(m, step)
            code, err = run()
        lines = err.strip().splitlines()
        assert code == 1, (step, err)
        assert lines[-1].startswith("poolsift: error: cannot write "), (step, err)
        assert lines[-1].endswith("No space left on device (errno 28)"), (step, err)
        assert lines.count(f"poolsift: the previous result in {out} is kept as it was") == 1, (step, err)
        assert snapshot(out) == before, f"{step}: the previous result changed"
        assert_whole(out)


def test_a_rerun_that_fails_at_any_output_step_keeps_the_last_result(tmp_path, rerun_dir, monkeypatch):
    """The shard plan on the bundled sample, resharding and the report on: each task writes
    its source shard's parts and tars into the spill folder, the driver renames them into
    place (the tasks run in this process, so the injected faults reach them)."""
    import pipelines.executors.streaming as streaming

    out = rerun_dir
    monkeypatch.setattr(streaming, "task_pool", lambda *_a: contextlib.nullcontext(_InProcessTasks()))
    full = {"webdataset": True, "samples_per_shard": 30, "rows_per_part": 40, "report": True}
    good_run(config(tmp_path, out, **full), out)
    first = assert_whole(out)
    assert first["execution"]["plan"] == "streaming" and len(first["shards"]) > 4
    assert {"subset/", "dropped/", "shards/", "report.html"} <= set(snapshot(out))

    cfg = config(tmp_path, out, **full)
    other = ("--set", "filters[0].clip_score.min=0.3")  # other kept rows: other parts and shards

    def rerun():
        code, _, err = run_cli("run", cfg, "--quiet", *other)
        return code, err

    _rerun_fails_at_each_step(out, list(STEPS), rerun, monkeypatch)
    assert not (out / streaming.SPILL).exists()

    # a clean rerun commits, and nothing of the old result stays: no shards, dropped rows nor report
    lean = config(tmp_path, out, dropped=False, rows_per_part=40)
    code, _, err = run_cli("run", lean, "--quiet", *other)
    assert code == 0, err
    assert "previous result" not in err
    manifest = assert_whole(out)
    assert manifest["files"]["subset.npy"]["sha256"] != first["files"]["subset.npy"]["sha256"]
    assert not (out / "shards").exists() and not (out / "dropped").exists() and not (out / "report.html").exists()
    assert sorted(os.listdir(out)) == [".poolsift.lock", "cache", "index", "manifest.json", "subset", "subset.npy"]


def _datacomp_config(tmp_path: Path, metadata: Path, out: Path, fraction: float, **output) -> Path:
    path = tmp_path / f"dc-{fraction}-{len(output)}.yaml"
    raw = {
        "input": {"datacomp_metadata": str(metadata)},
        "filters": [{"clip_score": {"top_fraction": fraction}}],
        "output": {"dir": str(out), "rows_per_part": 25, **output},
    }
    path.write_text(json.dumps(raw))
    return path


def test_a_streaming_rerun_that_fails_at_any_output_step_keeps_the_last_result(tmp_path, monkeypatch):
    """The streaming plan on a DataComp pool (it writes no shards and no report)."""
    import pipelines.executors.streaming as streaming

    metadata = make_datacomp_pool(tmp_path / "metadata", shards=3, rows=60)
    out = tmp_path / "out"
    monkeypatch.setattr(streaming, "task_pool", lambda *_a: contextlib.nullcontext(_InProcessTasks()))
    first = good_run(_datacomp_config(tmp_path, metadata, out, 0.6), out)
    assert first["execution"]["plan"] == "streaming"
    assert len(first["files"]) > 6

    cfg = _datacomp_config(tmp_path, metadata, out, 0.3)

    def rerun():
        code, _, err = run_cli("run", cfg, "--quiet")
        return code, err

    _rerun_fails_at_each_step(out, ["subset parts", "dropped parts", "subset.npy", "manifest"], rerun, monkeypatch)

    code, _, err = run_cli("run", _datacomp_config(tmp_path, metadata, out, 0.3, dropped=False), "--quiet")
    assert code == 0, err
    manifest = assert_whole(out)
    assert manifest["execution"]["plan"] == "streaming"
    assert manifest["counts"]["kept"] < first["counts"]["kept"]
    assert not (out / "dropped").exists()
    assert len(list((out / "subset").iterdir())) < len([f for f in first["files"] if f.startswith("subset/")])


def test_a_switch_left_half_done_is_finished_at_the_next_start(tmp_path, monkeypatch):
    """A run killed in the middle of its switch (here: after three of its renames, with
    nothing after them run) is rolled forward when the next run starts."""
    import pipelines.executors.streaming as streaming

    metadata = make_datacomp_pool(tmp_path / "metadata", shards=3, rows=60)
    out = tmp_path / "out"
    monkeypatch.setattr(streaming, "task_pool", lambda *_a: contextlib.nullcontext(_InProcessTasks()))
    good_run(_datacomp_config(tmp_path, metadata, out, 0.6), out)
    cfg = _datacomp_config(tmp_path, metadata, out, 0.3, dropped=False)

    class Killed(BaseException):
        pass

    moves = []
    real_move = commit._move

    def move(src, dst):
        if len(moves) == 3:
            raise Killed
        moves.append(src)
        real_move(src, dst)

    with monkeypatch.context() as m:
        m.setattr(commit, "_move", move)
        m.setattr(commit, "recover", lambda *_a: None)  # a killed run cleans nothing up
        with pytest.raises(Killed):
            run_cli("run", cfg, "--quiet")
    assert (out / commit.JOURNAL).is_file() and not (out / "manifest.json").exists()
    code, _, err = run_cli("report", out)
    assert code == 2 and "no manifest.json" in err

    code, _, err = run_cli("run", cfg, "--quiet")
    assert code == 0, err
    assert f"poolsift: finished switching {out} to the result a killed run had committed" in err.splitlines()
    manifest = assert_whole(out)
    assert not (out / "dropped").exists()
    assert not any(n.startswith(".poolsift-") for n in os.listdir(out))
    assert manifest["counts"]["kept"] == len(np.load(out / "subset.npy"))
