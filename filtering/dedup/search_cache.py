"""The candidate search's result (:func:`filtering.dedup.partitioned.search`: a label per
row and the pairs of labels), cached under ``DIR/cache/dedup-<fingerprint>/``.

The search runs over every row of the pool, whatever reaches the filter, so its result
depends only on the search settings and on the key columns of the shards in pool order.
The fingerprint covers exactly that: the settings (with the spill format's version) and,
per shard, its url, its row count and a digest of its key columns' contents (their Arrow
buffers, one fast pass in the worker that already holds the shard). A rerun that changes
the survivor rule, ``min_similarity``, an earlier or a later filter, or the outputs reads
the entry; a shard added, removed, reordered or rescored, or another radius or key,
misses it and searches again (``tests/pipelines/test_dedup_search_cache.py``).

An entry is ``pair_a.npy``, ``pair_b.npy``, ``spec.json`` and, written last, ``labels.npy``:
each file atomic, the labels' presence marking a complete entry.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pyarrow as pa

from filtering.cache import fingerprint, load_npy, save_npy
from filtering.dedup.partitioned import SearchSettings
from filtering.io.atomic import atomic_write_text, exists
from filtering.io.paths import is_local, join, local_path


def table_digest(table: pa.Table) -> str:
    """sha256 of the columns' Arrow buffers (with each chunk's offset and length)."""
    h = hashlib.sha256()
    for name, col in zip(table.column_names, table.columns, strict=True):
        h.update(f"{name}:{col.type}:{col.num_chunks}".encode())
        for chunk in col.chunks:
            h.update(f"{chunk.offset}:{len(chunk)}:{chunk.null_count}".encode())
            for buf in chunk.buffers():
                h.update(b"-" if buf is None else memoryview(buf))
    return h.hexdigest()


def shard_key(url: str, table: pa.Table) -> list:
    """One shard's part of the key: ``[url, rows, digest of the key columns]``."""
    return [url, table.num_rows, table_digest(table)]


class SearchCache:
    """One search's entry: ``settings`` over the shards ``shards`` (each :func:`shard_key`)."""

    def __init__(self, cache_root: str, settings: SearchSettings, shards: list[list]):
        self.spec: dict[str, Any] = {"search": settings.describe(), "shards": shards}
        self.rows = sum(int(s[1]) for s in shards)
        self.fingerprint = fingerprint(self.spec)
        self.dir = join(cache_root, f"dedup-{self.fingerprint}")

    def _path(self, name: str) -> str:
        return join(self.dir, f"{name}.npy")

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``(labels, pair_a, pair_b)``, or None when there is no complete entry."""
        if not exists(self._path("labels")):
            return None
        try:
            labels, a, b = (_read(self._path(name)) for name in ("labels", "pair_a", "pair_b"))
        except (OSError, ValueError):  # a damaged entry is searched again, and overwritten
            return None
        if labels.shape != (self.rows,) or a.shape != b.shape:
            return None
        return labels, a, b

    def save(self, labels: np.ndarray, pair_a: np.ndarray, pair_b: np.ndarray) -> None:
        save_npy(self._path("pair_a"), pair_a)
        save_npy(self._path("pair_b"), pair_b)
        atomic_write_text(join(self.dir, "spec.json"), json.dumps(self.spec, indent=1))
        save_npy(self._path("labels"), labels)  # last: its presence marks a complete entry


def _read(url: str) -> np.ndarray:
    """A cached array, writable (the survivors step may label into it), read once."""
    if is_local(url):
        return np.load(local_path(url), allow_pickle=False)
    return load_npy(url)
