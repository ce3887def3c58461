"""Image-cluster membership: DataComp's ImageNet-cluster rule as pool columns.

DataComp's image-based baseline (Gadre et al. 2023, §3.4; ``baselines/apply_filter.py``):
k-means centroids of the pool's image embeddings (or published ones), each pool image
assigned to its nearest centroid by inner product, and the target clusters are those
nearest to at least one reference (ImageNet) embedding. This stage adds

- ``cluster_id`` (int64; null for failed rows) and ``cluster_sim`` (the inner product
  with that centroid),
- ``cluster_target`` (bool): the row's cluster is in the target set,

and the ``image_clusters`` filter keeps ``cluster_target``. Every expensive piece is
cached under ``DIR/cache/`` with a fingerprint of what it depends on, so a rerun with
other filter settings loads centroids, reference embeddings, target set and per-shard
assignments without loading a model or re-clustering:

- ``centroids-<fp>/``: ``centroids.npy`` and ``targets-<ref fp>-a<N>.npy``; fp = the pool's
  embeddings (per shard: url, rows, a sample of rows) and the k-means settings, or the
  centroids file;
- ``reference-<fp>/embeddings.npy``: fp = the reference files and, when they are images,
  the model;
- ``clusters-<fp>/<shard>.parquet``: per-shard assignments, fp = the centroids; each
  records the fingerprint of the shard's embeddings it was computed from.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from filtering import clustering
from filtering.cache import ShardCache, fingerprint, load_npy, part_fingerprint, save_npy
from filtering.errors import ConfigError, InputError
from filtering.io.atomic import atomic_write_text, exists
from filtering.io.paths import expand_shards, file_info, get_fs, join, shard_name
from filtering.pool import Pool
from filtering.settings import ClustersConfig, ModelConfig
from filtering.stages.base import ColumnStage, RunContext
from filtering.stages.image_decode import DEFAULT_IMAGE_FORMATS

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
EMBEDDING_FILE_EXTS = (".npy", ".pt", ".pth")
ALGO_VERSION = 1  # bump when the training rule changes (centroids are retrained)
# Bump when the assignment rule changes: cached targets and per-shard assignments are
# recomputed, centroids and reference embeddings kept. 2: the screened path's overflow fix;
# 3: candidates decided in float64 on every backend.
ASSIGN_VERSION = 3
DECODE_CHUNK = 64
IN_PROCESS_DECODE_MAX = 2000  # smaller reference sets decode in-process (no worker start-up)


_ASSIGNERS: dict = {}  # per shard-plan worker process: the centroids' Assigner, built once


@dataclass(frozen=True)
class ClusterTargets:
    """What assigning rows needs once the whole-pool part is done: small and picklable,
    so shard workers (the streaming plan) assign exactly as the driver would."""

    kind: str  # the embedding kind
    cfp: str  # fingerprint of the centroids: names their cache folder and the assignments'
    centroids: str  # the cached centroids.npy
    targets: np.ndarray  # sorted ids of the target clusters
    num_clusters: int


class ImageClustersStage(ColumnStage):
    name = "clusters"
    scope = "global"  # the target clusters over the pool, then each shard's rows assigned

    def __init__(
        self,
        clusters: ClustersConfig | None,
        model: ModelConfig,
        cache_root: str,
        formats: tuple[str, ...] = DEFAULT_IMAGE_FORMATS,
    ):
        # Nothing is read here: `poolsift validate` plans the run without touching data.
        self.clusters = clusters  # the run's ``clusters`` section (None: no image_clusters possible)
        self.model = model  # the CLIP model that embeds an image-folder or shard reference set
        self.cache_root = cache_root
        self.formats = tuple(formats)  # the image decoders allowed (input.image_formats)

    def provides(self) -> set[str]:
        return {"cluster_id", "cluster_sim", "cluster_target"}

    def requires(self) -> set[str]:
        """No pool columns beyond the embeddings; checks (at plan time) that the run's
        ``clusters`` section can produce a target set."""
        cc = self.clusters
        if cc is None:
            raise ConfigError("clusters: the image_clusters filter needs a clusters section with a reference set")
        if not cc.reference:
            raise ConfigError("clusters.reference: required (image folder, shards, or .npy/.pt embeddings)")
        return set()

    def embeddings_required(self) -> dict[str, str | None]:
        return {"clusters.embedding": self.clusters.embedding}

    # --- the shard plan (scope "global"): the targets in the driver, each shard assigned in the workers

    def prepare(self, ctx: RunContext, source, shard_rows: list[int]) -> ClusterTargets:
        """The target clusters from the source's pool of shard parts and embeddings
        (``skeleton_pool``: no column, nothing per row)."""
        t0 = time.perf_counter()
        targets = self.find_targets(ctx, source.skeleton_pool(shard_rows))
        ctx.stage_info["clusters"]["seconds"] = round(time.perf_counter() - t0, 3)
        return targets

    def run_shard(self, ctx: RunContext, pool: Pool, prepared: ClusterTargets) -> None:
        self.assign(ctx, pool, prepared, _ASSIGNERS)

    def merge_records(self, record: dict[str, Any], shard_records: list[dict[str, Any]]) -> dict[str, Any]:
        """The driver's record of the targets, with the shards' assignment counts summed."""
        record = {**record, "cache": dict(record["cache"])}
        for key in ("shards_assigned", "shards_cached"):
            record["cache"][key] = sum(r["cache"][key] for r in shard_records)
        record["rows_in_target"] = sum(r["rows_in_target"] for r in shard_records)
        record["seconds"] = record.pop("seconds")  # last
        return record

    def find_targets(self, ctx: RunContext, pool: Pool) -> ClusterTargets:
        """The whole-pool part: centroids (trained on a sample of ``pool``'s embeddings, or
        loaded), the reference embeddings and the target clusters, each cached. Reads the
        pool's embeddings (a sample for training, a few rows per shard for the
        fingerprints), never a column: the streaming plan calls it on a pool of parts alone."""
        cc = self.clusters
        self.requires()
        try:
            kind = pool.resolve_embedding(cc.embedding)
        except KeyError as e:
            raise ConfigError(f"clusters.embedding: {e.args[0]}") from e
        info: dict[str, Any] = {"embedding": kind, "cache": {}}
        ctx.stage_info["clusters"] = info
        # One light pass for fingerprints; arrays are not kept (memory stays one shard).
        parts = [(part, part_fingerprint(part, emb, kind)) for part, emb in pool.iter_embeddings(kind)]

        centroids, cfp = self.centroids(ctx, pool, parts, info)
        reference, rfp = self.reference(ctx, info)
        if reference.shape[1] != centroids.shape[1]:
            raise ConfigError(
                f"clusters.reference: embeddings of dimension {reference.shape[1]} do not match the pool's "
                f"{kind!r} embeddings of dimension {centroids.shape[1]}; embed the reference with the same model"
            )
        targets = self.targets(centroids, cfp, reference, rfp, info, ctx.executor)
        info.update(
            num_clusters=int(len(centroids)),
            target_clusters=int(len(targets)),
            assign_backend=clustering.default_backend(len(centroids)),
        )
        path = join(self.cache_root, f"centroids-{cfp}", "centroids.npy")
        return ClusterTargets(kind, cfp, path, targets, int(len(centroids)))

    def assign(self, ctx: RunContext, pool: Pool, targets: ClusterTargets, assigners: dict | None = None) -> None:
        """The per-row part: each row's nearest centroid, per shard through the shared cached
        loop (:func:`filtering.stages.scorer_stage.cached_shard_loop`, keyed by the shard's
        embeddings), as the columns ``cluster_id``, ``cluster_sim`` and ``cluster_target``.
        Row-local, so the streaming plan runs it on each shard's pool in its workers, where
        ``assigners`` keeps one :class:`filtering.clustering.Assigner` per process."""
        from filtering.stages.scorer_stage import cached_shard_loop

        info = ctx.stage_info.setdefault("clusters", {"embedding": targets.kind, "cache": {}})
        kind = targets.kind
        cache = ShardCache(
            self.cache_root, "clusters", {"centroids": targets.cfp, "embedding": kind, "assign": ASSIGN_VERSION}
        )
        assigners = {} if assigners is None else assigners

        def compute(part, emb):
            assigner = assigners.get(targets.centroids)
            if assigner is None:  # only when some shard is not cached: centroids loaded once
                assigners.clear()
                assigner = assigners[targets.centroids] = clustering.Assigner(load_npy(targets.centroids))
            a_ids, a_sims = clustering.assign(emb, assigner)
            return {"cluster_id": a_ids, "cluster_sim": a_sims}

        loop = cached_shard_loop(
            ctx,
            pool,
            cache,
            ("cluster_id", "cluster_sim"),
            source_of=lambda part, emb: {"embedding": part_fingerprint(part, emb, kind)},
            compute=compute,
            desc="assign clusters",
            kind=kind,
            task=functools.partial(_assign_shard, targets.centroids),
        )
        info["cache"]["shards_assigned"] = loop.computed
        info["cache"]["shards_cached"] = loop.cached
        ids = loop.columns["cluster_id"].astype(np.int64, copy=False)
        sims = loop.columns["cluster_sim"].astype(np.float32, copy=False)
        failed = pool.failed
        target_mask = np.zeros(targets.num_clusters, dtype=bool)
        target_mask[targets.targets] = True
        in_target = target_mask[ids] & ~failed
        pool.add_column("cluster_id", pa.array(ids, mask=failed))
        pool.add_column("cluster_sim", pa.array(sims, mask=failed))
        pool.add_column("cluster_target", in_target)
        info["rows_in_target"] = int(in_target.sum())

    # --- centroids -------------------------------------------------------------------

    def centroids(self, ctx, pool, parts, info) -> tuple[np.ndarray, str]:
        cc = self.clusters
        if cc.centroids:
            spec = {"file": cc.centroids, "source": _file_info(cc.centroids, "clusters.centroids")}
        else:
            spec = {
                "pool": [fp for _, fp in parts],
                "num_clusters": cc.num_clusters,
                "niter": cc.niter,
                "seed": cc.seed,
                "sample_fraction": cc.sample_fraction,
                "max_training_points": cc.max_training_points,
                "version": ALGO_VERSION,
            }
        cfp = fingerprint(spec)
        path = join(self.cache_root, f"centroids-{cfp}", "centroids.npy")
        if exists(path):
            info["centroids"] = "cached"
            return load_npy(path), cfp
        if cc.centroids:
            try:
                centroids = clustering.load_centroids(cc.centroids)
            except (OSError, ValueError) as e:
                raise InputError(f"clusters.centroids: {e}") from e
            info["centroids"] = "loaded"
        else:
            centroids = self.train(ctx, pool, info)
            info["centroids"] = "trained"
        save_npy(path, centroids)
        atomic_write_text(join(self.cache_root, f"centroids-{cfp}", "spec.json"), json.dumps(spec, indent=1))
        return centroids, cfp

    def train(self, ctx, pool, info) -> np.ndarray:
        cc = self.clusters
        # Failed rows (WebDataset input: ``error`` set) are left out: the sample is drawn
        # among the rows not failed (the column's nulls), counted and found shard by shard,
        # so no array over the whole pool is held.
        error = pool.table.column("error") if pool.has_column("error") else None
        alive = [part.n if error is None else error.slice(part.start, part.n).null_count for part in pool.parts]
        usable = sum(alive)
        m = clustering.training_size(usable, cc.num_clusters, cc.sample_fraction, cc.max_training_points)
        if m < cc.num_clusters:
            raise ConfigError(
                f"clusters.num_clusters: {cc.num_clusters} clusters need at least as many training points; "
                f"the pool has {usable} usable rows (sample: {m})"
            )
        rows = clustering.sample_indices(usable, m, cc.seed)
        if error is not None:
            rows = _alive_rows(error, pool.parts, alive, rows)
        sample = pool.embeddings(info["embedding"], rows)  # only the sampled rows, shard by shard
        ctx.log(f"clusters: k-means of {m:,} points into {cc.num_clusters:,} clusters ({cc.niter} iterations)")
        bar = ctx.bar(cc.niter, "k-means", unit="iterations")
        t = time.perf_counter()
        try:
            centroids = clustering.train_kmeans(
                sample, cc.num_clusters, niter=cc.niter, seed=cc.seed, progress=lambda it, obj: bar.update(1)
            )
        finally:
            bar.close()
        info["training_points"] = int(m)
        info["training_seconds"] = round(time.perf_counter() - t, 3)
        return centroids

    # --- reference set ---------------------------------------------------------------

    def reference(self, ctx, info) -> tuple[np.ndarray, str]:
        ref = self.clusters.reference
        source = reference_source(ref)
        spec: dict[str, Any] = {"reference": ref, "kind": source[0], "files": source[2]}
        if source[0] != "embeddings":
            from filtering.scorers.clip import model_spec

            spec["model"] = model_spec(self.model)
            spec["jpeg_draft"] = self.model.jpeg_draft
            if (formats := self.formats) != DEFAULT_IMAGE_FORMATS:
                spec["formats"] = sorted(formats)
        rfp = fingerprint(spec)
        path = join(self.cache_root, f"reference-{rfp}", "embeddings.npy")
        if exists(path):
            emb = load_npy(path)
            info["reference"] = "cached"
        else:
            if source[0] == "embeddings":
                try:
                    emb = np.concatenate([clustering.load_reference_embeddings(f) for f in source[1]])
                except (OSError, ValueError) as e:
                    raise InputError(f"clusters.reference: {e}") from e
                info["reference"] = "loaded"
            else:
                emb, failures = self.embed_reference(ctx, source)
                info["reference"] = "embedded"
                info["reference_failed"] = failures
            if len(emb) == 0:
                raise InputError(f"clusters.reference: no usable reference images in {ref!r}")
            save_npy(path, emb)
        info["reference_count"] = int(len(emb))
        return emb, rfp

    def embed_reference(self, ctx, source) -> tuple[np.ndarray, int]:
        """Encode reference images exactly as pool images are: same decode, transform, model."""
        from filtering.models.transforms import draft_target
        from filtering.scorers.clip import ClipEncoder
        from filtering.stages.image_decode import reference_plan

        clip = ctx.clip()
        encoder = ClipEncoder(clip)
        draft = draft_target(clip.pil_transform) if self.model.jpeg_draft else None
        batch_size = self.model.batch_size
        out: list[np.ndarray] = []
        pending: list[np.ndarray] = []
        failures, first_failure = 0, None
        bar = ctx.bar(len(source[1]) if source[0] == "folder" else None, "embed reference", unit="images")

        def flush() -> None:
            img, _ = encoder(np.stack(pending), [""] * len(pending))
            out.append(img.astype(np.float16))
            bar.update(len(pending))
            pending.clear()

        try:
            plan = reference_plan(clip.pil_transform, draft, self.formats)
            for item, d in decode_reference(self.clusters.reference, source, plan, self.model):
                if d.error is not None:
                    failures += 1
                    first_failure = first_failure or f"{item}: {d.error}"
                    continue
                pending.append(d.pixels["clip"])
                if len(pending) >= batch_size:
                    flush()
            if pending:
                flush()
        finally:
            bar.close()
        if failures:
            ctx.log(
                f"clusters: {failures} reference images could not be decoded and were skipped (first: {first_failure})"
            )
        dim = encoder.dim
        return (np.concatenate(out) if out else np.zeros((0, dim), np.float16)), failures

    # --- targets and assignments -----------------------------------------------------

    def targets(self, centroids, cfp, reference, rfp, info, executor=None) -> np.ndarray:
        """DataComp's target set (:func:`filtering.clustering.target_clusters`), cached. With
        an executor that runs tasks (``--executor ray``) the reference set's assignment is
        cut into tasks of :data:`TARGET_CHUNK_ROWS` rows, a multiple of the assignment's
        batch, so every batch is the one the driver would assign: the same target set."""
        from filtering.tasks import runs_tasks, task_pool

        path = join(self.cache_root, f"centroids-{cfp}", f"targets-{rfp}-a{ASSIGN_VERSION}.npy")
        if exists(path):
            info["cache"]["targets"] = "cached"
            return load_npy(path)
        saved = join(self.cache_root, f"centroids-{cfp}", "centroids.npy")
        if executor is not None and runs_tasks(executor) and len(reference) and exists(saved):
            chunks = [
                (saved, reference[lo : lo + TARGET_CHUNK_ROWS]) for lo in range(0, len(reference), TARGET_CHUNK_ROWS)
            ]
            with task_pool(executor, 1) as tasks:
                targets = np.unique(np.concatenate(list(tasks.map(_target_chunk, chunks))))
        else:
            targets = clustering.target_clusters(reference, clustering.Assigner(centroids))
        save_npy(path, targets)
        info["cache"]["targets"] = "computed"
        return targets


# --- helpers -----------------------------------------------------------------------


def _alive_rows(error: pa.ChunkedArray, parts, alive: list[int], ranks: np.ndarray) -> np.ndarray:
    """The pool rows of the rows not failed (``error`` null) of ascending ``ranks`` among
    them, one shard at a time (``alive``: each part's count of them)."""
    out = np.empty(len(ranks), np.int64)
    ends = np.cumsum(alive, dtype=np.int64)
    cut = np.searchsorted(ranks, np.r_[0, ends])
    for p, part in enumerate(parts):
        lo, hi = cut[p], cut[p + 1]
        if hi > lo:
            local = np.flatnonzero(error.slice(part.start, part.n).is_null().to_numpy(zero_copy_only=False))
            out[lo:hi] = part.start + local[ranks[lo:hi] - (ends[p] - alive[p])]
    return out


def reference_source(ref: str) -> tuple[str, list[str], list]:
    """(kind, items, fingerprintable listing): ``embeddings`` file, image ``folder``, or ``shards``."""
    if ref.lower().endswith(EMBEDDING_FILE_EXTS):
        import braceexpand

        files = list(braceexpand.braceexpand(ref))  # e.g. DataComp's in1k_clip_vit_l14_{0..4}.pt
        return "embeddings", files, [[f, _file_info(f, "clusters.reference")] for f in files]
    fs, path = get_fs(ref)
    if fs.isdir(path):
        prefix = ref.split("://", 1)[0] + "://" if "://" in ref and not ref.startswith("file://") else ""
        images = sorted(p for p in fs.find(path) if p.lower().endswith(IMAGE_EXTS))
        if images:
            info = fs.info  # one stat per file: cheap next to decoding, and catches edits
            listing = [
                [os.path.relpath(p, path), int(info(p).get("size") or 0), str(info(p).get("mtime"))] for p in images
            ]
            return "folder", [prefix + p for p in images], listing
    try:
        urls = expand_shards(ref)
    except InputError as e:
        raise InputError(
            f"clusters.reference: {ref!r} is neither an image folder, shards, nor a .npy/.pt embeddings file"
        ) from e
    return "shards", urls, [[u, file_info(u)] for u in urls]


def reference_images(kind: str, items: list[str], root: str) -> Iterator[tuple[str, bytes | None]]:
    """(id, image bytes) of a ``folder`` or ``shards`` reference (:func:`reference_source`),
    read one at a time: folder images by path relative to the folder (``root``), shard
    samples as ``shard name/key``."""
    from filtering.io.paths import open_file
    from filtering.io.reader import iter_shard

    if kind == "folder":
        for p in items:
            rel = os.path.relpath(p.split("://", 1)[-1], root).replace(os.sep, "/")
            with open_file(p) as f:
                yield rel, f.read()
    else:
        for url in items:
            name = shard_name(url)
            for sample in iter_shard(url):
                yield f"{name}/{sample.key}", sample.image


def decode_reference(ref: str, source, plan, model_cfg) -> Iterator[tuple[str, Any]]:
    """(id, :class:`~filtering.stages.image_decode.DecodedImage`) of each image of the
    reference ``ref`` (``source``: its :func:`reference_source`), in order, decoded by
    ``plan`` through :func:`~filtering.stages.image_decode.decode_in_order`: in this
    process for a folder of up to ``IN_PROCESS_DECODE_MAX`` images (no worker start-up),
    else in ``model.num_workers`` processes with a bounded window in flight."""
    from filtering.stages.image_decode import decode_in_order

    kind, items, _ = source
    workers = 0 if kind == "folder" and len(items) <= IN_PROCESS_DECODE_MAX else _workers(model_cfg)
    return decode_in_order(reference_images(kind, items, get_fs(ref)[1]), plan, workers, DECODE_CHUNK)


def _workers(model_cfg) -> int:
    from filtering.tasks import worker_count

    return worker_count(model_cfg.num_workers, reserve=1, cap=8)


def _file_info(path: str, key: str) -> dict:
    try:
        return file_info(path)
    except (OSError, FileNotFoundError) as e:
        raise InputError(f"{key}: {path!r} not found") from e


TARGET_CHUNK_ROWS = 16 * clustering.DEFAULT_BATCH  # reference rows per target task on Ray


def _target_chunk(args) -> np.ndarray:
    """The nearest centroids of one chunk of the reference set (a task on Ray): the
    centroids loaded once per worker process, the driver's batches and arithmetic."""
    centroids, chunk = args
    assigner = _TASK_ASSIGNERS.get(centroids)
    if assigner is None:
        _TASK_ASSIGNERS.clear()
        assigner = _TASK_ASSIGNERS[centroids] = clustering.Assigner(load_npy(centroids))
    return clustering.target_clusters(chunk, assigner)


_TASK_ASSIGNERS: dict[str, clustering.Assigner] = {}  # per task worker process (Ray): one set of centroids


def _assign_shard(centroids: str, part, emb, cols) -> dict[str, np.ndarray]:
    """One shard's assignment where the executor runs it (``cached_shard_loop``'s ``task``):
    the centroids loaded once per worker process, the same arithmetic as the driver's."""
    assigner = _TASK_ASSIGNERS.get(centroids)
    if assigner is None:
        _TASK_ASSIGNERS.clear()
        assigner = _TASK_ASSIGNERS[centroids] = clustering.Assigner(load_npy(centroids))
    ids, sims = clustering.assign(emb, assigner)
    return {"cluster_id": ids, "cluster_sim": sims}
