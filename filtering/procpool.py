"""Waiting on a ``ProcessPoolExecutor`` whose workers may be killed (the OOM killer, SIGKILL).

CPython (seen on 3.11.7) can hang for ever when a worker dies in the middle of sending a
large result: the executor's manager thread blocks in ``recv`` on the half-written
message (the parent holds the pipe's write end too, so no EOF ever comes), the
futures are never failed, and ``shutdown(wait=True)`` then joins that thread for ever.
Decode workers return about a megabyte of pixels per chunk, so this is not rare: it
hung ``test_dead_worker_is_a_clear_error`` under load, and a minimal script (kill a
worker while it returns 5 MB) hangs in 6 runs of 8.

:func:`result` therefore polls the future and the workers' exit codes, and
:func:`shutdown` closes the parent's copies of the two pipe ends the stuck threads wait
on, which turns the hang into the ``BrokenProcessPool`` the executor would have raised.
:class:`ProcessPool` does the same for ``map`` and ``with`` blocks; every process pool in
poolsift is one of these (decode workers, reference decoding, language identification on
all cores, the streaming plan).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
from concurrent.futures.process import BrokenProcessPool

POLL_SECONDS = 0.5


def _processes(executor: cf.ProcessPoolExecutor) -> list:
    return list((getattr(executor, "_processes", None) or {}).values())


def worker_died(executor: cf.ProcessPoolExecutor) -> bool:
    return any(p.exitcode is not None for p in _processes(executor))


def result(fut: cf.Future, executor: cf.ProcessPoolExecutor):
    """``fut.result()``, raising ``BrokenProcessPool`` as soon as any worker has died."""
    while True:
        try:
            return fut.result(timeout=POLL_SECONDS)
        except cf.TimeoutError:
            if worker_died(executor):
                raise BrokenProcessPool("a worker process exited while its results were awaited") from None


def _unblock(executor: cf.ProcessPoolExecutor) -> None:
    """Kill the live workers and close our pipe ends, so the executor's threads can finish."""
    for p in _processes(executor):
        if p.exitcode is None:
            p.kill()
    # The manager thread may be blocked reading a half-sent result, the queue's feeder
    # thread writing a task nobody will read: closing our ends gives them EOF / EPIPE.
    for queue, end in (("_result_queue", "_writer"), ("_call_queue", "_reader")):
        conn = getattr(getattr(executor, queue, None), end, None)
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()


def shutdown(executor: cf.ProcessPoolExecutor) -> None:
    """Cancel what is queued and stop the workers; never hangs on a pool whose worker died."""
    if worker_died(executor):
        _unblock(executor)
    cf.ProcessPoolExecutor.shutdown(executor, wait=True, cancel_futures=True)


class ProcessPool(cf.ProcessPoolExecutor):
    """``ProcessPoolExecutor`` whose ``map`` raises and whose ``shutdown`` (also on leaving a
    ``with`` block) returns when a worker was killed, instead of hanging (module doc)."""

    @property
    def workers(self) -> int:
        """How many tasks run at once (the task pool protocol, ``filtering/tasks.py``)."""
        return self._max_workers

    def map(self, fn, *iterables, timeout=None, chunksize=1):
        futures = collections.deque(self.submit(fn, *args) for args in zip(*iterables, strict=False))

        def ordered():
            try:
                while futures:  # a result handed out is not held here too (histograms of every shard)
                    yield result(futures.popleft(), self)
            finally:
                for f in futures:
                    f.cancel()

        return ordered()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if worker_died(self):
            _unblock(self)
            cancel_futures = True
        super().shutdown(wait=wait, cancel_futures=cancel_futures)
