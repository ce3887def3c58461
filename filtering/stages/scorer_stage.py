"""The per-shard cached loop every column computation shares (scorers, cluster
assignment, decontamination distances), and :class:`ScorerStage`, which runs one scorer
(:mod:`filtering.scorers.base`) over the pool through it."""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from filtering.errors import ConfigError
from filtering.scorers.base import BATCH_ROWS, Batch, Scorer
from filtering.stages.base import ColumnStage, RunContext

if TYPE_CHECKING:
    from filtering.pool import Pool, ShardPart


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
    import pyarrow as pa

    from filtering.tasks import runs_tasks, task_pool, windowed

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

    def todo():
        """The shards to compute where the executor runs them, as ``windowed`` items; the
        cached ones are filled and the local ones computed as they come."""
        nonlocal computed, cached
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
            yield (part, source), (task, part, emb, cols)

    try:
        if not remote:
            for _ in todo():
                pass
        else:
            with task_pool(ctx.executor, 1) as tasks:  # at most two shards per worker in flight
                for (part, source), result in windowed(tasks, _shard_task, todo(), 2 * tasks.workers):
                    store(part, source, result)
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


_SET_UP: OrderedDict[str, Scorer] = OrderedDict()  # per process: scorers set up, by identity, last used last
KEEP_SET_UP = 4  # scorers kept set up per process (a run's configured and filter scorers alternate per shard)


def set_up(scorer: Scorer) -> Scorer:
    """This process's set-up scorer equal to ``scorer`` (same kind, name, version, settings
    and device): ``scorer`` itself, set up, the first time. A task worker gets a fresh
    copy of the stage with every shard; this loads its model once per process."""
    key = json.dumps(
        [scorer.kind, scorer.name, scorer.version, scorer.fingerprint(), scorer.device], sort_keys=True, default=str
    )
    ready = _SET_UP.pop(key, None)
    if ready is None:
        scorer.ensure_setup()
        ready = scorer
    _SET_UP[key] = ready
    while len(_SET_UP) > KEEP_SET_UP:
        _SET_UP.popitem(last=False)
    return ready


def _score_shard(stage: ScorerStage, part: ShardPart, emb, cols) -> dict[str, np.ndarray]:
    """A :class:`ScorerStage`'s shard in a task worker (``--executor ray``)."""
    stage.scorer = set_up(stage.scorer)  # this process's copy of the stage
    return stage._compute(part, emb, cols)


class ScorerStage(ColumnStage):
    """Runs one scorer over the pool, shard by shard, through its own cache."""

    def __init__(self, scorer: Scorer, cache_root: str, internal: bool = False):
        self.scorer = scorer
        self.cache_root = cache_root
        self.internal = internal  # a filter's own scorer: its columns stay out of the outputs
        self.name = f"scorer:{scorer.name}"
        # On the shard plan every shard's columns are computed (or read from this stage's
        # per-shard cache) in the workers, each loading the scorer once (:func:`set_up`).
        # A scorer that reads images never runs here: the source's decode pass runs it.
        self.scope = "shard"
        self._copy = False  # a pickled copy (a task worker's): its scorer set up once per process

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _copy=True)

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
            if self._copy:
                self.scorer = set_up(self.scorer)
            else:
                scorer.ensure_setup()
            return self._compute(part, emb, cols_of(part))

        loop = cached_shard_loop(
            ctx,
            pool,
            cache,
            tuple(provided),
            source_of=lambda part, emb: {"input": _input_fingerprint(part, emb, kind, cols_of(part))},
            compute=compute,
            desc=f"score {scorer.label}",
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
