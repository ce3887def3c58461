"""Provenance: what produced an output — config and its hash, package and git versions,
model and checkpoint hash, every input file with size and checksum (docs/spec.md, "Output directory").

Input checksums: when the local input files total at most ``FULL_HASH_LIMIT`` (1 GiB,
a second or two of hashing), each gets the sha256 of its bytes (``"sha256"``). Larger
local pools (a DataComp pool's npz embeddings alone are gigabytes) get a cheap content
fingerprint instead, ``"sha256_head_tail"``: sha256 of the size and the first and last
64 KiB of each file (for Parquet the tail is its footer with schema and row-group
statistics; for npz, the zip directory), which catches truncation, rewrites and most
edits at a fixed cost per file. Remote objects keep their size and modification stamp
(``"size+mtime"``), read from listings without downloading. The manifest's
``input_checksum`` names the method used.
"""

from __future__ import annotations

import datetime as dt
import functools
import subprocess
from pathlib import Path
from typing import Any

from filtering import __version__
from filtering.io.paths import is_local, open_file, sha256_file

FULL_HASH_LIMIT = 1 << 30  # total local input bytes hashed in full; above it, head+tail fingerprints
HEAD_TAIL_BYTES = 64 << 10
HEAD_TAIL_METHOD = "sha256_head_tail: sha256 of the size and the first and last 64 KiB of each file"


@functools.cache
def git_commit() -> str | None:
    """The poolsift source checkout's commit, when it runs from one."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def checksum_inputs(inputs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Add a checksum to each input record; returns (records, method)."""
    from filtering.tasks import thread_pool

    if not all(is_local(i["path"]) for i in inputs):
        return [dict(i) for i in inputs], "size+mtime"
    total = sum(int(i.get("size") or 0) for i in inputs)
    full = total <= FULL_HASH_LIMIT
    field, fn = ("sha256", sha256_file) if full else ("sha256_head_tail", sha256_head_tail)
    with thread_pool(4) as pool:  # hashlib releases the GIL on large blocks
        digests = list(pool.map(fn, [i["path"] for i in inputs]))
    records = [{**i, field: d} for i, d in zip(inputs, digests, strict=True)]
    return records, "sha256" if full else HEAD_TAIL_METHOD


def sha256_head_tail(url: str, block: int = HEAD_TAIL_BYTES) -> str:
    """sha256 over the file's size (8 bytes, big-endian), its first ``block`` bytes and its
    last ``block`` bytes (the whole file once when it is shorter than two blocks)."""
    import hashlib

    h = hashlib.sha256()
    with open_file(url) as f:
        size = f.seek(0, 2)
        h.update(size.to_bytes(8, "big"))
        f.seek(0)
        if size <= 2 * block:
            h.update(f.read())
        else:
            h.update(f.read(block))
            f.seek(size - block)
            h.update(f.read(block))
    return h.hexdigest()


def provenance(config: dict[str, Any], config_sha256: str, model: dict[str, Any]) -> dict[str, Any]:
    """The timestamp-free part of provenance, embedded in every Parquet file's schema metadata."""
    return {
        "poolsift_version": __version__,
        "git_commit": git_commit(),
        "config": config,
        "config_sha256": config_sha256,
        "model": model,
    }


def settings_sha256(config: dict[str, Any]) -> str:
    """sha256 of a recorded config's settings: all but ``output`` (where and what to write),
    so a sweep (``DIR/sweep.json``) can say which run's settings it was made with."""
    import hashlib
    import json

    settings = {k: v for k, v in config.items() if k != "output"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
