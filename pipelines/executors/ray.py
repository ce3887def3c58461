"""Scoring on a Ray cluster, with Ray Data streaming shards from CPU tasks to model actors.

The unit of work is a shard, as in the local executor, and the work goes through the
scorer protocol (:mod:`filtering.scorers.base`) with the source's own functions: a CPU
task reads one shard and decodes it (``read_shard_batches``: the image scorers such as
the perceptual hash run there, the pixel scorers' transforms too), cut into model
batches of ``model.batch_size`` consecutive samples (a batch never spans two shards;
the last one is partial). An actor pool holds the pixel scorers (CLIP): ``setup()``
runs once per actor, the models are never shipped, and each batch is scored by
``score_batch`` exactly as the local ``score_stream`` does, so every shard's cache
entries are bit-for-bit those of a local run on the same hardware. Batches travel as
the pickled named objects (``SampleBatch``, ``ScoredBatch``, ``ShardEnd``). The driver
collects each shard's batches and writes its pieces with the source's ``write_shard``,
one shard at a time, atomically; the filter and write stages then run unchanged. A run
killed part-way resumes from the shards already in the cache.

Every node must have poolsift installed and read access to the input shards (a
shared file system or an fsspec URL such as ``s3://``); only the driver writes.

The rest of the plan runs on Ray through :meth:`RayExecutor.task_pool` (the task pool
protocol of ``filtering/tasks.py``): the streaming plan's phases and the partitioned dedup
search submit plain functions as Ray tasks and take their results in submission order,
so the outputs are byte for byte the local process pool's. Those tasks read and write
spill files under the output folder (``OUT/.streaming/``, dedup's work folders, written
through fsspec when the output is a URL), so on a cluster of several machines the
output folder must be on storage every node sees: mounted at the same path, or an
fsspec URL.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from filtering.errors import ConfigError, PoolsiftError
from filtering.tasks import cores

INSTALL_HINT = "--executor ray needs Ray: pip install 'poolsift[ray]'"


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401 — Ray Data ships in the ray[data] extra
    except ImportError as e:
        raise ConfigError(INSTALL_HINT) from e
    return ray


# A line of Ray's C++ core log at info level: "[2026-12-07 16:14:01,539 I 22544 22544] logging.cc:303: ..."
_RAY_CORE_INFO = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+ I \d+ \d+\] ")


@contextlib.contextmanager
def _without_ray_core_notices():
    """Keep the driver's C++ core notices off the terminal while Ray starts: with
    ``RAY_BACKEND_LOG_LEVEL`` set, the core still writes "logging.cc:303: Set ray log
    level ..." straight to file descriptor 2, where Python's logging settings cannot reach.
    Whatever else was written there meanwhile is passed on."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to keep clean (a daemon, a closed descriptor)
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(True)
            sys.stderr.write("".join(line for line in lines if not _RAY_CORE_INFO.match(line)))


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
            kwargs.update(num_cpus=self.num_cpus or cores(), include_dashboard=False)
        try:
            # "local": a private Ray, never one that RAY_ADDRESS or a `ray start` on this
            # machine points at (README: without --ray-address a private Ray is started).
            with _without_ray_core_notices():
                ray.init(address=self.address or "local", **kwargs)
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

    def workers(self) -> int:
        """The CPUs tasks run on: the cluster's once joined, else those a local Ray would get."""
        if self.ray.is_initialized():
            return max(1, int(self.ray.cluster_resources().get("CPU", 1)))
        return self.num_cpus or cores()

    def nodes(self) -> int:
        """The cluster's live nodes (joining it or starting a local Ray first)."""
        self.connect()
        return sum(1 for node in self.ray.nodes() if node.get("Alive"))

    def task_pool(self) -> RayTaskPool:
        """Plain-function tasks on this cluster (``filtering/tasks.py``), one CPU each."""
        self.connect()
        return RayTaskPool(self.ray)

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

    def score(self, stage, todo: dict[str, tuple[str, ...]], ctx) -> None:
        """Score the missing pieces of each shard in ``todo`` (url -> scorer names, ``source``
        for the rows) for ``stage`` (a :class:`~filtering.stages.webdataset.WebDatasetStage`)
        into its caches, through the scorer protocol: read tasks decode and run the image
        scorers, model actors set up the pixel scorers once and score batches."""
        from filtering.stages.webdataset import SampleBatch, ShardEnd, ShardScores, score_batch

        self.connect()
        ray = self.ray
        data_ctx = ray.data.DataContext.get_current()
        data_ctx.enable_progress_bars = False
        data_ctx.print_on_execution_start = False

        wanted = {name for names in todo.values() for name in names}
        needed = stage.transform_scorers(wanted)
        transforms = _unwrap(ray, lambda: ray.get(ray.remote(num_cpus=1)(_transforms).remote(needed)))
        plan = stage.decode_plan(transforms)
        models = [s for s in stage.pixel_scorers() if s.name in wanted]
        pool = self.model_pool(models[0].device if models else "cpu")
        ctx.log(
            f"ray: {len(todo)} shards, {pool['size'] if models else 0} model actor(s) with "
            f"{pool['num_gpus']} GPU / {pool['num_cpus']} CPU each"
        )

        items = [{"url": u, "wanted": json.dumps(list(names))} for u, names in todo.items()]
        ds = self.ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.flat_map(
            _read_decode,
            fn_kwargs={"plan": plan, "batch_size": stage.model_cfg.batch_size, "uid_field": stage.uid_field},
            num_cpus=1,
        )
        if models:
            ds = ds.map_batches(
                # scorers travel with the class, set up in the actor
                _actor_class(models, gpu=pool["num_gpus"] > 0, required=plan.required),
                batch_size=1,  # one row = one model batch, already cut along the shard
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=pool["size"]),
                num_gpus=pool["num_gpus"],
                num_cpus=pool["num_cpus"],
            )
        bar = ctx.bar(None, "score")
        infos_written: set[str] = set()
        batches: dict[str, dict[int, object]] = {}
        ends: dict[str, object] = {}

        def collect() -> None:
            for row in ds.iter_rows():
                for name, info in json.loads(row.get("info") or "{}").items():
                    if name not in infos_written and info is not None:
                        # Written before the first shard, as the local executor does, so a resumed run finds it.
                        stage.scorer_cache(next(s for s in models if s.name == name)).write_info(info)
                        infos_written.add(name)
                item = pickle.loads(row["payload"])
                url = item.url
                if isinstance(item, SampleBatch):  # no model ran on it (only image scorers wanted)
                    item = score_batch(item, [], todo[url])
                if isinstance(item, ShardEnd):
                    ends[url] = item
                else:
                    batches.setdefault(url, {})[item.index] = item
                    bar.update(len(item.rows))
                end = ends.get(url)
                got = batches.get(url, {})
                if end is None or len(got) < end.batches:
                    continue
                shard = ShardScores(url)
                for i in range(end.batches):
                    shard.add(got[i])
                shard.read_error = end.read_error
                stage.write_shard(shard, todo[url])
                batches.pop(url, None)
                ends.pop(url)
            if batches or ends:
                raise PoolsiftError(f"ray: {len(set(batches) | set(ends))} shard(s) came back incomplete")

        try:
            _unwrap(ray, collect)
        finally:
            bar.close()


class RayTaskPool:
    """The task pool protocol (``filtering/tasks.py``) on Ray: each call is a Ray task of one
    CPU; ``map`` submits every task and yields the results in submission order (so which
    node finishes first never changes an output).

    Tasks left unread (a reader that stopped early or raised) are not cancelled: they run to
    their end, their results dropped, and a run's tasks end with its driver at the latest
    (``RayExecutor.close``). On Ray 2.60 a ``ray.cancel`` that meets the task's reply aborts
    the driver's process (``Check failed: it != submissible_tasks_.end() Tried to complete
    task that was not pending``; ray-project/ray#54846)."""

    def __init__(self, ray):
        self.ray = ray
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._remote: dict[Any, Any] = {}

    def _task(self, fn):
        if fn not in self._remote:
            self._remote[fn] = self.ray.remote(num_cpus=1)(fn)
        return self._remote[fn]

    def submit(self, fn, *args):
        """``fn(*args)`` as a Ray task; a ``concurrent.futures.Future`` of its result (a
        poolsift error raised in the task comes out as itself, as from :meth:`map`)."""
        import concurrent.futures as cf

        out: cf.Future = cf.Future()

        def done(inner) -> None:
            try:
                out.set_result(_unwrap(self.ray, inner.result))
            except BaseException as e:  # noqa: BLE001 — handed to the reader of ``out``
                out.set_exception(e)

        self._task(fn).remote(*args).future().add_done_callback(done)
        return out

    def map(self, fn, args):
        task = self._task(fn)
        refs = [task.remote(a) for a in args]
        ray = self.ray

        def ordered():
            for ref in refs:
                yield _unwrap(ray, lambda ref=ref: ray.get(ref))

        return ordered()

    def __enter__(self) -> RayTaskPool:
        return self

    def __exit__(self, *exc) -> None:
        self._remote.clear()


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


def _transforms(scorers) -> dict[str, Any]:
    """Each pixel scorer's PIL preprocessing (picklable), for the decode tasks."""
    return {s.name: s.transform() for s in scorers}


def _read_decode(item: dict, plan, batch_size: int, uid_field: str = "uid") -> Iterator[dict]:
    """One shard -> its model batches (decoded, image scorers run), then its end."""
    from filtering.stages.webdataset import read_shard_batches

    url, wanted = item["url"], tuple(json.loads(item["wanted"]))
    for out in read_shard_batches(url, plan, wanted, batch_size, uid_field):
        yield {"url": url, "wanted": item["wanted"], "payload": pickle.dumps(out), "info": ""}


def _actor_class(scorers: list, gpu: bool, required: frozenset = frozenset()) -> type:
    class ModelActor(_ModelActor):
        def __init__(self):
            super().__init__(scorers, gpu, required)

    return ModelActor


class _ModelActor:
    """The pixel scorers, set up once per actor (models loaded here, never shipped);
    ``required``: those whose failure stops the run (CLIP), as in a local run."""

    def __init__(self, scorers: list, gpu: bool, required: frozenset = frozenset()):
        # Ray gives each actor its own GPU through CUDA_VISIBLE_DEVICES: it is always "cuda" there.
        self.scorers = [s.placed("cuda") if gpu else s for s in scorers]
        self.required = required
        for s in self.scorers:
            s.ensure_setup()
        self.info = json.dumps({s.name: s.info() for s in self.scorers}, sort_keys=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from filtering.stages.webdataset import SampleBatch, score_batch

        payloads = []
        for payload, wanted in zip(batch["payload"], batch["wanted"], strict=True):
            item = pickle.loads(payload)
            if isinstance(item, SampleBatch):
                item = score_batch(item, self.scorers, tuple(json.loads(wanted)), self.required)
            payloads.append(pickle.dumps(item))
        n = len(payloads)
        return {
            "url": np.array(list(batch["url"]), dtype=object),
            "wanted": np.array(list(batch["wanted"]), dtype=object),
            "payload": np.array(payloads, dtype=object),
            "info": np.array([self.info] * n, dtype=object),
        }
