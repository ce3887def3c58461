"""The report's view of every score column a ``score`` filter used (``aesthetic_score``...).

For each such column: a histogram of every row's score (kept vs dropped) with the
filter's thresholds, and thumbnail grids of the best and the worst rows by that score.
Scores come from the scorer's own per-shard cache (the manifest names its folder),
row-aligned with the score cache (WebDataset input) or DataComp's metadata parquet,
which give the uids; without that cache, the subset's kept rows are shown. Two passes
over one float column per shard (range, then bins) keep memory flat in the pool size.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np

from filtering.io.paths import join, shard_id
from filtering.report.data import (
    Sample,
    ScoreHistogram,
    TopK,
    _exists,
    _glob,
    _Row,
    iter_batches,
    score_sources,
    source_record,
    uid_file,
    with_run_uids,
)

BINS = 50


@dataclass
class ColumnReport:
    column: str
    histogram: ScoreHistogram | None
    best: list[Sample]
    worst: list[Sample]
    scope: str  # "pool" or "kept"
    scorer: str | None = None  # the scorer that wrote the column, when one did


def filtered_columns(manifest: dict[str, Any]) -> dict[str, list[float]]:
    """Columns named by ``score`` filters anywhere in the filter tree, with their fixed
    thresholds (``min``/``max``; a top fraction's threshold is in ``manifest.thresholds``)."""
    found: dict[str, list[float]] = {}

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for n in node:
                walk(n)
        elif isinstance(node, dict):
            for name, params in node.items():
                if name == "score" and isinstance(params, dict) and params.get("column"):
                    bounds = found.setdefault(str(params["column"]), [])
                    bounds += [float(params[k]) for k in ("min", "max") if params.get(k) is not None]
                else:
                    walk(params)

    walk(manifest.get("config", {}).get("filters", []))
    recorded = manifest.get("thresholds", {}) or {}
    for column, bounds in found.items():
        t = recorded.get(column)
        if t is not None and np.isfinite(t):
            bounds.append(float(t))
        found[column] = sorted(set(bounds))
    return found


def _scorer_files(out_dir: str, manifest: dict[str, Any], column: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(scorer name, [(uid source file, scorer cache file)] per shard), or (None, []) when not cached."""
    for name, info in (manifest.get("stages", {}).get("scorers", {}) or {}).items():
        if column not in info.get("columns", []):
            continue
        cache_dir = info.get("cache", {}).get("dir")
        if not cache_dir:
            return name, []
        cache_dir = join(out_dir, "cache", posixpath.basename(cache_dir.rstrip("/")))  # the run may have moved
        sources = score_sources(out_dir, manifest, "uid")
        if source_record(manifest).get("scores_in_inputs"):  # the scorer ran per metadata file
            urls = sources
        else:
            urls = [i["path"] for i in manifest.get("inputs", []) if isinstance(i, dict) and "path" in i]
        files = [join(cache_dir, f"{shard_id(u)}.parquet") for u in urls]
        if not sources or len(sources) != len(files) or not all(_exists(f) for f in files):
            return name, []
        return name, list(zip(sources, files, strict=True))
    return None, []


def _column(path: str, column: str) -> np.ndarray:
    parts = [b.column(column).to_numpy(zero_copy_only=False) for b in iter_batches(path, [column])]
    return np.asarray(np.concatenate(parts) if parts else np.zeros(0), dtype=np.float64)


def gather_score_columns(out_dir: str, manifest: dict[str, Any], kept_set, per_grid: int = 12) -> list[ColumnReport]:
    reports = []
    caption_col = source_record(manifest)["caption_column"]
    subset_parts = _glob(join(out_dir, "subset", "part-*.parquet"))
    for column, bounds in filtered_columns(manifest).items():
        scorer, pairs = _scorer_files(out_dir, manifest, column)
        scope = "pool" if pairs and kept_set is not None else "kept"
        if scope == "kept":  # the subset carries the column for its rows
            pairs = [(p, p) for p in subset_parts]
            caption = "caption"
        else:
            caption = caption_col
        lo, hi = np.inf, -np.inf
        for _, scores_file in pairs:  # pass 1: the range
            s = _column(scores_file, column) if column in _names(scores_file) else np.zeros(0)
            s = s[np.isfinite(s)]
            if len(s):
                lo, hi = min(lo, float(s.min())), max(hi, float(s.max()))
        if not np.isfinite(lo):
            reports.append(ColumnReport(column, None, [], [], scope, scorer))
            continue
        lo, hi = min([lo, *bounds]), max([hi, *bounds])
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, BINS + 1)
        kept_h, dropped_h = np.zeros(BINS, np.int64), np.zeros(BINS, np.int64)
        best, worst = TopK(per_grid, True), TopK(per_grid, False)
        for source, scores_file in pairs:  # pass 2: bins and the best and worst rows
            scores = _column(scores_file, column)
            start = 0
            resolved = uid_file(out_dir, manifest, source) if scope == "pool" else None
            batches = iter_batches(source, ["uid", "key", "source_shard", caption, "error", "url"])
            for b in with_run_uids(batches, resolved, manifest if scope == "pool" else None):
                sc = scores[start : start + b.num_rows]
                start += b.num_rows
                valid = np.isfinite(sc)
                if "error" in b.schema.names:
                    valid &= b.column("error").is_null().to_numpy(zero_copy_only=False)
                kept = kept_set.contains(b.column("uid")) if scope == "pool" else np.ones(b.num_rows, bool)
                bins = np.clip(np.searchsorted(edges, sc, side="right") - 1, 0, BINS - 1)
                kept_h += np.bincount(bins[valid & kept], minlength=BINS)
                dropped_h += np.bincount(bins[valid & ~kept], minlength=BINS)
                rows = np.flatnonzero(valid)
                row = _Row(b)

                def make(j, rows=rows, row=row, sc=sc, kept=kept, caption=caption):
                    i = rows[j]
                    return Sample(
                        row("uid", i),
                        row("key", i),
                        row("source_shard", i),
                        row(caption, i),
                        float(sc[i]),
                        "kept" if kept[i] else "dropped",
                    )

                best.offer(sc[rows], make)
                worst.offer(sc[rows], make)
        hist = ScoreHistogram(column, edges, kept_h, dropped_h, bounds)
        reports.append(ColumnReport(column, hist, best.result(), worst.result(), scope, scorer))
    return reports


def _names(path: str) -> list[str]:
    from filtering.report.data import _schema_names

    return _schema_names(path)
