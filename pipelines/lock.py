"""One run per output directory: an advisory lock (``flock``) on ``DIR/.poolsift.lock``.

The kernel drops the lock when the holder dies, even by SIGKILL, so a crashed run never
leaves a stale lock behind and the rerun resumes at once.

The lock file is opened without following a symbolic link (``O_NOFOLLOW``) and only
written to once it is known to be a regular file with no other name (a planted symlink
or hard link to another file would otherwise have that file truncated and overwritten).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
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
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OutputLockedError(
                f"{path}: is a symbolic link; refusing to use it as the run lock (remove it)"
            ) from None
        raise OutputLockedError(f"{path}: cannot open the run lock: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise OutputLockedError(
                f"{path}: is not a plain file of its own (a link to another file?); refusing to use it as the run lock"
            )
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
