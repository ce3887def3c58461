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
from collections.abc import Iterator


@contextlib.contextmanager
def task_pool(executor, workers: int) -> Iterator:
    """The executor's task pool (``executor.task_pool()``: Ray), or a local process pool of
    ``workers`` (spawned, as every poolsift pool: the driver may hold torch's threads)."""
    if executor is not None:
        with executor.task_pool() as pool:
            yield pool
        return
    from filtering.procpool import ProcessPool

    with ProcessPool(workers, mp_context=mp.get_context("spawn")) as pool:
        yield pool


def runs_tasks(executor) -> bool:
    """Whether ``executor`` can run the plan's tasks (None: the local process pool can)."""
    return executor is None or hasattr(executor, "task_pool")
