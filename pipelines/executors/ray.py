"""Scoring on a Ray cluster, with Ray Data streaming shards from CPU tasks to model actors.

The unit of work is a shard, as in the local executor: a CPU task reads one shard,
decodes its images with the model's own PIL transform and cuts it into model batches
of ``model.batch_size`` consecutive samples (a batch never spans two shards; the last
one is partial). An actor pool runs the CLIP model — loaded once per actor, in its
constructor, never shipped — and encodes each batch exactly as
:func:`filtering.stages.webdataset.score_stream` does, so every shard's scores and
embeddings are bit-for-bit those of a local run on the same hardware. The driver
collects each shard's batches and writes them to the same per-shard cache, one shard
at a time, atomically; the filter and write stages then run unchanged. A run killed
part-way resumes from the shards already in the cache.

Every node must have poolsift installed and read access to the input shards (a
shared file system or an fsspec URL such as ``s3://``); only the driver writes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from filtering.errors import ConfigError, PoolsiftError

INSTALL_HINT = "--executor ray needs Ray: pip install 'poolsift[ray]'"


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401 — Ray Data ships in the ray[data] extra
    except ImportError as e:
        raise ConfigError(INSTALL_HINT) from e
    return ray


class RayExecutor:
    """Runs the scoring stage on Ray: a local Ray started for the run, or the cluster at ``address``.

    ``num_cpus`` sizes a locally started Ray (default: every core); ``num_actors`` and
    ``actor_cpus`` override the model pool (default: one actor per GPU, or on CPU-only
    clusters one actor per 8 CPUs with up to 4 threads each).
    """

    def __init__(
        self,
        address: str | None = None,
        num_cpus: int | None = None,
        num_actors: int | None = None,
        actor_cpus: int | None = None,
    ):
        self.ray = _import_ray()
        self.address = address
        self.num_cpus = num_cpus
        self.num_actors = num_actors
        self.actor_cpus = actor_cpus
        self._started = False

    # --- cluster -----------------------------------------------------------------------

    def connect(self) -> None:
        """Join the cluster at ``address`` or start a local Ray; a Ray already running here is reused."""
        ray = self.ray
        if ray.is_initialized():
            return
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Ray's C++ core logs notices (e.g. about actor restarts) straight to stderr.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        kwargs: dict[str, Any] = {
            "log_to_driver": False,  # task and actor output stays in Ray's log files
            "logging_level": logging.ERROR,  # failures surface as exceptions; Ray's notices are noise here
            "namespace": "poolsift",
        }
        if self.address is None:
            kwargs.update(num_cpus=self.num_cpus or os.cpu_count(), include_dashboard=False)
        try:
            ray.init(address=self.address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"join the Ray cluster at {self.address}" if self.address else "start a local Ray"
            raise PoolsiftError(f"could not {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        self._started = True
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)

    def close(self) -> None:
        """Disconnect: a local Ray this executor started stops, a cluster it joined keeps running,
        and a Ray it found already initialised in this process is left alone."""
        if self._started:
            self.ray.shutdown()
            self._started = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def model_pool(self, device: str) -> dict[str, Any]:
        """Actor count and per-actor resources for the model stage."""
        resources = self.ray.cluster_resources()
        cpus = int(resources.get("CPU", 1))
        gpus = int(resources.get("GPU", 0))
        if gpus and device != "cpu":
            return {"size": self.num_actors or gpus, "num_gpus": 1, "num_cpus": self.actor_cpus or 1}
        if device.startswith("cuda"):
            raise ConfigError(f"model.device: {device!r} requested but the Ray cluster has no GPUs")
        size = self.num_actors or max(1, cpus // 8)
        per_actor = self.actor_cpus or max(1, min(4, cpus // (2 * size)))
        return {"size": size, "num_gpus": 0, "num_cpus": per_actor}

    # --- scoring -----------------------------------------------------------------------

    def score(self, stage, urls: list[str], ctx) -> None:
        """Score ``urls`` for ``stage`` (a :class:`~filtering.stages.webdataset.WebDatasetStage`) into its cache."""
        self.connect()
        ray = self.ray
        data_ctx = ray.data.DataContext.get_current()
        data_ctx.enable_progress_bars = False
        data_ctx.print_on_execution_start = False

        model = stage.model_cfg.model_dump()
        pil_transform = _unwrap(ray, lambda: ray.get(ray.remote(num_cpus=1)(_pil_transform).remote(model)))
        draft = stage.draft_size(pil_transform) if hasattr(stage, "draft_size") else None
        pool = self.model_pool(model["device"])
        ctx.log(
            f"ray: {len(urls)} shards, {pool['size']} model actor(s) with "
            f"{pool['num_gpus']} GPU / {pool['num_cpus']} CPU each"
        )

        ds = self.ray.data.from_items([{"url": u} for u in urls], override_num_blocks=len(urls))
        ds = ds.flat_map(
            _read_decode,
            fn_kwargs={
                "transform": pil_transform,
                "draft": draft,
                "batch_size": model["batch_size"],
                "uid_field": stage.uid_field,
            },
            num_cpus=1,
        )
        ds = ds.map_batches(
            _actor_class(model),  # the config travels with the class, not as object-store arguments
            batch_size=1,  # one row = one model batch, already cut along the shard
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=pool["size"]),
            num_gpus=pool["num_gpus"],
            num_cpus=pool["num_cpus"],
        )
        bar = ctx.bar(None, "score")
        try:
            _unwrap(ray, lambda: self._collect(ds.iter_rows(), stage, bar))
        finally:
            bar.close()

    def _collect(self, rows: Iterator[dict], stage, bar) -> None:
        """Gather each shard's batches (they arrive in any order) and write a shard once all are in."""
        from filtering.io.reader import ShardReadResult
        from filtering.stages.webdataset import _ShardAcc

        pending: dict[str, dict[int, dict]] = {}
        ends: dict[str, dict] = {}
        info_written = False
        for row in rows:
            url = row["url"]
            if not info_written:
                # Written before the first shard, as the local executor does, so a resumed run finds it.
                stage.cache.write_info(json.loads(row["info"]))
                info_written = True
            if row["final"]:
                ends[url] = row
            else:
                pending.setdefault(url, {})[int(row["index"])] = row
                bar.update(int(row["n"]))
            end = ends.get(url)
            batches = pending.get(url, {})
            if end is None or len(batches) < int(end["index"]):
                continue
            dim = int(end["dim"])
            acc = _ShardAcc(url, [], [], [], read=ShardReadResult(url, error=end["read_error"] or None))
            for i in range(int(end["index"])):
                b = batches[i]
                n = int(b["n"])
                acc.rows.extend(json.loads(b["rows"]))
                acc.image.append(np.frombuffer(b["image"], np.float16).reshape(n, dim))
                acc.text.append(np.frombuffer(b["text"], np.float16).reshape(n, dim))
            stage.write_shard(acc, dim)
            pending.pop(url, None)
            ends.pop(url)
        if pending or ends:
            raise PoolsiftError(f"ray: {len(set(pending) | set(ends))} shard(s) came back incomplete")


def _unwrap(ray, call):
    """Run ``call``; a poolsift error raised inside a Ray task comes out as itself, one line."""
    try:
        return call()
    except ray.exceptions.RayError as e:
        cause = getattr(e, "cause", None)
        while cause is not None and not isinstance(cause, PoolsiftError) and getattr(cause, "cause", None):
            cause = cause.cause
        if isinstance(cause, PoolsiftError):
            raise cause from None
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise PoolsiftError(f"ray: {first}") from e


def _load_model(model: dict):
    from filtering.models.clip import load_clip

    device = model["device"]
    if device.startswith("cuda"):
        device = "cuda"  # Ray gives each actor its own GPU through CUDA_VISIBLE_DEVICES
    return load_clip(model["arch"], model["pretrained"], device, model["precision"])


def _pil_transform(model: dict):
    """The model's PIL preprocessing (picklable), for the decode tasks."""
    return _load_model({**model, "device": "cpu"}).pil_transform


def _read_decode(item: dict, transform, draft: int | None, batch_size: int, uid_field: str = "uid") -> Iterator[dict]:
    """One shard -> its model batches (decoded pixels of the readable images), then an end row."""
    from filtering.io.reader import ShardReadResult, iter_shard
    from filtering.stages.image_decode import decode_one
    from filtering.stages.webdataset import _row, decode_input

    url = item["url"]
    result = ShardReadResult(url)
    batch: list[tuple[dict, Any]] = []
    index = 0

    def emit() -> dict:
        ok = [d.pixels for _, d in batch if d.error is None]
        pixels = np.stack(ok) if ok else np.zeros((0, 0, 0, 3), np.uint8)
        samples = [(r, [d.width, d.height, d.phash, d.error]) for r, d in batch]
        return {
            "url": url,
            "index": index,
            "final": False,
            "read_error": "",
            "n": len(batch),
            "samples": json.dumps({"items": samples, "shape": list(pixels.shape)}),
            "pixels": pixels.tobytes(),
        }

    for sample in iter_shard(url, result):
        batch.append((_row(sample, url, uid_field), decode_one(decode_input(sample), transform, draft)))
        if len(batch) == batch_size:
            yield emit()
            batch, index = [], index + 1
    if batch:
        yield emit()
        index += 1
    # The end row: how many batches the shard has, and whether it was cut short.
    yield {
        "url": url,
        "index": index,
        "final": True,
        "read_error": result.error or "",
        "n": 0,
        "samples": json.dumps({"items": [], "shape": [0, 0, 0, 3]}),
        "pixels": b"",
    }


def _actor_class(model: dict) -> type:
    class ModelActor(_ModelActor):
        def __init__(self):
            super().__init__(model)

    return ModelActor


class _ModelActor:
    """One CLIP model per actor, built here so it is never pickled."""

    def __init__(self, model: dict):
        from filtering.stages.webdataset import ClipEncoder

        self.clip = _load_model(model)
        self.encoder = ClipEncoder(self.clip)
        self.info = json.dumps(self.clip.info, sort_keys=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from filtering.stages.image_decode import Decoded
        from filtering.stages.webdataset import encode_batch

        out: dict[str, list] = {
            k: [] for k in ("url", "index", "final", "read_error", "n", "rows", "image", "text", "dim", "info")
        }
        for i in range(len(batch["url"])):
            payload = json.loads(batch["samples"][i])
            shape = payload["shape"]
            pixels = np.frombuffer(batch["pixels"][i], np.uint8).reshape(shape)
            items, k = [], 0
            for row, (width, height, phash, error) in payload["items"]:
                px = None
                if error is None:
                    px, k = pixels[k], k + 1
                items.append((row, Decoded(px, width, height, phash, error)))
            image, text = encode_batch(self.encoder, items)
            out["url"].append(batch["url"][i])
            out["index"].append(int(batch["index"][i]))
            out["final"].append(bool(batch["final"][i]))
            out["read_error"].append(batch["read_error"][i])
            out["n"].append(len(items))
            out["rows"].append(json.dumps([row for row, _ in items]))
            out["image"].append(image.tobytes())
            out["text"].append(text.tobytes())
            out["dim"].append(self.encoder.dim)
            out["info"].append(self.info)
        return {
            k: np.array(v, dtype=object) if k in ("url", "read_error", "rows", "image", "text", "info") else np.array(v)
            for k, v in out.items()
        }
