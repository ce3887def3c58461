"""The one owner of parallelism: every local process pool in poolsift is made here
(:func:`process_pool`: decode workers, language identification, the dedup partitions, the
plan's tasks), and every thread pool (:func:`thread_pool`: reading metadata, writing parts,
hashing inputs, flushing files); their workers are counted here (:func:`worker_count`,
:func:`plan_workers`, from :func:`cores`), mapped over with a bounded window here
(:func:`windowed`), and every worker process dies with the driver (:func:`init_worker`).
``tests/filtering/test_one_owner.py`` fails when a pool or a core count appears elsewhere.

Where the plan's tasks run: plain module-level functions over picklable arguments.

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

import concurrent.futures as cf
import contextlib
import multiprocessing as mp
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any


@contextlib.contextmanager
def task_pool(executor, workers: int) -> Iterator:
    """The executor's task pool (``executor.task_pool()``: Ray), or a local process pool of
    ``workers``, started as :func:`start_method` says."""
    if executor is not None:
        with executor.task_pool() as pool:
            yield pool
        return
    from filtering.io.arrow import pandas_blocked

    start = start_method()
    # a spawned worker blocks pandas as the driver does (filtering/io/arrow.py); a forked one inherits it
    with process_pool(workers, start, no_pandas=start == "spawn" and pandas_blocked()) as pool:
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
    those drivers keep spawning. So do drivers with an OpenMP runtime loaded (faiss's
    libgomp: the image_clusters targets, k-means): after a parallel region in the driver, a
    forked worker's first parallel region waits for ever on the driver's team, which the
    fork did not copy (tests/filtering/test_tasks.py).
    """
    import threading

    if (
        "torch" in sys.modules
        or threading.active_count() > 1
        or _openmp_loaded()
        or "fork" not in mp.get_all_start_methods()
    ):
        return "spawn"
    return "fork"


def _openmp_loaded() -> bool:
    """Whether this process has loaded faiss or any OpenMP runtime (libgomp, LLVM's libomp,
    Intel's libiomp), whose thread team a fork cannot copy."""
    if "faiss" in sys.modules:
        return True
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:  # not Linux: faiss is what loads one here
        return False
    return any(name in maps for name in ("libgomp", "libomp.so", "libiomp"))


def runs_tasks(executor) -> bool:
    """Whether ``executor`` can run the plan's tasks (None: the local process pool can)."""
    return executor is None or hasattr(executor, "task_pool")


# --- every local process pool ---------------------------------------------------------


def cores() -> int:
    """This machine's CPU count (at least one): the only place poolsift asks for it."""
    return os.cpu_count() or 1


def worker_count(
    configured: int | None = None, *, reserve: int = 0, per: int = 1, least: int = 1, cap: int | None = None
) -> int:
    """How many workers a pool gets: ``configured`` when set (``model.num_workers``, a
    test's pin), else one per ``per`` of the cores left after ``reserve``, at least
    ``least`` and at most ``cap``."""
    if configured is not None:
        return configured
    n = max(least, (cores() - reserve) // per)
    return min(n, cap) if cap is not None else n


def plan_workers(cap: int | None = None, configured: int | None = None) -> int:
    """Workers for the plan's tasks and the dedup steps: ``configured`` (``execution.workers``)
    when set, else ``POOLSIFT_WORKERS`` when set, else one per core; at least one, at most ``cap``."""
    env = os.environ.get("POOLSIFT_WORKERS")
    n = max(1, worker_count(configured if configured is not None else int(env) if env else None))
    return min(n, max(1, cap)) if cap is not None else n


@contextlib.contextmanager
def process_pool(workers: int, start: str = "spawn", initializer=None, initargs: tuple = (), no_pandas: bool = False):
    """A local pool of ``workers`` processes started by ``start`` (``spawn``, or ``fork``:
    :func:`start_method`): the one way poolsift makes one (decode workers, language
    identification, the dedup partitions, the plan's tasks). Each worker first runs
    :func:`init_worker` (it dies with the driver; ``no_pandas``: it blocks pandas), then
    ``initializer(*initargs)``. The pool is a :class:`~filtering.procpool.ProcessPool`, so a
    killed worker is an error, never a hang."""
    from filtering.procpool import ProcessPool

    context = mp.get_context(start)
    args = (os.getpid(), no_pandas, initializer, initargs)
    with ProcessPool(workers, mp_context=context, initializer=_start_worker, initargs=args) as pool:
        yield pool


@contextlib.contextmanager
def thread_pool(workers: int) -> Iterator[cf.ThreadPoolExecutor]:
    """A pool of ``workers`` threads (at least one), for work that releases the GIL (pyarrow
    reading and writing, hashlib, fsync): the one way poolsift makes one."""
    with cf.ThreadPoolExecutor(max(1, workers)) as pool:
        yield pool


def _start_worker(parent: int, no_pandas: bool, initializer, initargs: tuple) -> None:
    init_worker(parent, no_pandas)
    if initializer is not None:
        initializer(*initargs)


def windowed(pool, fn, items: Iterable[tuple[Any, tuple | None]], ahead: int) -> Iterator[tuple[Any, Any]]:
    """The bounded-window map every pool runs: ``(tag, args)`` items in, ``(tag, fn(*args))``
    out, in order (an item whose ``args`` is None passes through as ``(tag, None)``). At most
    ``ahead`` tasks wait beyond the one awaited, so the driver holds a few results however
    many items there are; a dead worker raises ``BrokenProcessPool`` (``procpool.result``);
    leaving early (an error, ``close()``) cancels what is queued."""
    from filtering.procpool import result

    pending: deque = deque()
    try:
        for tag, args in items:
            pending.append((tag, None if args is None else pool.submit(fn, *args)))
            while len(pending) > ahead:
                tag, fut = pending.popleft()
                yield tag, None if fut is None else result(fut, pool)
        while pending:
            tag, fut = pending.popleft()
            yield tag, None if fut is None else result(fut, pool)
    finally:
        for _, fut in pending:
            if fut is not None:
                fut.cancel()
