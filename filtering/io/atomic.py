"""Atomic writes: write to a temporary name beside the target, then rename.

A reader never sees a half-written file, and a run killed mid-write leaves only a
``.tmp-*`` file that the next run overwrites. Local paths use ``os.replace`` (atomic
on POSIX); fsspec URLs write the temporary object then move it.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import IO

from filtering.io.paths import get_fs, is_local, local_path


def _tmp_name(path: str) -> str:
    head, tail = os.path.split(path)
    return os.path.join(head, f".tmp-{uuid.uuid4().hex[:12]}-{tail}")


@contextlib.contextmanager
def atomic_open(url: str, mode: str = "wb") -> Iterator[IO]:
    """Open ``url`` for writing; the file appears under its name only if the block succeeds."""
    if is_local(url):
        path = url.removeprefix("file://")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = _tmp_name(path)
        try:
            with open(tmp, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
        return
    fs, path = get_fs(url)
    tmp = _tmp_name(path)
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with fs.open(tmp, mode) as f:
            yield f
        fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise


def remove_temp_files(root: str) -> int:
    """Delete the ``.tmp-*`` files that killed runs left under a local ``root``; returns how many.

    Only safe while no other process writes under ``root`` (the caller holds the output
    lock). Remote roots are left alone: object stores have no lock to make this safe,
    and a leftover temporary object is never read as a result.
    """
    if not is_local(root):
        return 0
    removed = 0
    for dirpath, _, files in os.walk(root.removeprefix("file://")):
        for name in files:
            if name.startswith(".tmp-"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(dirpath, name))
                    removed += 1
    return removed


def atomic_write_bytes(url: str, data: bytes) -> None:
    with atomic_open(url, "wb") as f:
        f.write(data)


def atomic_write_text(url: str, text: str) -> None:
    atomic_write_bytes(url, text.encode("utf-8"))


def makedirs(url: str) -> None:
    if is_local(url):
        os.makedirs(local_path(url), exist_ok=True)
        return
    fs, path = get_fs(url)
    fs.makedirs(path, exist_ok=True)


def exists(url: str) -> bool:
    if is_local(url):
        return os.path.exists(local_path(url))
    fs, path = get_fs(url)
    return fs.exists(path)
