"""Nearest evaluation-set item for every pool row: the scores behind the ``decontaminate`` filter.

For each distinct reference named by a ``decontaminate`` filter in the run's filter
tree, this stage adds ``decontam_<name>_similarity`` (semantic: largest cosine of the
row's image embedding to a reference embedding, exact argmax by
:class:`filtering.clustering.Assigner`) or ``decontam_<name>_distance`` (perceptual:
smallest Hamming distance of the row's ``phash`` to a reference hash, by faiss's
exhaustive binary index), and ``decontam_<name>_match`` (the id of that reference
item). Failed rows get nulls.

The reference set is loaded once and cached under ``DIR/cache/decontam-<fp>/``, where
the fingerprint covers the reference files (names, sizes, modification stamps), the
method and, for images embedded here, the model; reruns load it without the model.
Semantic similarities are cached per shard too (``decontam-nearest-<fp>/``, keyed by the
reference set and the shard's embeddings), so a rerun with another threshold is free.
On the shard plan (``scope = "global"``) the driver loads or builds each reference set
(:meth:`DecontaminateStage.prepare`) and each worker (a local process or a Ray task)
computes its shard's columns (:meth:`DecontaminateStage.run_shard`), the reference set
read from its cache file once per process (``_process_reference``, ``_nearest_shard``),
through that per-shard cache.
Reference images go through the scoring stage's own decoding (``decode_image`` under
``reference_plan``, read and decoded as the image-cluster reference set is:
``decode_reference``) and encoder (``ClipEncoder``), so their embeddings and hashes are
comparable with the pool's.
"""

from __future__ import annotations

import functools
import io
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from filtering.cache import fingerprint
from filtering.errors import ConfigError, InputError
from filtering.io.atomic import atomic_open, atomic_write_text, exists
from filtering.io.paths import get_fs, join
from filtering.pool import Pool
from filtering.settings import ModelConfig
from filtering.stages.base import ColumnStage, RunContext
from filtering.stages.image_decode import DEFAULT_IMAGE_FORMATS

ALGO_VERSION = 1


@dataclass(frozen=True)
class Target:
    """One reference to compare the pool with, as a decontaminate filter names it."""

    reference: str
    method: str
    embedding: str | None
    value_column: str
    match_column: str


@dataclass
class ReferenceSet:
    ids: np.ndarray  # str
    hashes: np.ndarray | None = None  # uint64 (perceptual)
    embeddings: np.ndarray | None = None  # float32 unit-norm (semantic)
    fingerprint: str = ""  # of what the set was built from


def targets_of(filter_tree) -> list[Target]:
    """The distinct references of the tree's ``decontaminate`` leaves; two different
    references may not share a column name."""
    from filtering.decontaminate.decontaminate_filter import Decontaminate

    by_column: dict[str, Target] = {}
    for node in filter_tree:
        for f in node.leaves():
            if not isinstance(f, Decontaminate):
                continue
            p = f.params
            t = Target(p.reference, p.method, p.embedding, f.value_column, f.match_column)
            other = by_column.get(t.value_column)
            if other is not None and other != t:
                raise ConfigError(
                    f"filters: decontaminate references {other.reference!r} and {t.reference!r} would both write "
                    f"{t.value_column!r}; give one of them a distinct name: (e.g. name: {f.tag}_2)"
                )
            by_column[t.value_column] = t
    return list(by_column.values())


class DecontaminateStage(ColumnStage):
    name = "decontaminate"
    scope = "global"  # the reference sets in the driver, then each shard's nearest items

    def __init__(
        self, filter_tree, model: ModelConfig, cache_root: str, formats: tuple[str, ...] = DEFAULT_IMAGE_FORMATS
    ):
        self.model = model  # the CLIP model that embeds a semantic reference set
        self.cache_root = cache_root
        self.formats = tuple(formats)  # the image decoders allowed (input.image_formats)
        self.targets = targets_of(filter_tree)  # the references of the tree's decontaminate filters

    def provides(self) -> set[str]:
        return {c for t in self.targets for c in (t.value_column, t.match_column)}

    def requires(self) -> set[str]:
        return {"phash"} if any(t.method == "perceptual" for t in self.targets) else set()

    # --- the shard plan (scope "global"): the reference sets in the driver, each shard's
    # nearest items in the workers, through per-shard caches

    def prepare(self, ctx: RunContext, source, shard_rows: list[int]) -> tuple[str, ...]:
        """Each reference set loaded, or embedded or hashed, and cached;
        what the workers need is its cache file's fingerprint, one per target."""
        info: dict[str, Any] = {}
        ctx.stage_info["decontaminate"] = info
        fingerprints = []
        for t in self.targets:
            t0 = time.perf_counter()
            ref, how = self.reference(ctx, t)
            fingerprints.append(ref.fingerprint)
            info[t.value_column] = {
                **_record(t, ref, how),
                "nearest": None,
                "seconds": round(time.perf_counter() - t0, 3),
            }
        return tuple(fingerprints)

    def run_shard(self, ctx: RunContext, pool: Pool, prepared: tuple[str, ...]) -> None:
        """One shard's columns, each reference set read from its cache file once per worker process."""
        info: dict[str, Any] = {}
        ctx.stage_info["decontaminate"] = info
        for t, rfp in zip(self.targets, prepared, strict=True):
            t0 = time.perf_counter()
            ref = _process_reference(self.reference_path(rfp))
            nearest = self.add_columns(ctx, pool, t, ref)
            info[t.value_column] = {"nearest": nearest, "seconds": round(time.perf_counter() - t0, 3)}

    def merge_records(self, record: dict[str, Any], shard_records: list[dict[str, Any]]) -> dict[str, Any]:
        """The driver's records of the reference sets, with the nearest item over the shards
        and their seconds added (the shards' summed over the workers)."""
        out = {}
        for column, rec in record.items():
            found = [r[column]["nearest"] for r in shard_records if r[column]["nearest"] is not None]
            best = max if rec["method"] == "semantic" else min
            seconds = rec["seconds"] + sum(r[column]["seconds"] for r in shard_records)
            out[column] = {**rec, "nearest": best(found) if found else None, "seconds": round(seconds, 3)}
        return out

    def add_columns(self, ctx: RunContext, pool: Pool, t: Target, ref: ReferenceSet):
        """``t``'s two columns for one shard's ``pool`` (nulls on failed rows), the reference
        set the worker process's cached one (:func:`_process_reference`); returns the nearest
        value over the rows not failed (None: no such row)."""
        failed = pool.failed
        if t.method == "semantic":
            values, idx = self.nearest_semantic(ctx, pool, t, ref)
        else:
            values, idx = self.nearest_perceptual(pool, ref)
        match = np.asarray(ref.ids, dtype=object)[np.maximum(idx, 0)]
        pool.add_column(t.value_column, pa.array(values, mask=failed))
        pool.add_column(t.match_column, pa.array(match, type=pa.string(), mask=failed))
        ok = values[~failed]
        if not len(ok):
            return None
        return float(ok.max()) if t.method == "semantic" else int(ok.min())

    # --- comparison ------------------------------------------------------------------

    def nearest_semantic(self, ctx, pool: Pool, t: Target, ref: ReferenceSet) -> tuple[np.ndarray, np.ndarray]:
        """Per shard, cached: a rerun with another threshold reads the columns back; the
        reference set's Assigner is the worker process's (:func:`_nearest_shard`)."""
        from filtering.cache import ShardCache, part_fingerprint
        from filtering.stages.scorer_stage import cached_shard_loop

        key = "filters.decontaminate.embedding"
        try:
            kind = pool.resolve_embedding(t.embedding)
        except KeyError as e:
            raise ConfigError(f"{key}: {e.args[0]}") from e
        cache = ShardCache(self.cache_root, "decontam-nearest", {"reference": ref.fingerprint, "embedding": kind})
        task = functools.partial(_nearest_shard, self.reference_path(ref.fingerprint), t.reference, kind)

        def compute(part, emb):
            return task(part, emb, None)

        loop = cached_shard_loop(
            ctx,
            pool,
            cache,
            ("match", "similarity"),
            source_of=lambda part, emb: {"embedding": part_fingerprint(part, emb, kind)},
            compute=compute,
            desc=f"decontaminate {t.value_column}",
            kind=kind,
            task=task,
        )
        return loop.columns["similarity"].astype(np.float32, copy=False), loop.columns["match"].astype(
            np.int64, copy=False
        )

    @staticmethod
    def nearest_perceptual(pool: Pool, ref: ReferenceSet):
        """Smallest Hamming distance to a reference hash and its index, per row."""
        from filtering.dedup.dedup_filter import hash_column
        from filtering.dedup.hamming import nearest

        hashes, null = hash_column(pool, "phash")
        dist, idx = nearest(hashes, ref.hashes)
        return np.where(null, 65, dist).astype(np.int16), idx

    # --- reference set ---------------------------------------------------------------

    def reference_path(self, rfp: str) -> str:
        return join(self.cache_root, f"decontam-{rfp}", "reference.npz")

    def reference(self, ctx: RunContext, t: Target) -> tuple[ReferenceSet, str]:
        from filtering.image_clusters.image_clusters_stage import reference_source
        from filtering.scorers.clip import model_spec

        key = "filters.decontaminate.reference"
        index = _output_index(ctx, t, self.cache_root)
        if index is not None:
            return index
        try:
            kind, items, listing = reference_source(t.reference)
        except InputError as e:
            raise InputError(f"{key}: {str(e).split(': ', 1)[-1]}") from e
        spec: dict[str, Any] = {
            "reference": t.reference,
            "kind": kind,
            "files": listing,
            "method": t.method,
            "version": ALGO_VERSION,
        }
        if kind != "embeddings":
            spec["jpeg_draft"] = self.model.jpeg_draft
            if t.method == "semantic" or spec["jpeg_draft"]:
                spec["model"] = model_spec(self.model)
            if (formats := self.formats) != DEFAULT_IMAGE_FORMATS:
                spec["formats"] = sorted(formats)
        rfp = fingerprint(spec)
        path = self.reference_path(rfp)
        if exists(path):
            ref = _load(path)
            ref.fingerprint = rfp
            return ref, "cached"
        if kind == "embeddings":
            ref = _load_arrays(items, t, key)
            how = "loaded"
        else:
            ref, failures, first = self.embed(ctx, t, kind, items)
            how = "embedded" if t.method == "semantic" else "hashed"
            if failures:
                ctx.log(
                    f"decontaminate: {failures} reference images in {t.reference!r} could not be decoded; "
                    f"skipped (first: {first})"
                )
        if len(ref.ids) == 0:
            raise InputError(f"{key}: no usable reference items in {t.reference!r}")
        ref.fingerprint = rfp
        _save(path, ref)
        atomic_write_text(join(os.path.dirname(path), "spec.json"), json.dumps(spec, indent=1, default=str))
        return ref, how

    def embed(self, ctx: RunContext, t: Target, kind: str, items: list[str]) -> tuple[ReferenceSet, int, str | None]:
        """Decode (and for semantic, encode) reference images as the scoring stage does pool
        images; with how many failed, and the first one's id and reason."""
        from filtering.image_clusters.image_clusters_stage import decode_reference
        from filtering.models.transforms import draft_target
        from filtering.stages.image_decode import reference_plan

        semantic = t.method == "semantic"
        jpeg_draft = self.model.jpeg_draft
        formats = self.formats
        if semantic:
            from filtering.scorers.clip import ClipEncoder

            clip = ctx.clip()
            encoder = ClipEncoder(clip)
            plan = reference_plan(clip.pil_transform, draft_target(clip.pil_transform) if jpeg_draft else None, formats)
        else:
            # Hash exactly as the scoring stage hashed the pool: with its JPEG draft decoding.
            plan = reference_plan(None, draft_target(ctx.clip().pil_transform) if jpeg_draft else None, formats)
        ids: list[str] = []
        hashes: list[int] = []
        emb: list[np.ndarray] = []
        pending: list[np.ndarray] = []
        failures, first = 0, None

        def flush() -> None:
            img, _ = encoder(np.stack(pending), [""] * len(pending))
            emb.append(img.astype(np.float32))
            pending.clear()

        bar = ctx.bar(len(items) if kind == "folder" else None, f"reference {t.value_column}", unit="images")
        try:
            for item_id, d in decode_reference(t.reference, (kind, items, None), plan, self.model):
                bar.update(1)
                if d.error is not None:
                    failures += 1
                    first = first or f"{item_id}: {d.error}"
                    continue
                ids.append(item_id)
                hashes.append(d.values["phash"]["phash"])
                if semantic:
                    pending.append(d.pixels["clip"])
                    if len(pending) >= self.model.batch_size:
                        flush()
            if semantic and pending:
                flush()
        finally:
            bar.close()
        if semantic:
            dim = encoder.dim
            matrix = np.concatenate(emb) if emb else np.zeros((0, dim), np.float32)
            return ReferenceSet(np.asarray(ids, dtype=str), embeddings=matrix), failures, first
        return ReferenceSet(np.asarray(ids, dtype=str), hashes=np.asarray(hashes, dtype=np.uint64)), failures, first


def _output_index(ctx: RunContext, t: Target, cache_root: str) -> tuple[ReferenceSet, str] | None:
    """A reference that is an earlier poolsift output (or its ``index/`` folder): its kept
    rows' perceptual hashes, from its index (``filtering/dedup/index.py``; built on demand
    for an output written before indexes, with one line saying so), or (semantic) their
    embeddings, read where that run found them (the index names each row's source shard
    and position); each named by its uid. None when ``t.reference`` is no output. The whole
    set is compared with every row (as an evaluation set is): for a large earlier output,
    ``dedup: {against: [...]}`` searches by partitions instead."""
    from filtering.dedup import against
    from filtering.dedup import index as ix
    from filtering.dedup.partitioned import read_batches
    from filtering.io.paths import open_file

    key = "filters.decontaminate.reference"
    if ix.find_index(t.reference) is None and not exists(join(t.reference, "manifest.json")):
        return None
    (ref,) = against.open_references([t.reference], cache_root, ctx.log)
    with open_file(join(ref.folder, ix.META)) as f:
        import hashlib

        meta_sha = hashlib.sha256(f.read()).hexdigest()
    spec = {"reference": t.reference, "kind": "index", "index": meta_sha, "version": ALGO_VERSION}
    if t.method == "semantic":
        from filtering.sources import source_info

        spec["embedding"] = t.embedding or source_info(ref.source or "webdataset").default_embedding
    rfp = fingerprint(spec)
    path = join(cache_root, f"decontam-{rfp}", "reference.npz")
    if exists(path):
        out = _load(path)
        out.fingerprint = rfp
        return out, "cached"
    if t.method == "semantic":
        out = _index_embeddings(ref, spec["embedding"], key)
        out.fingerprint = rfp
        _save(path, out)
        return out, "index"
    ids, hashes = [], []
    for batch in read_batches(ref.all_pieces()):
        ph = batch.column("phash")
        valid = ph.is_valid().to_numpy(zero_copy_only=False)
        hi, lo = batch.column("uid_hi").to_numpy()[valid], batch.column("uid_lo").to_numpy()[valid]
        ids += [f"{int(a):016x}{int(b):016x}" for a, b in zip(hi, lo, strict=True)]
        hashes.append(np.asarray(ph.fill_null(0).to_numpy(), np.uint64)[valid])
    if not ids:
        raise InputError(f"{key}: the {ref.rows:,} kept rows of {t.reference} have no perceptual hashes")
    out = ReferenceSet(np.asarray(ids, dtype=str), hashes=np.concatenate(hashes), fingerprint=rfp)
    _save(path, out)
    return out, "index"


def _index_embeddings(ref, kind: str, key: str) -> ReferenceSet:
    """An earlier output's kept rows' embeddings ``kind`` (unit norm, float32), named by
    their uids, read one index file (one source shard's kept rows) at a time."""
    from filtering import clustering
    from filtering.dedup import against
    from filtering.dedup import index as ix

    try:
        against.check_embeddings([ref], kind)
    except InputError as e:
        raise InputError(f"{key}: {str(e).split(': ', 1)[-1]}") from e
    ids, mats = [], []
    for file in range(len(ref.files)):
        table = ix.file_records(ref, file)
        if table.num_rows == 0:
            continue
        emb = ix.records_embeddings(ref, table, kind, np.float32, key, "semantic decontamination")
        hi, lo = table.column("uid_hi").to_numpy(), table.column("uid_lo").to_numpy()
        ids += [f"{int(a):016x}{int(b):016x}" for a, b in zip(hi, lo, strict=True)]
        mats.append(clustering.normalize(emb))
    if not ids:
        raise InputError(f"{key}: {ref.path} kept no rows")
    return ReferenceSet(np.asarray(ids, dtype=str), embeddings=np.concatenate(mats))


def _load_arrays(files: list[str], t: Target, key: str) -> ReferenceSet:
    """Embeddings (``.npy``/``.pt``, semantic) or uint64 hashes (``.npy``, perceptual)."""
    from filtering import clustering
    from filtering.io.paths import open_file

    ids: list[str] = []
    if t.method == "perceptual":
        arrays = []
        for f in files:
            if not f.lower().endswith(".npy"):
                raise InputError(
                    f"{key}: perceptual decontamination needs images or a .npy of uint64 hashes, got {f!r}"
                )
            with open_file(f) as fh:
                arr = np.load(io.BytesIO(fh.read()), allow_pickle=False)
            if arr.ndim != 1 or arr.dtype not in (np.uint64, np.int64):
                raise InputError(
                    f"{key}: {f!r} must be a 1-d uint64 array of perceptual hashes, got {arr.dtype} {arr.shape}"
                )
            arrays.append(arr.astype(np.uint64))
            ids += [f"{os.path.basename(f)}:{i}" for i in range(len(arr))]
        return ReferenceSet(np.asarray(ids, dtype=str), hashes=np.concatenate(arrays))
    mats = []
    for f in files:
        try:
            m = clustering.load_reference_embeddings(f)
        except (OSError, ValueError) as e:
            raise InputError(f"{key}: {e}") from e
        mats.append(clustering.normalize(m))
        ids += [f"{os.path.basename(f)}:{i}" for i in range(len(m))]
    return ReferenceSet(np.asarray(ids, dtype=str), embeddings=np.concatenate(mats))


def _save(path: str, ref: ReferenceSet) -> None:
    arrays: dict[str, np.ndarray] = {"ids": np.asarray(ref.ids, dtype=str)}
    if ref.hashes is not None:
        arrays["hashes"] = ref.hashes
    if ref.embeddings is not None:
        arrays["embeddings"] = ref.embeddings
    with atomic_open(path) as f:
        np.savez(f, **arrays)


def _load(path: str) -> ReferenceSet:
    fs, p = get_fs(path)
    with fs.open(p, "rb") as f:
        data = np.load(io.BytesIO(f.read()), allow_pickle=False)
        return ReferenceSet(data["ids"], data.get("hashes"), data.get("embeddings"))


def _check_dimension(reference: str, dim: int, kind: str, emb: np.ndarray) -> None:
    if emb.shape[1] != dim:
        raise ConfigError(
            f"filters.decontaminate.reference: {reference!r} has embeddings of dimension "
            f"{dim}, the pool's {kind!r} embeddings have {emb.shape[1]}; "
            "embed the reference with the same model"
        )


_PROCESS_REFERENCES: dict[str, tuple[ReferenceSet, dict]] = {}  # per worker process: by cache file


def _process_reference(path: str) -> ReferenceSet:
    """The reference set cached at ``path``, read once per worker process (a shard-plan
    worker or a Ray task's); its fingerprint is its cache folder's."""
    entry = _PROCESS_REFERENCES.get(path)
    if entry is None:
        if len(_PROCESS_REFERENCES) >= 8:  # another run's
            _PROCESS_REFERENCES.clear()
        ref = _load(path)
        ref.fingerprint = os.path.basename(os.path.dirname(path)).removeprefix("decontam-")
        entry = _PROCESS_REFERENCES[path] = (ref, {})
    return entry[0]


def _nearest_shard(path: str, reference: str, kind: str, part, emb, cols) -> dict[str, np.ndarray]:
    """One shard's nearest reference items in a shard-plan worker (``cached_shard_loop``'s
    ``compute``): the reference set read from its cache file and its Assigner built once
    per process."""
    from filtering import clustering

    ref = _process_reference(path)
    built = _PROCESS_REFERENCES[path][1]
    if "assigner" not in built:
        _check_dimension(reference, ref.embeddings.shape[1], kind, emb)
        built["assigner"] = clustering.Assigner(ref.embeddings)
    ids, sims = clustering.assign(emb, built["assigner"])
    return {"match": ids, "similarity": sims}


def _record(t: Target, ref: ReferenceSet, how: str) -> dict[str, Any]:
    return {"reference": t.reference, "method": t.method, "reference_items": int(len(ref.ids)), "reference_cache": how}
