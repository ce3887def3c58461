"""Writing the kept subset and the dropped-rows audit trail as Parquet parts.

Parts are ``part-NNNNN.parquet`` of at most ``rows_per_part`` rows each, in pool order
(shard order, then sample order), each written atomically and carrying the provenance
JSON in its schema metadata under ``poolsift``. Parts left from an earlier run with
more parts are removed, so the folder always holds exactly one run's output.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from filtering.io.atomic import atomic_open
from filtering.io.paths import get_fs, join

META_KEY = b"poolsift"


def write_parts(dir_url: str, table: pa.Table, rows_per_part: int, provenance: dict[str, Any]) -> list[str]:
    """Write ``table`` as parts under ``dir_url``; returns the part paths."""
    meta = {**(table.schema.metadata or {}), META_KEY: json.dumps(provenance, sort_keys=True)}
    table = table.replace_schema_metadata(meta)
    n_parts = max(1, -(-table.num_rows // rows_per_part))
    paths = []
    for i in range(n_parts):
        path = join(dir_url, f"part-{i:05d}.parquet")
        with atomic_open(path) as f:
            pq.write_table(table.slice(i * rows_per_part, rows_per_part), f)
        paths.append(path)
    _remove_stale(dir_url, {p.rsplit("/", 1)[-1] for p in paths})
    return paths


def _remove_stale(dir_url: str, keep: set[str]) -> None:
    fs, path = get_fs(dir_url)
    for p in fs.glob(f"{path}/part-*.parquet"):
        if p.rsplit("/", 1)[-1] not in keep:
            fs.rm(p)


def subset_table(pool_table: pa.Table, keep: np.ndarray, drop_columns: tuple[str, ...] = ("error",)) -> pa.Table:
    cols = [c for c in pool_table.column_names if c not in drop_columns]
    return pool_table.select(cols).filter(pa.array(keep))


def dropped_table(pool_table: pa.Table, outcome, failed: np.ndarray) -> pa.Table:
    """uid, key, source_shard, filter, reason and duplicate_of for every dropped or failed row."""
    rows = failed | (~outcome.keep & ~failed)
    idx = np.flatnonzero(rows)
    errors = pool_table.column("error").to_numpy(zero_copy_only=False) if "error" in pool_table.column_names else None
    filt = np.where(failed[idx], "failed", outcome.drop_filter[idx]).astype(object)
    reason = outcome.drop_reason[idx].copy()
    if errors is not None:
        reason[failed[idx]] = errors[idx][failed[idx]]
    return pa.table(
        {
            "uid": pool_table.column("uid").take(idx),
            "key": pool_table.column("key").take(idx),
            "source_shard": pool_table.column("source_shard").take(idx),
            "filter": pa.array(filt.tolist(), pa.string()),
            "reason": pa.array(reason.tolist(), pa.string()),
            "duplicate_of": pa.array(outcome.duplicate_of[idx].tolist(), pa.string()),
        }
    )
