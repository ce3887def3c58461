"""Atomic writes: write to a temporary name beside the target, then rename.

A reader never sees a half-written file, and a run killed mid-write leaves only a
``.tmp-*`` file that the next run overwrites. Local paths use ``os.replace`` (atomic
on POSIX); fsspec URLs write the temporary object then move it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterator
from typing import IO

from filtering.errors import PoolsiftError
from filtering.io.paths import get_fs, is_local, local_path


class WriteError(PoolsiftError):
    """Writing an output or cache file failed (disk full, permissions): one line naming it."""


def write_error(path: str, e: OSError) -> WriteError:
    """``e`` as one line naming ``path``. numpy's short writes carry no errno (``16000
    requested and 8128 written``); they happen when the disk fills, which is said."""
    if e.errno is not None:
        cause = f"{e.strerror or os.strerror(e.errno)} (errno {e.errno})"
    else:
        cause = " ".join(str(e).split()) or type(e).__name__
        if "requested and" in cause:
            cause = f"short write ({cause}); is the disk full?"
    return WriteError(f"cannot write {path}: {cause}")


_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def is_write_failure(e: BaseException) -> bool:
    """Whether ``e`` is a failure to write (not, say, an input read error raised while an
    output file was open)."""
    if not isinstance(e, OSError):
        return False
    return e.errno in _WRITE_ERRNOS or (e.errno is None and "requested and" in str(e))


def _tmp_name(path: str) -> str:
    head, tail = os.path.split(path)
    return os.path.join(head, f".tmp-{uuid.uuid4().hex[:12]}-{tail}")


@contextlib.contextmanager
def atomic_open(url: str, mode: str = "wb", fsync: bool = True) -> Iterator[IO]:
    """Open ``url`` for writing; the file appears under its name only if the block succeeds.
    ``fsync=False``: the caller makes it durable later (``filtering/writers/commit.py: fsync_files``), e.g. a spill
    file that is renamed into place at a commit."""
    if is_local(url):
        path = url.removeprefix("file://")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = _tmp_name(path)
        try:
            with open(tmp, mode) as f:
                yield f
                f.flush()
                if fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            if is_write_failure(e):
                raise write_error(path, e) from e
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
