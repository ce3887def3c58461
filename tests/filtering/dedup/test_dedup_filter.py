"""dedup filter: exact and perceptual on a synthetic pool, survivor policies, shard-order invariance.

Every decision here is the shard plan's: its dedup phase (``pipelines/executors/dedup_phase.py``:
search, alive rows, ``min_similarity``, survivors) over the pool's parts as shards, then its
filter pass with the survivors fixed (``tests/shard_plan.py: run_dedup_phase``)."""

import tempfile

import numpy as np
import pyarrow as pa
import pytest

from filtering.errors import ConfigError
from filtering.pool import Pool, ShardPart
from filtering.registry import parse_filters
from tests.filtering.dedup.test_groups import survivor_oracle
from tests.shard_plan import run_dedup_phase


def make_pool(sha, phash, scores, emb=None, failed=None, uids=None, shards=1) -> Pool:
    n = len(sha)
    uids = uids or [f"{i:032x}" for i in range(n)]
    failed = failed if failed is not None else [False] * n
    table = pa.table(
        {
            "uid": uids,
            "caption": [f"caption {i % 3}" for i in range(n)],
            "sha256": sha,
            "phash": pa.array(phash, pa.uint64()),
            "clip_score": pa.array(scores, pa.float32()),
            "error": pa.array(["corrupt_image: x" if f else None for f in failed], pa.string()),
        }
    )
    emb = emb if emb is not None else np.zeros((n, 4), np.float16)
    cuts = np.linspace(0, n, shards + 1).astype(int)
    return Pool(
        table=table,
        parts=[ShardPart(f"s{k}", f"s{k}", int(cuts[k]), int(cuts[k + 1])) for k in range(shards)],
        embedding_loader=lambda kind, part: emb[part.start : part.stop],
        embedding_kinds=("image",),
        default_embedding="image",
    )


def apply_searched(nodes, pool):
    """The shard plan's decision for these filters on ``pool`` (its parts as shards)."""
    with tempfile.TemporaryDirectory() as work:
        return run_dedup_phase(nodes, pool, work)[0]


def run(pool, **params):
    return apply_searched(parse_filters([{"dedup": params}]), pool)


def test_exact_keeps_highest_clip_score_and_records_survivor():
    pool = make_pool(["a", "b", "a", "a"], [1, 2, 3, 4], [0.2, 0.5, 0.9, 0.9])
    out = run(pool, method="exact")
    # rows 2 and 3 tie on score: the smaller uid (row 2) survives
    np.testing.assert_array_equal(out.keep, [False, True, True, False])
    assert out.duplicate_of.tolist() == [f"{2:032x}", None, None, f"{2:032x}"]
    assert out.funnel[0]["reasons"] == {"duplicate_exact": 2}


def test_exact_with_caption_and_smallest_uid():
    pool = make_pool(["a", "a", "a", "a"], [1, 2, 3, 4], [0.9, 0.1, 0.1, 0.1])
    out = run(pool, method="exact", with_caption=True, keep="smallest_uid")
    # captions cycle 0,1,2,0: only rows 0 and 3 share hash and caption
    np.testing.assert_array_equal(out.keep, [True, True, True, False])
    assert out.duplicate_of[3] == f"{0:032x}"


def test_perceptual_within_max_distance():
    base = 0x0F0F_F0F0_1234_5678
    hashes = [base, base ^ 0b111, base ^ 0xFF, 0xFFFF_0000_FFFF_0000, (1 << 64) - 1]
    pool = make_pool(list("abcde"), hashes, [0.1, 0.2, 0.3, 0.4, 0.5])
    out = run(pool, method="perceptual", max_distance=3)
    np.testing.assert_array_equal(out.keep, [False, True, True, True, True])  # distance 3: row 1 scores higher
    assert out.duplicate_of[0] == f"{1:032x}"
    out = run(pool, method="perceptual", max_distance=8)  # row 2 joins through row 0
    np.testing.assert_array_equal(out.keep, [False, False, True, True, True])


def test_only_rows_that_reach_the_filter_compete():
    # row 1 (best score) was dropped by clip_score first, so row 0 survives the dedup
    pool = make_pool(["a", "a", "a"], [1, 1, 1], [0.5, 0.1, 0.4])
    out = apply_searched(parse_filters([{"clip_score": {"min": 0.3}}, {"dedup": {"method": "exact"}}]), pool)
    np.testing.assert_array_equal(out.keep, [True, False, False])
    assert out.drop_reason.tolist() == [None, "clip_score_below_min", "duplicate_exact"]
    assert out.duplicate_of[2] == f"{0:032x}"


def test_failed_rows_do_not_take_part():
    pool = make_pool(["a", "a"], [1, 1], [0.1, 0.9], failed=[False, True])
    out = run(pool, method="exact")
    assert out.keep[0] and out.duplicate_of[0] is None


@pytest.mark.parametrize("method", ["exact", "perceptual"])
def test_same_result_whatever_the_row_order(method):
    rng = np.random.default_rng(1)
    n = 300
    sha = [f"h{v}" for v in rng.integers(0, 200, n)]
    hashes = rng.integers(0, 1 << 12, n, dtype=np.uint64)  # dense: many near pairs
    emb = rng.normal(size=(n, 8)).astype(np.float32)
    emb[n // 2 :] = emb[: n // 2] + 0.01 * rng.normal(size=(n - n // 2, 8))
    scores = rng.random(n).round(1)  # ties, broken by uid
    uids = [f"{v:032x}" for v in rng.permutation(10 * n)[:n]]
    params = {"method": method}
    perm = rng.permutation(n)

    def result(order, shards):
        pool = make_pool(
            [sha[i] for i in order],
            hashes[order].tolist(),
            scores[order],
            emb=emb[order].astype(np.float16),
            uids=[uids[i] for i in order],
            shards=shards,
        )
        out = run(pool, **params)
        return {u: (bool(k), d) for u, k, d in zip(pool.column("uid"), out.keep, out.duplicate_of, strict=True)}

    a, b = result(np.arange(n), 1), result(perm, 3)  # another row order, cut into other shards
    assert a == b
    assert sum(not k for k, _ in a.values()) > 10


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"method": "exact", "threshold": 0.9}, "threshold applies to method semantic, not exact"),
        ({"method": "semantic", "max_distance": 4}, "max_distance applies to method perceptual"),
        ({"method": "perceptual", "with_caption": True}, "with_caption applies to method exact"),
        ({"method": "fuzzy"}, "method"),
        ({"method": "exact", "keep": "largest"}, "keep"),
        ({"method": "semantic", "threshold": 1.5}, "threshold"),
        ({"method": "exact", "bogus": 1}, "bogus"),
    ],
)
def test_rejects_bad_params_naming_the_key(params, message):
    with pytest.raises(ConfigError, match=message):
        parse_filters([{"dedup": params}])


def test_requires_the_columns_it_reads():
    """The key columns (so a missing one is named at plan time), the uid and the keep score."""
    (node,) = parse_filters([{"dedup": {"method": "perceptual"}}])
    assert node.filter.requires() == {"uid", "phash", "clip_score"}
    (node,) = parse_filters([{"dedup": {"method": "exact", "keep": "smallest_uid"}}], input_kind="datacomp")
    assert node.filter.requires() == {"uid", "sha256"}
    (node,) = parse_filters([{"dedup": {"method": "semantic"}}])
    assert node.filter.requires() == {"uid", "clip_score"}


def test_perceptual_min_similarity_confirms_hash_pairs():
    base = 0x0F0F_F0F0_1234_5678
    emb = np.array([[1, 0, 0, 0], [0.99, 0.1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], np.float16)
    pool = make_pool(list("abcd"), [base, base ^ 1, base ^ 2, 7], [0.4, 0.3, 0.2, 0.1], emb=emb)
    out = run(pool, method="perceptual", max_distance=2)
    np.testing.assert_array_equal(out.keep, [True, False, False, True])
    out = run(pool, method="perceptual", max_distance=2, min_similarity=0.9)
    # row 2 shares the hash neighbourhood but not the content
    np.testing.assert_array_equal(out.keep, [True, False, True, True])
    assert out.duplicate_of[1] == f"{0:032x}"


def in_memory_decision(pool, alive, params):
    """The filter as it was before the search moved to its cached stage: exact_groups /
    near_pairs over the rows that reach it, in uid order, and the plain-Python survivor oracle
    (the reference)."""
    from filtering.dedup import groups
    from filtering.dedup.dedup_filter import hash_column
    from filtering.dedup.hamming import near_pairs

    uids_all = pool.column("uid")
    rows = np.flatnonzero(alive)
    rows = rows[np.argsort(np.asarray(uids_all[rows], dtype=str), kind="stable")]
    if params["method"] == "exact":
        keys = [pool.column("sha256")[rows]]
        labels = groups.exact_groups(keys)
        missing = np.asarray([k is None for k in keys[0]], dtype=bool)
        labels = np.where(missing, labels.max(initial=0) + 1 + np.arange(len(rows)), labels)
        _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
        first_of = first[inverse]
        linked = first_of != np.arange(len(rows))
        i, j = first_of[linked], np.flatnonzero(linked)
    else:
        hashes, null = hash_column(pool, "phash")
        ok = np.flatnonzero(~null[rows])
        i, j = near_pairs(hashes[rows[ok]], params["max_distance"])
        i, j = ok[i], ok[j]
    keep_policy = params.get("keep", "highest_clip_score")
    scores = pool.column("clip_score")[rows] if keep_policy == "highest_clip_score" else None
    best = survivor_oracle(len(rows), i, j, uids_all[rows], scores, keep_policy)
    keep = np.ones(pool.n, dtype=bool)
    dup = np.full(pool.n, None, dtype=object)
    for r, b in enumerate(best):
        if b != r:
            keep[rows[r]] = False
            dup[rows[r]] = uids_all[rows[b]]
    return keep, dup


@pytest.mark.parametrize(
    "params",
    [
        {"method": "exact"},
        {"method": "exact", "keep": "smallest_uid"},
        {"method": "perceptual", "max_distance": 4},
        {"method": "perceptual", "max_distance": 6, "keep": "smallest_uid"},
    ],
)
def test_same_survivors_as_the_in_memory_search_with_ties_chains_and_earlier_drops(params):
    """Many copies, chains of near copies, tied and missing scores, rows an earlier filter
    dropped (a chain's middle link among them): the decision of the search over the whole
    pool, restricted, equals that of the in-memory search over the rows that reached it."""
    rng = np.random.default_rng(len(str(params)))
    n = 600
    seeds = rng.integers(0, 2**62, 60, dtype=np.int64).astype(np.uint64)
    phash = seeds[rng.integers(0, 60, n)]
    chain_step = np.uint64(0b1111)  # 4 bits per link: links within 4, ends further apart
    links = rng.random(n) < 0.4
    phash[links] ^= chain_step << (np.uint64(4) * rng.integers(0, 3, int(links.sum())).astype(np.uint64))
    sha = [f"sha{v}" for v in rng.integers(0, 150, n)]
    sha = [None if rng.random() < 0.03 else v for v in sha]
    scores = rng.choice([0.1, 0.2, 0.3, np.nan], n).astype(np.float32)  # ties everywhere
    uids = [f"{v:032x}" for v in rng.permutation(n)]  # uid order differs from row order
    pool = make_pool(sha, phash.tolist(), scores.tolist(), uids=uids, shards=3)
    gate = {"clip_score": {"min": 0.15}}  # drops the 0.1 rows (and NaN) before dedup
    out = apply_searched(parse_filters([gate, {"dedup": params}]), pool)
    alive = ~np.isnan(scores) & (scores >= 0.15)
    keep, dup = in_memory_decision(pool, alive, params)
    dropped_here = alive & ~keep
    assert dropped_here.sum() > 50
    assert np.array_equal(out.keep, alive & keep)
    assert list(out.duplicate_of[dropped_here]) == list(dup[dropped_here])


def test_search_workers_are_the_plan_pools_from_execution_workers(monkeypatch, tmp_path):
    """The dedup search runs on the plan's task pool (``streaming._plan_tasks``: local
    processes, ``execution.workers`` over ``POOLSIFT_WORKERS``), with the result of the
    in-process run; the manifest's stage info says how many workers searched."""
    from types import SimpleNamespace

    from pipelines.executors.streaming import _plan_tasks

    monkeypatch.setenv("POOLSIFT_WORKERS", "3")  # execution.workers wins over it
    sha = [f"s{i % 7}" for i in range(40)]
    phash = [(i % 5) * 0x1111 for i in range(40)]
    nodes = parse_filters([{"dedup": {"method": "exact"}}])
    expected = [None] * 7 + [f"{i % 7:032x}" for i in range(7, 40)]  # tied scores: the smallest uid survives
    for workers in (1, 2):
        cfg = SimpleNamespace(execution=SimpleNamespace(workers=workers))
        with _plan_tasks(cfg, SimpleNamespace(executor=None), [0, 1, 2, 3]) as tasks:
            out, ctx = run_dedup_phase(
                nodes, make_pool(sha, phash, [0.1] * 40, shards=4), str(tmp_path / f"w{workers}"), tasks
            )
        assert ctx.stage_info["dedup"]["dedup_label_exact"]["workers"] == workers
        assert out.duplicate_of.tolist() == expected


@pytest.mark.parametrize("method", ["exact", "perceptual"])
def test_no_row_reaching_the_filter_keeps_nothing_and_does_not_fail(method):
    """An earlier filter that drops every row (or an empty pool) leaves dedup nothing to group."""
    pool = make_pool(list("ab"), [1, 1], [0.1, 0.2], emb=np.ones((2, 4), np.float16))
    out = apply_searched(parse_filters([{"clip_score": {"min": 0.9}}, {"dedup": {"method": method}}]), pool)
    assert not out.keep.any() and list(out.drop_reason) == ["clip_score_below_min"] * 2
    empty = make_pool([], [], [])
    assert len(apply_searched(parse_filters([{"dedup": {"method": method}}]), empty).keep) == 0


def test_search_spills_under_the_plans_spill_folder_and_removes_them():
    """The search's spill files (one per map task) go under the plan's spill folder, which
    every task sees (``execution.spill_dir`` on a Ray cluster: ``streaming._remote_spill_root``),
    not to the driver's temporary folder; they are removed after, and the decision is the
    in-process one."""
    import os

    from tests.filtering.dedup.test_partitioned import InProcessTasks

    sha = [f"s{i % 7}" for i in range(40)]
    nodes = parse_filters([{"dedup": {"method": "exact"}}])
    with tempfile.TemporaryDirectory() as work:
        spill = os.path.join(work, "shared-spill")
        tasks = InProcessTasks(spill)
        out, _ = run_dedup_phase(nodes, make_pool(sha, [0] * 40, [0.1] * 40, shards=4), work, tasks, spill=spill)
        assert out.duplicate_of.tolist() == [None] * 7 + [f"{i % 7:032x}" for i in range(7, 40)]
        spills = {p for p in tasks.paths if "/dedup-spill-" in p}
        assert spills and all(p.startswith(os.path.join(spill, "dedup-spill-")) for p in spills)
        assert not [f for _, _, files in os.walk(spill) for f in files]
