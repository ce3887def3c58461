"""What the shard plan's phases share (:mod:`pipelines.executors.streaming` and
:mod:`pipelines.executors.dedup_phase`): the run's settings every worker gets
(:class:`_Shared`), one shard's pool and its columns, and the filter tree with every
reduction's result over the pool fixed, so one shard is decided as the whole pool would be."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from filtering.filters.base import Survivors, TopFraction
from filtering.filters.compose import AllOf, AnyOf, FilterNode, Leaf, Not, apply_filters
from filtering.io.paths import join
from filtering.stages.base import RunContext
from pipelines.executors.uid_phase import UidDuplicates, later_rows


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
    uids_spilled: bool = False  # each shard's uids spilled before the filter pass (uid_phase.spill_uids)
    uid_later: bool = False  # input.uid.duplicates: keep_first found later copies (uid_phase.later_rows)
    write: bool = True  # False: the filter pass returns counts only, writes nothing (``poolsift sweep``)


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


Path = tuple[int, ...]  # a node's place in the tree: its top-level index, then its child index at each level


def uid_prefix(sh: _Shared, i: int, pool) -> list[FilterNode]:
    """What runs before the tree on shard ``i``: the later copies of repeated uids dropped
    (``input.uid.duplicates: keep_first``), as the in-memory plan drops them first."""
    if not sh.uid_later:
        return []
    later = np.zeros(pool.n, bool)
    later[later_rows(sh.spill, i)] = True
    return [UidDuplicates(later)]


def survivor_paths(nodes: list[FilterNode]) -> list[Path]:
    """The paths of the leaves whose reduction is :class:`Survivors` (``dedup``), in
    ``leaves()`` order: each one's alive rows depend only on leaves before it."""
    out: list[Path] = []

    def walk(node: FilterNode, path: Path) -> None:
        if isinstance(node, AllOf | AnyOf):
            for k, child in enumerate(node.children):
                walk(child, (*path, k))
        elif isinstance(node, Not):
            walk(node.child, (*path, 0))
        elif isinstance(node.filter.reduction(), Survivors):
            out.append(path)

    for k, node in enumerate(nodes):
        walk(node, (k,))
    return out


def node_at(nodes: list[FilterNode], path: Path) -> FilterNode:
    node = nodes[path[0]]
    for k in path[1:]:
        node = node.child if isinstance(node, Not) else node.children[k]
    return node


def alive_at(nodes: list[FilterNode], path: Path, pool, prefix: list[FilterNode] = ()) -> np.ndarray:
    """The rows that reach the node at ``path``, as ``apply_filters`` evaluates the tree
    (``filtering/filters/compose.py``): the top-level entries before it in order (after
    ``prefix``), then in an ``all`` the children before it; an ``any``'s children and a
    ``not``'s child see the rows that reach the ``any`` or ``not``."""
    alive = apply_filters([*prefix, *nodes[: path[0]]], pool).keep
    node = nodes[path[0]]
    for k in path[1:]:
        if isinstance(node, AllOf):
            for child in node.children[:k]:
                alive = alive & child.evaluate(pool, alive).keep
        node = node.child if isinstance(node, Not) else node.children[k]
    return alive


def decided_tree(nodes: list[FilterNode], thresholds: list, survivors: dict[Path, tuple] | None) -> list[FilterNode]:
    """The tree with every reduction's result over the pool fixed: each ``TopFraction``
    leaf (in ``leaves()`` order) its threshold, each ``Survivors`` leaf whose path is in
    ``survivors`` its shard's decision (``Filter.decided``)."""
    it = iter(thresholds)
    survivors = survivors or {}

    def walk(node: FilterNode, path: Path) -> FilterNode:
        if isinstance(node, AllOf):
            return AllOf([walk(c, (*path, k)) for k, c in enumerate(node.children)])
        if isinstance(node, AnyOf):
            return AnyOf([walk(c, (*path, k)) for k, c in enumerate(node.children)])
        if isinstance(node, Not):
            return Not(walk(node.child, (*path, 0)))
        f = node.filter
        if isinstance(f.reduction(), TopFraction):
            return Leaf(f.decided(next(it)))
        return Leaf(f.decided(survivors[path])) if path in survivors else node

    return [walk(n, (k,)) for k, n in enumerate(nodes)]
