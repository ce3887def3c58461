"""One run per output directory: an advisory lock (``flock``) on ``DIR/.poolsift.lock``.

The kernel drops the lock when the holder dies, even by SIGKILL, so a crashed run never
leaves a stale lock behind and the rerun resumes at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

from filtering.errors import PoolsiftError
from filtering.io.paths import is_local


class OutputLockedError(PoolsiftError):
    exit_code = 1


@contextlib.contextmanager
def output_lock(out_dir: str) -> Iterator[None]:
    if not is_local(out_dir):
        # Object stores have no advisory locks; concurrent runs there are the user's to avoid.
        yield
        return
    path = os.path.join(out_dir.removeprefix("file://"), ".poolsift.lock")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise OutputLockedError(
                f"output directory {out_dir} is in use by another poolsift run (pid {holder}); "
                "wait for it to finish or choose another --output"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
