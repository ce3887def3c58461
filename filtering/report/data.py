"""What the report shows, gathered from an output directory in bounded memory.

Everything is read column-selectively and in record batches: scores of every row come
from the run's caches (WebDataset input: the rows in ``DIR/cache/source-*/``, each score
in its scorer's ``DIR/cache/scorer-*/``, row-aligned, as the manifest's ``source`` record
names them; ``score-*/`` before) or the pool's own metadata parquet (DataComp input); the kept set from ``subset.npy``; reasons and
duplicate links from ``dropped/``. Plots are built from fixed fine bins (cosine scores
lie in [-1, 1]) and thumbnails from a few capped candidate lists (top-k heaps and a
seeded reservoir), so memory does not grow with the pool. Missing pieces (no score
cache, no images, no clusters, no dedup) shrink the report instead of failing it.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from filtering.errors import InputError
from filtering.io.paths import get_fs, join, shard_id
from filtering.sources import source_info
from filtering.uid import normalize_uids, uids_to_u8u8
from filtering.writers.commit import verify

FINE_BINS = 4000  # fine histogram over [-1, 1]; rebinned to the occupied range for display
BATCH_ROWS = 65_536
MAX_DUP_ROWS = 200_000  # duplicate links held while picking the largest groups


@dataclass
class Sample:
    """One row shown as a thumbnail."""

    uid: str
    key: str | None = None
    source_shard: str | None = None
    caption: str | None = None
    score: float | None = None
    note: str | None = None  # reason code, cluster, "survivor"...
    image: str | None = None  # data: URI, filled by the thumbnail pass


@dataclass
class ScoreHistogram:
    field: str
    edges: np.ndarray
    kept: np.ndarray
    dropped: np.ndarray
    thresholds: list[float]


@dataclass
class ClusterSummary:
    sizes: list[tuple[int, int, bool]]  # (cluster id, rows, is a target cluster), largest first
    scope: str  # "pool" (every row) or "kept" (the subset only)
    n_clusters: int
    n_target: int | None
    examples: dict[int, list[Sample]]


@dataclass
class DuplicateGroup:
    survivor: Sample
    copies: list[Sample]
    total_copies: int


@dataclass
class ReportData:
    out_dir: str
    manifest: dict[str, Any]
    histogram: ScoreHistogram | None = None
    score_scope: str = "none"  # "pool", "kept" or "none"
    grids: dict[str, list[Sample]] = field(default_factory=dict)
    failures: list[Sample] = field(default_factory=list)
    clusters: ClusterSummary | None = None
    duplicates: list[DuplicateGroup] = field(default_factory=list)
    duplicate_rows: int = 0
    sweep: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    score_columns: list[Any] = field(default_factory=list)  # score_columns.ColumnReport, one per filtered column

    def samples(self) -> Iterator[Sample]:
        for grid in self.grids.values():
            yield from grid
        yield from self.failures
        if self.clusters:
            for ex in self.clusters.examples.values():
                yield from ex
        for g in self.duplicates:
            yield g.survivor
            yield from g.copies
        for c in self.score_columns:
            yield from c.best
            yield from c.worst


# --- reading -----------------------------------------------------------------------


def _exists(url: str) -> bool:
    fs, p = get_fs(url)
    return fs.exists(p)


def _glob(pattern: str) -> list[str]:
    fs, p = get_fs(pattern)
    prefix = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
    return sorted(prefix + x for x in fs.glob(p))


def _mtime(url: str) -> float:
    return os.path.getmtime(url) if "://" not in url else 0.0


def _read_json(url: str) -> Any:
    fs, p = get_fs(url)
    with fs.open(p, "r") as f:
        return json.load(f)


def iter_batches(url: str, columns: list[str], batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """Record batches of the named columns that exist in the file (others are skipped)."""
    fs, p = get_fs(url)
    with fs.open(p, "rb") as f:
        pf = pq.ParquetFile(f)
        present = [c for c in columns if c in pf.schema_arrow.names]
        yield from pf.iter_batches(batch_size=batch_rows, columns=present)


def _schema_names(url: str) -> list[str]:
    fs, p = get_fs(url)
    with fs.open(p, "rb") as f:
        return pq.read_schema(f).names


class _Row:
    """Values of one batch read one cell at a time: only the rows shown become Python
    objects, not the whole batch's strings."""

    def __init__(self, batch: pa.RecordBatch):
        self.batch = batch

    def __call__(self, name: str, i: int):
        if name not in self.batch.schema.names:
            return None
        return self.batch.column(name)[int(i)].as_py()


# --- candidate lists ---------------------------------------------------------------


class TopK:
    """The k rows with the largest (or smallest) score seen so far, fed batch by batch."""

    def __init__(self, k: int, largest: bool = True):
        self.k, self.sign = k, (1.0 if largest else -1.0)
        self.keys = np.zeros(0)
        self.rows: list[Sample] = []

    def offer(self, scores: np.ndarray, make) -> None:
        """``make(i)`` builds the Sample of batch row ``i``; called only for candidates."""
        if self.k == 0 or len(scores) == 0:
            return
        keys = self.sign * scores.astype(np.float64)
        idx = np.argpartition(-keys, self.k - 1)[: self.k] if len(keys) > self.k else np.arange(len(keys))
        if len(self.rows) >= self.k:
            idx = idx[keys[idx] > self.keys.min()]
        if len(idx) == 0:
            return
        all_keys = np.concatenate([self.keys, keys[idx]])
        all_rows = self.rows + [make(int(i)) for i in idx]
        best = np.argsort(-all_keys, kind="stable")[: self.k]
        self.keys, self.rows = all_keys[best], [all_rows[i] for i in best]

    def result(self) -> list[Sample]:
        return list(self.rows)


class Reservoir:
    """A seeded uniform sample of k rows from a stream (smallest random priorities)."""

    def __init__(self, k: int, seed: int):
        self.k, self.rng = k, np.random.default_rng(seed)
        self.keys = np.zeros(0)
        self.rows: list[Sample] = []

    def offer(self, n: int, make) -> None:
        if self.k == 0 or n == 0:
            return
        pri = self.rng.random(n)
        idx = np.argsort(pri)[: self.k]
        all_keys = np.concatenate([self.keys, pri[idx]])
        all_rows = self.rows + [make(int(i)) for i in idx]
        best = np.argsort(all_keys)[: self.k]
        self.keys, self.rows = all_keys[best], [all_rows[i] for i in best]

    def result(self) -> list[Sample]:
        return list(self.rows)


# --- the gatherer ------------------------------------------------------------------


def source_record(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``source`` record (what depends on the input kind, as the source stage
    stated it); manifests written before it existed get their input kind's."""
    record = manifest.get("source")
    if isinstance(record, dict) and "kind" in record:
        return record
    return source_info(manifest.get("input_kind") or "webdataset").to_dict()


def score_field(manifest: dict[str, Any]) -> str:
    """The score the clip_score filter used (its ``field``), else the source's default."""
    default = source_record(manifest)["score_field"]

    def walk(node: Any) -> str | None:
        if isinstance(node, list):
            return next((f for f in map(walk, node) if f), None)
        if isinstance(node, dict):
            for name, params in node.items():
                if name == "clip_score":
                    return (params or {}).get("field") or default
                found = walk(params)
                if found:
                    return found
        return None

    return walk(manifest.get("config", {}).get("filters", [])) or default


def score_sources(out_dir: str, manifest: dict[str, Any], field_name: str) -> list[str]:
    """Parquet files holding every row's score: the run's score cache (the manifest's
    ``source.score_cache``) or, where the scores are the input's (DataComp), its metadata."""
    inputs = [i["path"] for i in manifest.get("inputs", []) if isinstance(i, dict) and "path" in i]
    source = source_record(manifest)
    if source.get("scores_in_inputs"):
        meta_dir = manifest.get("config", {}).get("input", {}).get("datacomp_metadata")
        files = [p for p in inputs if p.endswith(".parquet")]
        if not files and meta_dir:
            files = _glob(join(meta_dir, "*.parquet"))
        return [f for f in files if _exists(f)]
    if source.get("score_cache"):
        files = [join(out_dir, source["score_cache"], f"{shard_id(u)}.parquet") for u in inputs]
        if not files or not all(_exists(f) for f in files):
            return []
        if field_name in _schema_names(files[0]):
            return files
        beside = [score_column_file(out_dir, manifest, field_name, f) for f in files]
        return files if all(b is not None and _exists(b) for b in beside) else []
    # A manifest written before the source record: the newest score cache holding every input.
    best: list[str] = []
    best_mtime = -1.0
    for cache_dir in _glob(join(out_dir, "cache", "score-*")):
        files = [join(cache_dir, f"{shard_id(u)}.parquet") for u in inputs]
        if not files or not all(_exists(f) for f in files):
            continue
        if field_name not in _schema_names(files[0]):
            continue
        mtime = _mtime(files[0])
        if mtime > best_mtime:
            best, best_mtime = files, mtime
    return best


def score_column_file(out_dir: str, manifest: dict[str, Any], field_name: str, rows_file: str) -> str | None:
    """The scorer cache file holding ``field_name`` for the shard of ``rows_file`` (row-aligned
    with it; the manifest's ``source.score_columns``), or None when the column is not cached apart."""
    folder = (source_record(manifest).get("score_columns") or {}).get(field_name)
    if not folder:
        return None
    return join(out_dir, folder, rows_file.rstrip("/").rsplit("/", 1)[-1])


def uid_file(out_dir: str, manifest: dict[str, Any], rows_file: str) -> str | None:
    """The file holding the run's resolved ``uid`` and ``error`` of the rows of
    ``rows_file`` (row-aligned; the manifest's ``source.uid_cache``), or None."""
    folder = source_record(manifest).get("uid_cache")
    if not folder:
        return None
    path = join(out_dir, folder, rows_file.rstrip("/").rsplit("/", 1)[-1])
    if not _exists(path) or _num_rows(path) != _num_rows(rows_file):  # not this run's rows
        return None
    return path


def _num_rows(url: str) -> int:
    fs, p = get_fs(url)
    with fs.open(p, "rb") as f:
        return pq.read_metadata(f).num_rows


def with_run_uids(batches: Iterator[pa.RecordBatch], resolved: str | None, manifest: dict[str, Any] | None = None):
    """``batches`` of a rows cache file with ``uid`` and ``error`` as the run resolved them
    (:func:`uid_file`): the cached rows keep the ``.json`` uid as read, which is missing
    or in another spelling where the run derived or normalised it. Without that file (a
    run from before it was written), resolved here by the same rule from the manifest's
    ``input.uid``, batch by batch."""
    if resolved is None:
        for b in batches:
            yield _resolve_uids(b, manifest) if manifest is not None else b
        return
    fs, p = get_fs(resolved)
    with fs.open(p, "rb") as f:
        run = pq.read_table(f, columns=["uid", "error"])
    start = 0
    for b in batches:
        for name in ("uid", "error"):
            if name in b.schema.names:
                i = b.schema.get_field_index(name)
                b = b.set_column(i, name, run.column(name).slice(start, b.num_rows).combine_chunks())
        yield b
        start += b.num_rows


def _resolve_uids(batch: pa.RecordBatch, manifest: dict[str, Any]) -> pa.RecordBatch:
    """``batch`` with ``uid`` and ``error`` resolved as :func:`filtering.uid.resolve_uids`
    resolves them for the run (``input.uid`` from the manifest); as it is when it lacks the
    columns the rule needs or the rule refuses it."""
    from filtering.uid import UidError, resolve_uids

    if not {"uid", "key", "source_shard", "error"} <= set(batch.schema.names):
        return batch
    cfg = ((manifest.get("config") or {}).get("input") or {}).get("uid") or {}
    table = pa.Table.from_batches([batch])
    try:
        uid, error, _ = resolve_uids(
            table,
            source=cfg.get("source", "json"),
            field=cfg.get("field", "uid"),
            derive=cfg.get("derive", "key"),
            on_invalid=cfg.get("on_invalid", "error"),
            failed=batch.column("error").is_valid().to_numpy(zero_copy_only=False),
        )
    except UidError:
        return batch
    for name, values in (("uid", uid), ("error", error)):
        values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        batch = batch.set_column(batch.schema.get_field_index(name), name, values)
    return batch


def with_score_column(batches: Iterator[pa.RecordBatch], score_file: str | None, field_name: str):
    """``batches`` of a rows file with ``field_name`` appended from its scorer's cache file."""
    if score_file is None:
        yield from batches
        return
    values = pa.concat_arrays([b.column(field_name) for b in iter_batches(score_file, [field_name])] or [pa.array([])])
    start = 0
    for b in batches:
        yield b.append_column(field_name, values.slice(start, b.num_rows))
        start += b.num_rows


class _UidSet:
    """Membership in a sorted ``u8,u8`` uid array (``subset.npy``, memory-mapped).

    Searching the high halves as plain uint64 is many times faster than searching the
    structured array; low halves are compared at the found positions, and the rare runs
    of equal high halves are resolved exactly.
    """

    def __init__(self, arr: np.ndarray):
        self.arr = arr
        self.high = np.ascontiguousarray(arr["f0"]) if len(arr) else np.zeros(0, np.uint64)

    def contains(self, uids: pa.Array) -> np.ndarray:
        """Whether each uid is kept; a uid that is not 32 hex digits (an output written
        before the run's uids were cached, :func:`uid_file`) is not."""
        if len(self.arr) == 0 or len(uids) == 0:
            return np.zeros(len(uids), dtype=bool)
        uids = normalize_uids(uids)
        valid = uids.is_valid().to_numpy(zero_copy_only=False)
        if not valid.all():
            found = np.zeros(len(uids), dtype=bool)
            found[valid] = self.contains(uids.filter(pa.array(valid)))
            return found
        q = uids_to_u8u8(uids)
        left = np.searchsorted(self.high, q["f0"], "left")
        right = np.searchsorted(self.high, q["f0"], "right")
        at = np.minimum(left, len(self.arr) - 1)
        found = (right > left) & (self.arr["f1"][at] == q["f1"])
        for i in np.flatnonzero((right - left > 1) & ~found):
            found[i] = bool((self.arr["f1"][left[i] : right[i]] == q["f1"][i]).any())
        return found


def kept_uids(out_dir: str) -> _UidSet | None:
    path = join(out_dir, "subset.npy")
    if not _exists(path):
        return None
    if "://" in path:
        fs, p = get_fs(path)
        with fs.open(p, "rb") as f:
            import io

            return _UidSet(np.load(io.BytesIO(f.read())))
    return _UidSet(np.load(path, mmap_mode="r"))


def gather_outputs(
    out_dir: str,
    per_grid: int = 12,
    seed: int = 0,
    clusters_shown: int = 6,
    per_cluster: int = 5,
    duplicate_groups: int = 8,
    copies_per_group: int = 4,
) -> ReportData:
    """Collect the report's numbers and thumbnail candidates (images are filled later),
    all but the score columns' (:func:`filtering.report.gather` adds those)."""
    manifest_path = join(out_dir, "manifest.json")
    if not _exists(manifest_path):
        raise InputError(
            f"{out_dir}: no manifest.json (not a poolsift output directory, or its last run did not finish)"
        )
    manifest = _read_json(manifest_path)
    verify(out_dir, manifest)  # the files are the ones the manifest lists (writers/commit.py)
    data = ReportData(out_dir=out_dir, manifest=manifest)
    subset_parts = _glob(join(out_dir, "subset", "part-*.parquet"))
    dropped_parts = _glob(join(out_dir, "dropped", "part-*.parquet"))

    # 1. dropped/: a seeded sample of failures and the duplicate links.
    failures = Reservoir(per_grid, seed)
    dup_rows: list[tuple[str, str, str | None, str | None]] = []  # (survivor uid, copy uid, key, shard)
    for part in dropped_parts:
        for b in iter_batches(part, ["uid", "key", "source_shard", "filter", "reason", "duplicate_of"]):
            row = _Row(b)
            key = "key" if "key" in b.schema.names else "uid"  # DataComp's dropped rows: the key is the uid
            failed = np.flatnonzero(
                pc.equal(b.column("filter"), "failed").fill_null(False).to_numpy(zero_copy_only=False)
            )
            failures.offer(
                len(failed),
                lambda j, f=failed, r=row, k=key: Sample(
                    r("uid", f[j]), r(k, f[j]), r("source_shard", f[j]), note=r("reason", f[j])
                ),
            )
            if "duplicate_of" not in b.schema.names:
                continue
            has = np.flatnonzero(b.column("duplicate_of").is_valid().to_numpy(zero_copy_only=False))
            data.duplicate_rows += len(has)
            room = max(MAX_DUP_ROWS - len(dup_rows), 0)
            dup_rows += [
                (row("duplicate_of", i), row("uid", i), row(key, i), row("source_shard", i)) for i in has[:room]
            ]
    data.failures = failures.result()

    by_survivor: dict[str, list[tuple[str, str | None, str | None]]] = defaultdict(list)
    for surv, copy, key, shard in dup_rows:
        by_survivor[surv].append((copy, key, shard))
    largest = sorted(by_survivor, key=lambda s: (-len(by_survivor[s]), s))[:duplicate_groups]
    for surv in largest:
        copies = [Sample(c, k, s, note="duplicate") for c, k, s in by_survivor[surv][:copies_per_group]]
        data.duplicates.append(DuplicateGroup(Sample(surv, note="survivor"), copies, len(by_survivor[surv])))

    # 2. every row's score: histogram, grids, and details of the rows named above.
    field_name = score_field(manifest)
    thresholds = manifest.get("thresholds", {}) or {}
    threshold = thresholds.get(field_name)
    kept_set = kept_uids(out_dir)
    wanted: dict[str, list[Sample]] = defaultdict(list)
    for s in data.samples():
        wanted[s.uid].append(s)
    wanted_set = pa.array(list(wanted), pa.string())
    fine_edges = np.linspace(-1.0, 1.0, FINE_BINS + 1)
    hist_kept = np.zeros(FINE_BINS, dtype=np.int64)
    hist_dropped = np.zeros(FINE_BINS, dtype=np.int64)
    top_kept, low_kept, top_dropped = TopK(per_grid, True), TopK(per_grid, False), TopK(per_grid, True)
    sources = score_sources(out_dir, manifest, field_name)
    caption_col = source_record(manifest)["caption_column"]
    columns = ["uid", "key", "source_shard", caption_col, field_name, "error", "url"]
    if sources and kept_set is not None:
        data.score_scope = "pool"
    elif subset_parts:
        sources, data.score_scope, caption_col = subset_parts, "kept", "caption"
        columns[3] = caption_col
        data.notes.append("no score cache found: the histogram shows kept rows only")
    for src in sources:
        side = score_column_file(out_dir, manifest, field_name, src) if data.score_scope == "pool" else None
        if side is not None and field_name in _schema_names(src):
            side = None
        resolved = uid_file(out_dir, manifest, src) if data.score_scope == "pool" else None
        batches = with_run_uids(iter_batches(src, columns), resolved, manifest if data.score_scope == "pool" else None)
        for b in with_score_column(batches, side, field_name):
            uid_arr = b.column("uid") if "uid" in b.schema.names else None
            if uid_arr is None or field_name not in b.schema.names:
                continue
            scores = np.asarray(b.column(field_name).to_numpy(zero_copy_only=False), dtype=np.float64)
            valid = ~np.isnan(scores)
            if "error" in b.schema.names:
                valid &= b.column("error").is_null().to_numpy(zero_copy_only=False)
            kept = kept_set.contains(uid_arr) if data.score_scope == "pool" else np.ones(b.num_rows, bool)
            row = _Row(b)
            bins = np.clip(np.floor((np.nan_to_num(scores) + 1.0) / 2.0 * FINE_BINS), 0, FINE_BINS - 1).astype(np.int64)
            hist_kept += np.bincount(bins[valid & kept], minlength=FINE_BINS)
            hist_dropped += np.bincount(bins[valid & ~kept], minlength=FINE_BINS)

            def maker(rows, note, r=row, sc=scores):
                return lambda j: Sample(
                    r("uid", rows[j]),
                    r("key", rows[j]),
                    r("source_shard", rows[j]),
                    r(caption_col, rows[j]),
                    float(sc[rows[j]]),
                    note,
                )

            rows_k = np.flatnonzero(valid & kept)
            top_kept.offer(scores[rows_k], maker(rows_k, "kept"))
            low_kept.offer(scores[rows_k], maker(rows_k, "kept"))
            below = valid & ~kept
            if threshold is not None:
                below &= scores < threshold  # "just below": dropped by the score, not by another filter
            rows_d = np.flatnonzero(below)
            top_dropped.offer(scores[rows_d], maker(rows_d, "dropped"))
            if wanted:
                hit = pc.is_in(uid_arr, value_set=wanted_set).to_numpy(zero_copy_only=False)
                for i in np.flatnonzero(hit):
                    for s in wanted[row("uid", i)]:
                        s.key, s.source_shard = s.key or row("key", i), s.source_shard or row("source_shard", i)
                        s.caption = row(caption_col, i)
                        s.score = float(scores[i]) if valid[i] else None
    if hist_kept.sum() + hist_dropped.sum():
        data.histogram = _rebin(
            field_name,
            fine_edges,
            hist_kept,
            hist_dropped,
            [float(t) for t in thresholds.values() if t is not None and np.isfinite(t)]
            if threshold is None
            else [float(threshold)]
            if np.isfinite(threshold)
            else [],
        )
    data.grids = {"highest-scored kept": top_kept.result(), "lowest-scored kept": low_kept.result()}
    if data.score_scope == "pool":
        data.grids["highest-scored dropped"] = top_dropped.result()

    # 3. clusters, when the clusters stage ran.
    if subset_parts and "cluster_id" in _schema_names(subset_parts[0]):
        data.clusters = _clusters(
            out_dir,
            subset_parts,
            "caption",
            field_name,
            clusters_shown,
            per_cluster,
            sources if data.score_scope == "pool" else [],
        )

    sweep_path = join(out_dir, "sweep.json")
    if _exists(sweep_path):
        data.sweep = sweep_of_this_run(_read_json(sweep_path), manifest, data.notes)
    return data


def sweep_of_this_run(sweep: dict[str, Any], manifest: dict[str, Any], notes: list[str]) -> dict[str, Any] | None:
    """``sweep`` when it was made with this run's settings: against this run (its config
    hash), or from the same settings (made before the run); else None, with a note. A sweep
    file from before the hashes were recorded is shown only when it is newer than the run."""
    from filtering.provenance import settings_sha256

    if "run_config_sha256" in sweep or "settings_sha256" in sweep:
        ours = sweep.get("run_config_sha256") == manifest.get("config_sha256") or sweep.get(
            "settings_sha256"
        ) == settings_sha256(manifest.get("config") or {})
    else:
        ours = str(sweep.get("created_at", "")) >= str(manifest.get("created_at", ""))
    if ours:
        return sweep
    notes.append(
        f"sweep.json ({sweep.get('param')}, made {sweep.get('created_at')}) was made with other settings than "
        "this run's, so it is left out; run poolsift sweep again to draw it beside this run."
    )
    return None


def _rebin(
    field_name: str,
    edges: np.ndarray,
    kept: np.ndarray,
    dropped: np.ndarray,
    thresholds: list[float],
    target_bins: int = 60,
) -> ScoreHistogram:
    """Merge fine bins into about ``target_bins`` over the occupied range (plus thresholds)."""
    total = kept + dropped
    nz = np.flatnonzero(total)
    lo, hi = int(nz[0]), int(nz[-1]) + 1
    for t in thresholds:
        ti = int(np.clip((t + 1.0) / 2.0 * (len(edges) - 1), 0, len(edges) - 2))
        lo, hi = min(lo, ti), max(hi, ti + 1)
    step = max(1, -(-(hi - lo) // target_bins))
    hi = min(len(total), lo + step * -(-(hi - lo) // step))
    n = (hi - lo) // step
    k = kept[lo : lo + n * step].reshape(n, step).sum(axis=1)
    d = dropped[lo : lo + n * step].reshape(n, step).sum(axis=1)
    return ScoreHistogram(field_name, edges[lo : lo + n * step + 1 : step], k, d, thresholds)


def _cluster_counts(files: list[str], masks: list[str | None] | None = None) -> tuple[Counter[int], dict[int, bool]]:
    """Rows per cluster id, and the ids marked ``cluster_target``. ``masks``: per file, a
    row-aligned score-cache table whose failed rows (``error`` set) are not counted."""
    sizes: Counter[int] = Counter()
    target: dict[int, bool] = {}
    for f, mask_file in zip(files, masks or [None] * len(files), strict=True):
        failed = None
        if mask_file and _exists(mask_file) and "error" in _schema_names(mask_file):
            failed = np.concatenate(
                [
                    b.column("error").is_valid().to_numpy(zero_copy_only=False)
                    for b in iter_batches(mask_file, ["error"])
                ]
                or [np.zeros(0, bool)]
            )
        start = 0
        for b in iter_batches(f, ["cluster_id", "cluster_target"]):
            valid = b.column("cluster_id").is_valid().to_numpy(zero_copy_only=False)
            if failed is not None and len(failed) >= start + b.num_rows:
                valid &= ~failed[start : start + b.num_rows]
            start += b.num_rows
            ids = b.column("cluster_id").to_numpy(zero_copy_only=False)[valid].astype(np.int64)
            u, c = np.unique(ids, return_counts=True)
            sizes.update(dict(zip(u.tolist(), c.tolist(), strict=True)))
            if "cluster_target" in b.schema.names:
                tg = b.column("cluster_target").fill_null(False).to_numpy(zero_copy_only=False)[valid]
                target.update(dict.fromkeys(np.unique(ids[tg.astype(bool)]).tolist(), True))
    return sizes, target


def _cache_spec(url: str) -> dict[str, Any]:
    fs, p = get_fs(url)
    with fs.open(p, "rb") as f:
        meta = pq.read_schema(f).metadata or {}
    try:
        return json.loads(meta.get(b"poolsift_cache", b"{}")).get("spec", {}) or {}
    except (ValueError, AttributeError):
        return {}


def _clusters(
    out_dir: str,
    subset_parts: list[str],
    caption_col: str,
    field_name: str,
    shown: int,
    per_cluster: int,
    score_files: list[str],
) -> ClusterSummary:
    """Cluster sizes over the pool when the clusters stage's cache holds every row's
    cluster (``cache/clusters-*/``), else over the subset; targets from the stage's
    cached target set when found, else from the subset's ``cluster_target``."""
    pool_files: list[str] = []
    for d in sorted(_glob(join(out_dir, "cache", "clusters-*")), key=_mtime, reverse=True):  # the newest result
        pool_files = [f for f in _glob(join(d, "*.parquet")) if "cluster_id" in _schema_names(f)]
        if pool_files:
            break
    by_name = {posixpath.basename(f): f for f in score_files}
    masks = [by_name.get(posixpath.basename(f)) for f in pool_files]
    sizes, target = _cluster_counts(pool_files, masks) if pool_files else _cluster_counts(subset_parts)
    scope = "pool" if pool_files else "kept"
    has_target = "cluster_target" in _schema_names(subset_parts[0]) or bool(target)
    if pool_files:
        target |= _cluster_counts(subset_parts)[1]  # the subset says which clusters were targets
        centroids = _cache_spec(pool_files[0]).get("centroids")
        found = (
            sorted(_glob(join(out_dir, "cache", f"centroids-{centroids}", "targets-*.npy")), key=_mtime)
            if centroids
            else []
        )
        if len(found) == 1 and "://" not in found[0]:  # one reference set: its targets are this run's
            target |= dict.fromkeys(np.load(found[0]).astype(np.int64).tolist(), True)
            has_target = True
    ordered = sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))
    chosen = [cid for cid, _ in ordered if target.get(cid, not has_target)][:shown]
    examples: dict[int, list[Sample]] = {cid: [] for cid in chosen}
    wanted_ids = np.asarray(chosen, dtype=np.int64)
    for part in subset_parts:
        for b in iter_batches(part, ["uid", "key", "source_shard", caption_col, field_name, "cluster_id"]):
            if all(len(v) >= per_cluster for v in examples.values()):
                break
            ids = b.column("cluster_id").fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
            row = _Row(b)
            for i in np.flatnonzero(np.isin(ids, wanted_ids)):
                cid = int(ids[i])
                if len(examples[cid]) < per_cluster:
                    score = row(field_name, i)
                    examples[cid].append(
                        Sample(
                            row("uid", i),
                            row("key", i),
                            row("source_shard", i),
                            row(caption_col, i),
                            None if score is None or score != score else float(score),
                            f"cluster {cid}",
                        )
                    )
    return ClusterSummary(
        sizes=[(cid, n, target.get(cid, False)) for cid, n in ordered],
        scope=scope,
        n_clusters=len(sizes),
        n_target=len(target) if has_target else None,
        examples=examples,
    )
