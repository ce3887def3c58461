"""The dedup candidate search as a column stage: computation, cached; the filter decides.

For ``method: exact`` and ``method: perceptual`` the ``dedup`` filter
(:mod:`filtering.dedup.dedup_filter`) reads one internal column, the row's group label
from :func:`filtering.dedup.partitioned.search` (``dedup_label_exact``,
``dedup_label_exact_caption`` or ``dedup_label_phash_d<k>``), and, perceptual, the pairs
of labels within the radius (``pool.artifacts[<column> + ".pairs"]``). The search runs
once over every row of the pool, so it does not depend on which rows reach the filter;
the filter restricts the labels and pairs to those rows, which gives the groups the
search over those rows alone would give (:func:`filtering.dedup.groups.label_edges`).

The result is cached in ``DIR/cache/dedup-<fingerprint>/`` (``labels.npy``,
``pairs.npy``): the fingerprint covers the search settings, the shard layout and a
digest of the key columns' contents (their Arrow buffers: one fast pass, no Python
object per row), so a rerun that changes the survivor rule, an earlier or a later
filter, or the outputs does not search again, and a changed input is never misread.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pyarrow as pa

from filtering.cache import fingerprint, load_npy, save_npy
from filtering.dedup import partitioned
from filtering.dedup.search_cache import table_digest
from filtering.io.atomic import atomic_write_text, exists
from filtering.io.paths import is_local, join
from filtering.pool import Pool
from filtering.stages.base import ColumnStage, RunContext
from filtering.tasks import runs_tasks, task_pool

PARALLEL_MIN_ROWS = 200_000  # below this a process pool costs more than it saves


def workers_for(rows: int) -> int:
    """Worker processes for a dedup step over ``rows`` rows: as the streaming plan, one per
    core unless ``POOLSIFT_WORKERS`` says otherwise; none below :data:`PARALLEL_MIN_ROWS`."""
    if rows < PARALLEL_MIN_ROWS:
        return 1
    from filtering.tasks import plan_workers

    return plan_workers()


def label_column(settings: partitioned.SearchSettings) -> str:
    if settings.method == "exact":
        return "dedup_label_exact_caption" if settings.with_caption else "dedup_label_exact"
    return f"dedup_label_{settings.key_column}_d{settings.max_distance}"


def pairs_key(column: str) -> str:
    return f"{column}.pairs"


def content_digest(pool: Pool, columns: list[str]) -> str:
    """sha256 of the columns' Arrow buffers (with each chunk's offset and length)."""
    return table_digest(pool.table.select(columns))


class DedupSearchStage(ColumnStage):
    """One candidate search (one set of search settings), shared by dedup filters with the same settings."""

    scope = "reduction"  # on the shard plan, the dedup filter's survivors step searches (dedup_phase.py)

    def __init__(self, settings: partitioned.SearchSettings, cache_root: str, workers: int | None = None):
        self.settings = settings
        self.cache_root = cache_root
        self.workers = workers
        self.column = label_column(settings)
        self.name = f"dedup:{self.column}"
        self.last_workers = 1

    def provides(self) -> set[str]:
        return {self.column}

    def requires(self) -> set[str]:
        return set(self.settings.columns())

    def spec(self, pool: Pool) -> dict[str, Any]:
        return {
            "search": self.settings.describe(),
            "rows": pool.n,
            "parts": [[p.url, p.start, p.stop] for p in pool.parts],
            "content": content_digest(pool, self.settings.columns()),
        }

    def run(self, ctx: RunContext, pool: Pool) -> None:
        t0 = time.perf_counter()
        pool.materialize(self.settings.columns())  # DataComp's captions are read late
        spec = self.spec(pool)
        folder = join(self.cache_root, f"dedup-{fingerprint(spec)}")
        labels_path, pairs_path = join(folder, "labels.npy"), join(folder, "pairs.npy")
        cached = exists(labels_path) and exists(pairs_path)
        if cached:
            labels = load_npy(labels_path)
            pairs = load_npy(pairs_path)
        else:
            labels, a, b = self.search(pool, ctx.executor)
            pairs = np.stack([a, b], axis=1) if len(a) else np.zeros((0, 2), np.int64)
            save_npy(pairs_path, pairs)
            save_npy(labels_path, labels)  # last: its presence marks a complete entry
            atomic_write_text(join(folder, "spec.json"), json.dumps(spec, indent=1))
        pool.add_column(self.column, pa.array(labels, pa.int64()))
        pool.internal.add(self.column)
        pool.artifacts[pairs_key(self.column)] = (pairs[:, 0], pairs[:, 1])
        info = ctx.stage_info.setdefault("dedup", {})
        info[self.column] = {
            "cache": "reused" if cached else "computed",
            "fingerprint": fingerprint(spec),
            "pairs": int(len(pairs)),
            "workers": None if cached else self.last_workers,
            "seconds": round(time.perf_counter() - t0, 3),
        }

    def search(self, pool: Pool, executor=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The partitioned search; with an executor that runs tasks (Ray, ``filtering/tasks.py``)
        its emit and reduce steps are tasks there, with the same results, and its spill
        files go under the cache folder even when that is an fsspec URL."""
        table = pool.table.select(self.settings.columns())
        shards = [partitioned.ShardKeys(p.start, p.n, table=table.slice(p.start, p.n)) for p in pool.parts]
        workers = self.workers if self.workers is not None else workers_for(pool.n)
        self.last_workers = max(1, workers)
        on_cluster = executor is not None and runs_tasks(executor)
        # Spill files under the cache, on the output's file system, which every Ray node sees;
        # local workers of a run with a remote output spill to local disk instead.
        work_dir = self.cache_root if is_local(self.cache_root) or on_cluster else None
        if on_cluster:
            with task_pool(executor, workers) as tasks:
                self.last_workers = tasks.workers
                return partitioned.search(
                    shards, pool.n, self.settings, workers=tasks.workers, work_dir=work_dir, executor=tasks
                )
        return partitioned.search(shards, pool.n, self.settings, workers=workers, work_dir=work_dir)
