"""The streaming plan: a DataComp-metadata pool filtered shard by shard on all cores.

Used when every filter in the tree decides a row from that row alone (caption,
language, image_size, text_entities, wordnet_synsets, uids, ``clip_score`` /
``score`` thresholds, ``image_clusters`` once the target clusters are known), or is a
``clip_score`` ``top_fraction`` over the whole pool. No
process holds the pool; each phase is a map over shards on a process pool, or a small
reduction in the driver:

1. **scan** (per shard): read ``uid`` and the ``top_fraction`` score columns only;
   write the shard's sorted ``u8,u8`` uids to a spill file; return, per score column,
   the NaN count and a 65,536-bin histogram of the scores' order-preserving bit keys.
2. **duplicates** (per uid range): the spilled uids of every shard, one range of
   their high bits at a time, sorted; any repeat sends the run to the in-memory path,
   which reports it exactly as before (``input.uid.duplicates``).
3. **threshold** (driver + per shard): DataComp's ``sorted_desc[int(N * f)]``
   (``filtering/filters/clip_score.py``, NaN counted in N and sorted last). The
   histograms give the bin holding that rank (narrowed by more 16-bit histogram passes
   while it holds more than GATHER_LIMIT scores); the shards return only the scores in
   that bin, and ``np.partition`` picks the exact value, in the column's dtype.
3b. **cluster targets** (driver; ``image_clusters`` only): centroids, reference
   embeddings and target ids by ``ImageClustersStage.find_targets`` on a pool of shard
   parts and embeddings (no column), in the in-memory path's caches.
4. **filter** (per shard): the shard read as a one-shard pool, its rows assigned to
   clusters (``ImageClustersStage.assign``, the in-memory path's per-shard cache), the
   filter tree applied with the global thresholds (same code as the in-memory path);
   kept and dropped rows
   spilled as Arrow files, the kept uids spilled sorted; the funnel comes back as
   counts per filter and reason code.
5. **write** (per output part): parts cut where the in-memory writer cuts them, each
   encoded from the memory-mapped spill files; ``subset.npy`` by a k-way merge of the
   sorted per-shard uid files, one high-bit range per task, written into place; the
   manifest last (the commit record), from the summed counts.

What each phase holds per row is in the README ("What each stage holds per row").
Outputs equal the in-memory path's: ``subset.npy`` and every subset and dropped part
byte for byte, and the manifest's counts, thresholds and uid report.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from filtering.filters.clip_score import ClipScore
from filtering.filters.compose import AllOf, AnyOf, FilterNode, Leaf, Not, apply_filters
from filtering.io.atomic import atomic_write_text
from filtering.io.paths import is_local, join, local_path, open_file
from filtering.procpool import ProcessPool
from filtering.provenance import provenance
from filtering.stages.base import RunContext
from filtering.uid import UID_DTYPE, sort_u8u8, uids_to_u8u8
from filtering.writers.commit import file_records, invalidate
from filtering.writers.parquet import HEX_COLUMNS, _leaf_paths, _PartWriter, dropped_table, remove_parts, subset_stream

# Filters whose decision for a row reads only that row (a global top_fraction is handled apart).
# ``image_clusters`` is row-local once the target clusters are known (a small id set the
# driver finds first); each shard's rows are then assigned in the workers.
ROW_LOCAL = frozenset(
    {
        "caption",
        "language",
        "image_size",
        "text_entities",
        "wordnet_synsets",
        "uids",
        "clip_score",
        "score",
        "image_clusters",
    }
)
KEY_BITS = 16  # histogram of the top bits of each score's order-preserving key
FINE_BITS = 12  # uid ranges: the top bits of the uid's high half
RANGE_ROWS = 2_000_000  # uids sorted per merge task (32 MB)
SPILL = ".streaming"


def why_not(cfg, the_plan, executor) -> str | None:
    """Why this run cannot stream (None: it can, with outputs equal to the in-memory path's)."""
    from filtering.image_clusters.image_clusters_stage import ImageClustersStage
    from filtering.scorers.base import ScorerStage

    if the_plan.source.info.kind != "datacomp":
        return "input is not DataComp metadata"
    if executor is not None:
        return "an executor is configured"
    # A filter's own scorers (language's language_id) run shard by shard in the workers;
    # configured scorers (model heads) keep the in-memory path, which loads them once.
    # The cluster stage splits: targets in the driver, assignment in the workers.
    whole = [
        s
        for s in the_plan.stages
        if not (isinstance(s, ScorerStage) and s.internal) and not isinstance(s, ImageClustersStage)
    ]
    if whole:
        return f"stage {type(whole[0]).__name__} needs the whole pool"
    if cfg.output.webdataset:
        return "output.webdataset"
    if not (is_local(cfg.output.dir) and is_local(cfg.input.datacomp_metadata)):
        return "remote input or output"
    for node in cfg.filter_tree:
        reason = _node_why_not(node)
        if reason:
            return reason
    return None


def _node_why_not(node: FilterNode) -> str | None:
    if isinstance(node, AllOf | AnyOf):
        return next((r for c in node.children if (r := _node_why_not(c))), None)
    if isinstance(node, Not):
        return _node_why_not(node.child)
    if not isinstance(node, Leaf):
        return f"filter {node.label()} is not row-local"
    f = node.filter
    if f.name not in ROW_LOCAL:
        return f"filter {f.name} is not row-local"
    if f.name == "score" and f.params.top_fraction is not None:
        return "score top_fraction (only clip_score's top_fraction streams)"
    return None


def _top_fraction_leaves(nodes: list[FilterNode]) -> list[ClipScore]:
    out = []
    for node in nodes:
        for f in node.leaves():
            if isinstance(f, ClipScore) and f.params.top_fraction is not None:
                out.append(f)
    return out


class _GlobalClipScore(ClipScore):
    """``clip_score`` with the threshold the whole pool gave (a shard's own would differ)."""

    def __init__(self, base: ClipScore, value):
        super().__init__(base.params, base.input)
        self.value = value

    def threshold(self, pool):
        return self.value


def _with_thresholds(nodes: list[FilterNode], values: list) -> list[FilterNode]:
    """The tree with each top_fraction ``clip_score`` leaf (in ``leaves()`` order) fixed to its global value."""
    it = iter(values)

    def walk(node: FilterNode) -> FilterNode:
        if isinstance(node, AllOf):
            return AllOf([walk(c) for c in node.children])
        if isinstance(node, AnyOf):
            return AnyOf([walk(c) for c in node.children])
        if isinstance(node, Not):
            return Not(walk(node.child))
        f = node.filter
        if isinstance(f, ClipScore) and f.params.top_fraction is not None:
            return Leaf(_GlobalClipScore(f, next(it)))
        return node

    return [walk(n) for n in nodes]


# ---------------------------------------------------------------- score keys


def score_keys(values: np.ndarray) -> np.ndarray:
    """uint64 keys ordered as the (non-NaN) float values: sign-flipped IEEE bits; -0.0 as 0.0."""
    bits = (np.asarray(values, dtype=np.float64) + 0.0).view(np.uint64)
    neg = (bits >> np.uint64(63)).astype(bool)
    return np.where(neg, ~bits, bits | np.uint64(1 << 63))


def _score_column(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False)  # as Pool.column reads it


# ---------------------------------------------------------------- workers (module level: picklable)


@dataclass(frozen=True)
class _Shared:
    cfg: Any
    requested: frozenset[str]
    fields: tuple[str, ...]  # score column of each top_fraction leaf
    spill: str
    out_dir: str
    prov: dict[str, Any]
    hex_columns: frozenset[str]
    rows_per_part: int
    scorer_stages: tuple = ()  # the plan's ScorerStages, run on each shard's pool (cached per shard)
    clusters: Any = None  # (ImageClustersStage, ClusterTargets): assign each shard's rows


def _read(shard, columns: list[str]) -> pa.Table:
    from filtering.stages.datacomp import naming

    with naming(shard.parquet), open_file(shard.parquet) as f:
        return pq.ParquetFile(f).read(columns=columns, use_threads=False)


def _scan(args) -> dict[str, Any]:
    sh, i, shard = args
    fields = list(dict.fromkeys(sh.fields))
    table = _read(shard, ["uid", *fields])
    out: dict[str, Any] = {"n": table.num_rows, "hists": {}, "nan": {}, "dtype": {}}
    try:
        uids = sort_u8u8(uids_to_u8u8(table.column("uid").cast(pa.string())))
    except Exception as e:  # noqa: BLE001 — the in-memory path reports bad uids its own way
        out["bad_uids"] = f"{type(e).__name__}: {e}"
        return out
    np.save(os.path.join(sh.spill, f"all-{i:06d}.npy"), uids)
    out["uid_bins"] = np.bincount((uids["f0"] >> np.uint64(64 - FINE_BITS)).astype(np.int64), minlength=1 << FINE_BITS)
    for name in fields:
        scores = _score_column(table, name)
        nan = np.isnan(scores)
        out["nan"][name] = int(nan.sum())
        out["dtype"][name] = scores.dtype.str
        keys = score_keys(scores[~nan])
        out["hists"][name] = np.bincount((keys >> np.uint64(64 - KEY_BITS)).astype(np.int64), minlength=1 << KEY_BITS)
    return out


def _keys_under(scores: np.ndarray, prefix: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The non-NaN scores whose key starts with ``prefix`` (its top ``bits`` bits), and their keys."""
    scores = scores[~np.isnan(scores)]
    keys = score_keys(scores)
    if bits:
        hit = (keys >> np.uint64(64 - bits)) == np.uint64(prefix)
        scores, keys = scores[hit], keys[hit]
    return scores, keys


def _refine(args) -> np.ndarray:
    """One shard's histogram of the next KEY_BITS key bits, among scores under ``prefix``."""
    sh, shard, name, prefix, bits = args
    _, keys = _keys_under(_score_column(_read(shard, [name]), name), prefix, bits)
    shift = np.uint64(64 - bits - KEY_BITS)
    return np.bincount(((keys >> shift) & np.uint64((1 << KEY_BITS) - 1)).astype(np.int64), minlength=1 << KEY_BITS)


def _gather(args) -> np.ndarray:
    """One shard's scores under ``prefix``."""
    sh, shard, name, prefix, bits = args
    scores, _ = _keys_under(_score_column(_read(shard, [name]), name), prefix, bits)
    return scores


def _load_range(paths: list[str], ranges: list[tuple[int, int]]) -> np.ndarray:
    chunks = []
    for path, (lo, hi) in zip(paths, ranges, strict=True):
        if hi > lo:
            chunks.append(np.array(np.load(path, mmap_mode="r")[lo:hi]))
    return sort_u8u8(np.concatenate(chunks)) if chunks else np.zeros(0, UID_DTYPE)


def _has_repeat(args) -> bool:
    paths, ranges = args
    s = _load_range(paths, ranges)
    return bool(len(s) > 1 and ((s["f0"][1:] == s["f0"][:-1]) & (s["f1"][1:] == s["f1"][:-1])).any())


def _merge_range(args) -> int:
    paths, ranges, target, offset = args
    s = _load_range(paths, ranges)
    if len(s):
        out = np.load(target, mmap_mode="r+")
        out[offset : offset + len(s)] = s
        out.flush()
        del out
    return len(s)


def _write_part(args) -> str:
    """Part ``index`` of a folder from slices of the per-shard spill files, encoded as
    ``write_parts_stream`` encodes it (same row groups, so the same bytes)."""
    sh, dir_url, index, pieces, schema_path = args
    tables = []
    for path, lo, n in pieces:  # memory-mapped: the slices are read as they are encoded
        tables.append(pa.ipc.open_file(pa.memory_map(path)).read_all().slice(lo, n))
    schema = pa.ipc.open_file(pa.memory_map(schema_path)).schema
    meta = {**(schema.metadata or {}), b"poolsift": json.dumps(sh.prov, sort_keys=True)}
    schema = schema.with_metadata(meta)
    hexes = {f.name for f in schema if f.name in sh.hex_columns and pa.types.is_string(f.type)}
    leaves = _leaf_paths(schema)
    options = {
        "compression": {p: "none" if p in hexes else "snappy" for p in leaves} or "snappy",
        "use_dictionary": [p for p in leaves if p not in hexes],
    }
    parts = _PartWriter(dir_url, schema, sh.rows_per_part, options, first_index=index)
    with parts:
        for table in tables:
            parts.add(table)
    assert len(parts.paths) == 1
    return parts.paths[0]


def _spill_table(path: str, schema: pa.Schema, tables) -> int:
    n = 0
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for t in tables:
            writer.write_table(t)
            n += t.num_rows
    return n


def _shard_pool(sh: _Shared, shard):
    from filtering.stages.datacomp import DataCompStage

    stage = DataCompStage(sh.cfg.input.datacomp_metadata, join(sh.out_dir, "cache"))
    stage._shards = [shard]
    stage.request(set(sh.requested))
    ctx = RunContext(config=sh.cfg, out_dir=sh.out_dir, cache_dir=join(sh.out_dir, "cache"), log=lambda _m: None)
    return stage.run(ctx), ctx


def _filter(args) -> dict[str, Any]:
    """One shard through the filter tree: kept rows (late columns read for them only) and
    the dropped rows spilled as Arrow files, the kept uids sorted, the funnel as counts."""
    sh, i, shard, thresholds = args
    pool, ctx = _shard_pool(sh, shard)
    for stage in sh.scorer_stages:  # e.g. language's language_id: its cache is per shard anyway
        stage.run(ctx, pool)
    if sh.clusters is not None:  # the same per-shard cache entries as the in-memory run's
        stage, targets = sh.clusters
        stage.assign(ctx, pool, targets, _ASSIGNERS)
    nodes = _with_thresholds(list(sh.cfg.filter_tree), thresholds)
    outcome = apply_filters(nodes, pool)
    schema, tables = subset_stream(pool, outcome.keep)
    n_kept = _spill_table(os.path.join(sh.spill, f"subset-{i:06d}.arrow"), schema, tables)
    n_dropped = 0
    if sh.cfg.output.dropped:
        table = dropped_table(pool.table, outcome, pool.failed, pool.artifacts.get("carried_columns", ()))
        n_dropped = _spill_table(os.path.join(sh.spill, f"dropped-{i:06d}.arrow"), table.schema, [table])
    kept = sort_u8u8(uids_to_u8u8(pool.table.column("uid").filter(pa.array(outcome.keep))))
    np.save(os.path.join(sh.spill, f"kept-{i:06d}.npy"), kept)
    return {
        "funnel": outcome.funnel,
        "kept": n_kept,
        "dropped": n_dropped,
        "uid_bins": np.bincount((kept["f0"] >> np.uint64(64 - FINE_BITS)).astype(np.int64), minlength=1 << FINE_BITS),
        "thresholds": outcome.thresholds,
        "language_identifiers": pool.artifacts.get("language_identifiers", []),
        "stage_info": ctx.stage_info.get("datacomp", {}),
        "scorers": ctx.stage_info.get("scorers", {}),
        "clusters": ctx.stage_info.get("clusters"),
    }


_ASSIGNERS: dict = {}  # per worker process: the centroids' Assigner, built once


def _cluster_targets(stage, shards, counts: list[int], ctx: RunContext):
    """The target clusters, found as the in-memory run finds them (same caches), from a
    pool of shard parts and embeddings only: no metadata column, nothing per row."""
    from filtering.pool import Pool, ShardPart
    from filtering.stages.datacomp import _embedding_kinds, default_embedding, load_npz_array

    parts, start = [], 0
    for shard, n in zip(shards, counts, strict=True):
        parts.append(ShardPart(shard.parquet, shard.stem, start, start + n))
        start += n
    npz = {s.stem: s.npz for s in shards}
    kinds = _embedding_kinds(shards)
    skeleton = Pool(
        table=pa.table({"rows": pa.nulls(start)}),  # a null-typed column: a row count, no buffers
        parts=parts,
        embedding_loader=lambda kind, part: load_npz_array(npz[part.sid], kind, part),
        embedding_kinds=kinds,
        default_embedding=default_embedding(kinds),
    )
    return stage.find_targets(ctx, skeleton)


def _sum_cluster_info(info: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """The driver's record of the targets, with the shards' assignment counts summed."""
    info = {**info, "cache": dict(info["cache"])}
    info["cache"]["shards_assigned"] = sum(r["clusters"]["cache"]["shards_assigned"] for r in results)
    info["cache"]["shards_cached"] = sum(r["clusters"]["cache"]["shards_cached"] for r in results)
    info["rows_in_target"] = sum(r["clusters"]["rows_in_target"] for r in results)
    return info


def part_pieces(counts: list[int], rows_per_part: int) -> list[list[tuple[int, int, int]]]:
    """The parts of a folder as the in-memory writer cuts them (``rows_per_part`` rows of
    the rows in pool order; one empty part when there are none): per part, the
    ``(shard, first row in shard, rows)`` slices it takes."""
    cum = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(cum[-1])
    parts = []
    for start in range(0, max(total, 1), rows_per_part):
        stop = min(start + rows_per_part, total)
        pieces = []
        s = int(np.searchsorted(cum, start, side="right")) - 1
        pos = start
        while pos < stop:
            take = min(stop, int(cum[s + 1])) - pos
            if take > 0:
                pieces.append((s, pos - int(cum[s]), take))
            pos += take
            s += 1
        parts.append(pieces)
    return parts


# ---------------------------------------------------------------- driver


def _ranges(bins: list[np.ndarray], limit: int = RANGE_ROWS) -> list[list[tuple[int, int]]]:
    """Group the fine uid bins into tasks of about ``limit`` rows: per task, each shard's row range."""
    per_shard = np.stack(bins)  # shards x bins
    cum = np.concatenate([np.zeros((len(bins), 1), np.int64), np.cumsum(per_shard, axis=1)], axis=1)
    totals = per_shard.sum(axis=0)
    tasks, start, acc = [], 0, 0
    for b, count in enumerate(totals):
        acc += int(count)
        if acc >= limit or b == len(totals) - 1:
            tasks.append([(int(cum[s, start]), int(cum[s, b + 1])) for s in range(len(bins))])
            start, acc = b + 1, 0
    return tasks


GATHER_LIMIT = 1 << 20  # scores gathered into the driver at most (8 MB), except exact ties


def select_threshold(hist: np.ndarray, nan: int, total: int, fraction: float, dtype: np.dtype, refine, gather):
    """DataComp's ``top_fraction`` threshold (``filtering/filters/clip_score.py``) from counts:
    None (index past the end: keep all), NaN (index among the NaN rows), or the exact value
    at ``sorted_desc[int(N * fraction)]``.

    ``hist`` counts the non-NaN scores by the top KEY_BITS bits of their key. While the
    bin holding the rank has more than GATHER_LIMIT scores, ``refine(prefix, bits)``
    (the summed histogram of the next bits under that prefix) narrows it; then
    ``gather(prefix, bits)`` returns the scores under the prefix and ``np.partition``
    picks the value. A prefix of all 64 bits is one value: no gathering at all."""
    n = int(total * fraction)
    if n >= total:
        return None
    scored = total - nan
    if n >= scored:
        return dtype.type(np.nan)
    rank = scored - 1 - n  # ascending rank of sorted_desc[n] among the scored rows
    prefix, bits = 0, 0
    while True:
        cum = np.cumsum(hist)
        b = int(np.searchsorted(cum, rank, side="right"))
        rank -= int(cum[b - 1]) if b else 0
        prefix, bits = (prefix << KEY_BITS) | b, bits + KEY_BITS
        if bits == 64:
            return key_value(prefix, dtype)
        if int(hist[b]) <= GATHER_LIMIT:
            scores = gather(prefix, bits)
            return np.partition(scores, rank)[rank]
        hist = refine(prefix, bits)


def key_value(key: int, dtype: np.dtype):
    """The score whose key is ``key`` (the inverse of :func:`score_keys`), in ``dtype``."""
    k = np.uint64(key)
    bits = k & np.uint64((1 << 63) - 1) if k >> np.uint64(63) else ~k
    return dtype.type(np.array([bits], dtype=np.uint64).view(np.float64)[0])


def _sum_funnels(funnels: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    out = []
    for steps in zip(*funnels, strict=True):
        reasons: Counter = Counter()
        for s in steps:
            reasons.update(s["reasons"])
        out.append(
            {
                "name": steps[0]["name"],
                "in": sum(s["in"] for s in steps),
                "kept": sum(s["kept"] for s in steps),
                "dropped": sum(s["dropped"] for s in steps),
                "reasons": dict(sorted((k, v) for k, v in reasons.items() if v)),
            }
        )
    return out


def _uniform(shards) -> bool:
    """Every shard has the same schema (else the in-memory path's permissive concat applies)."""
    from filtering.stages.datacomp import _read_schema

    first = _read_schema(shards[0]).remove_metadata()
    return all(_read_schema(s).remove_metadata().equals(first) for s in shards[1:])


def workers_for(n_shards: int) -> int:
    env = os.environ.get("POOLSIFT_WORKERS")
    n = int(env) if env else (os.cpu_count() or 1)
    return max(1, min(n, n_shards))


def run_streaming(cfg, the_plan, ctx: RunContext) -> dict[str, Any] | None:
    """Run the whole plan shard-parallel; returns the manifest, or None (nothing written)
    when the pool turns out to need the in-memory path (repeated uids, mixed schemas)."""
    source = the_plan.source
    shards = source._shards
    out_dir = cfg.output.dir
    if not _uniform(shards):
        ctx.log("execution: shards differ in schema; filtering in memory")
        return None
    spill = os.path.join(local_path(out_dir), SPILL)
    shutil.rmtree(spill, ignore_errors=True)
    os.makedirs(spill)
    try:
        return _run(cfg, source, shards, ctx, spill, the_plan.stages)
    finally:
        shutil.rmtree(spill, ignore_errors=True)


def _run(cfg, source, shards, ctx: RunContext, spill: str, the_plan_stages=()) -> dict[str, Any] | None:
    from filtering.image_clusters.image_clusters_stage import ImageClustersStage
    from pipelines.runner import _json_default, check_funnel, manifest_record, model_record

    cluster_stage = next((s for s in the_plan_stages if isinstance(s, ImageClustersStage)), None)

    top = _top_fraction_leaves(list(cfg.filter_tree))
    config_dict = cfg.to_dict()
    model = model_record(cfg, ctx, source)
    prov = provenance(config_dict, cfg.sha256(), model)
    sh = _Shared(
        cfg=cfg,
        requested=frozenset(source.requested),
        fields=tuple(f.field for f in top),
        spill=spill,
        out_dir=cfg.output.dir,
        prov=prov,
        hex_columns=frozenset(HEX_COLUMNS | set(source.info.hex_columns)),
        rows_per_part=cfg.output.rows_per_part,
        scorer_stages=tuple(s for s in the_plan_stages if s is not cluster_stage),
    )
    n_workers = workers_for(len(shards))
    all_paths = [os.path.join(spill, f"all-{i:06d}.npy") for i in range(len(shards))]
    kept_paths = [os.path.join(spill, f"kept-{i:06d}.npy") for i in range(len(shards))]
    seconds: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        seconds[name] = round(now - clock[0], 3)
        clock[0] = now

    with ProcessPool(n_workers, mp_context=mp.get_context("spawn")) as pool:
        # 1. scan
        bar = ctx.bar(len(shards), "scan", unit="shards")
        total, uid_bins, bad, counts = 0, [], None, []
        hists: dict[str, np.ndarray] = {}
        nans: dict[str, int] = {}
        dtypes: dict[str, str] = {}
        for r in pool.map(_scan, [(sh, i, s) for i, s in enumerate(shards)]):  # summed as they come
            bad = bad or r.get("bad_uids")
            if not bad:
                total += r["n"]
                counts.append(r["n"])
                uid_bins.append(r["uid_bins"])
                for name, h in r["hists"].items():
                    hists[name] = hists[name] + h if name in hists else h
                    nans[name] = nans.get(name, 0) + r["nan"][name]
                    dtypes[name] = r["dtype"][name]
            bar.update(1)
        bar.close()
        if bad:
            ctx.log(f"execution: uids that subset.npy cannot hold ({bad}); filtering in memory")
            return None
        lap("scan")
        # 2. duplicates
        if any(pool.map(_has_repeat, [(all_paths, r) for r in _ranges(uid_bins)])):
            ctx.log("execution: repeated uids; filtering in memory")
            return None
        for p in all_paths:
            os.remove(p)
        ctx.inputs.extend(_inputs(shards))
        lap("duplicates")
        # 3. thresholds
        values: list[Any] = []
        for f in top:
            name = f.field

            def refine(prefix, bits, name=name):
                return np.sum(list(pool.map(_refine, [(sh, s, name, prefix, bits) for s in shards])), axis=0)

            def gather(prefix, bits, name=name):
                return np.concatenate(list(pool.map(_gather, [(sh, s, name, prefix, bits) for s in shards])))

            dtype = np.dtype(dtypes[name])
            values.append(
                select_threshold(hists[name], nans[name], total, f.params.top_fraction, dtype, refine, gather)
            )
        lap("threshold")
        # 3b. cluster targets: a small id set, found before any row is assigned
        if cluster_stage is not None:
            sh = replace(sh, clusters=(cluster_stage, _cluster_targets(cluster_stage, shards, counts, ctx)))
            lap("cluster_targets")
        # 4. write
        out_dir = cfg.output.dir
        invalidate(out_dir)  # the manifest is the commit record (writers/commit.py)
        remove_parts(join(out_dir, "subset"))
        remove_parts(join(out_dir, "dropped"))
        bar = ctx.bar(len(shards), "filter", unit="shards")
        results = []
        for r in pool.map(_filter, [(sh, i, s, values) for i, s in enumerate(shards)]):
            results.append(r)
            bar.update(1)
        bar.close()
        folders = ("subset", "dropped") if cfg.output.dropped else ("subset",)
        tasks = []
        for folder in folders:  # every part of both folders in one map: encoding is the costly step
            files = [os.path.join(spill, f"{folder}-{i:06d}.arrow") for i in range(len(shards))]
            counts = [r["kept" if folder == "subset" else "dropped"] for r in results]
            for j, pieces in enumerate(part_pieces(counts, sh.rows_per_part)):
                tasks.append((sh, join(out_dir, folder), j, [(files[s], lo, n) for s, lo, n in pieces], files[0]))
        written = list(pool.map(_write_part, tasks))
        outputs: dict[str, Any] = {
            f: [p for t, p in zip(tasks, written, strict=True) if t[1] == join(out_dir, f)] for f in folders
        }
        kept = sum(r["kept"] for r in results)
        lap("filter_and_write")
        # 5. subset.npy
        subset_npy = join(out_dir, "subset.npy")
        tmp = os.path.join(spill, "subset.npy")
        np.lib.format.open_memmap(tmp, mode="w+", dtype=UID_DTYPE, shape=(kept,)).flush()
        tasks, offset = [], 0
        for r in _ranges([r["uid_bins"] for r in results]):
            tasks.append((kept_paths, r, tmp, offset))
            offset += sum(hi - lo for lo, hi in r)
        assert offset == kept
        list(pool.map(_merge_range, tasks))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    lap("subset_npy")
    os.replace(tmp, local_path(subset_npy))
    outputs = {
        "subset": outputs["subset"],
        "subset_npy": subset_npy,
        **{k: v for k, v in outputs.items() if k != "subset"},
    }
    if cfg.output.report:
        outputs["report"] = join(out_dir, "report.html")
    first = results[0]
    info = dict(first["stage_info"])
    info.update(shards=len(shards), rows=total)
    ctx.stage_info["datacomp"] = info
    if cluster_stage is not None:  # after the source's record, as the in-memory run orders them
        found = ctx.stage_info.pop("clusters")
        ctx.stage_info["clusters"] = {**_sum_cluster_info(found, results), "seconds": seconds["cluster_targets"]}
    scorers: dict[str, Any] = {}  # each shard's scorer records: one per scorer, shard counts summed
    for r in results:
        for name, rec in r["scorers"].items():
            agg = scorers.setdefault(
                name,
                {**rec, "seconds": 0.0, "cache": {"dir": rec["cache"]["dir"], "shards_scored": 0, "shards_cached": 0}},
            )
            agg["seconds"] = round(agg["seconds"] + rec.get("seconds", 0.0), 3)
            for k in ("shards_scored", "shards_cached"):
                agg["cache"][k] += rec["cache"][k]
    if scorers:
        ctx.stage_info["scorers"] = scorers
    ctx.log(f"read {total:,} rows of DataComp metadata from {len(shards)} shards ({n_workers} worker processes)")
    ctx.stage_info.setdefault("uids", {})["duplicates"] = {"policy": cfg.input.uid.duplicates, "rows": 0, "uids": 0}
    funnel = _sum_funnels([r["funnel"] for r in results])
    counts = {"input": total, "failed": 0, "failed_reasons": {}, "kept": kept, "filters": funnel}
    check_funnel(counts)
    manifest = manifest_record(
        config_dict,
        prov,
        model,
        source,
        ctx,
        counts=counts,
        thresholds=first["thresholds"],
        language_identifiers=first["language_identifiers"],
        failures=list(ctx.failures),
        failures_truncated=False,
        outputs=outputs,
    )
    written = [*outputs["subset"], outputs["subset_npy"], *outputs.get("dropped", [])]
    manifest["files"] = file_records(out_dir, written)
    lap("manifest")
    manifest["execution"] = {"plan": "streaming", "workers": n_workers, "seconds": seconds}
    atomic_write_text(join(out_dir, "manifest.json"), json.dumps(manifest, indent=2, default=_json_default) + "\n")
    return manifest


def _inputs(shards) -> list[dict[str, Any]]:
    from filtering.stages.datacomp import _input_records

    return _input_records(shards)
