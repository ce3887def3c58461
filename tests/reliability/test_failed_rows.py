"""Issue 23, finding 2: a failed row is a row like any other in every output and its readers.

A pool whose uids are derived (``input.uid.on_invalid: derive``) and where images are
refused as decompression bombs (header-only PNGs: 30,000 x 30,000, and 12,000 x 12,000
RGBA, which PIL only warns about): ``run`` with ``output.report: true`` and
``output.webdataset: true`` exits 0, ``report`` and ``sweep`` succeed, and each failed
row's uid is the same in the dropped table, the cache and the report.
"""

from __future__ import annotations

import json
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from filtering.report import gather
from filtering.uid import derive_uid, u8u8_to_uids
from tests.conftest import run_cli
from tests.reliability.hostile import accounted, bundled_members, rows, run_pool, tar_bytes

pytestmark = pytest.mark.slow  # runs the CLI


def header_only_png(width: int, height: int, color_type: int = 2) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` with one byte of pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


BOMBS = {"000000002": header_only_png(30_000, 30_000), "000000004": header_only_png(12_000, 12_000, color_type=6)}


def _pool(tmp_path: Path) -> Path:
    """Bundled samples without a uid in their .json, two of them with a bomb for an image."""
    out = []
    for name, data in bundled_members(7):
        key, ext = name.split(".", 1)
        if ext == "json":
            meta = json.loads(data)
            meta.pop("uid", None)
            data = json.dumps(meta).encode()
        if key in BOMBS and ext == "jpg":
            name, data = f"{key}.png", BOMBS[key]
        out.append((name, data))
    shard = tmp_path / "pool" / "00000.tar"
    shard.parent.mkdir()
    shard.write_bytes(tar_bytes(out))
    return shard


def _cached_uids(out: Path, manifest: dict) -> dict[str, str]:
    """key -> uid of every row as the run's cache holds it (the rows and their resolved uids)."""
    keys = pq.read_table(_cached(out, manifest, "score_cache"), columns=["key"]).column("key").to_pylist()
    uids = pq.read_table(_cached(out, manifest, "uid_cache"), columns=["uid"]).column("uid").to_pylist()
    return dict(zip(keys, uids, strict=True))


def _cached(out: Path, manifest: dict, record: str) -> Path:
    """The one shard's file in the cache the manifest's source record names."""
    [path] = (out / manifest["source"][record]).glob("*.parquet")
    return path


def test_failed_rows_with_derived_uids_in_every_output_and_reader(tmp_path):
    shard = _pool(tmp_path)
    code, err, manifest, out = run_pool(tmp_path, [shard], uid={"on_invalid": "derive"}, report=True, webdataset=True)
    assert code == 0, err
    assert accounted(manifest) and manifest["counts"]["failed"] == len(BOMBS)
    assert (out / "report.html").exists()

    failed = {r["key"]: r for r in rows(out, "dropped") if r["filter"] == "failed"}
    assert set(failed) == set(BOMBS)
    assert all(r["reason"].startswith("corrupt_image: ") for r in failed.values())
    expected = {k: derive_uid("00000.tar", k) for k in BOMBS}
    assert {k: r["uid"] for k, r in failed.items()} == expected  # the dropped table
    cached = _cached_uids(out, manifest)
    assert {k: cached[k] for k in BOMBS} == expected  # the cache
    report = gather(str(out))
    shown = {s.key: s for s in report.failures}
    assert {k: shown[k].uid for k in BOMBS} == expected  # the report's data
    captions = {r["key"]: r["caption"] for r in pq.read_table(_cached(out, manifest, "score_cache")).to_pylist()}
    assert all(shown[k].caption == captions[k] for k in BOMBS)  # found in the cache by that uid

    kept = set(u8u8_to_uids(np.load(out / "subset.npy")))
    assert kept and not kept & set(expected.values())
    assert kept == {cached[r["key"]] for r in rows(out, "subset")}
    with tarfile.open(out / "shards" / "00000.tar") as tf:
        resharded = {m.name.split(".", 1)[0] for m in tf}
    assert resharded == {r["key"] for r in rows(out, "subset")}

    code, _, err = run_cli("report", out)
    assert code == 0, err
    code, _, err = run_cli("sweep", tmp_path / "config.yaml", "--param", "filters[0].clip_score.min=0.3,0.6", "--quiet")
    assert code == 0, err
    sweep = json.loads((out / "sweep.json").read_text())
    assert [r["failed"] for r in sweep["results"]] == [len(BOMBS)] * 2

    # An output from before the run's uids were cached: the report resolves the raw uids
    # (missing here) by the run's input.uid, and finds the same rows.
    shutil.rmtree(out / manifest["source"]["uid_cache"])
    again = {s.key: s for s in gather(str(out)).failures}
    assert {k: again[k].uid for k in BOMBS} == expected
    assert all(again[k].caption == captions[k] for k in BOMBS)
    code, _, err = run_cli("report", out)
    assert code == 0, err
