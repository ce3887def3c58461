"""Writing the kept subset and the dropped-rows audit trail as Parquet parts.

Parts are ``part-NNNNN.parquet`` of at most ``rows_per_part`` rows each, in pool order
(shard order, then sample order), each written atomically and carrying the provenance
JSON in its schema metadata under ``poolsift``. Parts follow the pool (docs/spec.md,
"Output directory"): the plan writes each source shard's rows with a writer of their own,
so each part holds rows of one source shard; the run's outputs are staged and switched
into place whole (``writers/commit.py``), so nothing of an earlier run stays.

The subset is written as a stream of per-shard tables: a pool whose source left columns
on disk (DataComp's urls and captions) has them read for the kept rows of a few shards
at a time, on worker threads, while parts are written. Memory stays bounded by a part
and a few shards, whatever the pool's size.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from filtering.io.atomic import atomic_open
from filtering.io.paths import join

META_KEY = b"poolsift"
# Hex digests (uids, sha256) do not compress: 16 symbols per byte leave nothing for
# Snappy to find, and every value is unique, so dictionary pages only cost time. They
# are stored plain and uncompressed, which halves the time to write an audit of
# millions of uids at a size within a few percent; other columns use Snappy.
HEX_COLUMNS = frozenset({"uid", "sha256", "duplicate_of"})
ROW_GROUP_ROWS = 128 * 1024
T = TypeVar("T")
R = TypeVar("R")


def part_format(schema: pa.Schema, provenance: dict[str, Any], hex_columns=HEX_COLUMNS) -> tuple[pa.Schema, dict]:
    """The parts' schema (the provenance JSON in its metadata) and ParquetWriter options:
    hex digest columns plain and uncompressed, the others dictionary-encoded and Snappy."""
    meta = {**(schema.metadata or {}), META_KEY: json.dumps(provenance, sort_keys=True)}
    schema = schema.with_metadata(meta)
    hexes = {f.name for f in schema if f.name in hex_columns and pa.types.is_string(f.type)}
    leaves = _leaf_paths(schema)  # per-column options name Parquet leaf columns
    options = {
        "compression": {path: "none" if path in hexes else "snappy" for path in leaves} or "snappy",
        "use_dictionary": [path for path in leaves if path not in hexes],
    }
    return schema, options


class _HashingFile(io.RawIOBase):
    """A write-only file that passes bytes on to ``f`` and hashes them as they go, so
    the manifest's sha256 costs no second read of the file."""

    def __init__(self, f):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha256.update(b)
        self.size += len(b)
        return self.f.write(b)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.f.flush()


class _PartWriter:
    """Streams tables into ``part-NNNNN.parquet`` files of ``rows_per_part`` rows, in row
    groups of up to ``ROW_GROUP_ROWS`` written as soon as they fill, so encoding overlaps
    with whatever produces the tables. Each part is renamed into place when complete.
    ``records``: per part written, ``(path, rows, size, sha256)``, the hash taken from the
    bytes as they are written. The plan writes each source shard's rows with a writer of
    their own (``pipelines/executors/streaming.py: _write_folder``), so a part holds rows of
    one source shard."""

    def __init__(
        self,
        dir_url: str,
        schema: pa.Schema,
        rows_per_part: int,
        options: dict[str, Any],
        fsync: bool = True,
    ):
        self.dir_url, self.schema, self.rows_per_part, self.options = dir_url, schema, rows_per_part, options
        self.fsync = fsync  # False: the caller flushes the parts to disk (commit.fsync_files)
        self.group = min(rows_per_part, ROW_GROUP_ROWS)
        self.paths: list[str] = []
        self.pending: list[pa.Table] = []
        self.buffered = 0
        self.in_part = 0
        self.stack: contextlib.ExitStack | None = None
        self.writer: pq.ParquetWriter | None = None
        self.file: _HashingFile | None = None
        self.records: list[tuple[str, int, int, str]] = []

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.pending.append(table)
            self.buffered += table.num_rows
        while self.buffered >= min(self.group, self.rows_per_part - self.in_part):
            self._write(min(self.group, self.rows_per_part - self.in_part))

    def _write(self, n: int) -> None:
        table = pa.concat_tables(self.pending) if len(self.pending) > 1 else self.pending[0]
        rest = table.slice(n)
        self.pending, self.buffered = ([rest] if rest.num_rows else []), rest.num_rows
        self._writer().write_table(table.slice(0, n).replace_schema_metadata(self.schema.metadata), row_group_size=n)
        self.in_part += n
        if self.in_part == self.rows_per_part:
            self._close_part()

    def _writer(self) -> pq.ParquetWriter:
        if self.writer is None:
            path = join(self.dir_url, f"part-{len(self.paths):05d}.parquet")
            self.stack = contextlib.ExitStack()
            self.file = _HashingFile(self.stack.enter_context(atomic_open(path, fsync=self.fsync)))
            self.writer = pq.ParquetWriter(self.file, self.schema, **self.options)
            self.paths.append(path)
        return self.writer

    def _close_part(self) -> None:
        assert self.writer is not None and self.stack is not None and self.file is not None
        self.writer.close()
        self.stack.close()  # fsync and rename
        self.records.append((self.paths[-1], self.in_part, self.file.size, self.file.sha256.hexdigest()))
        self.writer, self.stack, self.file, self.in_part = None, None, None, 0

    def __enter__(self) -> _PartWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abort(exc_type, exc, tb)
            return
        try:  # the last rows are written here: a failure is the part's, as in add()
            if self.buffered:
                self._write(self.buffered)
            if not self.paths:  # no rows at all: one empty part, so readers find the schema
                self._writer()
            if self.writer is not None:
                self._close_part()
        except BaseException as e:
            self._abort(type(e), e, e.__traceback__)  # raises it as a WriteError when a write failed
            raise

    def _abort(self, exc_type, exc, tb) -> None:
        if self.stack is not None:  # the half-written part is removed, never renamed
            with contextlib.suppress(Exception):  # noqa: BLE001 — the original error is what matters
                self.writer.close()
            stack, self.stack, self.writer = self.stack, None, None
            stack.__exit__(exc_type, exc, tb)


def _leaf_paths(schema: pa.Schema) -> list[str]:
    """Parquet's leaf column paths for ``schema`` (``face_bboxes.list.element.list.element``)."""
    buf = pa.BufferOutputStream()
    pq.write_table(schema.empty_table(), buf)
    pschema = pq.ParquetFile(pa.BufferReader(buf.getvalue())).schema
    return [pschema.column(i).path for i in range(len(pschema))]


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, ahead: int) -> Iterator[R]:
    """``map(fn, items)`` on ``workers`` threads, in order, at most ``ahead`` results
    computed before they are consumed (bounded memory, unlike ``Executor.map``)."""
    from filtering.tasks import thread_pool, windowed

    with thread_pool(workers) as executor:
        for _, out in windowed(executor, fn, ((None, (item,)) for item in items), ahead - 1):
            yield out


def subset_table(pool_table: pa.Table, keep: np.ndarray, drop_columns: tuple[str, ...] = ("error",)) -> pa.Table:
    cols = [c for c in pool_table.column_names if c not in drop_columns]
    return pool_table.select(cols).filter(pa.array(keep))


def subset_stream(pool, keep: np.ndarray, drop_columns: tuple[str, ...] = ("error",), workers: int = 2):
    """The kept rows of ``pool`` as ``(schema, tables)``: one table per source shard, in
    pool order, late columns read for the kept rows only (``workers`` shards at a time).
    The pool's ``internal`` columns (a filter's own scorer columns) are left out too."""
    drop_columns = (*drop_columns, *sorted(pool.internal))
    cols = [c for c in pool.column_names if c not in drop_columns]
    if pool.late is None:
        table = subset_table(pool.table, keep, drop_columns)
        return table.schema, [table]
    late = pool.late
    eager = [c for c in cols if c not in late.names]
    fields = {f.name: f for f in pool.table.schema}
    fields.update({f.name: f for f in late.schema})
    schema = pa.schema([fields[c] for c in cols])

    def one(part) -> pa.Table:
        mask = keep[part.start : part.stop]
        head = pool.table.select(eager).slice(part.start, part.n).filter(pa.array(mask))
        tail = late.read(part, mask)
        merged = pa.Table.from_arrays([*head.columns, *tail.columns], names=[*head.column_names, *tail.column_names])
        return merged.select(cols)

    parts = [p for p in pool.parts if keep[p.start : p.stop].any()]
    return schema, ordered_map(one, parts, workers=workers, ahead=2 * workers)


def dropped_table(
    pool_table: pa.Table, outcome, failed: np.ndarray, carried: tuple[str, ...] = (), key: bool = True
) -> pa.Table:
    """uid, key, source_shard, filter, reason and duplicate_of for every dropped or failed row,
    then the ``carried`` source columns (img2dataset's ``status``, ``error_message``, ...).
    ``key=False`` leaves the key out: a source whose key is the uid (DataComp metadata),
    where it would repeat 32 hex digits per row.

    Built column-wise with no per-row Python: the filter labels and reason codes are the
    few values the funnel already lists, so each column is encoded by comparing against
    them and decoding a dictionary in Arrow. Hundreds of thousands of rows take well
    under a second.
    """
    out = failed | ~outcome.keep
    idx = np.flatnonzero(out)
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
    mask = pa.array(out)  # a boolean filter copies strings much faster than a take
    uid = pool_table.column("uid").filter(mask)
    keys = {}
    if key:
        column = pool_table.column("key")
        keys["key"] = uid if _same_data(column, pool_table.column("uid")) else column.filter(mask)
    return pa.table(
        {
            "uid": uid,
            **keys,
            "source_shard": pool_table.column("source_shard").filter(mask),
            "filter": strings_from_few(filt, labels),
            "reason": strings_from_few(reason, codes),
            "duplicate_of": strings_from_few(outcome.duplicate_of[idx], []),
            **{name: pool_table.column(name).filter(mask) for name in carried if name in pool_table.column_names},
        }
    )


def _same_data(a: pa.ChunkedArray, b: pa.ChunkedArray) -> bool:
    """Whether two columns share their buffers (DataComp's key is its uid)."""
    if a.num_chunks != b.num_chunks or a.type != b.type:
        return False
    return all(
        x.offset == y.offset
        and len(x) == len(y)
        and [u.address if u else None for u in x.buffers()] == [u.address if u else None for u in y.buffers()]
        for x, y in zip(a.chunks, b.chunks, strict=True)
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
