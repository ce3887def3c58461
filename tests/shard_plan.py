"""A ``scope == "global"`` column stage run as the shard plan runs it, on a test's pool.

The plan (``pipelines/executors/streaming.py``) calls the stage's ``prepare`` in the driver
with the source (whose ``skeleton_pool`` gives the shard parts and embeddings), then
``run_shard`` on each shard's own pool in a worker with a fresh context, and merges the
records with ``merge_records``. :func:`run_global_stage` does the same in this process on a
test's whole pool: each part cut out as a one-shard pool (rows from 0, its embeddings the
part's), the stage's columns joined back in pool order, the merged record in
``ctx.stage_info[stage.name]``.
"""

from __future__ import annotations

import pyarrow as pa

from filtering.pool import Pool, ShardPart
from filtering.stages.base import ColumnStage, RunContext


class PoolSource:
    """A source whose skeleton pool is the test's pool (the stage reads its parts,
    embeddings and failed rows, as a real skeleton pool gives them)."""

    def __init__(self, pool: Pool):
        self.pool = pool

    def skeleton_pool(self, counts: list[int]) -> Pool:
        assert counts == [p.n for p in self.pool.parts]
        return self.pool


def one_shard(pool: Pool, part: ShardPart) -> Pool:
    """``part``'s rows as the shard plan's one-shard pool: one part from row 0."""
    own = ShardPart(part.url, part.sid, 0, part.n)
    load = pool.embedding_loader
    return Pool(
        pool.table.slice(part.start, part.n),
        [own],
        embedding_loader=None if load is None else (lambda kind, _p: load(kind, part)),
        embedding_kinds=pool.embedding_kinds,
        default_embedding=pool.default_embedding,
    )


def run_global_stage(stage: ColumnStage, ctx: RunContext, pool: Pool) -> None:
    assert stage.scope == "global"
    prepared = stage.prepare(ctx, PoolSource(pool), [p.n for p in pool.parts])
    records, added = [], {}
    for part in pool.parts:
        shard = one_shard(pool, part)
        sctx = RunContext(model=ctx.model, out_dir=ctx.out_dir, cache_dir=ctx.cache_dir, log=lambda _m: None)
        stage.run_shard(sctx, shard, prepared)
        records.append(sctx.stage_info[stage.name])
        for name in sorted(stage.provides()):
            added.setdefault(name, []).append(shard.table.column(name))
    for name, columns in added.items():
        pool.add_column(name, pa.chunked_array([c for col in columns for c in col.chunks], columns[0].type))
    ctx.stage_info[stage.name] = stage.merge_records(ctx.stage_info[stage.name], records)


# -- the dedup phase on a test's pool -------------------------------------------------------------


class PoolShards:
    """A source whose shards are a test's pool's parts (shard ``k``: part ``k``), each read as
    the plan's one-shard pool; picklable (the table and each part's embeddings as arrays), so a
    process pool's workers build the shards as a real source's do."""

    def __init__(self, pool: Pool):
        self.table, self.parts = pool.table, list(pool.parts)
        self.kinds, self.default = pool.embedding_kinds, pool.default_embedding
        load = pool.embedding_loader
        self.emb = {k: [load(k, p) for p in self.parts] for k in self.kinds} if load else {}

    def shard_pool(self, shard: int, ctx) -> Pool:
        part = self.parts[shard]
        emb = {k: parts[shard] for k, parts in self.emb.items()}
        return Pool(
            self.table.slice(part.start, part.n),
            [ShardPart(part.url, part.sid, 0, part.n)],
            embedding_loader=(lambda kind, _p: emb[kind]) if emb else None,
            embedding_kinds=self.kinds,
            default_embedding=self.default,
        )


class InProcess:
    """A task pool (``filtering/tasks.py``) that runs each task here, in order."""

    def __init__(self, workers: int = 2):
        self.workers = workers

    def map(self, fn, args):
        return map(fn, list(args))


def run_dedup_phase(nodes: list, pool: Pool, work_dir: str, tasks=None, ctx: RunContext | None = None, spill=None):
    """The shard plan's dedup phase (``pipelines/executors/dedup_phase.py: run_dedup``) over
    ``pool``'s parts as shards, then its filter pass: each shard's pool through the tree with
    the survivors fixed (``decided_tree``). Returns the shards' outcomes joined in pool order
    (``keep``, ``drop_reason``, ``duplicate_of``, the ``funnel`` summed) and the context, whose
    ``stage_info`` holds the phase's records. ``tasks``: in this process unless given (a real
    pool: ``filtering.tasks.task_pool``); ``spill``: the plan's spill folder (``work_dir/.spill``)."""
    import os
    from types import SimpleNamespace

    import numpy as np

    from filtering.filters.compose import apply_filters
    from pipelines.executors.dedup_phase import run_dedup
    from pipelines.executors.shards import _Shared, decided_tree

    spill = spill or os.path.join(work_dir, ".spill")
    os.makedirs(spill, exist_ok=True)
    source = PoolShards(pool)
    cfg = SimpleNamespace(model=None, filter_tree=tuple(nodes))
    sh = _Shared(cfg, source, (), spill, spill, work_dir, {}, frozenset(), 1_000_000)
    ctx = ctx or RunContext(out_dir=work_dir, cache_dir=os.path.join(work_dir, "cache"), log=lambda _m: None)
    shards = list(range(len(source.parts)))
    decided = run_dedup(tasks or InProcess(), sh, shards, [p.n for p in source.parts], [], ctx)
    outcomes = [apply_filters(decided_tree(list(nodes), [], decided[i]), source.shard_pool(i, ctx)) for i in shards]
    funnel = []
    for k, first in enumerate(outcomes[0].funnel if outcomes else []):
        entry = {**first, "reasons": {}}
        for key in ("in", "kept", "dropped"):
            entry[key] = sum(o.funnel[k][key] for o in outcomes)
        for o in outcomes:
            for reason, count in o.funnel[k]["reasons"].items():
                entry["reasons"][reason] = entry["reasons"].get(reason, 0) + count
        funnel.append(entry)

    def joined(name):
        parts = [getattr(o, name) for o in outcomes]
        return np.concatenate(parts) if parts else np.zeros(0, object if name != "keep" else bool)

    out = SimpleNamespace(
        keep=joined("keep"), drop_reason=joined("drop_reason"), duplicate_of=joined("duplicate_of"), funnel=funnel
    )
    return out, ctx
