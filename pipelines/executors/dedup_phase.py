"""The streaming plan's dedup phase: exact and perceptual ``dedup`` without the pool in the driver.

A top-level ``dedup`` (``method: exact`` or ``perceptual``, no ``min_similarity``) is a
global decision over small per-row arrays, in three steps between the cluster targets
and the filter pass (``pipelines/executors/streaming.py``):

1. **search** (per shard, then per partition): each shard's key columns (``sha256``,
   ``caption``, ``phash``) emitted into spill files partitioned by key hash, each
   partition reduced on a worker (:mod:`filtering.dedup.partitioned`, the in-memory
   search stage's code); the driver holds one int64 label per row and the pairs of labels.
2. **alive at dedup** (per shard): the shard through the filters before the dedup (the
   global thresholds, earlier dedups' decisions); returned as the alive mask and, for the
   alive rows, the keep score (float64) and the uid as two uint64 (its string order for
   lowercase 32-hex uids; any other uid sends the run to the in-memory path).
3. **survivors** (driver): components of the alive rows
   (:func:`filtering.dedup.partitioned.components_of`), then in each component of two or
   more the row preferred by the filter's rule (:func:`filtering.dedup.groups.keep_rank`:
   score descending, missing scores last, then the smallest uid); each shard gets back its
   dropped rows and their survivors' uids only.

The filter pass then applies the decision in place of the ``dedup`` leaf (same funnel,
reason codes and ``duplicate_of`` as the in-memory filter).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from filtering.dedup import partitioned
from filtering.dedup.dedup_filter import Dedup
from filtering.dedup.search_stage import label_column
from filtering.filters.base import Decision
from filtering.filters.compose import FilterNode, Leaf, apply_filters
from filtering.uid import uids_to_u8u8


def dedup_positions(nodes: list[FilterNode]) -> list[int]:
    """Positions of the top-level ``dedup`` leaves (the only ones the streaming plan takes)."""
    return [k for k, n in enumerate(nodes) if isinstance(n, Leaf) and isinstance(n.filter, Dedup)]


class _DecidedDedup(Dedup):
    """A ``dedup`` leaf whose decision for one shard was taken over the whole pool."""

    def __init__(self, base: Dedup, drop: np.ndarray, dup_hi: np.ndarray, dup_lo: np.ndarray):
        super().__init__(base.params, base.input)
        self.drop, self.dup_hi, self.dup_lo = drop, dup_hi, dup_lo

    def apply(self, pool, alive: np.ndarray) -> Decision:
        keep = np.ones(pool.n, dtype=bool)
        keep[self.drop] = False
        duplicate_of = np.full(pool.n, None, dtype=object)
        duplicate_of[self.drop] = [
            f"{int(h):016x}{int(lo):016x}" for h, lo in zip(self.dup_hi, self.dup_lo, strict=True)
        ]
        return Decision(keep, self.reason, duplicate_of)


def with_decisions(nodes: list[FilterNode], decided: dict[int, tuple] | None) -> list[FilterNode]:
    """The top-level list with each decided ``dedup`` leaf replaced by its shard's decision."""
    if not decided:
        return nodes
    return [Leaf(_DecidedDedup(n.filter, *decided[k])) if k in decided else n for k, n in enumerate(nodes)]


# ---------------------------------------------------------------- workers


def _emit(args) -> int:
    from pipelines.executors.streaming import _shard_pool

    sh, shard, first_row, n, settings, partitions, spill, tag = args
    pool, _ = _shard_pool(sh, shard)  # the source's names and types (DataComp's text is caption)
    pool.materialize(settings.columns())
    keys = partitioned.ShardKeys(first_row, n, table=pool.table.select(settings.columns()))
    return partitioned.emit_shard(keys, settings, partitions, spill, tag)


def _reduce(args) -> partitioned.PartitionResult:
    return partitioned.reduce_partition(*args)


def _alive_at(args) -> dict[str, Any]:
    """One shard through the filters before the dedup at ``position``: the alive mask, and
    for the alive rows the keep score and the uid (two uint64)."""
    from pipelines.executors.streaming import _shard_pool, _with_thresholds

    sh, shard, thresholds, decided, position = args
    pool, ctx = _shard_pool(sh, shard)
    for stage in sh.scorer_stages:
        stage.run(ctx, pool)
    if sh.clusters is not None:
        from pipelines.executors.streaming import _ASSIGNERS

        stage, targets = sh.clusters
        stage.assign(ctx, pool, targets, _ASSIGNERS)
    nodes = with_decisions(_with_thresholds(list(sh.cfg.filter_tree), thresholds), decided)
    alive = apply_filters(nodes[:position], pool).keep
    f = nodes[position].filter
    rows = np.flatnonzero(alive)
    uid = pool.table.column("uid").cast(pa.string()).take(pa.array(rows))
    if len(uid) and not pc.all(pc.equal(uid, pc.utf8_lower(uid))).as_py():
        return {"bad_uids": "uids not in lowercase hex"}
    try:
        u = uids_to_u8u8(uid)
    except Exception as e:  # noqa: BLE001 — the in-memory path reports bad uids its own way
        return {"bad_uids": f"{type(e).__name__}: {e}"}
    out: dict[str, Any] = {"alive": np.packbits(alive), "n": pool.n, "hi": u["f0"], "lo": u["f1"]}
    if f.params.keep == "highest_clip_score":
        s = np.asarray(pool.column(f.score_field)[rows], dtype=np.float64)
        out["score"] = np.where(np.isnan(s), -np.inf, s) + 0.0  # missing last; -0.0 ties 0.0
    return out


# ---------------------------------------------------------------- driver


def run_dedup(tasks, sh, shards, shard_rows: list[int], thresholds: list, ctx) -> list[dict] | None:
    """Every top-level dedup decided over the pool; per shard ``{position: (dropped rows,
    survivor uid high, low)}``, or None when the run must take the in-memory path.

    ``tasks``: the plan's task pool (``filtering/tasks.py``: local processes or Ray tasks)."""
    nodes = list(sh.cfg.filter_tree)
    n = int(sum(shard_rows))
    starts = np.r_[0, np.cumsum(shard_rows)].astype(np.int64)
    decided: list[dict[int, tuple]] = [{} for _ in shards]
    searched: dict[Any, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    info = ctx.stage_info.setdefault("dedup", {})
    positions = dedup_positions(nodes)
    # The last position that uses each search: its labels are freed (and reused) there.
    last_use = {nodes[p].filter.search_settings(): p for p in positions}
    for position in positions:
        f = nodes[position].filter
        settings = f.search_settings()
        t0 = time.perf_counter()
        if settings not in searched:
            searched[settings] = _search(tasks, sh, shards, shard_rows, starts, n, settings)
            labels, pair_a, _ = searched[settings]
            info[label_column(settings)] = {
                "cache": "computed",
                "pairs": int(len(pair_a)),
                "workers": tasks.workers,
                "seconds": round(time.perf_counter() - t0, 3),
            }
        last = last_use[settings] == position
        labels, pair_a, pair_b = searched.pop(settings) if last else searched[settings]
        results = []
        for r in tasks.map(_alive_at, [(sh, s, thresholds, decided[i], position) for i, s in enumerate(shards)]):
            if "bad_uids" in r:
                ctx.log(f"execution: uids the dedup step cannot order ({r['bad_uids']}); filtering in memory")
                return None
            r["alive"] = np.unpackbits(r["alive"], count=r["n"]).view(bool)
            results.append(r)
        # One column at a time, each shard's part freed once copied: the driver never holds
        # a column twice.
        alive = _gather(results, "alive", bool)
        hi = _gather(results, "hi", np.uint64)
        lo = _gather(results, "lo", np.uint64)
        neg_score = None
        if f.params.keep == "highest_clip_score":
            neg_score = _gather(results, "score", np.float64)
            np.negative(neg_score, out=neg_score)
        del results
        rows = np.flatnonzero(alive)
        comp = partitioned.components_of(labels, pair_a, pair_b, alive, copy=not last)
        del labels, pair_a, pair_b, alive
        comp = comp[rows]
        drop, best = _survivors(comp, neg_score, hi, lo)
        del comp, neg_score
        # per shard: the dropped rows (shard-local) and their survivors' uids
        dropped_rows = rows[drop]
        del rows
        cut = np.searchsorted(dropped_rows, starts)
        for i in range(len(shards)):
            a, b = cut[i], cut[i + 1]
            decided[i][position] = (dropped_rows[a:b] - starts[i], hi[best[a:b]], lo[best[a:b]])
    return decided


def _gather(results: list[dict], key: str, dtype) -> np.ndarray:
    """The shards' ``key`` arrays end to end, each shard's freed once copied."""
    out = np.empty(sum(len(r[key]) for r in results), dtype)
    at = 0
    for r in results:
        part = r.pop(key)
        out[at : at + len(part)] = part
        at += len(part)
    return out


def _survivors(comp: np.ndarray, neg_score, hi: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Over the alive rows (in row order): the positions dropped, and for each its survivor's
    position. The filter's rule: score descending (``neg_score``: the negated scores, if
    any), then the smallest uid, then the first row.

    Only the rows of components of two or more are sorted (a singleton survives itself)."""
    if len(comp) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    size = np.bincount(comp)
    multi = np.flatnonzero(size[comp] > 1)
    del size
    c = comp[multi]
    keys = (lo[multi], hi[multi]) + ((neg_score[multi],) if neg_score is not None else ()) + (c,)
    order = np.lexsort(keys)  # by component, best first; stable, so ties keep row order
    del keys
    c = c[order]
    first = np.empty(len(c), bool)
    first[:1] = True
    np.not_equal(c[1:], c[:-1], out=first[1:])
    del c
    group = np.cumsum(first)
    group -= 1
    best = order[np.flatnonzero(first)][group]  # per sorted position: its component's best
    del group, first
    loser = np.flatnonzero(best != order)
    # positions (into the alive rows) of the dropped rows and of their survivors, by row
    dropped, survivor = multi[order[loser]], multi[best[loser]]
    del order, best, loser
    by_row = np.argsort(dropped, kind="stable")
    return dropped[by_row], survivor[by_row]


def _search(tasks, sh, shards, shard_rows, starts, n: int, settings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The partitioned candidate search over every row (the in-memory search stage's result)."""
    partitions = partitioned.num_partitions(n * settings.records_per_row(), settings.method, tasks.workers)
    spill = tempfile.mkdtemp(prefix="dedup-spill-", dir=sh.spill)
    try:
        emit = [
            (sh, s, int(starts[k]), int(shard_rows[k]), settings, partitions, spill, f"s{k:06d}")
            for k, s in enumerate(shards)
        ]
        for _ in tasks.map(_emit, emit):
            pass
        labels = np.arange(n, dtype=np.int64)
        pair_a, pair_b = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]

        def reduce_args():
            for p in range(partitions):
                folder = partitioned.partition_dir(spill, p)
                names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
                yield ([os.path.join(folder, f) for f in names if not f.startswith(".")], settings)

        for result in tasks.map(_reduce, list(reduce_args())):
            labels[result.rows] = result.labels
            pair_a.append(result.pair_a)
            pair_b.append(result.pair_b)
        return labels, np.concatenate(pair_a), np.concatenate(pair_b)
    finally:
        shutil.rmtree(spill, ignore_errors=True)
