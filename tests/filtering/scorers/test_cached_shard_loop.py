"""cached_shard_loop: the one per-shard cached loop of scorers, cluster assignment and
decontamination distances."""

import numpy as np
import pyarrow as pa

from filtering.cache import ShardCache
from filtering.pool import Pool, ShardPart
from filtering.scorers.base import cached_shard_loop
from filtering.stages.base import RunContext


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
    ctx = RunContext(config=None, out_dir=str(tmp_path), cache_dir=str(tmp_path))
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
