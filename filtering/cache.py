"""Per-shard stage results, cached under ``DIR/cache/<stage>-<fingerprint>/``.

A shard is the unit of work, caching and resume. Each shard's result is a Parquet
table (``<sid>.parquet``) plus optional arrays (``<sid>.<kind>.npy``, e.g. unit-norm
float16 embeddings). Arrays are written first and the table last, each atomically, so
the table's presence marks a complete result. The table's schema metadata records the
source file's size and modification stamp; a changed source is recomputed.
The fingerprint covers everything that changes the result (model, checkpoint,
precision), so results of different models never mix.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from filtering.io.atomic import atomic_open, atomic_write_text, exists
from filtering.io.paths import file_info, get_fs, is_local, join, shard_id

if TYPE_CHECKING:
    from filtering.pool import ShardPart


def save_npy(url: str, arr: np.ndarray) -> None:
    """``arr`` as an ``.npy`` file at ``url`` (local or fsspec), atomically."""
    with atomic_open(url) as f:
        np.save(f, arr)


def load_npy(url: str) -> np.ndarray:
    """An ``.npy`` file written by :func:`save_npy`, read whole (local or fsspec); no pickles."""
    fs, p = get_fs(url)
    with fs.open(p, "rb") as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)


META_KEY = b"poolsift_cache"
ROWS_SAMPLED_PER_SHARD = 16  # embedding rows read to fingerprint one shard's embeddings


def fingerprint(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def part_fingerprint(part: ShardPart, emb: np.ndarray, kind: str) -> str:
    """What one shard's embeddings are: its url, row count, shape and a strided sample of rows.

    Reading a handful of rows (memory-mapped) is enough to tell a rescored or replaced
    shard from the one an assignment was computed from, without hashing every byte.
    """
    h = hashlib.sha256(json.dumps([part.url, part.n, kind, list(emb.shape), str(emb.dtype)]).encode())
    if len(emb):
        rows = np.unique(np.linspace(0, len(emb) - 1, ROWS_SAMPLED_PER_SHARD).astype(np.int64))
        h.update(np.ascontiguousarray(emb[rows]).tobytes())
    return h.hexdigest()[:24]


def read_npy(path: str) -> np.ndarray:
    """An ``.npy`` file: memory-mapped when local, so only the rows read are loaded."""
    if is_local(path):
        return np.load(path.removeprefix("file://"), mmap_mode="r")
    fs, p = get_fs(path)
    with fs.open(p, "rb") as f:
        return np.load(io.BytesIO(f.read()))


class ShardCache:
    def __init__(self, cache_root: str, stage: str, spec: dict[str, Any]):
        self.spec = spec
        self.fingerprint = fingerprint(spec)
        self.dir = join(cache_root, f"{stage}-{self.fingerprint}")
        self.stage = stage

    def table_path(self, url: str) -> str:
        return join(self.dir, f"{shard_id(url)}.parquet")

    def array_path(self, url: str, kind: str) -> str:
        return join(self.dir, f"{shard_id(url)}.{kind}.npy")

    def is_done(self, url: str, source: dict | None = None) -> bool:
        path = self.table_path(url)
        if not exists(path):
            return False
        try:
            meta = self._read_meta(path)
        except (OSError, pa.ArrowInvalid):
            return False
        return meta.get("source") == (source if source is not None else file_info(url))

    def _read_meta(self, path: str) -> dict:
        fs, p = get_fs(path)
        with fs.open(p, "rb") as f:
            schema = pq.read_schema(f)
        return json.loads((schema.metadata or {}).get(META_KEY, b"{}"))

    def read_meta(self, url: str) -> dict:
        """What :meth:`write` recorded beside the shard's table (``extra`` included)."""
        return self._read_meta(self.table_path(url))

    def write(
        self,
        url: str,
        table: pa.Table,
        arrays: dict[str, np.ndarray],
        source: dict | None = None,
        extra: dict | None = None,
    ) -> None:
        for kind, arr in arrays.items():
            save_npy(self.array_path(url, kind), arr)
        meta = {
            "source": source if source is not None else file_info(url),
            "url": url,
            "spec": self.spec,
            **(extra or {}),
        }
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: json.dumps(meta)})
        with atomic_open(self.table_path(url)) as f:
            pq.write_table(table, f)

    def write_info(self, info: dict[str, Any]) -> None:
        atomic_write_text(join(self.dir, "stage.json"), json.dumps(info, indent=2, sort_keys=True))

    def read_info(self) -> dict[str, Any] | None:
        path = join(self.dir, "stage.json")
        if not exists(path):
            return None
        fs, p = get_fs(path)
        with fs.open(p, "r") as f:
            return json.load(f)

    def read_table(self, url: str, columns: list[str] | None = None) -> pa.Table:
        fs, p = get_fs(self.table_path(url))
        with fs.open(p, "rb") as f:
            table = pq.read_table(f, columns=columns)
        return table.replace_schema_metadata(None)

    def read_array(self, url: str, kind: str) -> np.ndarray:
        """Memory-mapped when the cache is local, so only the rows read are loaded."""
        return read_npy(self.array_path(url, kind))
