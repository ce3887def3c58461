"""img2dataset's per-shard side files: ``NNNNN.parquet`` and ``NNNNN_stats.json``.

img2dataset writes, beside each ``NNNNN.tar``, a parquet with one row per URL it
attempted, failures included (``status``, ``error_message``), and a stats file with the
shard's counts. The tar holds only the successes, so without the parquet the samples
it failed on would vanish from the funnel. Here they become failure rows
(``failed_upstream: <status>: <error_message>``), so ``input`` counts what was attempted;
every parquet column the poolsift schema does not already have (``status``,
``error_message``, ``exif``, img2dataset's ``sha256`` of the downloaded file, and each
``save_additional_columns`` column) is carried under its own name.
"""

from __future__ import annotations

import json
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from filtering.errors import PoolsiftError
from filtering.io.atomic import exists
from filtering.io.paths import file_info, get_fs

# Parquet columns that the scoring row already holds (from the tar's .json or decoding).
_SCORED = {"key", "caption", "url", "width", "height", "original_width", "original_height"}
STATS_COUNTS = ("count", "successes", "failed_to_download", "failed_to_resize")


def side_paths(url: str) -> tuple[str, str]:
    """``(parquet, stats)`` beside a shard: ``00012.tar`` -> ``00012.parquet``, ``00012_stats.json``."""
    head, name = posixpath.split(url)
    stem = name.split(".")[0]
    return posixpath.join(head, f"{stem}.parquet"), posixpath.join(head, f"{stem}_stats.json")


def side_parquet(url: str) -> str | None:
    path = side_paths(url)[0]
    return path if url.endswith(".tar") and exists(path) else None


def source_stamp(url: str) -> dict:
    """What a cached shard result depends on: the tar, and its parquet when there is one."""
    info = file_info(url)
    side = side_parquet(url)
    return {**info, "parquet": file_info(side)} if side else info


def read_stats(url: str) -> dict | None:
    path = side_paths(url)[1]
    if not url.endswith(".tar") or not exists(path):
        return None
    fs, p = get_fs(path)
    try:
        with fs.open(p, "r") as f:
            stats = json.load(f)
    except (OSError, ValueError):
        return None
    return stats if isinstance(stats, dict) else None


def _read_parquet(path: str) -> pa.Table:
    fs, p = get_fs(path)
    try:
        with fs.open(p, "rb") as f:
            return pq.read_table(f)
    except (pa.ArrowException, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PoolsiftError(f"{path}: cannot read img2dataset's parquet beside the shard: {first}") from e


def _as_strings(col: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return col.cast(pa.string())
    if pa.types.is_null(col.type):
        return pa.chunked_array([pa.nulls(len(col), pa.string())])
    return pa.chunked_array(
        [
            pa.array(
                [None if v is None else json.dumps(v, sort_keys=True, default=str) for v in col.to_pylist()],
                pa.string(),
            )
        ]
    )


def merge_side_parquet(table: pa.Table, url: str, uid_field: str) -> tuple[pa.Table, int]:
    """The shard's scored rows with the parquet's columns joined by key, then one failure
    row per attempted URL that is not in the tar. Returns the table and the number of rows added."""
    path = side_parquet(url)
    if path is None:
        return table, 0
    side = _read_parquet(path)
    if "key" not in side.column_names:
        return table, 0
    side = side.set_column(side.column_names.index("key"), "key", _as_strings(side.column("key")))
    if "exif" in side.column_names:
        side = side.set_column(side.column_names.index("exif"), "exif", _as_strings(side.column("exif")))
    carried = [c for c in side.column_names if c not in _SCORED and c != uid_field]
    # the tar's rows: the parquet's values for the columns it carries (key -> row)
    pos = pc.index_in(table.column("key"), value_set=side.column("key").combine_chunks())
    for name in carried:
        values = side.column(name).combine_chunks().take(pos)
        if name in table.column_names:  # status, error_message, exif, sha256: also in the tar's .json
            old = table.column(name)
            table = table.set_column(table.column_names.index(name), name, pc.coalesce(values.cast(old.type), old))
        else:
            table = table.append_column(name, values)
    # the attempted URLs the tar lacks: failed upstream (or listed as a success but absent)
    missing = ~np.asarray(
        pc.fill_null(pc.is_in(side.column("key"), value_set=table.column("key").combine_chunks()), False)
    )
    idx = np.flatnonzero(missing)
    if not len(idx):
        return table, 0
    rows = side.take(pa.array(idx))
    status = _col(rows, "status")
    message = _col(rows, "error_message")
    errors = [
        f"failed_upstream: {s or 'unknown'}: {m or ''}".rstrip(": ")
        if s != "success"
        else "missing_from_shard: img2dataset lists it as a success but the tar has no such sample"
        for s, m in zip(status, message, strict=True)
    ]
    added = {
        "uid": _as_strings(rows.column(uid_field))
        if uid_field in rows.column_names
        else pa.nulls(len(idx), pa.string()),
        "key": rows.column("key"),
        "source_shard": pa.array([url] * len(idx), pa.string()),
        "caption": pa.array(["" if c is None else str(c) for c in _col(rows, "caption")], pa.string()),
        "url": pa.array([c if isinstance(c, str) else None for c in _col(rows, "url")], pa.string()),
        "error": pa.array(errors, pa.string()),
    }
    for name in carried:
        added[name] = rows.column(name)
    extra = pa.table(added)
    merged = pa.concat_tables([table, extra], promote_options="permissive")
    return merged, len(idx)


def _col(table: pa.Table, name: str) -> list:
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows
