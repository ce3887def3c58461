"""The streaming plan: a pool filtered shard by shard on all cores.

The source stage owns everything that depends on the input kind (``SourceStage``'s
streaming methods: ``stream_shards``, ``stream_prepare``, ``shard_scores``,
``shard_pool``, ``skeleton_pool``, ``stream_record``): DataComp metadata read per
shard, or a WebDataset pool whose shards not cached yet are scored first
(``stream_prepare``), each worker then building its one-shard pool from the caches.

Used when every filter in the tree decides a row from that row alone (its
``reduction()`` is None), or declares a global step this plan runs: a ``TopFraction``
threshold over a source column or one a ``"shard"`` or ``"global"`` stage computes
(``clip_score`` and ``score`` ``top_fraction``, e.g. over a configured head's column or
``cluster_sim``), or
``Survivors`` anywhere in the tree (``dedup`` of any method, among the rows that reach it,
decided over the pool between steps 3 and 4: ``dedup_phase.py``); and every column stage runs per shard
(``scope``: ``"shard"``, or ``"global"`` with its whole-pool step in step 3; every scorer run over the pool, configured or a filter's own, is a
``"shard"`` stage, its model set up once per worker process). No process holds the
pool; each phase is a map over shards on a task pool (``filtering/tasks.py``: a local
process pool, or Ray tasks with ``--executor ray``), or a small reduction in the driver:

1. **scan** (per shard): read the ``top_fraction`` score columns only, spill them as
   arrays; return, per column, the NaN count and a 65,536-bin histogram of the scores'
   order-preserving bit keys. No scan without a ``top_fraction``. A column a stage
   computes is read from the one-shard pool after its ``"shard"`` stages ran (each
   caching the shard, so the filter pass reads their caches; the run's scorer records
   count each shard once, from the first pass that ran it: :func:`merge_scorer_records`).
2. **threshold** (driver + per shard): DataComp's ``sorted_desc[int(N * f)]``
   (``filtering/filters/clip_score.py``, NaN counted in N and sorted last). The
   histograms give the bin holding that rank (narrowed by more 16-bit histogram passes
   while it holds more than GATHER_LIMIT scores); the shards return only the scores in
   that bin, and ``np.partition`` picks the exact value, in the column's dtype. These
   passes read the scan's spilled arrays, not the shards.
3. **global stages** (driver; before step 1 when a ``top_fraction`` ranks a column one
   computes, so the scan runs its ``run_shard``): each ``"global"`` stage's ``prepare`` (``image_clusters``:
   centroids, reference embeddings and target ids by ``ImageClustersStage.find_targets``
   on the source's ``skeleton_pool``: shard parts and embeddings, no column but the
   failed rows as a validity bitmap, in the in-memory path's caches; ``decontaminate``:
   each reference set loaded, embedded or hashed, and cached, its fingerprint handed on).
3b. **uid check first** (``input.uid.duplicates``: ``keep_first`` or ``error``; per shard,
   then per uid range: ``uid_phase.py``): every shard's readable uids spilled grouped by
   range of their high bits, each range's repeats found (all copies of a uid fall in one
   range, in pool order), each later copy flagged in its shard's spill; the report made
   (``error`` stops here). Before any dedup and filter pass: the later copies drop first.
3c. **dedup** (per shard, then the driver: ``dedup_phase.py``): each dedup's survivors
   among the rows that reach it.
4. **filter and write** (per shard): the shard read as a one-shard pool (with the whole
   pool's columns and types, unified in ``stream_prepare`` where shards differ), its columns
   added by the column stages (``run``, or a global stage's ``run_shard``: the in-memory
   path's per-shard caches), the filter tree applied with the reductions' results
   (``Filter.decided``; same code as the in-memory path); the kept and dropped rows written as the shard's own Parquet parts into the spill folder, hashed
   as they are written, and with ``output.webdataset`` the kept samples' members copied
   into the shard's own tars (at most ``samples_per_shard`` each, as the in-memory
   ``reshard`` cuts them); the shard's uids spilled grouped by range of their high bits
   (unless 3b did), with a keep flag each and, per range, where it starts and how many
   rows it keeps (4,096 uint32 each, read back and added up by the driver as the shards
   finish: it holds the totals, never a shard's); the funnel comes back as counts per filter and reason code, and
   each ``Tally`` reduction's counts (``uids``: the list entries the shard's rows
   matched), added up in the driver as the shards finish; the filter's report is written
   from the sums at the commit (``pipelines/manifest.py: tally_reports``).
   A remote output (fsspec) has the parts and tars written into its own ``.streaming/``
   folder; the arrays spill to ``execution.spill_dir``, else a local temporary folder
   (a Ray cluster of several nodes needs the former: a folder every node mounts).
5. **uid check and subset.npy** (per uid range): the spilled uids of every shard, one
   range of their high bits at a time; under ``input.uid.duplicates: report`` the repeats
   found and reported as in 3b (every copy kept); the range's kept uids written into
   ``subset.npy`` at their offset (from the kept totals). Each range task finds its rows
   in every shard's spilled starts.
6. **commit** (driver): the parts and tars renamed in pool order (on a remote output:
   moved, and ``subset.npy`` uploaded; the earlier run's parts and tars that the new
   manifest does not list removed), and ``subset.npy``, into the
   run's staged result (``filtering/writers/commit.py``), the manifest written there from the
   summed counts and the workers' hashes; the runner flushes the staged result to disk (all
   at once: the workers did not wait on the disk one part at a time) and switches it into
   place.

What each phase holds per row is in docs/architecture.md ("What each stage holds per row").
Outputs hold what the in-memory path writes: ``subset.npy`` byte for byte, the same
subset and dropped rows in the same parts (each of one source shard, on both plans),
and the manifest's counts, thresholds and uid report.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa

from filtering.dedup import index as dedup_index
from filtering.errors import ConfigError, PoolsiftError
from filtering.filters import top_fraction
from filtering.filters.base import Filter, Survivors, Tally, TopFraction, add_tally
from filtering.filters.compose import FilterNode, apply_filters
from filtering.io.arrow import without_pandas
from filtering.io.atomic import atomic_write_text, is_write_failure, write_error
from filtering.io.paths import get_fs, is_local, join, local_path
from filtering.provenance import provenance
from filtering.stages.base import RunContext
from filtering.tasks import plan_workers, runs_tasks, task_pool
from filtering.uid import UID_DTYPE
from filtering.writers.commit import MANIFEST, Staged, file_records, place, remove_unlisted
from filtering.writers.parquet import HEX_COLUMNS, _PartWriter, dropped_table, part_format, subset_stream
from pipelines.executors import uid_phase
from pipelines.executors.dedup_phase import run_dedup
from pipelines.executors.shards import _shard_pool, _Shared, decided_tree, shard_columns, survivor_paths, uid_prefix

RANGE_ROWS = 2_000_000  # uids sorted per merge task (32 MB)
SPILL = ".streaming"


def check(cfg, the_plan, executor) -> None:
    """Refuse, in one line and before any data is read, a run this plan has no step for.

    Nothing here names a filter or a stage: each filter declares the global step it needs
    (``Filter.reduction()``: none for a row-local filter) and each column stage its scope
    (``ColumnStage.scope``); this says which of those the plan cannot run yet."""
    reason = why_not(cfg, the_plan, executor)
    if reason:
        raise ConfigError(f"this run cannot run on the shard plan: {reason}")


def why_not(cfg, the_plan, executor) -> str | None:
    source = the_plan.source
    reason = source.stream_why_not()
    if reason:
        return reason
    if not runs_tasks(executor):
        return "the executor runs no plan tasks"
    provided = set(source.provides())
    per_shard = {c for stage in the_plan.stages if stage.scope in ("shard", "global") for c in stage.provides()}
    for node in cfg.filter_tree:
        for f in node.leaves():
            reason = _reduction_why_not(f, provided | per_shard)
            if reason:
                return reason
    return None


def _reduction_why_not(f: Filter, provided: set[str]) -> str | None:
    """``provided``: the columns the scan can read, the source's and those a stage of scope
    ``"shard"`` or ``"global"`` computes per shard (a global stage's whole-pool step then
    runs before the scan)."""
    r = f.reduction()
    if r is None:  # row-local
        return None
    if isinstance(r, TopFraction):
        if r.column not in provided:
            return f"filters: {f.name}: top_fraction over {r.column}, a column a whole-pool stage computes"
        return None
    if isinstance(r, Survivors | Tally):  # survivors among the rows that reach it; counts summed in step 4
        return None
    return f"filters: {f.name}: the plan has no step for its reduction {type(r).__name__}"


def _top_fractions(nodes: list[FilterNode]) -> list[TopFraction]:
    """Each ``TopFraction`` reduction of the tree, in ``leaves()`` order."""
    return [r for node in nodes for f in node.leaves() if isinstance(r := f.reduction(), TopFraction)]


# ---------------------------------------------------------------- workers (module level: picklable)


def _score_keys(sh: _Shared) -> list[tuple[str, bool]]:
    """The distinct score columns the reductions rank, each as ``(column, as_float64)``."""
    return list(dict.fromkeys((r.column, r.as_float64) for r in sh.tops))


def _scores_path(sh: _Shared, key: int, i: int) -> str:
    return os.path.join(sh.spill, f"scores-{key}-{i:06d}.npy")


def _scan(args) -> dict[str, Any]:
    """One shard's top_fraction score columns: per column, the NaN count and the histogram
    of the top KEY_BITS bits of the scores' keys. The columns are spilled as they are
    (8 bytes a row for float64), so the threshold's later passes read an array instead of
    decoding the shard again.

    The source's columns are read alone (``shard_scores``); a column a stage computes is
    read from the one-shard pool after its column stages ran (each caching the shard, so
    the filter pass reads their caches), over the rows not failed, as the filters'
    in-memory threshold reads it (``scores[~pool.failed]``)."""
    sh, i, shard = args
    wanted = _score_keys(sh)
    names = list(dict.fromkeys(c for c, _ in wanted))
    from_source = [c for c in names if c in sh.source.provides()]
    columns = sh.source.shard_scores(shard, from_source) if from_source else {}
    records, global_records = None, None
    if any(c not in from_source for c in names):
        pool, ctx = _shard_pool(sh, shard)
        records = shard_columns(sh, ctx, pool)
        global_records = {stage.name: ctx.stage_info.get(stage.name) for stage, _ in sh.global_stages}
        alive = ~pool.failed
        columns.update({c: pool.column(c)[alive] for c in names if c not in from_source})
    out: dict[str, Any] = {"n": len(columns[wanted[0][0]]), "hists": {}, "nan": {}, "dtype": {}}
    out.update(scorers=records, global_stages=global_records)
    for key, (column, as_float64) in enumerate(wanted):
        scores = TopFraction(column, 0.0, as_float64).scores(columns[column])
        np.save(_scores_path(sh, key, i), scores)
        out["hists"][key], out["nan"][key] = top_fraction.histogram(scores)
        out["dtype"][key] = scores.dtype.str
    return out


def _count_rows(args) -> int:
    """A shard's row count (a footer)."""
    sh, shard = args
    return sh.source.shard_rows(shard)


def _refine(args) -> np.ndarray:
    """One shard's histogram of the next KEY_BITS key bits, among scores under ``prefix``."""
    sh, i, key, prefix, bits = args
    return top_fraction.refine_histogram(np.load(_scores_path(sh, key, i)), prefix, bits)


def _gather(args) -> np.ndarray:
    """One shard's scores under ``prefix``."""
    sh, i, key, prefix, bits = args
    return top_fraction.keys_under(np.load(_scores_path(sh, key, i)), prefix, bits)[0]


def _remove(url: str) -> None:
    if is_local(url):
        os.remove(local_path(url))
    else:
        fs, path = get_fs(url)
        fs.rm(path)


def _create_npy(path: str, n: int) -> None:
    """``subset.npy`` for ``n`` uids, its blocks reserved on disk, so that a full disk fails
    here, in one line, not as a SIGBUS in a worker writing the mapped pages."""
    try:
        np.lib.format.open_memmap(path, mode="w+", dtype=UID_DTYPE, shape=(n,)).flush()
        if hasattr(os, "posix_fallocate"):
            with open(path, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    except OSError as e:
        if is_write_failure(e):
            raise write_error(path, e) from e
        raise


def _write_folder(sh: _Shared, folder: str, i: int, schema: pa.Schema, tables) -> list[tuple[str, int, int, str]]:
    """One shard's rows of ``folder`` as parts of at most ``rows_per_part`` rows, in the
    spill folder (renamed into place once the whole pool has passed); per part
    ``(path, rows, size, sha256)``."""
    schema, options = part_format(schema, sh.prov, sh.hex_columns)
    # not flushed one by one: a worker waiting on the disk leaves its core idle; the switch
    # flushes every file of the staged result at once (writers/commit.py)
    parts = _PartWriter(join(sh.staging, folder, f"{i:06d}"), schema, sh.rows_per_part, options, fsync=False)
    with parts:
        for table in tables:
            parts.add(table)
    return parts.records


def _filter(args) -> dict[str, Any]:
    """One shard through the filter tree, its outputs written: the kept rows (late columns
    read for them only) and the dropped rows as parts, hashed as they are written; the
    shard's uids spilled grouped by uid range with a keep flag each; the funnel as counts."""
    sh, i, shard, thresholds, decided = args
    pool, ctx = _shard_pool(sh, shard)
    alive = ~pool.failed  # failed rows never reach subset.npy nor the uid check
    if sh.write and not sh.uids_spilled:
        uid_phase.spill_uids(sh.spill, i, pool.table, alive)
    scorers = shard_columns(sh, ctx, pool)
    nodes = decided_tree(list(sh.cfg.filter_tree), thresholds, decided)
    outcome = apply_filters([*uid_prefix(sh, i, pool), *nodes], pool)
    if not sh.write:  # counts only (``poolsift sweep``): nothing spilled, nothing written
        return {
            "n": pool.n,
            "failed": int(pool.failed.sum()),
            "funnel": outcome.funnel,
            "kept": int(outcome.keep.sum()),
            "thresholds": outcome.thresholds,
            "scorers": scorers,
        }
    # each alive row's keep flag, in the order of the spilled uids (grouped by uid range)
    keep = outcome.keep[np.load(uid_phase.spill_paths(sh.spill, i)["rows"])]
    uid_phase.spill_kept(sh.spill, i, keep)
    schema, tables = subset_stream(pool, outcome.keep, workers=1)
    index: list = []  # this shard's index file (filtering/dedup/index.py), moved into place at commit

    def add_index(table, rows, _k, phash):
        path = join(sh.staging, dedup_index.INDEX, f"{i:06d}.arrow")
        records = dedup_index.index_records(table, rows, i, phash)
        index.append((path, dedup_index.write_file(path, records), dedup_index.key_counts(records)))

    tables = dedup_index.shard_index_tables(pool, outcome.keep, tables, add_index)
    parts = {"subset": _write_folder(sh, "subset", i, schema, tables)}
    if sh.cfg.output.dropped:
        table = dropped_table(
            pool.table,
            outcome,
            pool.failed,
            pool.artifacts.get("carried_columns", ()),
            key=not pool.artifacts.get("key_is_uid"),
        )
        parts["dropped"] = _write_folder(sh, "dropped", i, table.schema, [table])
    shards = []
    if sh.cfg.output.webdataset:  # the shard's kept samples copied into tars of its own
        from filtering.writers.webdataset import write_shards

        out = join(sh.staging, "shards", f"{i:06d}")
        tars, sizes = write_shards(pool, outcome.keep, out, sh.cfg.output.samples_per_shard, fsync=False)
        shards = list(zip(tars, sizes, strict=True))
    failed = np.flatnonzero(pool.failed)
    reasons: Counter = Counter()
    failures: list[dict] = []
    if len(failed):  # as the in-memory path lists them (pipelines/runner.py, write_outputs)
        rows = pool.table.select(["source_shard", "key", "uid", "error"]).take(failed)
        reasons = Counter(str(e).split(":", 1)[0] for e in rows.column("error").to_pylist())
        failures = rows.slice(0, sh.max_failures).rename_columns(["source_shard", "key", "uid", "reason"]).to_pylist()
    return {
        "n": pool.n,
        "failed": len(failed),
        "failed_reasons": reasons,
        "failures": failures,
        "funnel": outcome.funnel,
        "kept": int(outcome.keep.sum()),
        "parts": parts,
        "shards": shards,
        "index": index,
        "shard_url": pool.parts[0].url if pool.parts else None,
        "embedding_kinds": list(pool.embedding_kinds),
        "thresholds": outcome.thresholds,
        "tallies": outcome.tallies,
        "language_identifiers": pool.artifacts.get("language_identifiers", []),
        "source": sh.source.shard_record(ctx, pool),
        "scorers": scorers,
        "global_stages": {stage.name: ctx.stage_info.get(stage.name) for stage, _ in sh.global_stages},
    }


# ---------------------------------------------------------------- driver


def first_embedding_kinds(results: list[dict]) -> list[str]:
    return next((r["embedding_kinds"] for r in results if r["embedding_kinds"]), [])


def _bin_groups(totals: np.ndarray, limit: int = RANGE_ROWS) -> list[tuple[int, int]]:
    """Group the fine uid bins (``totals``: their rows summed over shards) into ranges of about ``limit`` rows."""
    groups, start, acc = [], 0, 0
    for b, count in enumerate(totals):
        acc += int(count)
        if acc >= limit or b == len(totals) - 1:
            groups.append((start, b + 1))
            start, acc = b + 1, 0
    return groups


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


def merge_scorer_records(per_shard: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """One record per scorer, as the in-memory run writes it, from each shard's records of
    every phase that ran its column stages (scan, dedup, filter, in that order): a shard's
    cache counts are those of the first phase (which computed or read the shard; the
    later ones read what it cached); the seconds are summed over every phase and shard."""
    out: dict[str, Any] = {}
    for phases in per_shard:
        counted: set[str] = set()
        for records in phases:
            for name, rec in records.items():
                agg = out.setdefault(
                    name,
                    {
                        **rec,
                        "seconds": 0.0,
                        "cache": {"dir": rec["cache"]["dir"], "shards_scored": 0, "shards_cached": 0},
                    },
                )
                agg["seconds"] = round(agg["seconds"] + rec.get("seconds", 0.0), 3)
                if name not in counted:
                    counted.add(name)
                    for k in ("shards_scored", "shards_cached"):
                        agg["cache"][k] += rec["cache"][k]
    return out


def _spill_uids(args) -> None:
    """One shard's alive uids spilled grouped by range (the uid check's unit); with ``later``, its later-copy flags."""
    sh, i, shard, later = args
    pool, _ = _shard_pool(sh, shard)
    uid_phase.spill_uids(sh.spill, i, pool.table, ~pool.failed, later)


def _sample_names(args) -> list[dict[str, Any]]:
    """``source_shard`` and ``key`` of some rows of one shard (the duplicate report's examples)."""
    sh, shard, rows = args
    pool, _ = _shard_pool(sh, shard)
    return pool.table.select(["source_shard", "key"]).take(pa.array(rows, pa.int64())).to_pylist()


def _names_at(pool, sh: _Shared, shards: list):
    """``names(keys)`` for :func:`uid_phase.report`: the samples at pool keys ``shard << 32 | row``."""

    def names(keys: list[int]) -> dict[int, dict[str, Any]]:
        by_shard: dict[int, list[int]] = {}
        for k in keys:
            by_shard.setdefault(k >> 32, []).append(k & 0xFFFFFFFF)
        args = [(sh, shards[i], rows) for i, rows in by_shard.items()]
        found = [n for names in pool.map(_sample_names, args) for n in names]
        return dict(zip([i << 32 | r for i, rows in by_shard.items() for r in rows], found, strict=True))

    return names


def _uids_first(pool, sh: _Shared, shards: list, policy: str, ctx) -> tuple[_Shared, dict[str, Any]]:
    """``keep_first`` and ``error``: every shard's alive uids spilled and checked range by
    range before any row is filtered; ``error`` stops here, ``keep_first`` marks each later
    copy in its shard's ``later`` file (the filter pass and the dedup phase drop them first).
    A pass over the shards and the spill (20 bytes a row on disk) that the ``subset.npy``
    phase reuses, and no more in memory than a range: a re-write of the shards found to
    hold later copies instead would redo a dedup (its alive rows change) and, for a pool
    listed twice, every shard."""
    mark = policy == "keep_first"
    totals = np.zeros(1 << uid_phase.FINE_BITS, np.int64)  # rows per fine range, summed as the shards come
    for i, _ in enumerate(pool.map(_spill_uids, [(sh, i, s, mark) for i, s in enumerate(shards)])):
        totals += uid_phase.bin_counts(sh.spill, i)
    tasks = [(sh.spill, len(shards), group, True, mark, None, 0) for group in _bin_groups(totals)]
    found = [r for r in pool.map(uid_phase.check_range, tasks) if r is not None]
    duplicates = uid_phase.report(ctx, policy, found, _names_at(pool, sh, shards))
    return replace(sh, uids_spilled=True, uid_later=mark and bool(found)), duplicates


def run_streaming(cfg, the_plan, ctx: RunContext, result: Staged) -> dict[str, Any]:
    """Run the whole plan shard-parallel, its outputs into ``result``; returns the manifest."""
    source = the_plan.source
    shards = source.stream_shards()
    out_dir = cfg.output.dir
    if not is_local(out_dir):  # before any work: a cluster without a shared spill folder stops here
        spill_root = _remote_spill_root(cfg, ctx.executor)
    t0 = time.perf_counter()
    source.stream_prepare(ctx)  # WebDataset: the shards not cached yet are scored here
    prepare_seconds = round(time.perf_counter() - t0, 3)
    # the spill folder: arrays (scores, uids, subset.npy) and, on a local output, the parts
    # and tars; a remote output has them written into its own spill folder, by the workers
    if is_local(out_dir):
        spill = staging = os.path.join(local_path(out_dir), SPILL)
        shutil.rmtree(spill, ignore_errors=True)
        os.makedirs(os.path.join(spill, dedup_index.INDEX))
    else:
        spill, staging = tempfile.mkdtemp(prefix="poolsift-streaming-", dir=spill_root), join(result.dir, SPILL)
        _remove_remote(staging)
    try:
        with _guarded(source, ctx):
            manifest = _run(cfg, source, shards, ctx, spill, staging, result, the_plan.stages, prepare_seconds)
    finally:
        shutil.rmtree(spill, ignore_errors=True)
        if staging != spill:
            _remove_remote(staging)
    return manifest


def _remote_spill_root(cfg, executor) -> str | None:
    """Where a remote output's run spills its arrays (scores, uids, subset.npy: memory-mapped
    and written by range, so on a local file system): ``execution.spill_dir``, else this
    machine's temporary folder, which every task sees when they all run here (the local
    process pool, a Ray of one node). A Ray cluster of several nodes needs a folder they
    all mount: without one, a config error before any work."""
    root = cfg.execution.spill_dir
    if root is not None:
        root = os.path.abspath(os.path.expanduser(local_path(root)))
        os.makedirs(root, exist_ok=True)
        return root
    nodes = executor.nodes() if hasattr(executor, "nodes") else 1
    if nodes > 1:
        raise ConfigError(
            f"output.dir {cfg.output.dir} is remote and Ray runs on {nodes} nodes: set execution.spill_dir "
            "to a folder every node mounts (the plan spills scores, uids and subset.npy there between phases)"
        )
    return None


@contextlib.contextmanager
def _guarded(source, ctx: RunContext):
    """Around the phases: pandas kept out of the driver and its forked workers (0.3 CPU s
    each), unless the driver loaded torch (whose modules look for pandas) or runs on Ray;
    a one-shard pool's error raised as the whole pool gives it (its counts)."""
    keep_pandas = "torch" in sys.modules or ctx.executor is not None
    try:
        with contextlib.nullcontext() if keep_pandas else without_pandas():
            yield
    except PoolsiftError as e:
        pool_error = source.pool_error(e)
        if pool_error is e:
            raise
        raise pool_error from None


def count_streaming(runs: list, ctx: RunContext) -> list[dict[str, Any]]:
    """``poolsift sweep``: each ``(cfg, plan)`` of ``runs`` through the phases up to the
    filter pass (scan, thresholds, global stages, uid check, dedup), the filter pass
    counting only: per config its ``input``, ``failed`` and ``kept`` counts, the funnel and
    the thresholds, as its run's manifest gives them. Nothing is written but spill files.

    The configs differ only in their filters (``pipelines/sweep.py`` groups them so): the
    first plan's source serves all, prepared once (the shards not cached yet scored), and
    one task pool and spill folder serve every config; the scan of the ``top_fraction``
    score columns runs once per set of columns (a swept fraction or ``keep`` rescans
    nothing). The columns come from the per-shard caches, as on a rerun."""
    source = runs[0][1].source
    shards = source.stream_shards()
    reason = source.stream_prepare(ctx)  # WebDataset: the shards not cached yet are scored here
    if reason:
        raise PoolsiftError(f"sweep: {reason}")
    out_dir = runs[0][0].output.dir
    if is_local(out_dir):  # as a run's: the output's own spill folder (the lock held)
        spill = os.path.join(local_path(out_dir), SPILL)
        shutil.rmtree(spill, ignore_errors=True)
        os.makedirs(spill)
    else:
        spill = tempfile.mkdtemp(prefix="poolsift-sweep-", dir=_remote_spill_root(runs[0][0], ctx.executor))
    scans: dict[tuple, tuple] = {}
    try:
        with _guarded(source, ctx), _plan_tasks(runs[0][0], ctx, shards) as tasks:
            return [
                _run(cfg, source, shards, ctx, spill, spill, None, p.stages, open_pool=tasks, scan_cache=scans)
                for cfg, p in runs
            ]
    finally:
        shutil.rmtree(spill, ignore_errors=True)


def _plan_tasks(cfg, ctx: RunContext, shards: list):
    """The plan's task pool: Ray's, or local processes (``execution.workers``, at most one per shard)."""
    return task_pool(ctx.executor, plan_workers(cap=len(shards), configured=cfg.execution.workers))


def _remove_remote(url: str) -> None:
    fs, path = get_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _run(
    cfg,
    source,
    shards,
    ctx: RunContext,
    spill: str,
    staging: str,
    result: Staged,
    the_plan_stages=(),
    prepare_seconds: float = 0.0,
    open_pool=None,
    scan_cache: dict | None = None,
) -> dict[str, Any]:
    """The phases; with ``result`` None, up to the filter pass, which only counts: returns
    ``input``, ``failed``, ``kept``, ``thresholds`` and ``filters`` (the funnel) instead of
    the manifest (:func:`count_streaming`). ``open_pool``: a task pool to use; ``scan_cache``:
    the scan's sums by score columns, kept across calls that share ``spill``."""
    from pipelines.manifest import (
        MAX_MANIFEST_FAILURES,
        check_funnel,
        execution_record,
        json_default,
        manifest_record,
        model_record,
        tally_reports,
    )

    top = _top_fractions(list(cfg.filter_tree))
    global_stages = [s for s in the_plan_stages if s.scope == "global"]
    config_dict = cfg.to_dict()
    model = model_record(cfg, ctx, source)
    prov = provenance(config_dict, cfg.sha256(), model)
    sh = _Shared(
        cfg=cfg,
        source=source,
        tops=tuple(top),
        spill=spill,
        staging=staging,
        out_dir=cfg.output.dir,
        prov=prov,
        hex_columns=frozenset(HEX_COLUMNS | set(source.info.hex_columns)),
        rows_per_part=cfg.output.rows_per_part,
        column_stages=tuple(s for s in the_plan_stages if s.scope in ("shard", "global")),
        max_failures=MAX_MANIFEST_FAILURES,
        write=result is not None,
    )
    seconds: dict[str, float] = {"prepare": prepare_seconds}  # the source's: scoring, for WebDataset
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        seconds[name] = round(now - clock[0], 3)
        clock[0] = now

    with contextlib.nullcontext(open_pool) if open_pool else _plan_tasks(cfg, ctx, shards) as pool:
        n_workers = pool.workers

        def prepare_global_stages() -> _Shared:
            """3. the global stages' whole-pool steps (image_clusters: the target clusters, a
            small id set), before any row is assigned; they read no threshold."""
            rows = list(pool.map(_count_rows, [(sh, s) for s in shards]))  # every row, failed ones too
            prepared = []
            for stage in global_stages:
                prepared.append((stage, stage.prepare(ctx, source, rows)))
                lap(stage.name)
            return replace(sh, global_stages=tuple(prepared))

        # a top_fraction over a column a global stage computes: its whole-pool step first,
        # so the scan computes the column per shard (cached, the filter pass reads it)
        globals_first = bool({r.column for r in top} & {c for s in global_stages for c in s.provides()})
        if globals_first:
            sh = prepare_global_stages()
        # the global stages' records of the shards the scan ran them on (the first pass counts)
        scanned_global: list[dict[str, Any] | None] = [None] * len(shards)
        # 1. scan: the top_fraction score columns only (nothing to read without one)
        hists: dict[int, np.ndarray] = {}
        nans: dict[int, int] = {}
        dtypes: dict[int, str] = {}
        scanned, shard_rows = 0, []
        # each shard's scorer records, one per phase that ran its column stages (merged at the end)
        scorer_records: list[list[dict[str, Any]]] = [[] for _ in shards]
        scanned_before = scan_cache.get(tuple(_score_keys(sh))) if scan_cache is not None and top else None
        if scanned_before:  # the same score columns, scanned into this spill folder by an earlier call
            hists, nans, dtypes, scanned, shard_rows = scanned_before
        elif top:
            bar = ctx.bar(len(shards), "scan", unit="shards")
            scans = pool.map(_scan, [(sh, i, s) for i, s in enumerate(shards)])
            for i, r in enumerate(scans):  # summed as they come
                if r["scorers"] is not None:
                    scorer_records[i].append(r["scorers"])
                scanned_global[i] = r["global_stages"]
                scanned += r["n"]
                shard_rows.append(r["n"])
                for key, h in r["hists"].items():
                    hists[key] = hists[key] + h if key in hists else h
                    nans[key] = nans.get(key, 0) + r["nan"][key]
                    dtypes[key] = r["dtype"][key]
                bar.update(1)
            bar.close()
            lap("scan")
            if scan_cache is not None:
                scan_cache[tuple(_score_keys(sh))] = (hists, nans, dtypes, scanned, shard_rows)
        # 2. thresholds
        values: list[Any] = []
        keys = _score_keys(sh)
        for r in top:
            key = keys.index((r.column, r.as_float64))

            def refine(prefix, bits, key=key):
                return np.sum(list(pool.map(_refine, [(sh, i, key, prefix, bits) for i in range(len(shards))])), axis=0)

            def gather(prefix, bits, key=key):
                return np.concatenate(list(pool.map(_gather, [(sh, i, key, prefix, bits) for i in range(len(shards))])))

            dtype = np.dtype(dtypes[key])
            values.append(
                top_fraction.select_threshold(hists[key], nans[key], scanned, r.fraction, dtype, refine, gather)
            )
        if top:
            lap("threshold")
        # 3. the global stages' whole-pool steps, unless the scan needed them
        if global_stages and not globals_first:
            sh = prepare_global_stages()
        # 3b. uids (input.uid.duplicates: keep_first, error): repeats found before any row is
        # filtered, since the later copies drop first and any dedup picks among the rows left
        policy = cfg.input.uid.duplicates
        if policy != "report":
            sh, duplicates = _uids_first(pool, sh, shards, policy, ctx)
            lap("uid_check")
        # 3c. survivors (dedup): the search, then the survivors over small per-row arrays (dedup_phase.py)
        decided = [None] * len(shards)
        if survivor_paths(list(cfg.filter_tree)):
            shard_rows = list(pool.map(_count_rows, [(sh, s) for s in shards]))  # every row, failed ones too
            decided = run_dedup(pool, sh, shards, shard_rows, values, ctx, scorer_records)
            lap("dedup")
        # 4. filter and write: every shard's parts, into the spill folder
        bar = ctx.bar(len(shards), "filter", unit="shards")
        results = []
        sums: dict[int, dict[str, Any]] = {}  # Tally reductions: the shards' counts, added as they come
        # per fine uid range, the rows and the kept rows over the shards, added as they come
        uid_totals = np.zeros(1 << uid_phase.FINE_BITS, np.int64)
        kept_totals = np.zeros(1 << uid_phase.FINE_BITS, np.int64)
        funnel: list[dict[str, Any]] | None = None
        reasons: Counter = Counter()
        failures: list[dict[str, Any]] = []  # the manifest's first MAX_MANIFEST_FAILURES, in pool order
        tasks = [(sh, i, s, values, decided[i]) for i, s in enumerate(shards)]
        for i, r in enumerate(pool.map(_filter, tasks)):
            shard_funnel = r.pop("funnel")
            funnel = _sum_funnels([shard_funnel] if funnel is None else [funnel, shard_funnel])
            bar.update(1)
            if not sh.write:
                results.append(r)
                continue
            for k, t in r.pop("tallies", {}).items():
                sums[k] = add_tally(sums.get(k), t)
            uid_totals += uid_phase.bin_counts(spill, i)
            kept_totals += uid_phase.bin_counts(spill, i, "kept_bins")
            reasons += r.pop("failed_reasons")
            failures.extend(r.pop("failures")[: MAX_MANIFEST_FAILURES - len(failures)])
            if i:  # the first shard's records stand for all (thresholds, language identifiers)
                del r["thresholds"], r["language_identifiers"]
            results.append(r)
        bar.close()
        total = sum(r["n"] for r in results)
        kept = sum(r["kept"] for r in results)
        if not sh.write:  # counts only: the sums the manifest's counts would hold
            failed = sum(r["failed"] for r in results)
            return {
                "input": total,
                "failed": failed,
                "kept": kept,
                "thresholds": results[0]["thresholds"],
                "filters": funnel,
            }
        lap("filter_and_write")
        # 5. uid check and subset.npy, per range of uid high bits
        tmp = os.path.join(spill, "subset.npy")
        _create_npy(tmp, kept)
        tasks, offset = [], 0
        for start, stop in _bin_groups(uid_totals):
            tasks.append((spill, len(shards), (start, stop), not sh.uids_spilled, False, tmp, offset))
            offset += int(kept_totals[start:stop].sum())
        assert offset == kept
        found = [r for r in pool.map(uid_phase.check_range, tasks) if r is not None]
        if not sh.uids_spilled:  # input.uid.duplicates: report
            duplicates = uid_phase.report(ctx, policy, found, _names_at(pool, sh, shards))
    lap("uid_check_and_subset_npy")
    # 6. commit: the parts and subset.npy renamed into the staged result, the manifest written
    # there; the runner flushes it and switches it into place (writers/commit.py)
    out_dir = cfg.output.dir
    folders = ("subset", "dropped") if cfg.output.dropped else ("subset",)
    outputs: dict[str, Any] = {}
    files: dict[str, dict[str, Any]] = {}
    moves: list[tuple[str, str]] = []
    for folder in folders:
        outputs[folder] = []
        records = [rec for r in results for rec in r["parts"][folder]]
        placed = [rec for rec in records if rec[1]] or records[:1]  # one empty part when no rows at all
        for path in {rec[0] for rec in records} - {rec[0] for rec in placed}:
            _remove(path)
        for j, (path, _rows, size, sha) in enumerate(placed):
            name = f"part-{j:05d}.parquet"
            moves.append((path, result.url(folder, name)))
            outputs[folder].append(join(out_dir, folder, name))
            files[f"{folder}/{name}"] = {"size": size, "sha256": sha}
    shard_map = []
    for r in results:  # each source shard's tars, numbered on in pool order
        for record, size in r["shards"]:
            name = f"{len(shard_map):05d}.tar"
            moves.append((record["path"], result.url("shards", name)))
            shard_map.append({**record, "path": join(out_dir, "shards", name)})
            files[f"shards/{name}"] = {"size": size}
    files.update(file_records(spill, [tmp]))  # subset.npy
    moves.append((tmp, result.url("subset.npy")))
    # the index: each shard's file, written by its worker, moved into place in pool order
    index = dedup_index.IndexBuilder(result.url(dedup_index.INDEX), source.info.kind, first_embedding_kinds(results))
    for r in results:
        for path, spilled, keys in r["index"]:
            name = dedup_index.file_name(len(index.files))
            moves.append((path, result.url(dedup_index.INDEX, name)))
            index.add_file(name, spilled, keys)
    place(moves)
    files.update(file_records(result.dir, index.finish([r["shard_url"] for r in results])))
    if not result.local:  # an earlier run's parts and tars leave before the manifest is written
        remove_unlisted(result.dir, files)
    outputs = {
        "subset": outputs["subset"],
        "subset_npy": join(out_dir, "subset.npy"),
        **{k: v for k, v in outputs.items() if k != "subset"},
        "index": join(out_dir, dedup_index.INDEX, dedup_index.META),
    }
    if cfg.output.report:
        outputs["report"] = join(out_dir, "report.html")
    if cfg.output.webdataset:
        outputs["shards"] = [s["path"] for s in shard_map]
    reports, report_paths = tally_reports(list(cfg.filter_tree), sums, result, prov, ctx.log)
    for name, paths in report_paths.items():
        outputs[name] = [result.final(p) for p in paths]
        files.update(file_records(result.dir, paths))
    lap("commit")
    first = results[0]
    source.stream_record(ctx, [r["source"] for r in results], shards, total)
    for stage in global_stages:  # after the source's record, as the in-memory run orders them
        found = ctx.stage_info.pop(stage.name)
        shard_records = [(g or r["global_stages"])[stage.name] for g, r in zip(scanned_global, results, strict=True)]
        ctx.stage_info[stage.name] = stage.merge_records(found, shard_records)
    for i, r in enumerate(results):
        scorer_records[i].append(r["scorers"])
    scorers = merge_scorer_records(scorer_records)
    if scorers:  # after the source's own (image scorers in its decode pass), as in memory
        ctx.stage_info.setdefault("scorers", {}).update(scorers)
    where = "CPUs on Ray" if ctx.executor is not None else "worker processes"
    ctx.log(f"read {total:,} rows from {len(shards)} shards ({n_workers} {where})")
    ctx.stage_info.setdefault("uids", {})["duplicates"] = duplicates  # after the source's record, as in memory
    failed = sum(r["failed"] for r in results)
    counts = {
        "input": total,
        "failed": failed,
        "failed_reasons": dict(sorted(reasons.items())),
        "kept": kept,
        "filters": funnel,
    }
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
        failures=failures + list(ctx.failures),
        failures_truncated=failed > MAX_MANIFEST_FAILURES,
        outputs=outputs,
    )
    manifest.update(reports)
    if cfg.output.webdataset:
        manifest["shards"] = shard_map
    manifest["files"] = dict(sorted(files.items()))
    lap("manifest")
    manifest["execution"] = execution_record("streaming", ctx.executor, n_workers, seconds)
    atomic_write_text(result.url(MANIFEST), json.dumps(manifest, indent=2, default=json_default) + "\n")
    return manifest
