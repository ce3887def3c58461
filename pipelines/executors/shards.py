"""What the shard plan's phases share (:mod:`pipelines.executors.streaming` and
:mod:`pipelines.executors.dedup_phase`): the run's settings every worker gets
(:class:`_Shared`), one shard's pool and its columns, and the filter tree with every
reduction's result over the pool fixed, so one shard is decided as the whole pool would be."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from filtering.filters.base import Survivors, TopFraction
from filtering.filters.compose import AllOf, AnyOf, FilterNode, Leaf, Not
from filtering.io.paths import join
from filtering.stages.base import RunContext


@dataclass(frozen=True)
class _Shared:
    cfg: Any
    source: Any  # the SourceStage: builds each one-shard pool
    tops: tuple[TopFraction, ...]  # the tree's top_fraction reductions, in leaves() order
    spill: str  # a local folder the workers see: arrays spilled between phases
    staging: str  # where the workers write parts and tars: the spill folder, or the remote output's own
    out_dir: str
    prov: dict[str, Any]
    hex_columns: frozenset[str]
    rows_per_part: int
    column_stages: tuple = ()  # the plan's stages of scope "shard" or "global", in the plan's order
    global_stages: tuple = ()  # (stage, its prepare() result) for the stages of scope "global"
    max_failures: int = 10_000  # failed rows listed per shard (the manifest lists as many in all)


def _shard_pool(sh: _Shared, shard):
    ctx = RunContext(model=sh.cfg.model, out_dir=sh.out_dir, cache_dir=join(sh.out_dir, "cache"), log=lambda _m: None)
    return sh.source.shard_pool(shard, ctx), ctx


def shard_columns(sh: _Shared, ctx: RunContext, pool) -> dict[str, Any]:
    """The column stages' columns of one shard's pool, in the plan's order (the in-memory
    run's, so the columns come in its order): each per-shard stage (the scorers: cached
    per shard, so the phase that first runs them computes, the later ones read) and each
    global stage's per-shard part once its whole-pool step is done (the same per-shard
    cache entries as the in-memory run's). Returns the scorers' records of this shard
    (``ctx.stage_info``), which the driver merges (``streaming.merge_scorer_records``)."""
    prepared = {id(stage): result for stage, result in sh.global_stages}
    for stage in sh.column_stages:
        if stage.scope == "shard":
            stage.run(ctx, pool)
        elif id(stage) in prepared:  # not before its whole-pool step (the scan runs before it)
            stage.run_shard(ctx, pool, prepared[id(stage)])
    return ctx.stage_info.get("scorers", {})


def survivor_positions(nodes: list[FilterNode]) -> list[int]:
    """Positions of the top-level filters whose reduction is :class:`Survivors` (``dedup``)."""
    return [k for k, n in enumerate(nodes) if isinstance(n, Leaf) and isinstance(n.filter.reduction(), Survivors)]


def decided_tree(nodes: list[FilterNode], thresholds: list, survivors: dict[int, tuple] | None) -> list[FilterNode]:
    """The tree with every reduction's result over the pool fixed: each ``TopFraction``
    leaf (in ``leaves()`` order) its threshold, each top-level ``Survivors`` leaf found in
    ``survivors`` its shard's decision (``Filter.decided``)."""
    it = iter(thresholds)

    def walk(node: FilterNode) -> FilterNode:
        if isinstance(node, AllOf):
            return AllOf([walk(c) for c in node.children])
        if isinstance(node, AnyOf):
            return AnyOf([walk(c) for c in node.children])
        if isinstance(node, Not):
            return Not(walk(node.child))
        f = node.filter
        return Leaf(f.decided(next(it))) if isinstance(f.reduction(), TopFraction) else node

    out = [walk(n) for n in nodes]
    for k in survivors or {}:
        out[k] = Leaf(out[k].filter.decided(survivors[k]))
    return out
