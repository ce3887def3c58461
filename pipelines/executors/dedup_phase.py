"""The streaming plan's dedup phase: top-level ``dedup`` without the pool in the driver.

A top-level ``dedup`` (``method: exact``, ``perceptual`` or ``semantic``) is a global
decision over small per-row arrays, in three steps between the cluster targets and the
filter pass (``pipelines/executors/streaming.py``):

1. **search** (exact, perceptual; per group of shards, then per partition): each shard's
   key columns (``sha256``, ``caption``, ``phash``) emitted as records partitioned by key
   hash, one spill file per map task (a few tasks per worker), each partition reduced on
   a worker (:mod:`filtering.dedup.partitioned`); the driver holds one int64 label per row and the pairs of labels.
   The result is cached in ``DIR/cache/dedup-<fingerprint>/``
   (:mod:`filtering.dedup.search_cache`: the settings and each shard's url, rows and key
   columns' digest, made in step 2's pass), so a rerun that changes only ``keep``,
   ``min_similarity`` or another filter reads it instead of searching; step 2 runs first.
2. **alive at dedup** (per shard): the shard through the filters before the dedup (the
   global thresholds, earlier dedups' decisions); returned as the alive mask and, for the
   alive rows, the keep score (float64) and the uid as two uint64 (its string order for
   lowercase 32-hex uids; any other uid stops the run in one line); semantic:
   also whether each alive row's embedding is not all zero (the rows the filter compares).
2b. **semantic search** (issue 16: SemDeDup per k-means cluster partition, as NeMo Curator
   runs it): the valid alive rows put in uid order (the filter's canonical order, from the
   uint64 pairs); k-means trained in the driver on a seeded sample
   (:func:`filtering.clustering.sample_indices` over that order, at most 64 rows per
   cluster), those rows' embeddings fetched shard by shard; each shard's rows assigned to
   the centroids and spilled sorted by cluster in a worker
   (:func:`filtering.dedup.semantic.spill_assigned`); each partition of clusters (balanced
   by comparisons) gathered from every shard's spill and compared on one worker
   (:func:`filtering.dedup.semantic.spilled_partition_pairs`: ``cluster_pairs`` on a
   cluster's rows in uid order, so the pairs do not depend on shard order). The driver holds
   the sample and a few int64 per valid row; the pairs are rows, their labels the rows.
2c. **min_similarity** (perceptual): the filter's edges among the alive rows in uid order
   (:func:`filtering.dedup.groups.label_edges`, in the driver: int64 arrays); the rows
   they touch read per shard, normalised and spilled in workers; each chunk of edges
   confirmed by its cosine in a worker, as the filter computes it.
2d. **against** (``against: [...]``, filtering/dedup/against.py): exact and perceptual
   rows matched to a reference's kept rows by the partitioned search, before step 2; a
   semantic match searched among the valid alive rows here (k-means as in 2b, each
   reference index file's rows assigned to their two nearest clusters in a task, each partition of clusters compared
   on a worker); ``min_similarity`` confirming each hash match by the embeddings. The
   matched rows leave the alive rows before the survivors step.
3. **survivors** (driver): components of the alive rows
   (:func:`filtering.dedup.partitioned.components_of`), then in each component of two or
   more the row preferred by the filter's rule (:func:`filtering.dedup.groups.survivors`:
   score descending, missing scores last, then the smallest uid); each shard gets back its
   dropped rows and their survivors' uids only.

The filter pass then applies each shard's decision in place of the ``dedup`` leaf
(``Dedup.decided``: its funnel, reason codes and ``duplicate_of``).
``tests/shard_plan.py: run_dedup_phase`` runs this phase and that pass on a test's pool.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from filtering.dedup import against, groups, partitioned
from filtering.dedup.partitioned import label_column
from filtering.dedup.search_cache import SearchCache, shard_key
from pipelines.executors.shards import (
    Path,
    _shard_pool,
    alive_at,
    decided_tree,
    node_at,
    shard_columns,
    survivor_paths,
    uid_prefix,
)
from pipelines.executors.uid_phase import uid_pairs

# ---------------------------------------------------------------- workers


def _emit(args) -> partitioned.Spilled:
    """One map task: its shards' key columns, read one shard at a time, into one spill file."""
    sh, group, settings, partitions, path = args

    def keys():
        for shard, first_row, n in group:
            pool, _ = _shard_pool(sh, shard)  # the source's names and types (DataComp's text is caption)
            pool.materialize(settings.columns())
            yield partitioned.ShardKeys(first_row, n, table=pool.table.select(settings.columns()))

    return partitioned.emit_shards(keys(), settings, partitions, path)


def _emit_against(args) -> partitioned.Spilled:
    """One map task of a search against references: its shards' pool-side records (dedup/against.py)."""
    sh, group, settings, partitions, path = args

    def keys():
        for shard, first_row, n in group:
            pool, _ = _shard_pool(sh, shard)
            pool.materialize([settings.key_column])
            yield partitioned.ShardKeys(first_row, n, table=pool.table.select([settings.key_column]))

    spilled = against.emit_pool(keys(), settings, partitions, path)
    against.release_memory()
    return spilled


def _alive_at(args) -> dict[str, Any]:
    """One shard through the filters before the dedup at ``path``: the alive mask, and
    for the alive rows the keep score and the uid (two uint64); with ``key_columns``, the
    shard's part of the search cache's key (:func:`filtering.dedup.search_cache.shard_key`)."""
    sh, i, shard, thresholds, decided, path, dtype, key_columns = args
    pool, ctx = _shard_pool(sh, shard)
    key = None
    if key_columns is not None:  # the search not done yet: this shard's part of its cache key, as _emit reads it
        pool.materialize(key_columns)
        key = shard_key(pool.parts[0].url, pool.table.select(key_columns))
    scorers = shard_columns(sh, ctx, pool)
    nodes = decided_tree(list(sh.cfg.filter_tree), thresholds, decided)
    alive = alive_at(nodes, path, pool, uid_prefix(sh, i, pool))
    f = node_at(nodes, path).filter
    rows = np.flatnonzero(alive)
    u = uid_pairs(pool.table, rows)  # 32 hex digits in any case: the uids' numbers, in the filter's order
    out: dict[str, Any] = {
        "alive": np.packbits(alive),
        "n": pool.n,
        "hi": u["f0"],
        "lo": u["f1"],
        "scorers": scorers,
        "key": key,
    }
    if f.params.keep == "highest_clip_score":
        s = np.asarray(pool.column(f.score_field)[rows], dtype=np.float64)
        out["score"] = np.where(np.isnan(s), -np.inf, s) + 0.0  # missing last; -0.0 ties 0.0
    if f.params.method == "semantic":  # the rows the filter compares: embedding not all zero, in its dtype
        emb = _embeddings(pool, f)
        valid = np.zeros(len(rows), bool)  # failed rows carry zero embeddings
        for lo in range(0, len(rows), EMBEDDING_BLOCK):
            block = np.asarray(emb[rows[lo : lo + EMBEDDING_BLOCK]], dtype=dtype)
            valid[lo : lo + EMBEDDING_BLOCK] = np.any(block != 0, axis=1)
        out["valid"] = np.packbits(valid)
    return out


def _embedding_dtype(args) -> str:
    """The dtype every shard's embeddings are compared in: the pool's first shard's
    (float16 or float32, else float32), so a shard of another dtype is cast to it."""
    sh, shard, path = args
    pool, _ = _shard_pool(sh, shard)
    return _search_dtype(_embeddings(pool, _dedup_at(sh, path)).dtype).str


# ---------------------------------------------------------------- semantic: workers

EMBEDDING_BLOCK = 65_536  # embedding rows converted at a time in a worker
PARTITION_BYTES = 256 << 20  # a partition's embeddings (float32), at most about this, unless one cluster is larger


def _search_dtype(dtype) -> np.dtype:
    """float16 and float32 stay as they are (half the memory for float16); others become float32."""
    dtype = np.dtype(dtype)
    return dtype if dtype in (np.float16, np.float32) else np.dtype(np.float32)


def _embeddings(pool, f) -> np.ndarray:
    """The shard's embeddings for ``dedup`` leaf ``f`` (memory-mapped where the source allows)."""
    from filtering.errors import ConfigError

    try:
        kind = pool.resolve_embedding(f.params.embedding)
    except KeyError as e:
        raise ConfigError(f"filters.dedup.embedding: {e.args[0]}") from e
    parts = [emb for _, emb in pool.iter_embeddings(kind)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _dedup_at(sh, path: Path):
    return node_at(list(sh.cfg.filter_tree), path).filter


def _rows_of(args) -> np.ndarray:
    """Embeddings of some rows of one shard (the k-means training sample), in the search's dtype."""
    sh, shard, position, rows, dtype = args
    pool, _ = _shard_pool(sh, shard)
    return np.asarray(_embeddings(pool, _dedup_at(sh, position))[rows], dtype=dtype)


_CENTROIDS: dict[str, Any] = {}  # one Assigner per worker process (path -> Assigner)


def _assign_spill(args) -> np.ndarray:
    """One shard's valid rows assigned to the centroids and spilled sorted by cluster."""
    from filtering.clustering import Assigner
    from filtering.dedup.semantic import spill_assigned

    sh, shard, position, local, first_row, rank, dtype, centroids, k, prefix = args
    pool, _ = _shard_pool(sh, shard)
    emb = _embeddings(pool, _dedup_at(sh, position))
    assigner = None
    if centroids is not None:
        assigner = _CENTROIDS.get(centroids)
        if assigner is None:
            _CENTROIDS.clear()
            assigner = _CENTROIDS[centroids] = Assigner(np.load(centroids))
    return spill_assigned(emb, local, local + first_row, rank, assigner, k, prefix, dtype)


def _normalized_spill(args) -> None:
    """Some rows of one shard (ascending), as the filter confirms pairs with them: float32,
    divided by their norm (at least 1e-12), written to ``path``."""
    sh, shard, position, rows, dtype, path = args
    pool, _ = _shard_pool(sh, shard)
    emb = groups.unit_rows(np.asarray(_embeddings(pool, _dedup_at(sh, position))[rows], dtype=dtype))
    tmp = f"{path}.tmp.npy"
    np.save(tmp, emb)
    os.replace(tmp, path)


def _take(paths: list, cuts: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Rows ``pos`` of the shards' spills end to end (shard ``s`` holds ``cuts[s]:cuts[s + 1]``)."""
    shard = np.searchsorted(cuts, pos, side="right") - 1
    out = None
    for s in np.unique(shard):
        mem = np.load(paths[s], mmap_mode="r")
        if out is None:
            out = np.empty((len(pos), mem.shape[1]), np.float32)
        at = np.flatnonzero(shard == s)
        out[at] = mem[pos[at] - cuts[s]]
        del mem
    return out if out is not None else np.zeros((0, 0), np.float32)


def _close_edges(args) -> np.ndarray:
    """Which edges ``(a, b)`` (positions in the spills) have cosine >= ``min_similarity``, packed."""
    paths, cuts, a, b, min_similarity = args
    close = groups.close_pairs(_take(paths, cuts, a), _take(paths, cuts, b), min_similarity)
    return np.packbits(close)


def _compare_partition(args) -> tuple[np.ndarray, np.ndarray]:
    from filtering.dedup.semantic import spilled_partition_pairs

    return spilled_partition_pairs(*args)


# ---------------------------------------------------------------- driver


def run_dedup(
    tasks, sh, shards, shard_rows: list[int], thresholds: list, ctx, scorer_records: list[list] | None = None
) -> list[dict]:
    """Every dedup decided over the pool, at the top level or inside ``all``/``any``/``not``
    (each among the rows that reach it); per shard ``{path: (dropped rows, survivor uid
    high, low)}``.

    ``tasks``: the plan's task pool (``filtering/tasks.py``: local processes or Ray tasks);
    ``scorer_records``: per shard, the scorer records of each pass that ran its column
    stages are appended there (``streaming.merge_scorer_records``)."""
    nodes = list(sh.cfg.filter_tree)
    n = int(sum(shard_rows))
    starts = np.r_[0, np.cumsum(shard_rows)].astype(np.int64)
    decided: list[dict[int, tuple]] = [{} for _ in shards]
    searched: dict[Any, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    positions = survivor_paths(nodes)
    # The last position that uses each search: its labels are freed (and reused) there.
    last_use = {s: p for p in positions if (s := node_at(nodes, p).filter.search_settings()) is not None}
    matched: dict[Any, against.Matches] = {}  # per search against references
    for position in positions:
        f = node_at(nodes, position).filter
        settings = f.search_settings()  # None: semantic, searched below over the rows alive here
        ref_settings = f.against_settings()
        to_search = settings is not None and settings not in searched
        dtype = None
        if f.embeddings_required():  # semantic, or perceptual with min_similarity
            dtype = np.dtype(next(iter(tasks.map(_embedding_dtype, [(sh, shards[0], position)]))))
        results = []
        key_columns = settings.columns() if to_search else None
        args = [(sh, i, s, thresholds, decided[i], position, dtype, key_columns) for i, s in enumerate(shards)]
        for i, r in enumerate(tasks.map(_alive_at, args)):
            if scorer_records is not None:
                scorer_records[i].append(r.pop("scorers"))
            r["alive"] = np.unpackbits(r["alive"], count=r["n"]).view(bool)
            if "valid" in r:
                r["valid"] = np.unpackbits(r["valid"], count=len(r["hi"])).view(bool)
            results.append(r)
        if to_search:
            # The search's result depends on the shards' key columns only: cached under their digests.
            keys = [r.pop("key") for r in results]
            searched[settings] = _cached_search(tasks, sh, shards, shard_rows, starts, n, settings, keys, ctx)
        if ref_settings is not None and ref_settings not in matched:  # after the search
            matched[ref_settings] = _against(tasks, sh, shards, shard_rows, starts, n, ref_settings, ctx)
        last = settings is None or last_use[settings] == position
        if settings is not None:
            labels, pair_a, pair_b = searched.pop(settings) if last else searched[settings]
        # One column at a time, each shard's part freed once copied: the driver never holds
        # a column twice.
        alive = _gather(results, "alive", bool)
        hi = _gather(results, "hi", np.uint64)
        lo = _gather(results, "lo", np.uint64)
        valid = _gather(results, "valid", bool) if settings is None else None
        neg_score = None
        if f.params.keep == "highest_clip_score":
            neg_score = _gather(results, "score", np.float64)
            np.negative(neg_score, out=neg_score)
        del results
        ref_rows = None
        m = matched.get(ref_settings) if ref_settings is not None else None
        assigned = None
        if settings is None and f.params.against:  # semantic: searched among the rows alive here
            m, assigned = _semantic_against(
                tasks, sh, shards, starts, position, np.flatnonzero(alive), hi, lo, valid, dtype, ctx
            )
        if m is not None:
            # Rows that duplicate a reference's kept row go first; the rest dedup among themselves.
            hit = alive[m.rows]
            if settings is not None and f.params.min_similarity is not None:  # each match confirmed by the embeddings
                hit[hit] = _confirmed_matches(tasks, sh, shards, starts, position, m, np.flatnonzero(hit), dtype, ctx)
            ref_rows, ref_hi, ref_lo = m.rows[hit], m.hi[hit], m.lo[hit]
            if len(ref_rows):
                rest = ~np.isin(np.flatnonzero(alive), ref_rows)
                hi, lo = hi[rest], lo[rest]
                if neg_score is not None:
                    neg_score = neg_score[rest]
                if valid is not None:
                    valid = valid[rest]
                alive[ref_rows] = False
        rows = np.flatnonzero(alive)
        if settings is None:
            try:  # the rows the search against references assigned, when it matched none
                reuse = assigned if ref_rows is None or len(ref_rows) == 0 else None
                pair_a, pair_b = _semantic_pairs(tasks, sh, shards, starts, position, rows, hi, lo, valid, dtype, reuse)
            finally:
                if assigned is not None:
                    shutil.rmtree(assigned.spill, ignore_errors=True)
            labels = np.arange(n, dtype=np.int64)
            del valid
        elif f.params.min_similarity is not None:
            # Pairs of rows, each confirmed by the embeddings: the filter's edges, not its labels.
            pair_a, pair_b = _confirmed_edges(
                tasks, sh, shards, starts, position, rows, hi, lo, labels, pair_a, pair_b, dtype
            )
            labels = np.arange(n, dtype=np.int64)
            last = True  # components_of may write into these labels: they are this step's own
        comp = partitioned.components_of(labels, pair_a, pair_b, alive, copy=not last)
        del labels, pair_a, pair_b, alive
        comp = comp[rows]
        drop, best = groups.survivors(comp, neg_score, hi, lo)
        del comp, neg_score
        # per shard: the dropped rows (shard-local) and their survivors' uids
        dropped_rows = rows[drop]
        del rows
        cut = np.searchsorted(dropped_rows, starts)
        ref_cut = np.searchsorted(ref_rows, starts) if ref_rows is not None else None
        for i in range(len(shards)):
            a, b = cut[i], cut[i + 1]
            decided[i][position] = (dropped_rows[a:b] - starts[i], hi[best[a:b]], lo[best[a:b]])
            if ref_cut is not None:
                c, d = ref_cut[i], ref_cut[i + 1]
                decided[i][position] += (ref_rows[c:d] - starts[i], ref_hi[c:d], ref_lo[c:d])
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


EDGES_PER_TASK = 1 << 20  # edges confirmed per task (two float32 rows each, gathered)


def _confirmed_edges(tasks, sh, shards, starts, position, rows, hi, lo, labels, pair_a, pair_b, dtype):
    """``min_similarity``: the filter's edges among the alive rows ``rows`` in uid order
    (:func:`filtering.dedup.groups.label_edges`: a star per label from its first row, the
    first rows of paired labels), kept when the two rows' embeddings have cosine >=
    ``min_similarity`` as the filter computes it; returned as pool rows. The rows an edge
    touches are read per shard in workers, normalised and spilled; chunks of edges are
    confirmed in workers from the spills."""
    from filtering.dedup.groups import label_edges

    p = _dedup_at(sh, position).params
    empty = np.zeros(0, np.int64)
    crow = rows[np.lexsort((lo, hi))]  # the alive rows by uid: the filter's order
    i, j = label_edges(labels[crow], pair_a, pair_b)
    a, b = crow[i], crow[j]
    del crow, i, j
    if len(a) == 0:
        return empty, empty
    involved = np.unique(np.concatenate([a, b]))
    pa_, pb_ = np.searchsorted(involved, a), np.searchsorted(involved, b)
    cuts = np.searchsorted(involved, starts)
    spill = tempfile.mkdtemp(prefix="dedup-confirm-", dir=sh.spill)
    try:
        paths: list = [None] * len(shards)
        work = []
        for k in range(len(shards)):
            if cuts[k + 1] > cuts[k]:
                paths[k] = os.path.join(spill, f"s{k:06d}.npy")
                local = involved[cuts[k] : cuts[k + 1]] - starts[k]
                work.append((sh, shards[k], position, local, dtype, paths[k]))
        del involved
        for _ in tasks.map(_normalized_spill, work):
            pass
        close = np.zeros(len(a), bool)
        chunks = range(0, len(a), EDGES_PER_TASK)
        work = [
            (paths, cuts, pa_[c : c + EDGES_PER_TASK], pb_[c : c + EDGES_PER_TASK], p.min_similarity) for c in chunks
        ]
        for c, packed in zip(chunks, tasks.map(_close_edges, work), strict=True):
            m = min(EDGES_PER_TASK, len(a) - c)
            close[c : c + m] = np.unpackbits(packed, count=m).view(bool)
        return a[close], b[close]
    finally:
        shutil.rmtree(spill, ignore_errors=True)


@dataclass
class _Assigned:
    """The valid alive rows ``vrows`` (by uid) assigned to ``k`` centroids, spilled under
    ``spill`` (:func:`_train_centroids`, :func:`_assign_rows`): what the semantic search
    against references leaves for the in-pool search when it matched no row."""

    vrows: np.ndarray
    k: int
    centroids: str | None
    dim: int
    prefixes: list
    sizes: np.ndarray
    spill: str


def _semantic_pairs(
    tasks, sh, shards, starts, position: Path, rows, hi, lo, valid, dtype, assigned: _Assigned | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """SemDeDup's pairs (pool rows) among the alive rows ``rows`` whose embedding is not all
    zero (``valid``), by :mod:`filtering.dedup.semantic`'s steps: the rows in uid order
    (``hi``, ``lo``); k-means trained in the driver on a seeded sample of them, fetched
    shard by shard; each shard's rows assigned and spilled sorted by cluster in the
    workers; each partition of clusters compared on one worker, a cluster's rows in uid
    order (so the pairs do not depend on shard order).
    ``assigned``: the same rows already assigned (by the search against references, which
    matched none), used instead of training and assigning again; its spill is removed here."""
    from filtering.dedup import semantic

    p = _dedup_at(sh, position).params
    empty = np.zeros(0, np.int64)
    canon = np.lexsort((lo, hi))  # positions (into rows) by uid: the filter's order
    canon = canon[valid[canon]]
    vrows = rows[canon]  # the valid rows' pool rows, by uid
    del canon
    n = len(vrows)
    if n < 2:
        return empty, empty
    k = min(p.num_clusters or semantic.default_num_clusters(n), n)
    if assigned is not None and assigned.k == k and np.array_equal(assigned.vrows, vrows):
        spill, dim, prefixes, sizes = assigned.spill, assigned.dim, assigned.prefixes, assigned.sizes
    else:
        spill = tempfile.mkdtemp(prefix="semdedup-", dir=sh.spill)
    try:
        if spill != getattr(assigned, "spill", None):
            centroids, dim = _train_centroids(tasks, sh, shards, starts, position, vrows, k, dtype, spill)
            prefixes, sizes = _assign_rows(tasks, sh, shards, starts, position, vrows, dtype, centroids, k, spill)
        clusters = np.flatnonzero(sizes > 1)
        if len(clusters) == 0:
            return empty, empty
        size_bytes = float((sizes[clusters] * max(dim, 1) * 4).sum())
        parts_n = min(len(clusters), max(4 * tasks.workers, int(np.ceil(size_bytes / PARTITION_BYTES))))
        owner = semantic.balance(sizes[clusters], parts_n)
        out_a, out_b = [empty], [empty]
        work = [(prefixes, clusters[owner == q], p.threshold) for q in range(parts_n)]
        for a, b in tasks.map(_compare_partition, work):
            out_a.append(a)
            out_b.append(b)
        a, b = np.concatenate(out_a), np.concatenate(out_b)
        return np.minimum(a, b), np.maximum(a, b)
    finally:
        shutil.rmtree(spill, ignore_errors=True)


def _cached_search(
    tasks, sh, shards, shard_rows, starts, n: int, settings, keys: list, ctx
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The search's result from ``DIR/cache/dedup-<fingerprint>/`` when an entry has these
    settings and shards (``keys``: each shard's :func:`~filtering.dedup.search_cache.shard_key`),
    else searched and saved there; its manifest record under ``stages.dedup``, and a line
    when it was read."""
    from filtering.io.paths import join

    t0 = time.perf_counter()
    cache = SearchCache(join(sh.out_dir, "cache"), settings, keys)
    found = cache.load()
    reused = found is not None
    if reused:
        ctx.log(f"dedup: the {settings.method} candidate search read from cache/dedup-{cache.fingerprint}")
    else:
        found = _search(tasks, sh, shards, shard_rows, starts, n, settings)
        cache.save(*found)
    ctx.stage_info.setdefault("dedup", {})[label_column(settings)] = {
        "cache": "reused" if reused else "computed",
        "fingerprint": cache.fingerprint,
        "pairs": int(len(found[1])),
        "workers": None if reused else tasks.workers,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return found


def _emit_args(sh, shards, shard_rows, starts, workers: int, settings, partitions: int, spill: str) -> list:
    """The map tasks of a partitioned search (``_emit``, ``_emit_against``): per group of
    consecutive shards (:func:`partitioned.task_groups`), its shards as ``(shard, first
    row, rows)``, the settings, the partitions and the task's spill file."""
    return [
        (
            sh,
            [(shards[k], int(starts[k]), int(shard_rows[k])) for k in group],
            settings,
            partitions,
            partitioned.spill_path(spill, t),
        )
        for t, group in enumerate(partitioned.task_groups(shard_rows, workers))
    ]


def _by_shard(pool_rows: np.ndarray, starts: np.ndarray):
    """Per shard with rows among ``pool_rows``: (shard, its rows (local, ascending), their positions in ``pool_rows``)."""
    order = np.argsort(pool_rows, kind="stable")
    cut = np.searchsorted(pool_rows[order], starts)
    for i in range(len(starts) - 1):
        if cut[i + 1] > cut[i]:
            at = order[cut[i] : cut[i + 1]]
            yield i, pool_rows[at] - starts[i], at


def _train_centroids(tasks, sh, shards, starts, position, vrows, k: int, dtype, spill: str) -> tuple[str | None, int]:
    """k-means on a seeded training sample of ``vrows`` (the valid rows in uid
    order: the same positions), those rows' embeddings fetched shard by shard; the centroids
    saved under ``spill``. Returns their path (None for one cluster) and the embeddings' width."""
    from filtering.clustering import sample_indices, train_kmeans
    from filtering.dedup import semantic

    if k <= 1:
        return None, 0
    p = _dedup_at(sh, position).params
    n = len(vrows)
    m = min(n, semantic.TRAINING_POINTS_PER_CLUSTER * k)
    sample = vrows[sample_indices(n, m, p.seed)]
    parts = list(_by_shard(sample, starts))
    x = None
    args = [(sh, shards[i], position, local, dtype) for i, local, _ in parts]
    for (_, _, at), part in zip(parts, tasks.map(_rows_of, args), strict=True):
        if x is None:
            x = np.empty((m, part.shape[1]), dtype)
        x[at] = part
    del parts, sample
    dim = x.shape[1]
    trained = train_kmeans(x, k, niter=p.niter, seed=p.seed, max_training_points=m)
    del x
    centroids = os.path.join(spill, "centroids.npy")
    np.save(centroids, trained)
    return centroids, dim


def _assign_rows(tasks, sh, shards, starts, position, vrows, dtype, centroids, k: int, spill: str):
    """Each shard's rows among ``vrows`` (at their positions there as ranks) assigned to the
    centroids and spilled sorted by cluster in the workers: the spills' prefixes and the
    rows per cluster."""
    sizes = np.zeros(k, np.int64)
    prefixes, args = [], []
    for i, local, at in _by_shard(vrows, starts):
        prefixes.append(os.path.join(spill, f"s{i:06d}"))
        args.append((sh, shards[i], position, local, int(starts[i]), at, dtype, centroids, k, prefixes[-1]))
    for counts in tasks.map(_assign_spill, args):
        sizes += counts
    return prefixes, sizes


def _search(tasks, sh, shards, shard_rows, starts, n: int, settings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The partitioned candidate search over every row: ``(labels, pair_a, pair_b)``, the
    map tasks reading each group of shards' key columns (:func:`_emit`)."""
    emit_args = functools.partial(_emit_args, sh, shards, shard_rows, starts, tasks.workers, settings)
    return partitioned.search(tasks.map, _emit, emit_args, n, settings, tasks.workers, sh.spill)


def _against(tasks, sh, shards, shard_rows, starts, n: int, ref_settings, ctx) -> against.Matches:
    """The pool rows that duplicate a reference's kept row (``filtering/dedup/against.py``):
    the pool side emitted by shard groups in the workers, each partition joined on a worker."""
    from filtering.io.paths import join

    t0 = time.perf_counter()
    refs = against.open_references(
        ref_settings.paths, join(sh.out_dir, "cache"), ctx.log, ref_settings.search.key_column
    )
    settings = ref_settings.search

    emit_args = functools.partial(_emit_args, sh, shards, shard_rows, starts, tasks.workers, settings)
    matches = against.match(tasks.map, emit_args, _emit_against, n, settings, refs, tasks.workers, sh.spill, ctx.log)
    record = against.record(refs, matches, time.perf_counter() - t0, tasks.workers)
    ctx.stage_info.setdefault("dedup", {})[ref_settings.column] = record
    return matches


def _embedding_kind(args) -> str:
    """The embedding kind the ``dedup`` leaf at ``path`` reads (its ``embedding``, or the source's default)."""
    from filtering.errors import ConfigError

    sh, shard, path = args
    pool, _ = _shard_pool(sh, shard)
    try:
        return pool.resolve_embedding(_dedup_at(sh, path).params.embedding)
    except KeyError as e:
        raise ConfigError(f"filters.dedup.embedding: {e.args[0]}") from e


def _spill_reference(args) -> np.ndarray:
    return against.spill_reference(*args)


def _semantic_partition(args):
    return against.semantic_partition(*args)


def _semantic_against(
    tasks, sh, shards, starts, position: Path, rows, hi, lo, valid, dtype, ctx
) -> tuple[against.Matches, _Assigned | None]:
    """``method: semantic`` with ``against``: the alive rows ``rows`` whose embedding is not
    all zero (``valid``) that are within ``threshold`` of a reference's kept row
    (``filtering/dedup/against.py``): k-means trained on them as :func:`_semantic_pairs`
    trains (its k and sample), the pool's rows and each reference index file's rows
    assigned and spilled sorted by cluster in the workers, each partition of clusters
    compared on one worker. Also returns the pool rows' assignment (its spill the
    caller's to remove), which the in-pool search uses when no row matched."""
    from filtering.dedup import semantic
    from filtering.io.paths import join

    t0 = time.perf_counter()
    p = _dedup_at(sh, position).params
    refs = against.open_references(p.against, join(sh.out_dir, "cache"), ctx.log)
    kind = next(iter(tasks.map(_embedding_kind, [(sh, shards[0], position)])))
    against.check_embeddings(refs, kind)
    canon = np.lexsort((lo, hi))
    vrows = rows[canon[valid[canon]]]  # the valid rows by uid
    del canon
    n, n_ref = len(vrows), sum(r.rows for r in refs)
    matches, assigned = against.Matches.empty(), None
    if n and n_ref:
        # the in-pool step's k and sample: when no row matches, it uses this assignment
        k = min(p.num_clusters or semantic.default_num_clusters(n), n)
        spill = tempfile.mkdtemp(prefix="semdedup-", dir=sh.spill)
        ref_spill = os.path.join(spill, "references")
        os.makedirs(ref_spill)
        try:
            centroids, dim = _train_centroids(tasks, sh, shards, starts, position, vrows, k, dtype, spill)
            prefixes, sizes = _assign_rows(tasks, sh, shards, starts, position, vrows, dtype, centroids, k, spill)
            assigned = _Assigned(vrows, k, centroids, dim, prefixes, sizes, spill)
            ref_prefixes, args = [], []
            for k_ref, ref in enumerate(refs):
                for j in range(len(ref.files)):
                    ref_prefixes.append(os.path.join(ref_spill, f"r{len(ref_prefixes):06d}"))
                    args.append((ref, k_ref, j, kind, dtype, centroids, k, ref_prefixes[-1]))
            ref_sizes = np.zeros(k, np.int64)
            for counts in tasks.map(_spill_reference, args):
                ref_sizes += counts
            clusters = np.flatnonzero((sizes > 0) & (ref_sizes > 0))
            if len(clusters):
                # balanced by comparisons (pool rows times reference rows per cluster), and
                # enough partitions that one holds about PARTITION_BYTES of embeddings
                size_bytes = float(((sizes[clusters] + ref_sizes[clusters]) * max(dim, 1) * 4).sum())
                parts_n = min(len(clusters), max(4 * tasks.workers, int(np.ceil(size_bytes / PARTITION_BYTES))))
                owner = semantic.balance(np.sqrt(sizes[clusters] * ref_sizes[clusters].astype(np.float64)), parts_n)
                work = [(prefixes, ref_prefixes, clusters[owner == q], p.threshold) for q in range(parts_n)]
                matches = against.best_matches(tasks.map(_semantic_partition, work))
        except BaseException:
            shutil.rmtree(spill, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(ref_spill, ignore_errors=True)
    record = against.record(refs, matches, time.perf_counter() - t0, tasks.workers)
    ctx.stage_info.setdefault("dedup", {})[against.semantic_column(p.against, p.threshold)] = record
    return matches, assigned


def _spill_reference_rows(args) -> np.ndarray:
    return against.spill_reference_rows(*args)


def _confirmed_matches(tasks, sh, shards, starts, position: Path, m: against.Matches, at: np.ndarray, dtype, ctx):
    """``min_similarity`` against references: which matches ``at`` (positions in ``m``) have
    cosine >= ``min_similarity`` between the row's embedding and its reference row's (the
    closest by hash), as the filter confirms its own pairs: the rows spilled normalised
    per shard (:func:`_normalized_spill`), the reference rows per index file
    (:func:`against.spill_reference_rows`), the pairs confirmed in chunks by
    :func:`_close_edges`."""
    p = _dedup_at(sh, position).params
    close = np.zeros(len(at), bool)
    if len(at) == 0:
        return close
    refs = against.open_references(p.against, os.path.join(sh.out_dir, "cache"), ctx.log)
    kind = next(iter(tasks.map(_embedding_kind, [(sh, shards[0], position)])))
    against.check_embeddings(refs, kind)
    rows = m.rows[at]  # ascending
    spill = tempfile.mkdtemp(prefix="against-confirm-", dir=sh.spill)
    try:
        cuts = np.searchsorted(rows, starts)
        paths: list = [None] * len(shards)
        work = []
        for k in range(len(shards)):
            if cuts[k + 1] > cuts[k]:
                paths[k] = os.path.join(spill, f"s{k:06d}.npy")
                work.append((sh, shards[k], position, rows[cuts[k] : cuts[k + 1]] - starts[k], dtype, paths[k]))
        for _ in tasks.map(_normalized_spill, work):
            pass
        # the reference rows, per index file of the reference each match names
        keys = against.uid_keys(m.hi[at], m.lo[at])
        ref_of = m.ref[at]
        work, owners = [], []
        for k_ref, ref in enumerate(refs):
            wanted = np.unique(keys[ref_of == k_ref])
            for j in range(len(ref.files) if len(wanted) else 0):
                work.append((ref, j, kind, dtype, wanted, os.path.join(spill, f"r{len(work):06d}.npy")))
                owners.append(k_ref)
        found = list(tasks.map(_spill_reference_rows, work))
        paths += [w[-1] for w in work]
        cuts = np.r_[cuts, cuts[-1] + np.cumsum([len(f) for f in found])].astype(np.int64)
        b = np.full(len(at), -1, np.int64)  # each match's reference row: its position in the spills
        for k_ref in range(len(refs)):
            files = [t for t, o in enumerate(owners) if o == k_ref]
            if not files:
                continue
            got = np.concatenate([found[t] for t in files])
            pos = np.concatenate([np.arange(cuts[len(shards) + t], cuts[len(shards) + t + 1]) for t in files])
            order = np.argsort(got, kind="stable")  # a uid kept twice: its first copy
            got, pos = got[order], pos[order]
            mine = np.flatnonzero(ref_of == k_ref)
            i = np.minimum(np.searchsorted(got, keys[mine]), max(len(got) - 1, 0))
            ok = got[i] == keys[mine] if len(got) else np.zeros(len(mine), bool)
            b[mine[ok]] = pos[i[ok]]
        have = np.flatnonzero(b >= 0)
        a = np.arange(len(at), dtype=np.int64)[have]
        chunks = range(0, len(have), EDGES_PER_TASK)
        work = [
            (paths, cuts, a[c : c + EDGES_PER_TASK], b[have][c : c + EDGES_PER_TASK], p.min_similarity) for c in chunks
        ]
        for c, packed in zip(chunks, tasks.map(_close_edges, work), strict=True):
            n = min(EDGES_PER_TASK, len(have) - c)
            close[have[c : c + n]] = np.unpackbits(packed, count=n).view(bool)
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    record = ctx.stage_info.get("dedup", {}).get(_dedup_at(sh, position).against_settings().column)
    if record is not None:
        record["min_similarity"] = {"confirmed": int(close.sum()), "not_confirmed": int(len(close) - close.sum())}
    return close
