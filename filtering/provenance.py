"""Provenance: what produced an output — config and its hash, package and git versions,
model and checkpoint hash, every input file with size and checksum (SPEC, "Output directory").

Input checksums are sha256 of each shard's bytes for local files up to
``FULL_HASH_LIMIT``; beyond that (huge pools, remote objects) the manifest records the
cheap identity ``size+mtime`` and says so in ``checksum``.
"""

from __future__ import annotations

import datetime as dt
import functools
import subprocess
from pathlib import Path
from typing import Any

from filtering import __version__
from filtering.io.paths import is_local, sha256_file

FULL_HASH_LIMIT = 4 << 30  # total input bytes hashed in full; above it, size+mtime only


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
    total = sum(int(i.get("size") or 0) for i in inputs)
    if total <= FULL_HASH_LIMIT and all(is_local(i["path"]) for i in inputs):
        return [{**i, "sha256": sha256_file(i["path"])} for i in inputs], "sha256"
    return [dict(i) for i in inputs], "size+mtime"


def provenance(config: dict[str, Any], config_sha256: str, model: dict[str, Any]) -> dict[str, Any]:
    """The timestamp-free part of provenance, embedded in every Parquet file's schema metadata."""
    return {
        "poolsift_version": __version__,
        "git_commit": git_commit(),
        "config": config,
        "config_sha256": config_sha256,
        "model": model,
    }


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
