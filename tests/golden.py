"""Recorded output digests: the oracle for tests of the shard plan.

A run's outputs are reduced to a digest that does not depend on part boundaries, Parquet
metadata or where the pool lies: ``subset.npy``'s sha256, the subset and dropped rows per
source shard in order, the manifest's counts, thresholds and uid report, and the index
files' sha256. ``check_recorded(out)`` compares the digest of the run in ``out`` with the
one recorded for the calling test in ``recorded_outputs.json`` (keyed by the test's node id).

The record was made from the in-memory plan (``execution.mode: memory``) of commit 1703399,
the plan these tests used to compare with, before it was removed. To record a test again::

    POOLSIFT_RECORD_OUTPUTS=/tmp/rec PYTHONPATH=$PWD python -m pytest tests/... -p no:randomly
    PYTHONPATH=$PWD python -m tests.golden --merge /tmp/rec

In record mode ``check_recorded`` runs the same config again on the in-memory plan when the
checkout still has one, checks that it gives the same digest, and records that digest;
without it, it records the run's own digest (say why in the commit).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

RECORDED = Path(__file__).with_name("recorded_outputs.json")
RECORD_ENV = "POOLSIFT_RECORD_OUTPUTS"


def _shard_label(source_shard: str) -> str:
    """``source_shard`` from the last folder named ``sample_data`` or ``pool`` on (the
    path is written as the run found it: absolute, or relative to its working folder)."""
    parts = Path(source_shard).parts
    marks = [i for i, p in enumerate(parts) if p in ("sample_data", "pool")]
    return "/".join(parts[marks[0] if "sample_data" in parts[marks[0]] else marks[-1] :]) if marks else parts[-1]


def _rows_digest(folder: Path) -> dict:
    """Per source shard: the row count and a sha256 over the rows in order; and one over all."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not parts:
        return {"rows": 0, "sha256": hashlib.sha256().hexdigest(), "shards": {}, "columns": []}
    table = pa.concat_tables([pq.read_table(p).replace_schema_metadata(None) for p in parts], promote_options="default")
    columns = table.column_names
    total, shards = hashlib.sha256(), {}
    for row in table.to_pylist():
        shard = row["source_shard"] = _shard_label(str(row.get("source_shard")))
        line = repr([(c, row[c]) for c in columns]).encode()
        total.update(line + b"\n")
        entry = shards.setdefault(shard, [0, hashlib.sha256()])
        entry[0] += 1
        entry[1].update(line + b"\n")
    return {
        "rows": table.num_rows,
        "sha256": total.hexdigest(),
        "columns": [f"{f.name}:{f.type}" for f in table.schema],
        "shards": {s: {"rows": n, "sha256": h.hexdigest()} for s, (n, h) in shards.items()},
    }


def digests(out: Path) -> dict:
    """The digests of the run in ``out``."""
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        "subset.npy": hashlib.sha256((out / "subset.npy").read_bytes()).hexdigest(),
        "subset": _rows_digest(out / "subset"),
        "dropped": _rows_digest(out / "dropped"),
        "counts": manifest["counts"],
        "thresholds": manifest.get("thresholds"),
        "cache": cache_folders(out),
    }


def cache_folders(out: Path) -> list[str]:
    """The per-shard cache folders whose names do not depend on where the inputs are
    (rows, uids, scorers): the same names now mean a cache the reference commit wrote is
    found and read, not scored again."""
    cache = out / "cache"
    names = sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []
    return [n for n in names if n.startswith(("source-", "uids-", "scorer-"))]


def pool_digest(pool: Path) -> dict[str, str]:
    """Per pool file, a sha256 of what it holds (rows; arrays), not of the writer's bytes."""
    import numpy as np
    import pyarrow.parquet as pq

    out = {}
    for path in sorted(pool.iterdir()):
        h = hashlib.sha256()
        if path.suffix == ".parquet":
            for row in pq.read_table(path).to_pylist():
                h.update(repr(row).encode())
        else:
            with np.load(path) as arrays:
                for name in sorted(arrays.files):
                    a = arrays[name]
                    h.update(f"{name}:{a.dtype.str}:{a.shape}".encode() + np.ascontiguousarray(a).tobytes())
        out[path.name] = h.hexdigest()
    return out


def _portable(value):
    """A manifest record with every absolute path reduced to its ``_shard_label``."""
    if isinstance(value, dict):
        return {_portable(k): _portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v) for v in value]
    if isinstance(value, str) and value.startswith("/"):
        return _shard_label(value)
    return value


def _short(rows: dict) -> dict:
    """``_rows_digest`` with each source shard as ``"ROWS SHA256[:16]"`` (records stay small)."""
    shards = {s: f"{e['rows']} {e['sha256'][:16]}" for s, e in rows["shards"].items()}
    return {"rows": rows["rows"], "sha256": rows["sha256"], "columns": rows["columns"], "shards": shards}


def outputs_digest(out: Path) -> dict:
    """The digest of the run in ``out`` that ``check_recorded`` compares."""
    out = Path(out)
    manifest = json.loads((out / "manifest.json").read_text())
    index, tars = out / "index", out / "shards"
    digest = {
        "subset.npy": hashlib.sha256((out / "subset.npy").read_bytes()).hexdigest(),
        "subset": _short(_rows_digest(out / "subset")),
        "dropped": _short(_rows_digest(out / "dropped")),
        "counts": manifest["counts"],
        "thresholds": manifest.get("thresholds"),
        "uids": _portable(manifest.get("uids")),
        "index": {  # the index's parts; index.json describes them and names the pool's paths
            p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(index.iterdir())
            if p.name != "index.json"
        }
        if index.is_dir()
        else {},
    }
    if manifest.get("failures"):  # the failed rows listed (WebDataset pools)
        digest["failures"] = _portable([manifest["failures"], manifest.get("failures_truncated")])
    if tars.is_dir():  # output.webdataset: the resharded tars, byte for byte, and their record
        digest["tars"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tars.iterdir())}
        digest["tars_record"] = _portable(manifest.get("shards"))
    return digest


def _key(suffix: str) -> str:
    """The calling test's node id (``tests/pipelines/test_x.py::test_y[param]``), plus ``suffix``."""
    node = os.environ["PYTEST_CURRENT_TEST"].rsplit(" (", 1)[0]
    return node + (f"::{suffix}" if suffix else "")


def _differences(got: dict, want: dict) -> list[str]:
    diffs = []
    for field in want.keys() | got.keys():
        g, w = got.get(field), want.get(field)
        if g == w:
            continue
        if field in ("subset", "dropped") and isinstance(g, dict) and isinstance(w, dict):
            bad = sorted(s for s in w["shards"].keys() | g["shards"].keys() if g["shards"].get(s) != w["shards"].get(s))
            diffs.append(
                f"{field}: rows {g['rows']} (recorded {w['rows']}), columns equal: {g['columns'] == w['columns']}, source shards differing: {bad[:8]}"
            )
        else:
            diffs.append(f"{field}: {json.dumps(g)[:300]} (recorded {json.dumps(w)[:300]})")
    return diffs


def _memory_plan_digest(out: Path) -> dict | None:
    """The digest of the same config run again on the in-memory plan (its cache copied),
    or None where this checkout has no in-memory plan."""
    from pipelines import config
    from pipelines.runner import run

    execution = getattr(config, "ExecutionConfig", None)
    if execution is None or "memory" not in str(execution.model_fields.get("mode", "")):
        return None
    raw = json.loads((out / "manifest.json").read_text())["config"]
    aside = out.with_name(out.name + "-memory-plan")
    shutil.rmtree(aside, ignore_errors=True)
    if (out / "cache").is_dir():
        shutil.copytree(out / "cache", aside / "cache")
    raw["output"]["dir"] = str(aside)
    raw["execution"] = {"mode": "memory"}
    assert run(config.parse_config(raw), progress=False, log=lambda _m: None).pool is not None
    return outputs_digest(aside)


def check_recorded(out: Path, suffix: str = "") -> dict:
    """Assert the outputs in ``out`` equal the calling test's recorded digest (record mode:
    record it); returns the digest."""
    key, got = _key(suffix), outputs_digest(out)
    folder = os.environ.get(RECORD_ENV)
    if folder:
        memory = _memory_plan_digest(Path(out))
        if memory is not None:
            assert not _differences(got, memory), f"{key}: the plans differ: {_differences(got, memory)}"
            got = memory
        Path(folder).mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(key.encode()).hexdigest()[:20] + ".json"
        (Path(folder) / name).write_text(json.dumps({key: got}, indent=1) + "\n")
        return got
    recorded = json.loads(RECORDED.read_text())
    assert key in recorded, f"no recorded outputs for {key}: record them ({RECORD_ENV}, see tests/golden.py)"
    diffs = _differences(got, recorded[key])
    assert not diffs, f"{key}: the outputs differ from the recorded ones:\n" + "\n".join(diffs)
    return got


def merge(folder: Path) -> None:
    """Merge the digests recorded into ``folder`` into ``recorded_outputs.json``."""
    recorded = json.loads(RECORDED.read_text()) if RECORDED.is_file() else {}
    for path in sorted(Path(folder).glob("*.json")):
        recorded.update(json.loads(path.read_text()))
    comment = recorded.pop("_comment", None) or (
        "Digests of the outputs of the tests that name them (tests/golden.py, check_recorded), recorded from "
        "the in-memory plan (execution.mode: memory) of commit 1703399 after checking that the shard plan gave "
        "the same digest."
    )
    body = {"_comment": comment, **dict(sorted(recorded.items()))}
    RECORDED.write_text(json.dumps(body, indent=1) + "\n")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--merge", type=Path, required=True, help="the folder given as " + RECORD_ENV)
    merge(parser.parse_args().merge)
