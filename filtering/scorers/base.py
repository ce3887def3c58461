"""Scorers: one step writes a score column, a filter thresholds it (NeMo Curator's Score/Filter split).

A scorer is one file: a :class:`Scorer` subclass with a ``kind`` (its name in YAML's
``scorers:`` list), a pydantic ``Params`` model (unknown keys rejected), and

- :meth:`Scorer.provides`: the columns it adds (``aesthetic_score``...);
- :meth:`Scorer.needs`: what it reads: an embedding kind, pool columns, captions,
  decoded images (``images``: scored where the image is decoded, in the source's decode
  workers) or the output of its own :meth:`Scorer.transform` (``pixels``: batched, in the
  process or Ray actor that holds its model); checked by the planner before any data is read;
- :meth:`Scorer.fingerprint`: everything besides its input that changes its result
  (weights digest, preset, version); its cache lives under its own fingerprint, so
  adding or changing one scorer never invalidates another's cache;
- :meth:`Scorer.check`: plan-time checks that need no data (files exist, shapes fit);
- :meth:`Scorer.setup`: loads the model, once per process, never in ``__init__``, so
  a scorer stays small and picklable (Ray actors, worker processes);
- :meth:`Scorer.score`: one :class:`Batch` in, named numpy arrays (one row each) out;
  :meth:`Scorer.embeddings` names the 2-D ones (cached as float16 ``.npy``, read by
  filters as embedding kinds).

:class:`ScorerStage` owns the loop every scorer shares: shard by shard, read the
cached result (``DIR/cache/scorer-<name>-<fp>/<shard>.parquet``, keyed by what the
shard's input was), or compute it in batches and cache it; failed rows get nulls.
Scorers that read images cannot run on the pool (it holds no pixels): the planner hands
them to the source stage, whose decode pass feeds them (WebDataset:
:mod:`filtering.stages.webdataset`, each cached under its own
``scorer-<name>-<fp>/``); a source without images rejects them at plan time.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from filtering.errors import ConfigError
from filtering.stages.base import ColumnStage, RunContext
from filtering.validation import format_validation_error, unknown_name

# pyarrow (and the pool, which needs it) is imported where used: the source's decode
# workers import this module to unpickle image scorers, and start faster without it.
if TYPE_CHECKING:
    import pyarrow as pa

    from filtering.pool import Pool, ShardPart

BATCH_ROWS = 65_536  # rows per score() call: bounded memory, large enough for BLAS


class ScorerParams(BaseModel):
    """Base for scorer parameters: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


@dataclass(frozen=True)
class Needs:
    """What a scorer reads. ``embedding``: it reads an embedding kind, ``embedding_kind``
    (None: the pool's default, CLIP ``image`` for shards, ``l14_img`` for DataComp)."""

    embedding: bool = False
    embedding_kind: str | None = None
    columns: frozenset[str] = frozenset()
    captions: bool = False
    images: bool = False  # decoded images (PIL, in their own mode), one per call, in the decode workers
    pixels: bool = False  # uint8 NHWC output of the scorer's transform(), batched where its model is

    @property
    def reads_images(self) -> bool:
        return self.images or self.pixels

    def pool_columns(self, caption_column: str = "caption") -> set[str]:
        return set(self.columns) | ({caption_column} if self.captions else set())


@dataclass(frozen=True)
class InputInfo:
    """What a scorer may know about the input before any data is read."""

    kind: str  # "webdataset" | "datacomp"
    embedding_dims: dict[str, int] = field(default_factory=dict)  # known ones, e.g. {"l14_img": 768}


@dataclass
class Batch:
    """Consecutive rows of one shard: the embeddings, columns, images or pixels a scorer
    asked for. Image batches hold only the rows whose image decoded (and, for pixels,
    went through the transform); the source leaves the others null."""

    part: ShardPart | None = None  # None for image batches (the pool does not exist yet)
    start: int = 0  # first row, relative to the part
    embeddings: np.ndarray | None = None  # float32 (rows, dim)
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    images: list | None = None  # PIL images as decoded (Needs.images)
    pixels: np.ndarray | None = None  # uint8 (rows, H, W, 3) from the scorer's transform (Needs.pixels)

    @property
    def rows(self) -> int:
        for value in (self.embeddings, self.pixels, self.images):
            if value is not None:
                return len(value)
        return len(next(iter(self.columns.values()))) if self.columns else 0


class Done:
    """A result computed at once, for :meth:`Scorer.submit`."""

    def __init__(self, value: dict[str, np.ndarray]):
        self.value = value

    def result(self) -> dict[str, np.ndarray]:
        return self.value


class Scorer(ABC):
    """One score computation. Subclasses set ``kind`` and ``Params`` and implement the rest."""

    kind: ClassVar[str]
    Params: ClassVar[type[ScorerParams]] = ScorerParams
    version: ClassVar[int] = 1  # bump when the computation changes: old caches are then not reused

    def __init__(self, params: BaseModel, input_info: InputInfo, path: str = "scorers"):
        self.params = params
        self.input = input_info
        self.path = path  # the config key path, for messages
        self._ready = False

    @property
    def name(self) -> str:
        return getattr(self.params, "name", None) or self.kind

    @abstractmethod
    def provides(self) -> tuple[str, ...]:
        """The columns this scorer adds."""

    def needs(self) -> Needs:
        return Needs()

    def fingerprint(self) -> dict[str, Any]:
        """Everything besides the input that changes the result (weights digest, settings)."""
        return self.params.model_dump(mode="json")

    def check(self) -> None:
        """Plan-time checks that read no pool data; raise ``ConfigError`` naming the key."""
        return None

    def setup(self) -> None:
        """Load models or weights; called once per process before the first :meth:`score`."""
        return None

    @abstractmethod
    def score(self, batch: Batch) -> dict[str, np.ndarray]:
        """One array per provided column (and per :meth:`embeddings` kind, ``(rows, dim)``),
        ``batch.rows`` long."""

    def embeddings(self) -> tuple[str, ...]:
        """Embedding kinds this scorer writes (image scorers only): 2-D float arrays in
        :meth:`score`'s result, cached as float16 ``<shard>.<kind>.npy``."""
        return ()

    def embedding_dims(self) -> dict[str, int]:
        """The width of each :meth:`embeddings` kind, after :meth:`setup`."""
        return {}

    def column_types(self) -> dict[str, pa.DataType]:
        """The Arrow type of each provided column (rows it could not score are null)."""
        import pyarrow as pa

        return dict.fromkeys(self.provides(), pa.float32())

    def transform(self):
        """``Needs.pixels`` scorers: the picklable PIL transform (image -> image) the decode
        workers apply before :meth:`score` sees the pixels; may load what it needs."""
        return None

    @property
    def device(self) -> str:
        """Where :meth:`setup` puts the model (``auto``, ``cpu``, ``cuda``...): executors size
        their model workers by it."""
        return "cpu"

    def placed(self, device: str) -> Scorer:
        """A copy that runs on ``device`` (a Ray actor's own GPU); scorers without a model: self."""
        return self

    def info(self) -> dict[str, Any] | None:
        """What ran, after :meth:`setup` (versions, checksums): cached beside the results."""
        return None

    def submit(self, batch: Batch):
        """Start scoring ``batch``; ``result()`` of the returned object gives :meth:`score`'s
        arrays. Models on a GPU override it to overlap the next batch's copy with this one."""
        return Done(self.score(batch))

    def ensure_setup(self) -> None:
        if not self._ready:
            self.setup()
            self._ready = True

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "columns": list(self.provides()),
            "params": self.params.model_dump(mode="json", exclude_none=True),
        }

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the configuration only: loaded models stay behind, ``setup`` reloads."""
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_model")}
        state["_ready"] = False
        return state


def input_info(input_kind: str, model_arch: str | None = None) -> InputInfo:
    """Embedding sizes known without reading data: those the source states (DataComp's
    npz arrays), or the CLIP model's ``embed_dim`` from its JSON config (read as a file,
    open_clip not imported)."""
    from filtering.stages.base import source_info

    known = source_info(input_kind).embedding_dims
    if known:
        return InputInfo(input_kind, dict(known))
    dim = _clip_embed_dim(model_arch) if model_arch else None
    return InputInfo(input_kind, {"image": dim, "text": dim} if dim else {})


def _clip_embed_dim(arch: str) -> int | None:
    import importlib.util
    import json

    candidates = [Path(arch)] if arch.endswith(".json") else []
    candidates.append(Path(__file__).resolve().parent.parent / "models" / "configs" / f"{arch}.json")
    spec = importlib.util.find_spec("open_clip")
    if spec and spec.submodule_search_locations:
        candidates += [Path(loc) / "model_configs" / f"{arch}.json" for loc in spec.submodule_search_locations]
    for c in candidates:
        if c.is_file():
            try:
                return int(json.loads(c.read_text())["embed_dim"])
            except (OSError, ValueError, KeyError, TypeError):
                return None
    return None


REGISTRY: dict[str, type[Scorer]] = {}


def register(cls: type[Scorer]) -> type[Scorer]:
    if cls.kind in REGISTRY and REGISTRY[cls.kind] is not cls:
        raise ValueError(f"scorer kind {cls.kind!r} registered twice")
    REGISTRY[cls.kind] = cls
    return cls


def builtin_scorers() -> None:
    import filtering.scorers.clip  # noqa: F401  (registers on import)
    import filtering.scorers.embedding_head  # noqa: F401
    import filtering.scorers.language_id  # noqa: F401
    import filtering.scorers.phash  # noqa: F401


def scorer_class(kind: str, path: str = "scorers") -> type[Scorer]:
    builtin_scorers()
    cls = REGISTRY.get(kind)
    if cls is None:
        raise unknown_name(path, "scorer", kind, sorted(REGISTRY))
    return cls


def parse_scorers(specs: Any, input_info: InputInfo, path: str = "scorers") -> list[Scorer]:
    """Parse the ``scorers:`` list, each entry ``{kind: params}``; two scorers may not
    write the same column."""
    if specs is None:
        return []
    if not isinstance(specs, list):
        raise ConfigError(f"{path}: must be a list of scorers, each {{kind: {{...}}}}")
    scorers: list[Scorer] = []
    owner: dict[str, str] = {}
    for i, spec in enumerate(specs):
        where = f"{path}[{i}]"
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"{where}: each scorer is a mapping with exactly one key, the scorer kind")
        ((kind, params),) = spec.items()
        cls = scorer_class(str(kind), where)
        sub = f"{where}.{kind}"
        try:
            model = cls.Params.model_validate(params or {})
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, cls.Params, prefix=(sub,))) from e
        scorer = cls(model, input_info, sub)
        for column in scorer.provides():
            if column in owner:
                raise ConfigError(
                    f"{sub}: column {column!r} is already written by {owner[column]}; give it another name"
                )
            owner[column] = sub
        scorers.append(scorer)
    return scorers


# --- the per-shard cached loop ---------------------------------------------------------


@dataclass
class ShardLoopResult:
    columns: dict[str, np.ndarray]  # one array per column, pool.n rows (rows of empty shards: zeros)
    computed: int  # shards computed now
    cached: int  # shards read from the cache


def cached_shard_loop(
    ctx: RunContext,
    pool: Pool,
    cache,
    columns: tuple[str, ...],
    source_of,
    compute,
    desc: str,
    kind: str | None = None,
    task=None,
    inputs: tuple[str, ...] = (),
) -> ShardLoopResult:
    """The loop every per-shard computation over the pool shares (scorers, cluster
    assignment, decontamination distances): for each shard, read its cached table when
    the cache entry was made from the same input, else compute it and cache it.

    ``cache``: a :class:`filtering.cache.ShardCache` (its fingerprint is the computation's
    settings); ``source_of(part, emb)``: what the shard's input was (the cache key's
    ``source``; ``emb`` is the shard's ``kind`` embeddings, loaded only when ``kind`` is
    given); ``compute(part, emb)``: one array per column, ``part.n`` rows. Memory stays
    one shard plus the output columns.

    ``task``: the same computation as a picklable ``task(part, emb, cols)`` (``cols``: the
    shard's ``inputs`` pool columns). With an executor that runs tasks (``--executor ray``,
    ``filtering/tasks.py``) the shards not cached are computed there, a few at a time in
    flight, and their columns come back to be cached here as a local run caches them.
    Where the pool has ``embedding_ref`` the task loads the shard's embeddings itself
    (from the shared file), so the driver reads only the rows the cache key samples
    (memory-mapped; a remote file is still read whole for the key).
    """
    from collections import deque

    import pyarrow as pa

    from filtering.tasks import runs_tasks, task_pool

    out: dict[str, np.ndarray | None] = dict.fromkeys(columns)
    computed = cached = 0
    remote = task is not None and ctx.executor is not None and runs_tasks(ctx.executor)
    # The bar opens at the first shard to compute, so a step whose shards are all cached
    # says "cached" instead of drawing a bar that fills at once.
    bar, rows_done = None, 0

    def open_bar() -> None:
        nonlocal bar
        if bar is None:
            bar = ctx.bar(pool.n, desc)
            bar.update(rows_done)

    def fill(part: ShardPart, result) -> None:
        nonlocal rows_done
        for c in columns:
            if out[c] is None:
                out[c] = np.zeros(pool.n, dtype=result[c].dtype)
            out[c][part.start : part.stop] = result[c]
        rows_done += part.n
        if bar is not None:
            bar.update(part.n)

    def store(part: ShardPart, source, result) -> None:
        cache.write(part.url, pa.table({c: result[c] for c in columns}), {}, source=source)
        fill(part, result)

    try:
        with task_pool(ctx.executor, 1) if remote else contextlib.nullcontext() as tasks:
            window: deque = deque()  # (part, source, future): at most two per worker in flight
            for part in pool.parts:
                if part.n == 0:
                    continue
                emb = pool.embedding_loader(kind, part) if kind is not None else None
                source = source_of(part, emb)
                if cache.is_done(part.url, source):
                    table = cache.read_table(part.url)
                    fill(part, {c: table.column(c).to_numpy() for c in columns})
                    cached += 1
                    continue
                computed += 1
                open_bar()
                if not remote:
                    store(part, source, compute(part, emb))
                    continue
                cols = {c: pool.column(c)[part.start : part.stop] for c in inputs}
                # The task loads the shard's embeddings itself where the pool can say how:
                # the driver read only the rows its cache key samples.
                if kind is not None and pool.embedding_ref is not None:
                    emb = pool.embedding_ref(kind, part)
                window.append((part, source, tasks.submit(_shard_task, task, part, emb, cols)))
                while len(window) > 2 * tasks.workers:
                    p, src, fut = window.popleft()
                    store(p, src, fut.result())
            while window:
                p, src, fut = window.popleft()
                store(p, src, fut.result())
    finally:
        if bar is not None:
            bar.close()
    if bar is None and cached and ctx.progress is not None:
        ctx.log(f"{desc}: cached ({cached} shard{'s' if cached != 1 else ''})")
    filled = {c: v if v is not None else np.zeros(pool.n, np.float32) for c, v in out.items()}
    return ShardLoopResult(filled, computed, cached)


def _shard_task(task, part: ShardPart, emb, cols) -> dict[str, np.ndarray]:
    """One shard of :func:`cached_shard_loop` where the executor runs it (a Ray task);
    ``emb``: the shard's embeddings, or a function that loads them here."""
    if callable(emb):
        emb = emb()
    return {c: np.asarray(v) for c, v in task(part, emb, cols).items()}


_SET_UP: dict[str, Scorer] = {}  # per task worker process: scorers set up once, by identity


def _score_shard(stage: ScorerStage, part: ShardPart, emb, cols) -> dict[str, np.ndarray]:
    """A :class:`ScorerStage`'s shard in a task worker: its scorer set up once per process."""
    scorer = stage.scorer
    key = json.dumps([scorer.kind, scorer.name, scorer.version, scorer.fingerprint()], sort_keys=True, default=str)
    if key not in _SET_UP:
        _SET_UP.clear()  # one scorer's model at a time
        scorer.ensure_setup()
        _SET_UP[key] = scorer
    stage.scorer = _SET_UP[key]  # this process's copy of the stage
    return stage._compute(part, emb, cols)


class ScorerStage(ColumnStage):
    """Runs one scorer over the pool, shard by shard, through its own cache."""

    def __init__(self, scorer: Scorer, cache_root: str, internal: bool = False):
        self.scorer = scorer
        self.cache_root = cache_root
        self.internal = internal  # a filter's own scorer: its columns stay out of the outputs
        self.name = f"scorer:{scorer.name}"
        # A filter's own scorer (language's language_id) runs shard by shard in the
        # workers; a configured one (a model head) keeps the in-memory plan, which loads it once.
        self.scope = "shard" if internal else "pool"

    def provides(self) -> set[str]:
        return set(self.scorer.provides())

    def requires(self) -> set[str]:
        return self.scorer.needs().pool_columns()

    def embeddings_required(self) -> dict[str, str | None]:
        needs = self.scorer.needs()
        return {f"{self.scorer.path}.embedding": needs.embedding_kind} if needs.embedding else {}

    @property
    def reads_images(self) -> bool:
        """Fed by the source's decode pass (the planner hands it to the source), not by :meth:`run`."""
        return self.scorer.needs().reads_images

    def check(self, input_kind: str) -> None:
        self.scorer.check()

    def run(self, ctx: RunContext, pool: Pool) -> None:
        import pyarrow as pa

        from filtering.cache import ShardCache

        scorer = self.scorer
        needs = scorer.needs()
        t0 = time.perf_counter()
        kind = None
        if needs.embedding:
            try:
                kind = pool.resolve_embedding(needs.embedding_kind)
            except KeyError as e:
                raise ConfigError(f"{scorer.path}.embedding: {e.args[0]}") from e
        columns = sorted(needs.pool_columns())
        spec = {
            "kind": scorer.kind,
            "version": scorer.version,
            "scorer": scorer.fingerprint(),
            "embedding": kind,
            "columns": columns,
        }
        cache = ShardCache(self.cache_root, f"scorer-{scorer.name}", spec)
        provided = scorer.provides()
        failed = pool.failed

        def cols_of(part: ShardPart) -> dict[str, np.ndarray]:
            return {c: pool.column(c)[part.start : part.stop] for c in columns}

        def compute(part: ShardPart, emb: np.ndarray | None) -> dict[str, np.ndarray]:
            scorer.ensure_setup()
            return self._compute(part, emb, cols_of(part))

        loop = cached_shard_loop(
            ctx,
            pool,
            cache,
            tuple(provided),
            source_of=lambda part, emb: {"input": _input_fingerprint(part, emb, kind, cols_of(part))},
            compute=compute,
            desc=f"score {scorer.name}",
            kind=kind,
            task=functools.partial(_score_shard, self),
            inputs=tuple(columns),
        )
        computed, cached = loop.computed, loop.cached
        for c in provided:
            pool.add_column(c, pa.array(loop.columns[c], mask=failed))
            if self.internal:
                pool.internal.add(c)
        ctx.stage_info.setdefault("scorers", {})[scorer.name] = {
            **scorer.describe(),
            "embedding": kind,
            "cache": {"dir": cache.dir, "shards_scored": computed, "shards_cached": cached},
            "seconds": round(time.perf_counter() - t0, 3),
        }

    def _compute(self, part: ShardPart, emb: np.ndarray | None, cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        chunks: dict[str, list[np.ndarray]] = {c: [] for c in self.scorer.provides()}
        for lo in range(0, part.n, BATCH_ROWS):
            hi = min(part.n, lo + BATCH_ROWS)
            batch = Batch(
                part=part,
                start=lo,
                embeddings=None if emb is None else np.asarray(emb[lo:hi], dtype=np.float32),
                columns={c: v[lo:hi] for c, v in cols.items()},
            )
            result = self.scorer.score(batch)
            for c in chunks:
                arr = np.asarray(result[c])
                if arr.shape[:1] != (hi - lo,):
                    raise ValueError(
                        f"scorer {self.scorer.name}: column {c!r} has {arr.shape[:1]} rows, expected {hi - lo}"
                    )
                chunks[c].append(arr)
        if part.n == 0:
            return {c: np.zeros(0, np.float32) for c in chunks}
        return {c: np.concatenate(v) for c, v in chunks.items()}


def _input_fingerprint(part: ShardPart, emb: np.ndarray | None, kind: str | None, cols: dict[str, np.ndarray]) -> str:
    """What one shard's input to a scorer was: its embeddings (url, shape and a strided
    sample of rows, as the cluster stage keys its assignments) and the columns read."""
    import pyarrow as pa

    from filtering.cache import part_fingerprint

    h = hashlib.sha256(json.dumps([part.url, part.n]).encode())
    if emb is not None:
        h.update(part_fingerprint(part, emb, kind or "").encode())
    for name in sorted(cols):
        h.update(name.encode())
        h.update(
            pa.array(cols[name]).to_string().encode()
            if cols[name].dtype == object
            else np.ascontiguousarray(cols[name]).tobytes()
        )
    return h.hexdigest()[:24]
