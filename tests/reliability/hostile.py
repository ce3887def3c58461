"""Building hostile shards from the bundled sample, and running poolsift on them."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from tests.conftest import REPO, SAMPLE, run_cli

SHARD = SAMPLE / "pool" / "00000.tar"


def bundled_members(n_samples: int, shard: Path = SHARD, skip: int = 0) -> list[tuple[str, bytes]]:
    """(name, bytes) of the members of ``n_samples`` samples of a bundled shard, in order."""
    out, keys = [], []
    with tarfile.open(shard) as tf:
        for m in tf:
            key = m.name.split(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
            if len(keys) > skip + n_samples:
                break
            if len(keys) > skip:
                out.append((m.name, tf.extractfile(m).read()))
    return out


def tar_bytes(members: list[tuple[str, bytes]], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def with_json(members: list[tuple[str, bytes]], key: str, raw: bytes) -> list[tuple[str, bytes]]:
    """``members`` with ``key``'s ``.json`` replaced by ``raw``."""
    return [(n, raw if n == f"{key}.json" else d) for n, d in members]


def meta_of(members: list[tuple[str, bytes]], key: str) -> dict:
    return json.loads(dict(members)[f"{key}.json"])


def run_pool(
    tmp_path: Path, shards: list[Path], uid: dict | None = None, **output
) -> tuple[int, str, dict | None, Path]:
    """``poolsift run`` of the sample config on ``shards`` (``uid``: ``input.uid`` settings);
    returns (exit code, stderr, manifest, out dir)."""
    out = tmp_path / "out"
    cfg = yaml.safe_load((REPO / "configs" / "sample.yaml").read_text())
    cfg["input"]["shards"] = [str(s) for s in shards]
    if uid:
        cfg["input"]["uid"] = uid
    cfg["model"]["pretrained"] = os.path.normpath(REPO / "configs" / cfg["model"]["pretrained"])  # relative to configs/
    cfg["model"]["num_workers"] = 0  # decode in this process: a few samples need no pool
    cfg["output"] = {"dir": str(out), **output}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, _, stderr = run_cli("run", path, "--quiet")
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if code == 0 and manifest_path.exists() else None
    return code, stderr, manifest, out


def rows(out: Path, table: str) -> list[dict]:
    parts = sorted((out / table).glob("part-*.parquet"))
    return [r for p in parts for r in pq.read_table(p).to_pylist()]


def accounted(manifest: dict) -> bool:
    c = manifest["counts"]
    return c["input"] == c["kept"] + c["failed"] + sum(f["dropped"] for f in c["filters"])


def failures(out: Path) -> dict[str, str]:
    """key -> reason of the failed rows."""
    return {r["key"]: r["reason"] for r in rows(out, "dropped") if r["filter"] == "failed"}


def present(out: Path) -> set[tuple[str, str]]:
    """(source shard, key) of every row that is kept or dropped by a filter, not failed."""
    return {(r["source_shard"], r["key"]) for r in rows(out, "subset")} | {
        (r["source_shard"], r["key"]) for r in rows(out, "dropped") if r["filter"] != "failed"
    }


def strip_end(tar: bytes) -> bytes:
    """The tar without its end-of-archive blocks (and tarfile's record padding)."""
    end = len(tar)
    while end >= 512 and tar[end - 512 : end] == bytes(512):
        end -= 512
    return tar[:end]
