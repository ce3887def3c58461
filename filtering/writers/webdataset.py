"""Resharding the kept samples into new WebDataset shards (``output.webdataset: true``).

Every member of a kept sample (``.jpg``, ``.txt``, ``.json``...) is copied byte for byte
from its source shard under the same member name (``key.ext``, the extension as
webdataset reads it, i.e. lower case), in the source's order: images are never decoded
or re-encoded (STYLE, "What to avoid"). Output shards are ``DIR/shards/00000.tar``,
``00001.tar``... with ``samples_per_shard`` samples each (the last one fewer), in pool
order, each written atomically. Tar headers are fixed (mtime 0, uid/gid 0, no owner
names, mode 0644) so the same selection gives byte-identical shards on every run.

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
from filtering.io.paths import get_fs, join
from filtering.io.reader import ShardReadResult, iter_shard, unsafe_name
from filtering.pool import Pool

TAR_MODE = 0o644


class _ShardWriter:
    """Opens ``NNNNN.tar`` under ``dir_url`` as needed; ``samples_per_shard`` samples each."""

    def __init__(self, dir_url: str, samples_per_shard: int):
        self.dir_url = dir_url
        self.samples_per_shard = samples_per_shard
        self.shards: list[dict[str, Any]] = []
        self._stack: contextlib.ExitStack | None = None
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
        src = shard["sources"].setdefault(source, {"count": 0, "keys": []})
        src["count"] += 1
        src["keys"].append(key)

    def _next(self) -> None:
        self._close()
        path = join(self.dir_url, f"{len(self.shards):05d}.tar")
        self._stack = contextlib.ExitStack()
        f = self._stack.enter_context(atomic_open(path))
        tar = tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT)  # noqa: SIM115 — the stack closes it
        self._tar = self._stack.enter_context(tar)
        self.shards.append({"path": path, "count": 0, "sources": {}})

    def _close(self) -> None:
        if self._stack is not None:
            self._stack.close()  # closes the tar, then renames the file into place
        self._stack, self._tar = None, None

    def close(self) -> None:
        self._close()

    def abort(self) -> None:
        if self._stack is not None:
            with contextlib.suppress(Exception):
                self._stack.__exit__(PoolsiftError, PoolsiftError("aborted"), None)
        self._stack, self._tar = None, None


def reshard(pool: Pool, keep: np.ndarray, out_dir_url: str, samples_per_shard: int, ctx) -> list[str]:
    """Write the kept samples as new shards; returns their paths and records, in
    ``pool.artifacts["reshard_map"]``, each output shard's count and sources."""
    keys = pool.column("key")
    writer = _ShardWriter(out_dir_url, samples_per_shard)
    bar = ctx.bar(int(keep.sum()), "reshard")
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
                bar.update(1)
                if copied == len(wanted):
                    break
            if copied != len(wanted):
                raise PoolsiftError(
                    f"reshard: could only re-read {copied} of {len(wanted)} kept samples from {part.url}"
                    + (f" ({result.error})" if result.error else "")
                )
        writer.close()
    except BaseException as e:
        writer.abort()
        if is_write_failure(e) and writer.shards:
            raise write_error(writer.shards[-1]["path"], e) from e
        raise
    finally:
        bar.close()
    paths = [s["path"] for s in writer.shards]
    _remove_stale(out_dir_url, {p.rsplit("/", 1)[-1] for p in paths})
    pool.artifacts["reshard_map"] = writer.shards
    return paths


def _remove_stale(dir_url: str, keep: set[str]) -> None:
    """Shards left by an earlier run that wrote more of them."""
    fs, path = get_fs(dir_url)
    if not fs.exists(path):
        return
    for p in fs.glob(f"{path}/*.tar"):
        if p.rsplit("/", 1)[-1] not in keep:
            fs.rm(p)
