"""cached_shard_loop: the one per-shard cached loop of scorers, cluster assignment and
decontamination distances."""

import numpy as np
import pyarrow as pa

from filtering.cache import ShardCache
from filtering.pool import Pool, ShardPart
from filtering.stages.base import RunContext
from filtering.stages.scorer_stage import cached_shard_loop


def _pool(emb):
    parts = [ShardPart("a.tar", "a", 0, 3), ShardPart("empty.tar", "e", 3, 3), ShardPart("b.tar", "b", 3, 5)]
    return Pool(
        pa.table({"uid": [str(i) for i in range(5)]}),
        parts,
        embedding_loader=lambda kind, part: emb[part.start : part.stop],
        embedding_kinds=("image",),
        default_embedding="image",
    )


def test_computes_each_shard_once_and_recomputes_only_a_changed_one(tmp_path):
    emb = np.arange(10, dtype=np.float32).reshape(5, 2)
    ctx = RunContext(out_dir=str(tmp_path), cache_dir=str(tmp_path))
    cache = ShardCache(str(tmp_path), "test", {"v": 1})
    calls = []

    def compute(part, e):
        calls.append(part.url)
        return {"s": e.sum(axis=1), "i": np.arange(part.n, dtype=np.int64)}

    def run(embeddings):
        return cached_shard_loop(
            ctx,
            _pool(embeddings),
            cache,
            ("s", "i"),
            source_of=lambda part, e: {"sum": float(e.sum())},
            compute=compute,
            desc="t",
            kind="image",
        )

    first = run(emb)
    assert calls == ["a.tar", "b.tar"] and (first.computed, first.cached) == (2, 0)  # the empty shard is skipped
    np.testing.assert_array_equal(first.columns["s"], [1, 5, 9, 13, 17])
    np.testing.assert_array_equal(first.columns["i"], [0, 1, 2, 0, 1])
    again = run(emb)
    assert calls == ["a.tar", "b.tar"] and (again.computed, again.cached) == (0, 2)
    np.testing.assert_array_equal(again.columns["s"], first.columns["s"])
    changed = emb.copy()
    changed[4] += 1
    third = run(changed)
    assert calls[2:] == ["b.tar"] and (third.computed, third.cached) == (1, 1)
    assert third.columns["s"][4] == 19


def _square_sum(part, e, cols):
    return {"s": (np.asarray(e, np.float64) ** 2).sum(axis=1)}


def test_tasks_load_their_shards_embeddings_themselves(tmp_path):
    """On an executor that runs tasks, a shard not cached goes out as a loader of its
    embeddings (``Pool.embedding_ref``: the task reads the shared file), not as the array
    the driver would have read whole; the columns and the cache are the local loop's."""
    import functools
    import pickle

    import pyarrow.parquet as pq

    from filtering.cache import read_npy

    emb = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    paths = {}
    for name, lo, hi in (("a", 0, 3), ("b", 3, 5)):
        paths[name] = str(tmp_path / f"{name}.npy")
        np.save(paths[name], emb[lo:hi])

    def pool():
        p = _pool(emb)
        p.embedding_loader = lambda kind, part: read_npy(paths[part.sid])
        p.embedding_ref = lambda kind, part: functools.partial(read_npy, paths[part.sid])
        return p

    class Tasks:
        workers = 1
        sent: list[bytes] = []

        def submit(self, fn, *args):
            import concurrent.futures as cf

            payload = pickle.dumps(args)  # what Ray would ship
            self.sent.append(payload)
            out: cf.Future = cf.Future()
            out.set_result(fn(*pickle.loads(payload)))
            return out

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    class Cluster:
        def task_pool(self):
            return Tasks()

    def run(executor, root):
        ctx = RunContext(out_dir=str(root), cache_dir=str(root), executor=executor)
        return cached_shard_loop(
            ctx,
            pool(),
            ShardCache(str(root), "test", {"v": 1}),
            ("s",),
            source_of=lambda part, e: {"first": float(e[0, 0])},
            compute=lambda part, e: _square_sum(part, e, {}),
            desc="t",
            kind="image",
            task=_square_sum,
        )

    local = run(None, tmp_path / "local")
    remote = run(Cluster(), tmp_path / "remote")
    assert len(Tasks.sent) == 2 and all(len(p) < emb[:2].nbytes for p in Tasks.sent)  # no embeddings sent
    assert remote.computed == 2
    np.testing.assert_array_equal(remote.columns["s"], local.columns["s"])
    for name in ("a", "b"):
        ours = sorted((tmp_path / "remote").glob(f"test-*/{name}*.parquet"))
        theirs = sorted((tmp_path / "local").glob(f"test-*/{name}*.parquet"))
        assert ours and [pq.read_table(p) for p in ours] == [pq.read_table(p) for p in theirs]


def test_a_step_whose_shards_are_all_cached_says_cached_instead_of_drawing_a_bar(tmp_path):
    """A cached rerun used to draw "assign clusters: 1000/1000" filling at once; the bar now
    opens at the first shard to compute (counting the cached rows before it), and a step
    with nothing to compute logs one "cached" line."""

    class Bar:
        def __init__(self, total):
            self.total, self.n = total, 0

        def update(self, n):
            self.n += n

        def close(self):
            pass

    bars, lines = [], []

    def progress(total=None, desc="", unit="samples"):
        bars.append(Bar(total))
        return bars[-1]

    emb = np.arange(10, dtype=np.float32).reshape(5, 2)
    ctx = RunContext(out_dir=str(tmp_path), cache_dir=str(tmp_path), progress=progress, log=lines.append)
    cache = ShardCache(str(tmp_path), "test", {"v": 1})

    def run(embeddings):
        return cached_shard_loop(
            ctx,
            _pool(embeddings),
            cache,
            ("s",),
            source_of=lambda part, e: {"sum": float(e.sum())},
            compute=lambda part, e: {"s": e.sum(axis=1)},
            desc="assign clusters",
            kind="image",
        )

    run(emb)
    assert len(bars) == 1 and bars[0].n == 5 and lines == []
    run(emb)
    assert len(bars) == 1 and lines == ["assign clusters: cached (2 shards)"]
    changed = emb.copy()
    changed[4] += 1
    run(changed)  # shard a cached, shard b computed: one bar, from 3 of 5 to 5 of 5
    assert len(bars) == 2 and bars[1].n == 5 and bars[1].total == 5 and len(lines) == 1


class _Counted:
    """A scorer of the embeddings' row sums that counts its setups in this process."""

    setups = 0


def _counting_scorer():
    from filtering.scorers.base import InputInfo, Scorer, ScorerParams

    class RowSum(Scorer):
        kind = "row_sum_test"

        def provides(self):
            return ("row_sum",)

        def needs(self):
            from filtering.scorers.base import Needs

            return Needs(embedding=True)

        def setup(self):
            _Counted.setups += 1

        def score(self, batch):
            return {"row_sum": batch.embeddings.sum(axis=1)}

    return RowSum(ScorerParams(), InputInfo("webdataset"))


def test_a_task_workers_copies_of_a_scorer_stage_set_it_up_once(tmp_path, monkeypatch):
    """On the shard plan every shard's task brings a fresh (pickled) copy of the stage; the
    process sets the scorer up once (``set_up``), whereas each copy would load it again."""
    import copy

    from filtering.stages import scorer_stage
    from filtering.stages.scorer_stage import ScorerStage

    monkeypatch.setattr(scorer_stage, "_SET_UP", scorer_stage.OrderedDict())
    emb = np.arange(10, dtype=np.float32).reshape(5, 2)
    stage = ScorerStage(_counting_scorer(), str(tmp_path))
    assert stage.scope == "shard"
    _Counted.setups = 0
    for shard, (lo, hi) in enumerate(((0, 3), (3, 5))):  # two shards' one-shard pools, a fresh copy each
        pool = Pool(
            pa.table({"uid": [str(i) for i in range(hi - lo)]}),
            [ShardPart(f"{shard}.tar", str(shard), 0, hi - lo)],
            embedding_loader=lambda kind, part, lo=lo, hi=hi: emb[lo:hi],
            embedding_kinds=("image",),
            default_embedding="image",
        )
        copy.deepcopy(stage).run(RunContext(out_dir=str(tmp_path), cache_dir=str(tmp_path)), pool)
        np.testing.assert_array_equal(pool.column("row_sum"), emb[lo:hi].sum(axis=1))
    assert _Counted.setups == 1
