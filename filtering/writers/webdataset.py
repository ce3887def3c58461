"""Resharding the kept samples into new WebDataset shards (``output.webdataset: true``).

Every member of a kept sample (``.jpg``, ``.txt``, ``.json``...) is copied byte for byte
from its source shard under the same member name (``key.ext``, the extension as
webdataset reads it, i.e. lower case), in the source's order: images are never decoded
or re-encoded (STYLE, "What to avoid"). Output shards are ``DIR/shards/00000.tar``,
``00001.tar``..., numbered in pool order, each written atomically. Tars follow the pool
as Parquet parts do (docs/spec.md, "Output directory"): each holds samples of one source
shard, at most ``samples_per_shard`` of them, so a source shard's kept samples fill
``ceil(kept / samples_per_shard)`` tars (the last one fewer) and the shard plan writes
each source shard's tars on its own, the same tars as the in-memory plan. Tar headers are
fixed (mtime 0, uid/gid 0, no owner names, mode 0644) so the same selection gives
byte-identical shards on every run.

Source shards are streamed one at a time and only one sample is held in memory. The
i-th sample read from a shard is the i-th pool row of that shard (the scoring stage
records them in read order), so duplicate keys inside a shard cannot be confused; the
key is checked as well, and a source shard that no longer matches its scores is an error.

Member names are safe to extract: a sample whose key is absolute or has a ``..``
component is failed when it is scored (reason ``unsafe_name``), so it is never kept;
the writer refuses one all the same (a cache scored by an older poolsift).
"""

from __future__ import annotations

import contextlib
import io
import tarfile
from typing import Any

import numpy as np

from filtering.errors import PoolsiftError
from filtering.io.atomic import atomic_open, is_write_failure, write_error
from filtering.io.paths import join
from filtering.io.reader import ShardReadResult, iter_shard, unsafe_name
from filtering.pool import Pool

TAR_MODE = 0o644


class _ShardWriter:
    """Opens ``NNNNN.tar`` under ``dir_url`` as needed; at most ``samples_per_shard``
    samples each, and a new one at every source shard (:meth:`end`). ``sizes``: each
    tar's size in bytes, counted as it is written."""

    def __init__(self, dir_url: str, samples_per_shard: int, fsync: bool = True):
        self.dir_url = dir_url
        self.samples_per_shard = samples_per_shard
        self.fsync = fsync  # False: the caller flushes the tars to disk (writers/commit.py)
        self.shards: list[dict[str, Any]] = []
        self.sizes: list[int] = []
        self._stack: contextlib.ExitStack | None = None
        self._file: Any = None
        self._tar: tarfile.TarFile | None = None

    def write(self, key: str, members: dict[str, bytes], source: str) -> None:
        if unsafe_name(key):
            raise PoolsiftError(f"reshard: {source}: sample {key[:200]!r}: {unsafe_name(key)}; rerun without the cache")
        if self._tar is None or self.shards[-1]["count"] >= self.samples_per_shard:
            self._next()
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = TAR_MODE
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        shard = self.shards[-1]
        shard["count"] += 1
        src = shard["sources"].setdefault(source, {"count": 0, "first_key": key})
        src["count"] += 1
        src["last_key"] = key  # a record of fixed size: the subset's rows name every key

    def _next(self) -> None:
        self.end()
        path = join(self.dir_url, f"{len(self.shards):05d}.tar")
        self._stack = contextlib.ExitStack()
        self._file = self._stack.enter_context(atomic_open(path, fsync=self.fsync))
        self._tar = tarfile.open(fileobj=self._file, mode="w|", format=tarfile.PAX_FORMAT)  # noqa: SIM115 — end() closes it
        self.shards.append({"path": path, "count": 0, "sources": {}})

    def end(self) -> None:
        """The open tar closed and renamed into place: the next sample starts a new one."""
        if self._stack is not None:
            self._tar.close()
            self.sizes.append(self._file.tell())
            self._stack.close()  # renames the file into place
        self._stack, self._file, self._tar = None, None, None

    def abort(self) -> None:
        if self._stack is not None:
            with contextlib.suppress(Exception):  # marked closed first, so it never writes again
                self._tar.close()
            with contextlib.suppress(Exception):
                self._stack.__exit__(PoolsiftError, PoolsiftError("aborted"), None)
        self._stack, self._file, self._tar = None, None, None


def write_shards(pool: Pool, keep: np.ndarray, dir_url: str, samples_per_shard: int, fsync: bool = True):
    """The kept samples of ``pool`` as ``dir_url/NNNNN.tar``: each source shard's (a pool
    part's) cut into tars of at most ``samples_per_shard`` samples, so a shard's tars do
    not depend on the other shards and the shard plan writes them per source shard.
    Returns each tar's record (``path``, ``count``, ``sources``: each source's count and
    first and last key, a fixed size per tar: the subset parts list every kept key, in the
    tars' order) and each tar's size in bytes."""
    keys = pool.column("key")
    writer = _ShardWriter(dir_url, samples_per_shard, fsync=fsync)
    try:
        for part in pool.parts:
            wanted = np.flatnonzero(keep[part.start : part.stop])
            if len(wanted) == 0:
                continue
            copied = 0
            want = set(wanted.tolist())
            result = ShardReadResult(part.url)
            for i, sample in enumerate(iter_shard(part.url, result)):
                if i not in want:
                    continue
                if sample.key != keys[part.start + i]:
                    raise PoolsiftError(
                        f"reshard: {part.url} changed since it was scored (sample {i} is {sample.key!r}, "
                        f"expected {keys[part.start + i]!r}); rerun without the cache"
                    )
                writer.write(sample.key, sample.members, part.url)
                copied += 1
                if copied == len(wanted):
                    break
            if copied != len(wanted):
                raise PoolsiftError(
                    f"reshard: could only re-read {copied} of {len(wanted)} kept samples from {part.url}"
                    + (f" ({result.error})" if result.error else "")
                )
            writer.end()
    except BaseException as e:
        writer.abort()
        if is_write_failure(e) and writer.shards:
            raise write_error(writer.shards[-1]["path"], e) from e
        raise
    return writer.shards, writer.sizes
