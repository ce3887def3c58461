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


def remove_parts(dir_url: str) -> None:
    """Remove every part under ``dir_url`` (an output this run does not write)."""
    _remove_stale(dir_url, set())


def _remove_stale(dir_url: str, keep: set[str]) -> None:
    fs, path = get_fs(dir_url)
    for p in fs.glob(f"{path}/part-*.parquet"):
        if p.rsplit("/", 1)[-1] not in keep:
            fs.rm(p)


def subset_table(pool_table: pa.Table, keep: np.ndarray, drop_columns: tuple[str, ...] = ("error",)) -> pa.Table:
    cols = [c for c in pool_table.column_names if c not in drop_columns]
    return pool_table.select(cols).filter(pa.array(keep))


def dropped_table(pool_table: pa.Table, outcome, failed: np.ndarray) -> pa.Table:
    """uid, key, source_shard, filter, reason and duplicate_of for every dropped or failed row.

    Built column-wise with no per-row Python: the filter labels and reason codes are the
    few values the funnel already lists, so each column is encoded by comparing against
    them and decoding a dictionary in Arrow. Hundreds of thousands of rows take well
    under a second.
    """
    idx = np.flatnonzero(failed | ~outcome.keep)
    filt = outcome.drop_filter[idx]
    reason = outcome.drop_reason[idx]
    labels = [f["name"] for f in outcome.funnel]
    codes = [r for f in outcome.funnel for r in f.get("reasons", {})]
    failed_here = failed[idx]
    if failed_here.any():
        filt = np.where(failed_here, "failed", filt).astype(object)
        labels.append("failed")
        if "error" in pool_table.column_names:
            reason = reason.copy()
            errors = pool_table.column("error").take(pa.array(idx[failed_here])).to_numpy(zero_copy_only=False)
            reason[failed_here] = errors
            codes += list(dict.fromkeys(e for e in errors if isinstance(e, str)))
    take = pa.array(idx, pa.int64())
    return pa.table(
        {
            "uid": pool_table.column("uid").take(take),
            "key": pool_table.column("key").take(take),
            "source_shard": pool_table.column("source_shard").take(take),
            "filter": strings_from_few(filt, labels),
            "reason": strings_from_few(reason, codes),
            "duplicate_of": strings_from_few(outcome.duplicate_of[idx], []),
        }
    )


def strings_from_few(values: np.ndarray, known: list[str]) -> pa.Array:
    """An object array of strings drawn mostly from ``known`` (or None) as an Arrow string
    array; values outside ``known`` fall back to a plain conversion."""
    known = list(dict.fromkeys(known))
    codes = np.full(len(values), -1, dtype=np.int32)
    for i, value in enumerate(known):
        codes[values == value] = i
    unmatched = codes < 0
    if unmatched.any() and not (values[unmatched] == None).all():  # noqa: E711 — elementwise on objects
        return pa.array(values, pa.string())
    indices = pa.array(codes, mask=unmatched)
    return pa.DictionaryArray.from_arrays(indices, pa.array(known, pa.string())).cast(pa.string())
