"""The pool as columns: one row per input sample, all shards concatenated in shard order.

Scorers and stages add columns (``clip_score``, ``cluster_id``, ``phash``...); filters
read columns and return keep masks. Embeddings are not columns: they stay in per-shard
arrays (memory-mapped where the cache is local) and are read shard by shard.

A source may leave some of its columns on disk (:class:`LateColumns`): bulky strings
that no filter reads, such as DataComp's urls and captions. They are read shard by shard
when the subset is written, for the kept rows only, so filtering a billion-row pool
never holds them all in memory. Asking the pool for such a column reads it in full.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class ShardPart:
    """The rows of one source shard: ``pool[start:stop]``."""

    url: str
    sid: str
    start: int
    stop: int

    @property
    def n(self) -> int:
        return self.stop - self.start


EmbeddingLoader = Callable[[str, ShardPart], np.ndarray]
# A picklable zero-argument function that loads one shard's embeddings where it is called
# (a task on another machine reads the shared file itself; the driver sends no array).
EmbeddingRef = Callable[[str, ShardPart], Callable[[], np.ndarray]]


@dataclass(frozen=True)
class LateColumns:
    """Source columns not in ``Pool.table``, read from the source on demand.

    ``read(part, mask)`` returns those columns (``schema``) for the rows of the part
    where ``mask`` is true (None: all of them). ``order`` is the source's column order, which
    outputs follow.
    """

    schema: pa.Schema
    order: tuple[str, ...]
    read: Callable[[ShardPart, np.ndarray | None], pa.Table]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.schema.names)


@dataclass
class Pool:
    table: pa.Table
    parts: list[ShardPart]
    embedding_loader: EmbeddingLoader | None = None
    embedding_kinds: tuple[str, ...] = ()
    default_embedding: str | None = None
    artifacts: dict[str, Any] = field(default_factory=dict)
    late: LateColumns | None = None
    internal: set[str] = field(default_factory=set)  # columns filters read but outputs leave out
    embedding_ref: EmbeddingRef | None = None  # a task's own loader of a shard's embeddings
    _numpy: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return self.table.num_rows

    def has_column(self, name: str) -> bool:
        return name in self.table.column_names or (self.late is not None and name in self.late.names)

    @property
    def column_names(self) -> list[str]:
        """Every column, in output order: the source's order, then columns stages added."""
        if self.late is None:
            return self.table.column_names
        present = set(self.table.column_names) | set(self.late.names)
        order = [c for c in self.late.order if c in present]
        placed = set(order)
        return order + [c for c in self.table.column_names if c not in placed]

    def materialize(self, names: list[str] | tuple[str, ...]) -> None:
        """Read late columns into ``table`` (every row)."""
        if self.late is None or not (wanted := [n for n in names if n in self.late.names]):
            return
        order = self.column_names
        chunks = [self.late.read(part, None).select(wanted) for part in self.parts]
        for name in wanted:
            arrays = [c for t in chunks for c in t.column(name).chunks]
            self.table = self.table.append_column(name, pa.chunked_array(arrays, self.late.schema.field(name).type))
        rest = [f for f in self.late.schema if f.name not in wanted]
        self.late = LateColumns(pa.schema(rest), self.late.order, self.late.read) if rest else None
        if self.late is None:  # everything is in memory now: take the output order
            self.table = self.table.select(order)

    def column(self, name: str) -> np.ndarray:
        """A column as numpy (strings as object arrays, nulls as None / NaN)."""
        if self.late is not None and name in self.late.names:
            self.materialize([name])
        if name not in self._numpy:
            if name not in self.table.column_names:
                raise KeyError(f"the pool has no column {name!r}; it has {self.table.column_names}")
            self._numpy[name] = self.table.column(name).to_numpy(zero_copy_only=False)
        return self._numpy[name]

    def add_column(self, name: str, values: np.ndarray | pa.Array) -> None:
        arr = values if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(values)
        if name in self.table.column_names:
            self.table = self.table.set_column(self.table.column_names.index(name), name, arr)
        else:
            self.table = self.table.append_column(name, arr)
        self._numpy.pop(name, None)

    @property
    def failed(self) -> np.ndarray:
        """Rows that could not be read or decoded (``error`` set)."""
        if not self.has_column("error"):
            return np.zeros(self.n, dtype=bool)
        return self.table.column("error").is_valid().to_numpy(zero_copy_only=False)

    def resolve_embedding(self, kind: str | None) -> str:
        kind = kind or self.default_embedding
        if kind is None or kind not in self.embedding_kinds:
            raise KeyError(f"embedding {kind!r} is not available; choose one of {list(self.embedding_kinds)}")
        return kind

    def iter_embeddings(self, kind: str | None = None) -> Iterator[tuple[ShardPart, np.ndarray]]:
        """Per-shard embedding arrays (rows aligned with ``pool[part.start:part.stop]``)."""
        kind = self.resolve_embedding(kind)
        assert self.embedding_loader is not None
        for part in self.parts:
            yield part, self.embedding_loader(kind, part)

    def embeddings(self, kind: str | None = None, rows: np.ndarray | None = None) -> np.ndarray:
        """Embeddings of ``rows`` (a bool mask or indices; all rows if None) as one float32 array.

        Only the selected rows are materialised, shard by shard.
        """
        if rows is not None and rows.dtype == bool:
            rows = np.flatnonzero(rows)
        chunks = []
        for part, emb in self.iter_embeddings(kind):
            if rows is None:
                chunks.append(np.asarray(emb, dtype=np.float32))
            else:
                lo, hi = np.searchsorted(rows, [part.start, part.stop])
                if hi > lo:
                    chunks.append(np.asarray(emb[rows[lo:hi] - part.start], dtype=np.float32))
        if not chunks:
            dim = next((e.shape[1] for _, e in self.iter_embeddings(kind)), 0)
            return np.zeros((0, dim), dtype=np.float32)
        return np.concatenate(chunks)
