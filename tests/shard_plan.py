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
