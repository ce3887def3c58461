"""Where the plan's tasks run: plain module-level functions over picklable arguments.

A task pool has ``map(fn, args)`` (results in submission order, so outputs never depend
on which worker finished first), ``submit(fn, arg)`` (a ``concurrent.futures.Future``)
and ``workers`` (how many tasks run at once). The streaming plan
(``pipelines/executors/streaming.py``) and the partitioned dedup search
(``filtering/dedup/partitioned.py``) run every phase through one, so the same functions
run on a local process pool or as Ray tasks (``pipelines/executors/ray.py:
RayExecutor.task_pool``). Tasks return small results (counts, histograms, paths); what
is large per shard stays in spill files on the output's file system, which every
worker must see (on a multi-machine cluster: shared storage).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def task_pool(executor, workers: int) -> Iterator:
    """The executor's task pool (``executor.task_pool()``: Ray), or a local process pool of
    ``workers``, started as :func:`start_method` says."""
    if executor is not None:
        with executor.task_pool() as pool:
            yield pool
        return
    from filtering.io.arrow import pandas_blocked
    from filtering.procpool import ProcessPool

    context = mp.get_context(start_method())
    # a spawned worker blocks pandas as the driver does (filtering/io/arrow.py); a forked one inherits it
    no_pandas = context.get_start_method() == "spawn" and pandas_blocked()
    with ProcessPool(workers, mp_context=context, initializer=init_worker, initargs=(os.getpid(), no_pandas)) as pool:
        yield pool


def init_worker(parent: int, no_pandas: bool = False) -> None:
    """A task-pool worker's start: it dies with the driver, and blocks pandas if asked.

    A worker forked from the driver holds copies of every file the driver had open: the
    pool's own pipes (so it never sees them close) and the output folder's lock. Were the
    driver killed (SIGKILL, the OOM killer), such a worker would wait for tasks for ever
    and keep the folder locked against every rerun. On Linux the kernel kills it with its
    parent (``PR_SET_PDEATHSIG``); a parent already gone by then ends it here."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)
    if no_pandas:
        from filtering.io.arrow import block_pandas

        block_pandas()


def start_method() -> str:
    """``fork`` when the driver runs no other Python thread and has not imported torch (a
    metadata-only run: numpy, pyarrow and the config), else ``spawn``.

    A spawned worker starts a fresh interpreter and imports poolsift, pyarrow and numpy
    again: about 0.5 CPU seconds each and, with the pool's first tasks waiting on it, about
    a second of wall time per run (measured with bench/bench_scale.py). A forked one starts
    at once with the driver's modules. Forking is unsafe only where another thread may
    hold a lock at the fork (torch's thread pools, a preloading or progress thread), so
    those drivers keep spawning.
    """
    import threading

    if "torch" in sys.modules or threading.active_count() > 1 or "fork" not in mp.get_all_start_methods():
        return "spawn"
    return "fork"


def runs_tasks(executor) -> bool:
    """Whether ``executor`` can run the plan's tasks (None: the local process pool can)."""
    return executor is None or hasattr(executor, "task_pool")
