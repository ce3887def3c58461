"""The WebDataset source: stream shards, decode images once, feed the image scorers, cache per shard.

For each shard some cache lacks, samples are read in order and their images decoded by
worker processes (:mod:`filtering.stages.image_decode`), which also run the image
scorers (``Needs.images``: the perceptual hash, :mod:`filtering.scorers.phash`, and any
configured one) and apply each pixel scorer's transform (``Needs.pixels``: CLIP,
:mod:`filtering.scorers.clip`, the model's own PIL preprocessing). Pixel scorers then
score batches of ``model.batch_size`` consecutive samples of one shard in this process
(or in Ray actors, :mod:`pipelines.executors.ray`, through the same functions).

Each shard is cached in pieces, each under its own fingerprint, arrays first and the
table last, atomically: the rows (``source-<fp>/``: metadata, sizes, ``error``) and one
entry per scorer (``scorer-<name>-<fp>/``: its columns, row-aligned, and its embeddings),
so adding a scorer computes only that scorer, and a rerun (or a resumed, killed run)
reuses every piece without loading a model. Corrupt samples become rows with an
``error`` reason, null scores and zero embeddings. :meth:`WebDatasetStage.read_shard`
and :meth:`WebDatasetStage.load_pool` assemble the pool from the pieces. A cache of the
layout before (``score-<fp>/``, one table holding rows and scores) written with this
run's settings is split into the pieces (no model loaded); others are never read; one
log line says which (:meth:`WebDatasetStage.previous_layout`).

A sample's faults stay with that sample: a duplicated member, an unreadable ``.json``,
an unsafe or non-UTF-8 member name make it a failure row; a metadata field that
cannot be stored (``original_width`` of 1e400 or 3e9, a ``url`` that is not valid
text) is left empty and counted (``manifest.json``, ``stages.score.field_warnings``).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from filtering.cache import ShardCache, read_npy
from filtering.errors import ConfigError, PoolsiftError
from filtering.io.arrow import conform, unify_shards
from filtering.io.paths import expand_shards, file_info, get_fs, join
from filtering.io.reader import RawSample, ShardReadResult, iter_shard, one_line, unsafe_name
from filtering.pool import Pool, ShardPart
from filtering.scorers.base import Batch, Scorer, input_info
from filtering.scorers.clip import ClipScorer, model_spec
from filtering.scorers.phash import PhashScorer
from filtering.settings import ModelConfig, UidConfig
from filtering.sources import WEBDATASET
from filtering.stages.base import RunContext, SourceStage
from filtering.stages.image_decode import DEFAULT_IMAGE_FORMATS, DecodedImage, DecodePlan
from filtering.stages.img2dataset import STATS_COUNTS, merge_side_parquet, read_stats, side_parquet, source_stamp
from filtering.uid import MAX_EXAMPLES, UidError, count_invalid_uids, invalid_uids_error, resolve_uids

# The pool's columns from this source, in order: the rows' own (ROW_SCHEMA, cached in
# source-<fp>/) with the built-in scorers' phash and clip_score in their places.
SCORE_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("key", pa.string()),
        ("source_shard", pa.string()),
        ("caption", pa.string()),
        ("url", pa.string()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sha256", pa.string()),  # the source's own (img2dataset: of the downloaded file); see load_pool
        ("image_sha256", pa.string()),  # poolsift's: of the image bytes stored in the shard
        ("phash", pa.uint64()),
        ("image_ext", pa.string()),
        ("clip_score", pa.float32()),
        ("status", pa.string()),  # img2dataset's, from the .json or the shard's parquet
        ("error_message", pa.string()),
        ("exif", pa.string()),
        ("error", pa.string()),
    ]
)
# Source columns dropped from the pool when no sample has them (a plain WebDataset pool).
OPTIONAL_SOURCE_COLUMNS = ("status", "error_message", "exif")
BUILTIN_SCORED = ("phash", "clip_score")
ROW_SCHEMA = pa.schema([f for f in SCORE_SCHEMA if f.name not in BUILTIN_SCORED])
# Bumped when the cached rows' meaning changes (2: raw json uid, source and own sha256;
# 3: rows and each scorer's results cached apart).
CACHE_FORMAT = 3
DECODE_CHUNK = 32


_INT32_MAX = 2**31 - 1


def _int32(value) -> tuple[int | None, bool]:
    """An int32 column's value from a ``.json`` field, and whether the field was unusable
    (present but not a number in range: left empty and counted)."""
    if value is None:
        return None, False
    try:
        out = int(value)
    except (TypeError, ValueError, OverflowError):  # "abc", [], inf (1e400), nan
        return None, True
    return (out, False) if -_INT32_MAX - 1 <= out <= _INT32_MAX else (None, True)


def _text_ok(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates ("\ud800" in JSON, undecodable bytes in a name)
        return False
    return True


class WebDatasetStage(SourceStage):
    """Source stage for ``input.shards``: builds the pool from the per-shard caches of its
    rows and of every image scorer (CLIP and the perceptual hash always, and those the
    planner hands it with :meth:`add_image_scorer`)."""

    name = "score"
    info = WEBDATASET

    def __init__(
        self,
        shards_spec,
        model_cfg: ModelConfig,
        cache_root: str,
        uid_cfg: UidConfig | None = None,
        output_dir: str | None = None,
        image_formats: tuple[str, ...] = DEFAULT_IMAGE_FORMATS,
    ):
        # Nothing is read here: `poolsift validate` plans the run without touching data.
        self.shards_spec = shards_spec
        self.image_formats = tuple(image_formats)  # input.image_formats: the decoders allowed
        self.model_cfg = model_cfg
        self.cache_root = cache_root
        self.uid_cfg = uid_cfg  # the run's input.uid section; None = the defaults
        self.output_dir = output_dir  # its outputs are never read back as shards
        info = input_info("webdataset", model_cfg.arch)
        self.clip = ClipScorer.from_model_config(model_cfg, info)
        self.scorers: list[Scorer] = [self.clip, PhashScorer(PhashScorer.Params(), info, "phash")]
        self.internal: set[str] = set()

    def add_image_scorer(self, scorer: Scorer, internal: bool = False) -> None:
        """Run ``scorer`` in the decode pass: its columns join the pool, cached apart
        (``internal``: a filter's own scorer, its columns read by filters, not written out)."""
        taken = set(self.provides())
        clash = sorted(taken & set(scorer.provides()))
        if clash:
            raise ConfigError(f"{scorer.path}: column {clash[0]!r} is already written by the WebDataset source")
        self.scorers.append(scorer)
        if internal:
            self.internal |= set(scorer.provides())

    @property
    def uid_field(self) -> str:
        return getattr(self.uid_cfg, "field", "uid")

    @functools.cached_property
    def urls(self) -> list[str]:
        return expand_shards(self.shards_spec, output_dir=self.output_dir)

    def decode_spec(self) -> dict[str, Any] | None:
        """What changes the decoded images besides the bytes: DCT-domain JPEG downscaling
        to the CLIP model's input size (``model.jpeg_draft``), and decoders allowed other
        than the default ones (``input.image_formats``; the default keeps the caches
        written before the allow-list)."""
        spec: dict[str, Any] = {}
        if self.model_cfg.jpeg_draft:
            spec["jpeg_draft"] = model_spec(self.clip.params)
        if self.image_formats != DEFAULT_IMAGE_FORMATS:
            spec["formats"] = sorted(self.image_formats)
        return spec or None

    @functools.cached_property
    def cache(self) -> ShardCache:
        """The rows' cache (metadata, sizes, ``error``)."""
        spec = {"rows": CACHE_FORMAT, "uid_field": self.uid_field, "decode": self.decode_spec()}
        return ShardCache(self.cache_root, "source", spec)

    @functools.cached_property
    def uid_cache(self) -> ShardCache:
        """Each row's ``uid`` and ``error`` as the run resolved them (``input.uid``, failed
        rows included), row-aligned with the rows' cache, which keeps the ``.json`` uid as
        read: what the report reads, so that a derived uid is the one in ``dropped/``,
        ``subset.npy`` and the shards. Written when the pool is loaded (:meth:`load_pool`)."""
        cfg, default = self.uid_cfg, {"source": "json", "derive": "key", "on_invalid": "error"}
        uid = {"field": self.uid_field, **{k: getattr(cfg, k, v) for k, v in default.items()}}
        return ShardCache(self.cache_root, "uids", {"rows": CACHE_FORMAT, "uid": uid, "decode": self.decode_spec()})

    @functools.cache  # noqa: B019 — one cache object per scorer, for the stage's lifetime
    def scorer_cache(self, scorer: Scorer) -> ShardCache:
        """One scorer's cache: its columns (row-aligned with the rows') and embeddings."""
        spec = {
            "kind": scorer.kind,
            "version": scorer.version,
            "scorer": scorer.fingerprint(),
            "rows": CACHE_FORMAT,
            "decode": self.decode_spec(),
        }
        return ShardCache(self.cache_root, f"scorer-{scorer.name}", spec)

    def provides(self) -> set[str]:
        return set(SCORE_SCHEMA.names) | {c for s in self.scorers for c in s.provides()}

    def check_inputs(self) -> None:
        self.urls  # noqa: B018  (expanding the shard spec raises InputError if nothing matches)

    def embeddings(self) -> tuple[tuple[str, ...], str | None]:
        kinds = tuple(k for s in self.scorers for k in s.embeddings())  # CLIP embeds every image and caption
        return kinds, self.info.default_embedding

    def describe(self) -> dict[str, Any]:
        """With this run's caches, relative to the output directory: the rows'
        (``score_cache``) and each scorer column's (``score_columns``)."""
        return {
            **self.info.to_dict(),
            "score_cache": _relative(self.cache.dir),
            "uid_cache": _relative(self.uid_cache.dir),
            "score_columns": {c: _relative(self.scorer_cache(s).dir) for s in self.scorers for c in s.provides()},
        }

    def missing(self, url: str) -> tuple[str, ...]:
        """The pieces of ``url``'s result not cached: ``source`` (the rows) and scorer names."""
        stamp = source_stamp(url)
        names = [] if self.cache.is_done(url, stamp) else ["source"]
        names += [s.name for s in self.scorers if not self.scorer_cache(s).is_done(url, stamp)]
        return tuple(names)

    def score_missing(self, ctx: RunContext) -> None:
        """Every piece of every shard not cached yet computed and cached (decode workers and
        the batched model, or the Ray executor's tasks and actors); nothing is kept."""
        todo = {u: w for u in self.urls if (w := self.missing(u))}
        if todo:
            self.previous_layout(todo, ctx)
        if todo:
            ctx.log(f"scoring {len(todo)} of {len(self.urls)} shards ({len(self.urls) - len(todo)} cached)")
            if ctx.executor is not None:
                ctx.executor.score(self, todo, ctx)
            else:
                self.score_local(todo, ctx)
        else:
            ctx.log(f"all {len(self.urls)} shards cached; the model is not loaded")

    def _record_run(self, ctx: RunContext) -> None:
        """The run's records that do not depend on the rows: the model, the inputs, the
        upstream counts, the unusable fields, the extra image scorers."""
        sources = {u: file_info(u) for u in self.urls}
        info = self.scorer_cache(self.clip).read_info()
        if info:
            ctx.model_info.update(info)
        ctx.inputs.extend({"path": u, **sources[u]} for u in self.urls)
        for u in self.urls:
            if side := side_parquet(u):
                ctx.inputs.append({"path": side, **file_info(side)})
        upstream = self.upstream_stats()
        if upstream:
            ctx.stage_info["img2dataset"] = upstream
        warnings = self.field_warnings()
        if warnings:
            ctx.stage_info.setdefault(self.name, {})["field_warnings"] = warnings
            detail = ", ".join(f"{k} {v}" for k, v in warnings.items())
            ctx.log(f"warning: {sum(warnings.values())} unusable .json fields left empty ({detail})")
        for s in self.scorers[len(BUILTIN_SCORED) :]:  # the built-ins' caches are in the source record
            record = ctx.stage_info.setdefault("scorers", {})[s.name] = {
                **s.describe(),
                "source": "decode pass",
                # no per-run counts: a resumed run's manifest equals an uninterrupted one's
                "cache": {"dir": self.scorer_cache(s).dir},
            }
            if failed := self.scorer_failures(s):
                record["failed"] = failed
                ctx.log(
                    f"warning: scorer {s.name} failed on {failed['count']} image(s), left null "
                    f"(first: {failed['first_error']})"
                )

    def _log_derived(self, ctx: RunContext, u: dict) -> None:
        if u.get("derived"):
            ctx.log(
                f"warning: {u['derived']} uid(s) derived from the sample {self._derive_from()} (input.uid), not read from the pool"
            )

    # --- the streaming plan (pipelines/executors/streaming.py): the shards not cached are
    # scored first (stream_prepare, as ``run`` scores them); then each worker builds its
    # one-shard pool from the caches.

    def stream_why_not(self) -> str | None:
        return None  # every cache is read and written through fsspec: a remote one streams too

    def stream_shards(self) -> list[str]:
        return list(self.urls)

    def stream_prepare(self, ctx: RunContext) -> None:
        """The pool-wide column choices :meth:`resolve_uids` makes (a source column left out
        when no sample has it, the stored file's hash as ``sha256``), from the cached
        tables' footers; where the shards' columns differ (an img2dataset parquet beside
        some shards only), the pool's schema as ``load_pool``'s permissive concatenation
        unifies them, which each one-shard pool is cast and filled to; then the run
        records. The shards not cached yet are scored first."""
        from filtering.tasks import thread_pool, worker_count

        self.score_missing(ctx)
        schemas, nulls, rows = [], Counter(), 0
        names = [*OPTIONAL_SOURCE_COLUMNS, "sha256"]
        paths = [self.cache.table_path(u) for u in self.urls]
        with thread_pool(worker_count(least=8, cap=min(len(paths), 16))) as pool:  # footers: I/O-bound
            footers = list(pool.map(_footer_nulls, paths, [names] * len(paths)))  # in shard order
        for schema, counts, n in footers:
            for c in names:
                if c not in schema.names:  # null in the concatenated pool's rows of this shard
                    counts[c] += n
            schemas.append(schema)
            nulls.update(counts)
            rows += n
        self._pool_schema = None
        if any(not s.equals(schemas[0]) for s in schemas[1:]):
            self._pool_schema = unify_shards(  # shards that cannot unify: an InputError naming two
                [self._shard_schema(u, s) for u, s in zip(self.urls, schemas, strict=True)], self.urls, "input.shards"
            )
        drop = tuple(c for c in OPTIONAL_SOURCE_COLUMNS if c in nulls and nulls[c] == rows)
        self._pool_columns = (drop, nulls["sha256"] == rows)
        self._record_run(ctx)

    def pool_error(self, error: Exception) -> Exception:
        """A one-shard pool's bad uids (``InvalidUidsError``, that shard's count) as the whole
        pool's (:meth:`check_uids`); counted only once a shard has stopped the run."""
        if isinstance(error, InvalidUidsError):
            try:
                self.check_uids()
            except InvalidUidsError as whole:
                return whole
        return error

    def check_uids(self) -> None:
        """Under ``input.uid.on_invalid: error`` (the default), the bad uids of the whole
        pool, counted shard by shard from the cached ``uid``/``error`` columns: the error
        :meth:`resolve_uids` raises on the whole pool (its count and first sample), not one
        shard's. The shard plan calls it only after a one-shard pool raised (:meth:`pool_error`):
        a run whose uids are good never reads them in the driver."""
        cfg = self.uid_cfg
        if getattr(cfg, "source", "json") != "json" or getattr(cfg, "on_invalid", "error") != "error":
            return
        count, first = 0, None
        for u in self.urls:
            rows = self.cache.read_table(u, columns=["uid", "key", "source_shard", "error"])
            n, example = count_invalid_uids(rows, self.uid_field)
            count += n
            first = first or example
        if count:
            raise _uid_config_error(invalid_uids_error(count, first, self.uid_field))

    def _shard_schema(self, url: str, rows: pa.Schema) -> pa.Schema:
        """The schema :meth:`read_shard` gives ``url``'s table, from the footers of its cached
        rows (``rows``) and its scorers' pieces."""
        import pyarrow.parquet as pq

        scored: dict[str, pa.DataType] = {}
        for s in self.scorers:
            fs, p = get_fs(self.scorer_cache(s).table_path(url))
            with fs.open(p, "rb") as f:
                schema = pq.ParquetFile(f).schema_arrow
            scored.update({c: schema.field(c).type for c in s.provides()})
        return pa.schema(
            [(c, scored[c] if c in scored else rows.field(c).type) for c in _read_order(rows.names, scored)]
        )

    def failed_rows(self, shard: str) -> np.ndarray:
        """One shard's failed rows, as its pool has them (``Pool.failed``): ``error`` set in
        the rows' cache, or a bad uid failed by ``input.uid.on_invalid: fail``
        (:meth:`resolve_uids`), read from the cache without building the pool."""
        cfg = self.uid_cfg
        if getattr(cfg, "source", "json") == "json" and getattr(cfg, "on_invalid", "error") == "fail":
            rows = self.cache.read_table(shard, columns=["uid", "key", "source_shard", "url", "error"])
            failed = rows.column("error").is_valid().to_numpy(zero_copy_only=False)
            _, error, _ = resolve_uids(
                rows, source="json", field=self.uid_field, derive=self._derive_from(), on_invalid="fail", failed=failed
            )
        else:
            error = self.cache.read_table(shard, columns=["error"]).column("error")
        return error.is_valid().to_numpy(zero_copy_only=False)

    def shard_scores(self, shard: str, names: list[str]) -> dict[str, np.ndarray]:
        """From the scorers' caches, over the rows not failed (:meth:`failed_rows`), as
        ``ClipScore.threshold`` reads them."""
        alive = ~self.failed_rows(shard)
        out = {}
        for name in names:
            writer = next((s for s in self.scorers if name in s.provides()), None)
            cache = self.scorer_cache(writer) if writer is not None else self.cache
            out[name] = cache.read_table(shard, columns=[name]).column(name).to_numpy(zero_copy_only=False)[alive]
        return out

    def shard_rows(self, shard: str) -> int:
        return _footer_nulls(self.cache.table_path(shard), [])[2]

    def shard_pool(self, shard: str, ctx: RunContext) -> Pool:
        return self.load_pool([shard], pool_columns=self._pool_columns, schema=self._pool_schema)

    def shard_record(self, ctx: RunContext, pool: Pool) -> dict:
        return pool.artifacts["uids"]

    def skeleton_pool(self, counts: list[int]) -> Pool:
        """The parts and embeddings of :meth:`load_pool`'s pool (the same parts, so the same
        embedding fingerprints and caches) and its failed rows, read shard by shard
        (:meth:`failed_rows`) and held as the validity bitmap of an ``error`` column of
        booleans (two bits a row): ``image_clusters`` trains its k-means on the rows not
        failed, as on the whole pool."""
        parts, error, start = [], [], 0
        for u, n in zip(self.stream_shards(), counts, strict=True):
            failed = self.failed_rows(u)
            if len(failed) != n:
                raise PoolsiftError(f"cache: {self.cache.table_path(u)} has {len(failed)} rows, was {n}")
            error.append(pa.array(np.zeros(n, bool), mask=~failed))  # valid where failed, as Pool.failed reads it
            parts.append(ShardPart(u, self.cache.table_path(u), start, start + n))
            start += n
        table = pa.table({"error": pa.chunked_array(error, pa.bool_())})
        return Pool(table=table, parts=parts, **self._embedding_access())

    def _embedding_access(self) -> dict[str, Any]:
        """The pool's embeddings: each kind read per shard from the scorer that writes it."""
        writers = {k: s for s in self.scorers for k in s.embeddings()}
        kinds, default = self.embeddings()
        return {
            "embedding_loader": lambda kind, part: self.scorer_cache(writers[kind]).read_array(part.url, kind),
            "embedding_ref": lambda kind, part: functools.partial(
                read_npy, self.scorer_cache(writers[kind]).array_path(part.url, kind)
            ),
            "embedding_kinds": kinds,
            "default_embedding": default,
        }

    def stream_record(self, ctx: RunContext, records: list, shards: list, rows: int) -> None:
        """The uid report summed over the shards (examples: the first ones, in pool order)."""
        report = dict(records[0])
        for k in ("derived", "derived_failed", "invalid"):
            if k in report:
                report[k] = sum(r[k] for r in records)
        examples = [e for r in records for e in r.get("examples", ())][:MAX_EXAMPLES]
        if examples:
            report["examples"] = examples
        ctx.stage_info["uids"] = report
        self._log_derived(ctx, report)

    def previous_layout(self, todo: dict[str, tuple[str, ...]], ctx: RunContext) -> None:
        """Caches of the layout before the per-scorer one (``score-<fp>/``: one table per
        shard with the rows, ``phash`` and ``clip_score``, and the embeddings). The one this
        run's settings would have written (same model spec, uid field and row format) is
        split into the rows' and the CLIP and phash scorers' pieces, and those shards leave
        ``todo``; any other is never read. One line says which happened."""
        fs, root = get_fs(self.cache_root)
        found = sorted(d.rstrip("/") for d in fs.glob(join(root, "score-*")) if fs.isdir(d)) if fs.exists(root) else []
        if not found:
            return
        old = ShardCache(
            self.cache_root, "score", {**model_spec(self.model_cfg), "rows": 2, "uid_field": self.uid_field}
        )
        builtin = {"source", *(s.name for s in self.scorers[: len(BUILTIN_SCORED)])}
        reused = 0
        for url, wanted in list(todo.items()):
            if set(wanted) & builtin and self._split_previous(old, url, wanted):
                reused += 1
                todo[url] = tuple(w for w in wanted if w not in builtin)
                if not todo[url]:
                    del todo[url]
        if reused:
            if self.scorer_cache(self.clip).read_info() is None and (info := old.read_info()) is not None:
                self.scorer_cache(self.clip).write_info(info)
            ctx.log(
                f"note: {reused} shard(s) reused from {_relative(old.dir)} (the previous cache layout), "
                "now split into cache/source-* and cache/scorer-*; the old folder can be removed"
            )
        else:
            names = ", ".join(_relative(d) for d in found[:3]) + (" ..." if len(found) > 3 else "")
            ctx.log(
                f"note: {names} hold(s) scores in the previous cache layout for other settings, which are not read; "
                "shards are scored again into cache/source-* and cache/scorer-* (remove the old folder(s) to free the space)"
            )

    def _split_previous(self, old: ShardCache, url: str, wanted: tuple[str, ...]) -> bool:
        """One shard of the previous layout's cache, if complete for the same input, written
        as the pieces ``wanted`` asks for (rows, CLIP, phash)."""
        stamp = source_stamp(url)
        try:
            if not old.is_done(url, stamp):
                return False
            table = old.read_table(url)
            meta = old.read_meta(url)
            arrays = {k: np.asarray(old.read_array(url, k)) for k in self.clip.embeddings()}
        except (OSError, ValueError, pa.ArrowException):
            return False
        if not set(BUILTIN_SCORED) <= set(table.column_names) or any(len(a) != table.num_rows for a in arrays.values()):
            return False
        clip, phash = self.scorers[: len(BUILTIN_SCORED)]
        if phash.name in wanted:
            self.scorer_cache(phash).write(url, table.select(["phash"]), {}, source=stamp)
        if clip.name in wanted:
            self.scorer_cache(clip).write(url, table.select(["clip_score"]), arrays, source=stamp)
        if "source" in wanted:  # last, as write_shard does
            extra = {"field_warnings": meta["field_warnings"]} if meta.get("field_warnings") else None
            self.cache.write(url, table.drop_columns(list(BUILTIN_SCORED)), {}, source=stamp, extra=extra)
        return True

    def _derive_from(self) -> str:
        return getattr(self.uid_cfg, "derive", "key")

    def upstream_stats(self) -> dict | None:
        """img2dataset's own counts (``NNNNN_stats.json``), summed over the shards that have them."""
        found = [s for u in self.urls if (s := read_stats(u)) is not None]
        parquets = sum(1 for u in self.urls if side_parquet(u))
        if not found and not parquets:
            return None
        totals = {k: sum(int(s.get(k) or 0) for s in found if isinstance(s.get(k), int | float)) for k in STATS_COUNTS}
        return {"shards_with_parquet": parquets, "shards_with_stats": len(found), **totals}

    def read_shard(self, url: str) -> pa.Table:
        """One shard's cached rows with every scorer's columns, in the pool's column order:
        SCORE_SCHEMA's, then columns carried from an img2dataset parquet, then the other
        scorers' (uids not yet resolved: :meth:`resolve_uids`)."""
        table = self.cache.read_table(url)
        scored: dict[str, pa.ChunkedArray] = {}
        for s in self.scorers:
            t = self.scorer_cache(s).read_table(url, columns=list(s.provides()))
            if t.num_rows != table.num_rows:
                raise PoolsiftError(
                    f"cache: {self.scorer_cache(s).table_path(url)} has {t.num_rows} rows, the shard {table.num_rows}; "
                    "remove it to score the shard again"
                )
            for c in s.provides():
                scored[c] = t.column(c)
        names = _read_order(table.column_names, scored)
        return pa.table({c: scored[c] if c in scored else table.column(c) for c in names})

    def load_pool(
        self, urls: list[str] | None = None, pool_columns: tuple | None = None, schema: pa.Schema | None = None
    ) -> Pool:
        """The pool of ``urls`` (default: every shard) from the caches; ``load_pool([url])``
        is the one-shard pool (``pool_columns``: the whole pool's column choices, see
        :meth:`resolve_uids`, so that it has the whole pool's columns). Embeddings stay on disk, read per shard from the scorer
        that writes each kind."""
        tables, parts, start = [], [], 0
        for u in self.urls if urls is None else urls:
            t = self.read_shard(u)
            tables.append(t)
            parts.append(ShardPart(u, self.cache.table_path(u), start, start + t.num_rows))
            start += t.num_rows
        empty = pa.schema(
            [*SCORE_SCHEMA, *(pa.field(c, t) for s in self.scorers[2:] for c, t in s.column_types().items())]
        )
        table = pa.concat_tables(tables, promote_options="permissive") if tables else empty.empty_table()
        if schema is not None:
            table = conform(table, schema)
        table, uid_report = self.resolve_uids(table, pool_columns)
        self.cache_uids(table, parts)
        return Pool(
            table=table,
            parts=parts,
            **self._embedding_access(),
            artifacts={"uids": uid_report, "carried_columns": tuple(uid_report.pop("carried_columns", ()))},
            internal=set(self.internal),
        )

    def cache_uids(self, table: pa.Table, parts: list[ShardPart]) -> None:
        """Write each shard's resolved ``uid`` and ``error`` (:attr:`uid_cache`) unless cached."""
        for part in parts:
            stamp = source_stamp(part.url)
            if not self.uid_cache.is_done(part.url, stamp):
                rows = table.select(["uid", "error"]).slice(part.start, part.stop - part.start)
                self.uid_cache.write(part.url, rows, {}, source=stamp)

    def resolve_uids(self, table: pa.Table, pool_columns: tuple | None = None) -> tuple[pa.Table, dict]:
        """The pool's uids from the cached raw values (input.uid), and its source columns:
        ``status``/``error_message``/``exif`` only when some sample has them; the source's
        ``sha256`` beside poolsift's ``image_sha256`` when the source has one, else
        poolsift's hash of the stored bytes is the ``sha256`` column (the stored file is
        then the only file there is, and the bundled sample's tables stay as they were)."""
        cfg = self.uid_cfg
        failed = table.column("error").is_valid().to_numpy(zero_copy_only=False)
        try:
            uid, error, report = resolve_uids(
                table,
                source=getattr(cfg, "source", "json"),
                field=self.uid_field,
                derive=self._derive_from(),
                on_invalid=getattr(cfg, "on_invalid", "error"),
                failed=failed,
            )
        except UidError as e:
            raise _uid_config_error(e) from e
        table = table.set_column(table.column_names.index("uid"), "uid", uid)
        table = table.set_column(table.column_names.index("error"), "error", error)
        if pool_columns is None:  # (source columns no sample has, whether no sample has a sha256)
            pool_columns = (
                tuple(
                    c
                    for c in OPTIONAL_SOURCE_COLUMNS
                    if c in table.column_names and table.column(c).null_count == table.num_rows
                ),
                table.column("sha256").null_count == table.num_rows,
            )
        drop, own_sha256 = pool_columns
        table = table.drop_columns([c for c in drop if c in table.column_names])
        if own_sha256:
            own = table.column("image_sha256")
            table = table.drop_columns(["image_sha256"])
            table = table.set_column(table.column_names.index("sha256"), "sha256", own)
        scored = {c for s in self.scorers for c in s.provides()}
        carried = [
            c
            for c in table.column_names
            if c in OPTIONAL_SOURCE_COLUMNS or (c not in SCORE_SCHEMA.names and c not in scored)
        ]
        if carried:
            report["carried_columns"] = carried
        return table, report

    # --- scoring ---------------------------------------------------------------------

    def pixel_scorers(self) -> list[Scorer]:
        return [s for s in self.scorers if s.needs().pixels]

    def transform_scorers(self, wanted) -> list[Scorer]:
        """The pixel scorers whose transform the decode pass needs: those ``wanted``, and
        CLIP's when the rows are wanted (its preprocessing failing on an image fails the
        sample) or when JPEG draft decoding is on and the draft size (CLIP's input size)
        is not yet recorded beside the rows' cache (:meth:`recorded_draft`)."""
        clip = "source" in wanted or (self.model_cfg.jpeg_draft and self.recorded_draft() is None)
        return [s for s in self.pixel_scorers() if s.name in wanted or (clip and s is self.clip)]

    def recorded_draft(self) -> tuple[int | None] | None:
        """The JPEG draft size the rows' cache was decoded with, as ``(size,)``: recorded in
        its ``stage.json`` by :meth:`decode_plan`, so that a scorer added later decodes
        the images as the rows were without loading the CLIP model. None: not recorded
        (a cache written before it was, or none yet)."""
        info = self.cache.read_info() or {}
        return (info["jpeg_draft"],) if "jpeg_draft" in info else None

    def decode_plan(self, transforms: dict[str, Any]) -> DecodePlan:
        """What the decode workers run: the image scorers and the pixel scorers' transforms
        (``transforms``, by scorer name). The JPEG draft size (``model.jpeg_draft``) is the
        one CLIP's preprocessing resizes to, from its transform when given (and recorded
        then), else as recorded."""
        from filtering.models.transforms import draft_target

        draft = None
        if self.model_cfg.jpeg_draft:
            recorded = self.recorded_draft()
            if self.clip.name in transforms:
                draft = draft_target(transforms[self.clip.name])
                if recorded != (draft,):
                    self.cache.write_info({"jpeg_draft": draft})
            elif recorded is not None:
                (draft,) = recorded
            else:
                raise PoolsiftError("model.jpeg_draft: the draft size is unknown without CLIP's preprocessing")
        return DecodePlan(
            draft=draft,
            scorers=[s for s in self.scorers if s.needs().images],
            transforms=dict(transforms),
            required=frozenset(s.name for s in self.scorers[: len(BUILTIN_SCORED)]),
            formats=self.image_formats,
        )

    def score_local(self, todo: dict[str, tuple[str, ...]], ctx: RunContext) -> None:
        """Score the missing pieces of each shard in ``todo`` in this process, decoding in
        worker processes; the CLIP model is the run context's, loaded once."""
        wanted = {name for names in todo.values() for name in names}
        models = [s for s in self.pixel_scorers() if s.name in wanted]
        needed = self.transform_scorers(wanted)
        if self.clip.name in wanted or self.clip in needed:
            self.clip.attach(ctx.clip())
        for s in models:
            s.ensure_setup()
            if (info := s.info()) is not None:
                self.scorer_cache(s).write_info(info)
        transforms = {s.name: s.transform() for s in needed}
        device = ctx.clip().device if self.clip.name in wanted else "cpu"
        bar = ctx.bar(None, "score")
        try:
            for shard in score_stream(
                list(todo),
                self.decode_plan(transforms),
                models,
                self.model_cfg.batch_size,
                self.num_workers(device),
                bar,
                wanted=todo,
                uid_field=self.uid_field,
            ):
                self.write_shard(shard, todo[shard.url])
        finally:
            bar.close()

    def num_workers(self, device: str = "cpu") -> int:
        """Decode processes: a GPU wants every other core decoding; on a CPU the model's
        matmuls want the cores (decoding is about a quarter of the work in bf16), so one
        worker per four cores (one on this 2-core machine; docs/config.md, model)."""
        from filtering.tasks import worker_count

        if device.startswith("cuda"):
            return worker_count(self.model_cfg.num_workers, reserve=1)
        return worker_count(self.model_cfg.num_workers, per=4)

    def scorer_failures(self, scorer: Scorer) -> dict[str, Any] | None:
        """The images ``scorer`` failed on (its value null, the row not failed), over every
        shard from its cache: the count and the first error in shard order."""
        count, first = 0, None
        cache = self.scorer_cache(scorer)
        for u in self.urls:
            f = cache.read_meta(u).get("failures")
            if f:
                count += f["count"]
                first = first or f["first_error"]
        return {"count": count, "first_error": first} if count else None

    def field_warnings(self) -> dict[str, int]:
        """Unusable metadata fields left empty, counted per field over every shard."""
        total: Counter = Counter()
        for u in self.urls:
            total.update(self.cache.read_meta(u).get("field_warnings", {}))
        return dict(sorted(total.items()))

    def write_shard(self, shard: ShardScores, wanted: tuple[str, ...]) -> None:
        """Cache the ``wanted`` pieces of one shard: its rows (``source``) and each named
        scorer's columns and embeddings. An img2dataset parquet beside the shard adds its
        columns and one failure row per URL it attempted and failed (scores null)."""
        rows = shard.rows
        warnings = Counter(w for row in rows for w in row.pop("_warnings", ()))
        table, bad = _rows_table(rows)
        if shard.read_error:
            # The rest of a cut-short shard cannot be read: one failure row stands for it.
            table = pa.concat_tables(
                [table, pa.Table.from_pylist([_shard_error_row(shard.url, shard.read_error)], schema=ROW_SCHEMA)]
            )
        table, _ = merge_side_parquet(table, shard.url, self.uid_field)
        stamp = source_stamp(shard.url)
        for s in self.scorers:
            if s.name in wanted:
                columns, arrays = shard.results(s, table.num_rows, bad)
                failures = shard.failures(s.name, bad)
                self.scorer_cache(s).write(
                    shard.url,
                    pa.table(columns),
                    arrays,
                    source=stamp,
                    extra={"failures": failures} if failures else None,
                )
        if "source" in wanted:  # last: with every scorer's piece, the shard is complete
            extra = {"field_warnings": dict(sorted(warnings.items()))} if warnings else None
            self.cache.write(shard.url, table, {}, source=stamp, extra=extra)


def _read_order(rows: list[str], scored) -> list[str]:
    """The column order of :meth:`WebDatasetStage.read_shard`: SCORE_SCHEMA's, then the
    cached rows' others (columns carried from an img2dataset parquet), then the other
    scorers' (``scored``: the scorers' column names)."""
    names = [c for c in SCORE_SCHEMA.names if c in scored or c in rows]
    names += [c for c in rows if c not in names and c not in scored]
    names += [c for c in scored if c not in names]
    return names


def _footer_nulls(path: str, names: list[str]) -> tuple[pa.Schema, Counter, int]:
    """A cached table's schema (no metadata), the null counts of its columns ``names``
    (from the row groups' statistics; the column read where they lack one), its rows."""
    import pyarrow.parquet as pq

    fs, p = get_fs(path)
    with fs.open(p, "rb") as f:
        pf = pq.ParquetFile(f)
        meta = pf.metadata
        leaves = {meta.schema.column(j).path: j for j in range(meta.num_columns)}
        counts: Counter = Counter()
        for name in names:
            if name not in leaves:
                continue
            stats = [meta.row_group(g).column(leaves[name]).statistics for g in range(meta.num_row_groups)]
            if all(st is not None and st.has_null_count for st in stats):
                counts[name] = sum(st.null_count for st in stats)
            else:
                counts[name] = pf.read(columns=[name]).column(name).null_count
        return pf.schema_arrow.remove_metadata(), counts, meta.num_rows


class InvalidUidsError(ConfigError):
    """Bad uids under ``input.uid.on_invalid: error``: the pool (or one shard) names its count."""


def _uid_config_error(e: UidError) -> ConfigError:
    return InvalidUidsError(
        f"input.uid: {e}; set input.uid.on_invalid to derive (from input.uid.derive: key | url) "
        "or fail, or input.uid.source: derive"
    )


def _relative(cache_dir: str) -> str:
    """``cache/<name>``: a cache folder as the manifest records it (the run may move)."""
    return "cache/" + cache_dir.rstrip("/").rsplit("/", 1)[-1]


_ROW_ERRORS = (pa.ArrowException, ValueError, TypeError, OverflowError, UnicodeError)


def _rows_table(rows: list[dict]) -> tuple[pa.Table, list[int]]:
    """The shard's rows as a table, and the rows replaced: a row Arrow cannot store
    (``_row`` should prevent every one) becomes a failure row (its scores null, its
    embeddings zero) rather than failing the shard."""
    try:
        return pa.Table.from_pylist(rows, schema=ROW_SCHEMA), []
    except _ROW_ERRORS:
        pass
    bad = []
    for i, row in enumerate(rows):
        try:
            pa.Table.from_pylist([row], schema=ROW_SCHEMA)
        except _ROW_ERRORS as e:
            rows[i] = {
                "uid": row.get("uid"),
                "key": _safe_text(row.get("key")),
                "source_shard": row.get("source_shard"),
                "caption": "",
                "error": f"bad_row: {type(e).__name__}: {one_line(e)[:160]}",
            }
            bad.append(i)
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA), bad


def _safe_text(value) -> str:
    value = value if isinstance(value, str) else str(value)
    return value if _text_ok(value) else value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _shard_error_row(url: str, error: str) -> dict:
    # uid None: the pool derives it from shard name and key, as for every failed row without one
    return {"uid": None, "key": "__shard__", "source_shard": url, "caption": "", "error": error}


def _raw_string(value) -> str | None:
    """A .json value kept as text: strings as they are, anything else as JSON."""
    if value is None or isinstance(value, str):
        return value
    try:
        return json.dumps(value, sort_keys=True, default=str)[:100_000]
    except (TypeError, ValueError, RecursionError):
        return repr(type(value))


def _row(sample: RawSample, url: str, uid_field: str = "uid") -> dict:
    """One sample's cached row. ``uid`` is the .json field as read; the pool's uid is
    resolved from it when the pool is loaded (:func:`filtering.uid.resolve_uids`).
    ``error`` is set when the sample itself is unusable; ``_warnings`` (popped before
    caching) names the .json fields left empty because they cannot be stored."""
    meta, error = sample.read_meta()
    meta = meta or {}
    image = sample.image
    key = sample.key
    if not _text_ok(key):
        key, error = _safe_text(key), error or "bad_name: member name is not UTF-8"
    error = sample.error or error or unsafe_name(key)
    warnings = []
    row = {"uid": _raw_string(meta.get(uid_field)), "key": key, "source_shard": url, "caption": sample.caption}
    for name in ("original_width", "original_height"):
        row[name], bad = _int32(meta.get(name))
        if bad:
            warnings.append(name)
    texts = {name: meta.get(name) if isinstance(meta.get(name), str) else None for name in ("url", "sha256", "status")}
    texts["error_message"] = _raw_string(meta.get("error_message"))
    texts["exif"] = _raw_string(meta.get("exif"))
    for name, value in texts.items():
        if value is not None and not _text_ok(value):
            texts[name] = None
            warnings.append(name)
    row.update(texts)
    row["image_sha256"] = hashlib.sha256(image).hexdigest() if image is not None else None
    row["image_ext"] = sample.image_ext
    if error:
        row["error"] = error
    if warnings:
        row["_warnings"] = warnings
    return row


def decode_input(sample: RawSample) -> bytes | None:
    """The image bytes worth decoding: none for a sample already failed by the reader."""
    return sample.image if sample.error is None else None


def _read_tasks(urls: list[str], chunk: int = DECODE_CHUNK) -> Iterator[tuple]:
    """("chunk", url, samples) for every ``chunk`` samples, then ("end", url, read result)."""
    for url in urls:
        result = ShardReadResult(url)
        samples: list[RawSample] = []
        for sample in iter_shard(url, result):
            samples.append(sample)
            if len(samples) == chunk:
                yield "chunk", url, samples
                samples = []
        if samples:
            yield "chunk", url, samples
        yield "end", url, result


# --- the decode pass and the pixel scorers' batches (local and Ray alike) ----------------


@dataclass
class SampleBatch:
    """Up to ``model.batch_size`` consecutive samples of one shard after the decode pass:
    each sample's row (its decode fields filled in) and decoded image."""

    url: str
    index: int  # the batch's position in its shard
    rows: list[dict]
    images: list[DecodedImage]


@dataclass
class ScoredBatch:
    """A :class:`SampleBatch` after the pixel scorers: per scorer, the positions of the
    rows it scored and its named arrays for them; ``dims``: its embeddings' widths."""

    url: str
    index: int
    rows: list[dict]
    images: list[DecodedImage]  # pixels dropped
    outputs: dict[str, tuple[list[int], dict[str, np.ndarray]]] = field(default_factory=dict)
    dims: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class ShardEnd:
    """The last item of a shard: how many batches it had, and whether it was cut short."""

    url: str
    batches: int
    read_error: str | None


def sample_row(sample: RawSample, url: str, image: DecodedImage, uid_field: str = "uid") -> dict:
    """A sample's cached row with its decode fields; a failure found before decoding comes first."""
    row = _row(sample, url, uid_field)
    row.update(width=image.width, height=image.height, error=row.get("error") or image.error)
    return row


class _Raised:
    """A scorer's ``submit`` that raised, handed to :meth:`PendingBatch.complete` like a result."""

    def __init__(self, error: Exception):
        self.error = error

    def result(self):
        raise self.error


@dataclass
class _Run:
    """One pixel scorer on one batch: the rows it scores (positions in the batch), its
    input, and its pending result."""

    scorer: Scorer
    ok: list[int]
    inputs: Batch
    pending: Any


def _checked(scorer: Scorer, result: dict, n: int) -> dict[str, np.ndarray]:
    """``scorer``'s arrays in ``result`` (its columns and embeddings), each ``n`` rows long."""
    out = {}
    for name in (*scorer.provides(), *scorer.embeddings()):
        if name not in result:
            raise ValueError(f"scorer {scorer.name}: no {name!r} in its result")
        arr = np.asarray(result[name])
        if arr.shape[:1] != (n,):
            raise ValueError(f"scorer {scorer.name}: {name!r} has {arr.shape[:1]} rows, expected {n}")
        out[name] = arr
    return out


class PendingBatch:
    """A batch submitted to the pixel scorers; :meth:`complete` waits for their results.

    A scorer whose batch raises (in ``submit`` or ``result``, or with a result of the wrong
    shape) scores it again row by row, so a row that breaks it does not take its
    batch-mates down: a row that still fails is left out of the scorer's rows (null in its
    column) with the reason in its image's ``failures``, counted per scorer as an image
    scorer's failures are. A ``required`` scorer (CLIP, the source's own model) is never
    retried: its failure is the model's, not a row's, and stops the run.
    """

    def __init__(self, batch: SampleBatch, runs: dict[str, _Run], dims: dict, required: frozenset = frozenset()):
        self.batch, self.runs, self.dims, self.required = batch, runs, dims, required

    def complete(self) -> ScoredBatch:
        outputs = {}
        for name, run in self.runs.items():
            try:
                outputs[name] = (run.ok, _checked(run.scorer, run.pending.result(), len(run.ok)))
            except Exception:
                if name in self.required:
                    raise
                ok, arrays = self._row_by_row(run)
                if ok:
                    outputs[name] = (ok, arrays)
        self.runs = {}  # the pixels go with the runs
        return ScoredBatch(self.batch.url, self.batch.index, self.batch.rows, self.batch.images, outputs, self.dims)

    def _row_by_row(self, run: _Run) -> tuple[list[int], dict[str, np.ndarray]]:
        from filtering.stages.image_decode import _message

        s, inputs = run.scorer, run.inputs
        ok, results = [], []
        for j, i in enumerate(run.ok):
            one = Batch(pixels=inputs.pixels[j : j + 1], columns={c: v[j : j + 1] for c, v in inputs.columns.items()})
            try:
                results.append(_checked(s, s.score(one), 1))
            except Exception as e:  # noqa: BLE001 — this row's value stays null, the reason is counted
                self.batch.images[i].failures[s.name] = _message(e)
                continue
            ok.append(i)
        return ok, {k: np.concatenate([r[k] for r in results]) for k in results[0]} if results else {}


def submit_batch(batch: SampleBatch, scorers: list[Scorer], wanted, required: frozenset = frozenset()) -> PendingBatch:
    """Start each wanted pixel scorer on the batch's readable samples (those with no error
    whose pixels it has), with their captions when it reads them; drop the pixels.
    ``required``: the scorers whose failure stops the run (:class:`PendingBatch`)."""
    runs, dims = {}, {}
    for s in scorers:
        if s.name not in wanted:
            continue
        s.ensure_setup()
        dims[s.name] = {k: int(d) for k, d in s.embedding_dims().items()}
        ok = [
            i
            for i, (row, d) in enumerate(zip(batch.rows, batch.images, strict=True))
            if not row.get("error") and s.name in d.pixels
        ]
        if not ok:
            continue
        pixels = np.stack([batch.images[i].pixels[s.name] for i in ok])
        columns = {"caption": np.array([batch.rows[i]["caption"] for i in ok], dtype=object)}
        inputs = Batch(pixels=pixels, columns=columns if s.needs().captions else {})
        try:
            pending = s.submit(inputs)
        except Exception as e:
            if s.name in required:
                raise
            pending = _Raised(e)
        runs[s.name] = _Run(s, ok, inputs, pending)
    for d in batch.images:
        d.pixels = {}
    return PendingBatch(batch, runs, dims, required)


def score_batch(batch: SampleBatch, scorers: list[Scorer], wanted, required: frozenset = frozenset()) -> ScoredBatch:
    """One batch through the pixel scorers at once (the Ray executor's model actors)."""
    return submit_batch(batch, scorers, wanted, required).complete()


class ShardScores:
    """One shard's scored batches, in order, turned into each scorer's cached piece."""

    def __init__(self, url: str):
        self.url = url
        self.rows: list[dict] = []
        self.images: list[DecodedImage] = []
        self.outputs: dict[str, list[tuple[int, list[int], dict[str, np.ndarray]]]] = {}
        self.dims: dict[str, dict[str, int]] = {}
        self.read_error: str | None = None

    def add(self, scored: ScoredBatch) -> None:
        offset = len(self.rows)
        self.rows.extend(scored.rows)
        self.images.extend(scored.images)
        for name, (ok, arrays) in scored.outputs.items():
            self.outputs.setdefault(name, []).append((offset, ok, arrays))
        self.dims.update(scored.dims)

    def failures(self, name: str, bad: list[int]) -> dict[str, Any] | None:
        """How many of the shard's readable images scorer ``name`` failed on, and the first reason."""
        skip = set(bad)
        reasons = [
            d.failures[name]
            for i, (row, d) in enumerate(zip(self.rows, self.images, strict=True))
            if name in d.failures and not row.get("error") and i not in skip
        ]
        return {"count": len(reasons), "first_error": reasons[0]} if reasons else None

    def results(self, scorer: Scorer, n: int, bad: list[int]) -> tuple[dict[str, pa.Array], dict[str, np.ndarray]]:
        """``scorer``'s columns over the shard's ``n`` rows (null where it did not score:
        failed and added rows, ``bad`` rows) and its embeddings (float16, zero there)."""
        types = scorer.column_types()
        columns: dict[str, pa.Array] = {}
        arrays: dict[str, np.ndarray] = {}
        if scorer.needs().images:  # scored per image in the decode workers
            for c in scorer.provides():
                values = [d.values.get(scorer.name, {}).get(c) for d in self.images]
                values += [None] * (n - len(values))
                for i in bad:
                    values[i] = None
                columns[c] = pa.array(values, type=types[c])
            return columns, arrays
        pieces = self.outputs.get(scorer.name, [])
        idx = np.concatenate([np.asarray(ok, np.int64) + offset for offset, ok, _ in pieces] or [np.zeros(0, np.int64)])
        for c in scorer.provides():
            values = np.zeros(n, dtype=types[c].to_pandas_dtype())
            scored = np.zeros(n, dtype=bool)
            if pieces:
                values[idx] = np.concatenate([np.asarray(a[c]) for _, _, a in pieces])
                scored[idx] = True
            scored[bad] = False
            columns[c] = pa.array(values, type=types[c], mask=~scored)
        for kind in scorer.embeddings():
            dim = self.dims.get(scorer.name, {}).get(kind)
            if dim is None:
                dim = pieces[0][2][kind].shape[1] if pieces else int(scorer.input.embedding_dims.get(kind) or 0)
            emb = np.zeros((n, dim), np.float16)
            if pieces:
                emb[idx] = np.concatenate([np.asarray(a[kind]) for _, _, a in pieces])
            emb[bad] = 0
            arrays[kind] = emb
        return columns, arrays


def _worker_died(e: Exception) -> PoolsiftError:
    return PoolsiftError(
        f"a decode worker process died ({type(e).__name__}: {e}); "
        "often the system killed it for memory: lower model.num_workers or model.batch_size"
    )


def read_shard_batches(
    url: str, plan: DecodePlan, wanted, batch_size: int, uid_field: str = "uid"
) -> Iterator[SampleBatch | ShardEnd]:
    """One shard read and decoded in this process, cut into model batches, then its
    :class:`ShardEnd` (the Ray executor's read tasks; the local executor decodes the same
    way in worker processes, with the same batch boundaries)."""
    from filtering.stages.image_decode import decode_image

    result = ShardReadResult(url)
    rows: list[dict] = []
    images: list[DecodedImage] = []
    index = 0
    for sample in iter_shard(url, result):
        image = decode_image(decode_input(sample), wanted, plan)
        rows.append(sample_row(sample, url, image, uid_field))
        images.append(image)
        if len(rows) == batch_size:
            yield SampleBatch(url, index, rows, images)
            rows, images, index = [], [], index + 1
    if rows:
        yield SampleBatch(url, index, rows, images)
        index += 1
    yield ShardEnd(url, index, result.error)


def score_stream(
    urls,
    plan: DecodePlan,
    scorers: list[Scorer],
    batch_size: int,
    workers: int,
    bar=None,
    *,
    wanted: dict[str, tuple[str, ...]] | None = None,
    chunk: int = DECODE_CHUNK,
    uid_field: str = "uid",
) -> Iterator[ShardScores]:
    """Yield each shard's scored rows, in shard order.

    Decoding (and the image scorers) runs in ``workers`` processes ahead of the pixel
    scorers through a bounded window of chunks, so memory stays bounded and the model
    never waits while work is queued; ``workers=0`` decodes in this process. A model
    batch never spans two shards, so a shard's result does not depend on which shards
    were scored with it (the Ray executor relies on this). ``wanted``: per url, the
    scorer names to run (default: all). If a scorer (or anything else) raises, pending
    chunks are cancelled and the workers shut down before the exception propagates; a
    worker that dies becomes a :class:`PoolsiftError`.
    """
    from concurrent.futures.process import BrokenProcessPool

    from filtering.stages.image_decode import decode_window

    every = tuple(s.name for s in [*scorers, *plan.scorers])

    def names(url: str):
        return wanted.get(url, ()) if wanted is not None else every

    # Enough chunks in flight to keep every worker busy and one model batch ready behind the current one.
    max_pending = 2 * max(workers, 1) + -(-batch_size // chunk)
    batch = SampleBatch("", 0, [], [])  # waiting for the model
    inflight: deque = deque()  # (shard, pending batch) in submission order
    shard: ShardScores | None = None

    def flush() -> None:
        nonlocal batch
        inflight.append((shard, submit_batch(batch, scorers, names(batch.url), plan.required)))
        batch = SampleBatch(batch.url, batch.index + 1, [], [])
        finish(keep=1)  # keep one batch on the device while the next is prepared

    def finish(keep: int) -> None:
        while len(inflight) > keep:
            owner, pending = inflight.popleft()
            scored = pending.complete()
            owner.add(scored)
            if bar is not None:
                bar.update(len(scored.rows))

    def handle(task, images: list[DecodedImage] | None) -> Iterator[ShardScores]:
        nonlocal shard, batch
        kind, url, payload = task
        if shard is None:
            shard = ShardScores(url)
            batch = SampleBatch(url, 0, [], [])
        if kind == "chunk":
            for sample, image in zip(payload, images, strict=True):
                batch.rows.append(sample_row(sample, url, image, uid_field))
                batch.images.append(image)
                if len(batch.rows) >= batch_size:
                    flush()
        else:
            if batch.rows:
                flush()
            finish(keep=0)
            shard.read_error = payload.error
            done, shard = shard, None
            yield done

    tasks = (
        (task, [decode_input(s) for s in task[2]] if task[0] == "chunk" else None, names(task[1]))
        for task in _read_tasks(urls, chunk)
    )
    decoded = decode_window(tasks, plan, workers, max_pending)
    try:
        while True:
            try:
                task, images = next(decoded)
            except StopIteration:
                break
            except BrokenProcessPool as e:
                raise _worker_died(e) from e
            yield from handle(task, images)
    finally:
        # On an error or interrupt: drop queued chunks (running ones finish within a chunk), stop the workers.
        decoded.close()
