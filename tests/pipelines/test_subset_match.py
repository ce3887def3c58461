"""A subset applied to a second copy of its pool (issue 25, "Portable subsets"): shards
re-keyed, uids written otherwise, 10% of the samples missing. Matched by sha256, every
sample present is found and the match report lists exactly the missing ones (and the
entries more than one row matched), checked against the planted copy (``_check_report``)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from filtering.sample.datacomp import make_datacomp_sample, write_shard
from pipelines.config import parse_config
from pipelines.runner import run
from tests.conftest import SAMPLE, SAMPLE_CONFIG, run_cli, write_config

pytestmark = pytest.mark.slow  # runs the whole pipeline

REPORT = ("subset_match/unmatched.parquet", "subset_match/multiple.parquet")


def _run(cfg_path: Path):
    return run(parse_config(yaml.safe_load(cfg_path.read_text())), progress=False, log=lambda _m: None)


def _rows(folder: Path) -> list[dict]:
    return pq.read_table(folder).to_pylist()


def _cli_run(tmp_path: Path, make_config) -> tuple[dict, Path]:
    """The run on the shard plan from the CLI, end to end. Returns its manifest and folder."""
    out = tmp_path / "run"
    code, stdout, stderr = run_cli("run", make_config(out))
    assert code == 0, stderr
    assert "subset_match/" in stdout and "list entries found" in stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["execution"]["plan"] == "streaming"
    assert sorted(manifest["outputs"]["subset_match"]) == sorted(str(out / n) for n in REPORT)
    assert set(REPORT) <= set(manifest["files"])
    return manifest, out


def _check_report(manifest: dict, out: Path, entries: list[dict], copy_sha: list[str]) -> None:
    """Every entry whose image the copy holds is found (its rows kept), the others listed
    as unmatched; the entries whose image is on more than one row listed as such."""
    present = set(copy_sha)
    counts = {s: copy_sha.count(s) for s in present}
    missing = [e["uid"] for e in entries if e["sha256"] not in present]
    twice = [e["uid"] for e in entries if counts.get(e["sha256"], 0) > 1]
    [record] = manifest["subset_match"].values()
    assert 0 < len(missing) < len(entries) and twice  # both pools hold copies of some images
    assert record["entries"] == len(entries)
    assert record["found"] == record["found_by"]["sha256"] == len(entries) - len(missing)
    assert record["not_found"] == len(missing)
    assert [r["uid"] for r in _rows(out / REPORT[0])] == missing
    assert [r["uid"] for r in _rows(out / REPORT[1])] == twice
    assert record["matched_more_than_one_row"] == len(twice)
    kept = _rows(out / "subset")
    wanted = {e["sha256"] for e in entries}
    assert len(kept) == sum(n for s, n in counts.items() if s in wanted)
    assert {r["sha256"] for r in kept} == wanted & present


# ---------------------------------------------------------------- DataComp metadata


def test_datacomp_copy(tmp_path):
    """``make-sample --datacomp``'s pool (2% of rows share an image) and a subset of it
    made by a first run; the copy: re-sharded into 3 shards with new keys, new uids,
    every row of an image missing for 10% of images."""
    pool_a = tmp_path / "a"
    make_datacomp_sample(pool_a, rows=400, shards=4)
    first = tmp_path / "first"
    first_cfg = tmp_path / "first.yaml"
    first_cfg.write_text(
        yaml.safe_dump(
            {
                "input": {"datacomp_metadata": str(pool_a)},
                "filters": [{"clip_score": {"field": "clip_b32_similarity_score", "top_fraction": 0.5}}],
                "output": {"dir": str(first)},
            }
        )
    )
    _run(first_cfg)
    entries = _rows(first / "subset")

    rng = np.random.default_rng(7)
    tables = [pq.read_table(p) for p in sorted(pool_a.glob("*.parquet"))]
    arrays = [np.load(p.with_suffix(".npz")) for p in sorted(pool_a.glob("*.parquet"))]
    table = pa.concat_tables(tables)
    embeddings = {k: np.concatenate([a[k] for a in arrays]) for k in arrays[0].files}
    sha = table.column("sha256").to_pylist()
    images = sorted(set(sha))
    gone = set(rng.choice(images, size=len(images) // 10, replace=False).tolist())
    rows = np.array([i for i, s in enumerate(sha) if s not in gone])
    table = table.take(pa.array(rows))
    new_uids = [hashlib.sha256(f"copy {u}".encode()).hexdigest()[:32] for u in table.column("uid").to_pylist()]
    table = table.set_column(table.schema.get_field_index("uid"), "uid", pa.array(new_uids, pa.string()))
    pool_b = tmp_path / "b"
    pool_b.mkdir()
    cuts = [0, len(rows) // 3, 2 * len(rows) // 3 + 5, len(rows)]
    for s in range(3):
        part = table.slice(cuts[s], cuts[s + 1] - cuts[s])
        part = part.append_column("key", pa.array([f"b{s}-{i:05d}" for i in range(part.num_rows)]))
        write_shard(pool_b, s, part, {k: v[rows][cuts[s] : cuts[s + 1]] for k, v in embeddings.items()})

    def config(out: Path) -> Path:
        path = tmp_path / "run.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "input": {"datacomp_metadata": str(pool_b)},
                    "filters": [{"uids": {"path": str(first), "match": "sha256"}}],
                    "output": {"dir": str(out)},
                }
            )
        )
        return path

    manifest, out = _cli_run(tmp_path, config)
    _check_report(manifest, out, entries, table.column("sha256").to_pylist())
    # a later run in the folder without the filter: the report leaves with the old result
    again = yaml.safe_load(config(out).read_text())
    again["filters"] = [{"caption": {"min_words": 1}}]
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(again))
    assert "subset_match" not in _run(tmp_path / "again.yaml").manifest
    assert not (out / "subset_match").exists()


# ---------------------------------------------------------------- WebDataset


def _rewrite(shards: list[Path], out: Path, n_out: int) -> list[str]:
    """The samples of ``shards`` as ``n_out`` new shards: keys renamed, each uid replaced by
    another one written as an upper-case dashed UUID, every 10th sample left out. Returns
    the sha256 of each stored image, in the new pool's order."""
    samples = []
    for shard in shards:
        with tarfile.open(shard) as tf:
            members: dict[str, dict[str, bytes]] = {}
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tf.extractfile(m).read()
            samples += list(members.values())
    samples = [s for i, s in enumerate(samples) if i % 10 != 3]
    out.mkdir(parents=True)
    sha = []
    for k, chunk in enumerate(np.array_split(np.arange(len(samples)), n_out)):
        with tarfile.open(out / f"{k:05d}.tar", "w") as tf:
            for j in chunk.tolist():
                sample = samples[j]
                meta = json.loads(sample["json"])
                h = hashlib.sha256(meta["uid"].encode()).hexdigest()[:32].upper()
                meta["uid"] = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
                sample = {**sample, "json": json.dumps(meta).encode()}
                for ext, data in sample.items():
                    info = tarfile.TarInfo(f"copy{k}_{j:06d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
                image = next(v for e, v in sample.items() if e not in ("json", "txt"))
                sha.append(hashlib.sha256(image).hexdigest())
    return sha


def test_webdataset_copy(tmp_path, scored_sample):
    """Two shards of the bundled sample and the subset a first run kept of them; the copy:
    three shards with other keys, uids replaced and re-formatted, 10% of samples missing.
    The first run's subset/ carries the sha256 of each stored image."""
    first = tmp_path / "first"
    shutil.copytree(scored_sample / "cache", first / "cache")
    shards = sorted((SAMPLE / "pool").glob("*.tar"))[:2]
    first_cfg = write_config(
        tmp_path / "first.yaml", SAMPLE_CONFIG, input={"shards": [str(s) for s in shards]}, output={"dir": str(first)}
    )
    _run(first_cfg)
    entries = _rows(first / "subset")
    copy_sha = _rewrite(shards, tmp_path / "copy", 3)

    def config(out: Path) -> Path:
        return write_config(
            tmp_path / "run.yaml",
            SAMPLE_CONFIG,
            input={"shards": str(tmp_path / "copy" / "{00000..00002}.tar")},
            filters=[{"uids": {"path": str(first / "subset"), "match": "sha256"}}],
            output={"dir": str(out)},
        )

    manifest, out = _cli_run(tmp_path, config)
    _check_report(manifest, out, entries, copy_sha)
