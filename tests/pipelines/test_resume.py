"""A run killed with SIGKILL mid-scoring resumes from its finished shards (issue 7).

The rerun's outputs must be byte-identical to an uninterrupted run with the same
command: subset parts, subset.npy, dropped parts and the cache; the manifest differs
only in ``created_at``; no sample is lost or counted twice.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from filtering.cache import ShardCache
from tests.conftest import REPO, run_cli, write_config

N_SHARDS = 4


def _done_shards(out):
    """Complete shard results: the rows' table is written last (after every scorer's piece),
    atomically, so it marks completion."""
    return [p for p in out.glob("cache/source-*/*.parquet") if not p.name.startswith(".tmp-")]


def _kill_mid_scoring(cfg, out, timeout=300):
    """Start ``poolsift run`` and SIGKILL it (and its decode workers) once 1..N-1 shards are done."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "run", str(cfg), "--quiet"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    try:
        while not _done_shards(out):
            assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()!r}"
            assert time.monotonic() < deadline, "no shard finished in time"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, as a crashed machine would
        proc.wait()
        proc.stderr.close()
    return len(_done_shards(out))


def _files(out):
    names = ["subset.npy"] + [f"{d}/{p.name}" for d in ("subset", "dropped") for p in sorted((out / d).glob("*"))]
    names += [str(p.relative_to(out)) for p in sorted(out.glob("cache/*/*"))]
    return {n: (out / n).read_bytes() for n in names}


@pytest.mark.slow
def test_sigkill_mid_scoring_then_rerun_gives_identical_output(tmp_path, scored_sample):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "sample.yaml", output={"dir": str(out)})

    done = _kill_mid_scoring(cfg, out)
    assert 1 <= done < N_SHARDS, f"killed after {done} of {N_SHARDS} shards"
    assert not (out / "manifest.json").exists()

    code, _, err = run_cli("run", cfg, "--quiet")  # the same command again
    assert code == 0, err
    assert f"scoring {N_SHARDS - done} of {N_SHARDS} shards ({done} cached)" in err
    assert not list(out.rglob(".tmp-*")), "a killed run's temporary files are cleaned up"
    resumed = out.rename(tmp_path / "resumed")

    # The uninterrupted run with the same command: the session's sample run is one, so its
    # cache is what scoring from scratch gives; writing from it is the rest of the run.
    shutil.copytree(scored_sample / "cache", out / "cache")
    code, _, err = run_cli("run", cfg, "--quiet")
    assert code == 0, err

    ours, ref = _files(resumed), _files(out)
    assert ours.keys() == ref.keys()
    for name in ref:
        assert ours[name] == ref[name], f"{name} differs after resuming"
    m_ours = json.loads((resumed / "manifest.json").read_text())
    m_ref = json.loads((out / "manifest.json").read_text())
    assert m_ours.pop("created_at") and m_ref.pop("created_at")
    assert m_ours.pop("execution").pop("seconds") and m_ref.pop("execution").pop("seconds")
    assert m_ours == m_ref

    subset = pq.read_table(resumed / "subset").column("uid").to_pylist()
    dropped = pq.read_table(resumed / "dropped").column("uid").to_pylist()
    assert len(set(subset)) == len(subset) and not set(subset) & set(dropped)
    assert len(subset) + len(dropped) == m_ours["counts"]["input"]


def test_a_partly_written_shard_result_is_not_taken_as_done(tmp_path):
    """Defence in depth behind the atomic writes: a truncated or foreign table is redone."""
    shard = tmp_path / "00000.tar"
    shard.write_bytes(b"x" * 10)
    cache = ShardCache(str(tmp_path / "cache"), "score", {"arch": "a"})
    table = pa.table({"uid": ["u"]})
    cache.write(str(shard), table, {})
    assert cache.is_done(str(shard))
    table_file = Path(cache.table_path(str(shard)))
    table_file.write_bytes(table_file.read_bytes()[: table_file.stat().st_size // 2])  # cut short
    assert not cache.is_done(str(shard))
    pq.write_table(table, table_file)  # complete, but without the source record
    assert not cache.is_done(str(shard))
    shard.write_bytes(b"y" * 11)  # the source changed since the result was written
    cache.write(str(shard), table, {})
    assert cache.is_done(str(shard))
    shard.write_bytes(b"z" * 12)
    assert not cache.is_done(str(shard))


def test_decode_failure_reasons_are_the_same_in_every_process():
    """A resumed or Ray run must write the same reasons: no object addresses in them."""
    from filtering.stages.image_decode import decode_image, reference_plan

    plan = reference_plan(lambda im: im)
    assert decode_image(b"not an image", plan.required, plan).error == "corrupt_image: cannot identify image file"
