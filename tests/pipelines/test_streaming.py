"""The shard plan (pipelines/executors/streaming.py) on DataComp-format pools, against the
outputs recorded from the in-memory plan it replaced (tests/golden.py: subset.npy byte for
byte, the subset and dropped rows in order, the manifest's counts, thresholds and uid
report) and, for ``top_fraction``, DataComp's own arithmetic (tests/datacomp_pool.py)."""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import parse_config
from pipelines.runner import run
from tests.datacomp_pool import datacomp_clip_score_uids, make_datacomp_pool, set_nan_scores
from tests.golden import check_recorded

pytestmark = pytest.mark.slow  # runs the whole pipeline

B32, L14 = "clip_b32_similarity_score", "clip_l14_similarity_score"


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
    return make_datacomp_pool(tmp_path_factory.mktemp("dc") / "metadata", shards=4, rows=90)


@pytest.fixture(scope="module")
def nan_metadata(tmp_path_factory):
    root = make_datacomp_pool(tmp_path_factory.mktemp("dcnan") / "metadata", shards=3, rows=80, seed=3)
    set_nan_scores(root, L14, 0.2)
    set_nan_scores(root, B32, 0.5, seed=2)
    return root


def _run(metadata: Path, out, filters, clusters=None, scorers=(), **output):
    raw = {
        "input": {"datacomp_metadata": str(metadata)},
        "scorers": list(scorers),
        "filters": filters,
        "output": {"dir": str(out), **output},
    }
    if clusters is not None:
        raw["clusters"] = clusters
    return run(parse_config(raw), progress=False, log=lambda _m: None)


def _table(folder: Path) -> pa.Table:
    parts = sorted(folder.glob("part-*.parquet"))
    assert parts
    return pa.concat_tables([pq.read_table(p) for p in parts]).replace_schema_metadata(None)


def assert_tables_equal(ta: pa.Table, tb: pa.Table) -> None:
    """Same rows in the same order; NaN equals NaN (``Table.equals`` says it does not)."""
    assert ta.num_rows == tb.num_rows
    for name in ta.column_names:
        a, b = ta.column(name), tb.column(name)
        assert a.null_count == b.null_count, name
        if pa.types.is_floating(a.type):
            np.testing.assert_array_equal(a.to_numpy(), b.to_numpy(), err_msg=name)
        else:
            assert a.to_pylist() == b.to_pylist(), name


def assert_recorded_outputs(metadata: Path, tmp_path: Path, filters, clusters=None, scorers=(), **output) -> dict:
    """The run into ``tmp_path/run``: its outputs equal the recorded ones (tests/golden.py:
    subset.npy, the subset and dropped rows in order, counts, thresholds, uid report, index),
    its parts follow the pool (each of one source shard, at most ``rows_per_part`` rows) and
    the manifest's file hashes are the bytes on disk."""
    b = tmp_path / "run"
    streamed = _run(metadata, b, filters, clusters, scorers, **output)
    assert streamed.manifest["execution"]["plan"] == "streaming"
    assert not (b / ".streaming").exists()
    for folder in ("subset", "dropped"):
        if (b / folder).exists():
            rows = [pq.ParquetFile(p).metadata.num_rows for p in sorted((b / folder).glob("part-*.parquet"))]
            assert all(rows) or rows == [0]  # no empty part unless the folder has no rows
            assert max(rows) <= streamed.manifest["config"]["output"]["rows_per_part"]
            for p in (b / folder).glob("part-*.parquet"):
                assert len(set(pq.read_table(p, columns=["source_shard"]).column(0).to_pylist())) <= 1, p
    files = streamed.manifest["files"]  # hashed while written: the bytes on disk
    written = [b / "subset.npy", *b.glob("subset/*"), *b.glob("dropped/*"), *b.glob("index/*")]
    assert set(files) == {str(p.relative_to(b)) for p in written}
    for rel, record in files.items():
        data = (b / rel).read_bytes()
        assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, rel
    check_recorded(b)
    return streamed.manifest


@pytest.mark.parametrize("fraction", [0.3, 0.5, 1.0, 0.0])
def test_top_fraction_with_ties(tmp_path, metadata, fraction):
    m = assert_recorded_outputs(metadata, tmp_path, [{"clip_score": {"top_fraction": fraction}}])
    assert m["counts"]["kept"] > int(m["counts"]["input"] * fraction) or fraction == 1.0  # ties kept
    if fraction < 1.0:  # DataComp's ``sorted_desc[int(N * f)]``, ties kept (f = 1 indexes past the end)
        want = datacomp_clip_score_uids(metadata, L14, fraction=fraction)
        assert np.load(tmp_path / "run" / "subset.npy").tolist() == want.tolist()


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.95])
@pytest.mark.parametrize("field", [B32, L14])
def test_top_fraction_with_nan_scores(tmp_path, nan_metadata, field, fraction):
    """NaN rows count in N and are never kept; past the scored rows the threshold is NaN (nothing kept)."""
    m = assert_recorded_outputs(nan_metadata, tmp_path, [{"clip_score": {"top_fraction": fraction, "field": field}}])
    reasons = m["counts"]["filters"][0]["reasons"]
    assert reasons["clip_score_missing"] > 0
    if field == B32 and fraction == 0.95:
        assert m["counts"]["kept"] == 0


def test_min_and_row_local_chain(tmp_path, metadata):
    filters = [
        {"caption": {"min_words": 3}},
        {"image_size": {"min_side": 200, "max_aspect_ratio": 3}},
        {"clip_score": {"min": 0.25, "field": B32}},
        {"clip_score": {"top_fraction": 0.4}},  # after other filters: N is still the whole pool
    ]
    m = assert_recorded_outputs(metadata, tmp_path, filters, rows_per_part=5)
    assert [f["name"] for f in m["counts"]["filters"]][0] == "caption"
    assert len(m["outputs"]["dropped"]) > 4  # each shard's rows in parts of at most rows_per_part


def test_any_not_composition(tmp_path, metadata):
    filters = [
        {"any": [{"caption": {"min_words": 4}}, {"not": {"image_size": {"min_side": 500}}}]},
        {"all": [{"clip_score": {"top_fraction": 0.5}}, {"score": {"column": B32, "min": 0.15, "max": 0.38}}]},
    ]
    assert_recorded_outputs(metadata, tmp_path, filters)


def test_dropped_rows_do_not_repeat_the_uid_as_key(tmp_path):
    """DataComp's own metadata has no key (the pool's key is the uid): the subset keeps the
    key column, the dropped rows of both plans leave it out."""
    root = make_datacomp_pool(tmp_path / "metadata", shards=2, rows=40, with_key=False)
    assert_recorded_outputs(root, tmp_path, [{"clip_score": {"top_fraction": 0.3}}])
    assert _table(tmp_path / "run" / "dropped").column_names == [
        "uid",
        "source_shard",
        "filter",
        "reason",
        "duplicate_of",
    ]
    subset = _table(tmp_path / "run" / "subset")
    assert subset.column("key").equals(subset.column("uid"))


def test_without_dropped_and_nothing_kept(tmp_path, metadata):
    assert_recorded_outputs(metadata, tmp_path, [{"clip_score": {"min": 5.0}}], dropped=False)


@pytest.fixture(scope="module")
def repeat_metadata(tmp_path_factory):
    """Whole rows repeated (uid, sha256, scores): one sample three times (twice in shard 0,
    once in shard 2), another in shards 1 and 2, a third twice in shard 1."""
    root = make_datacomp_pool(tmp_path_factory.mktemp("dcrep") / "metadata", shards=3, rows=40, seed=9)
    paths = sorted(root.glob("*.parquet"))
    tables = [pq.read_table(p) for p in paths]
    copies = [((0, 3), [(0, 17), (2, 5)]), ((1, 8), [(2, 30)]), ((1, 2), [(1, 21)])]
    for (s0, r0), targets in copies:
        row = tables[s0].slice(r0, 1)
        for s1, r1 in targets:
            t = tables[s1]
            tables[s1] = pa.concat_tables([t.slice(0, r1), row, t.slice(r1 + 1)])
    for p, t in zip(paths, tables, strict=True):
        pq.write_table(t, p)
    return root


REPEAT_FILTERS = [{"clip_score": {"top_fraction": 0.8}}, {"dedup": {"method": "exact"}}]


@pytest.mark.parametrize("policy", ["report", "keep_first"])
def test_repeated_uids_on_the_shard_plan(tmp_path, repeat_metadata, policy):
    """Repeats across shards and within one, reported from the uid phase itself (no second
    plan): the recorded record, funnel and outputs (the in-memory plan's); ``keep_first``
    drops the later copies before the dedup picks its survivors."""
    b = tmp_path / "run"
    raw = {
        "input": {"datacomp_metadata": str(repeat_metadata), "uid": {"duplicates": policy}},
        "filters": REPEAT_FILTERS,
        "output": {"dir": str(b)},
    }
    streamed_log: list[str] = []
    streamed = run(parse_config(raw), progress=False, log=streamed_log.append)
    assert streamed.manifest["execution"]["plan"] == "streaming"
    check_recorded(b)
    dup = streamed.manifest["uids"]["duplicates"]
    assert (dup["rows"], dup["uids"], dup["policy"]) == (4, 3, policy)
    assert [e["count"] for e in dup["examples"]] == [3, 2, 2]
    warning = [m for m in streamed_log if "occur on more than one sample" in m]
    assert len(warning) == 1 and warning[0].startswith(
        "warning: 3 uid(s) occur on more than one sample (4 extra copies"
    )
    funnel = streamed.manifest["counts"]["filters"]
    if policy == "keep_first":
        assert funnel[0]["name"] == "uid_duplicates" and funnel[0]["reasons"] == {"duplicate_uid": 4}
    else:
        assert [f["name"] for f in funnel] == ["clip_score", "dedup"]
        dropped = _table(b / "dropped").to_pylist()
        assert any(r["duplicate_of"] == r["uid"] for r in dropped)  # a copy the dedup dropped, as in memory


def test_repeated_uids_error_on_the_shard_plan(tmp_path, repeat_metadata):
    """``error`` stops the run with one line, before any row is filtered, nothing written."""
    from filtering.errors import PoolsiftError

    raw = {
        "input": {"datacomp_metadata": str(repeat_metadata), "uid": {"duplicates": "error"}},
        "filters": REPEAT_FILTERS,
        "output": {"dir": str(tmp_path / "run")},
    }
    with pytest.raises(PoolsiftError, match="input.uid.duplicates: 3 uid") as e:
        run(parse_config(raw), progress=False, log=lambda _m: None)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run" / "subset.npy").exists()
    assert not (tmp_path / "run" / ".streaming").exists()


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    """30 shards of 10 rows; one sample repeated in shards 5 and 29."""
    root = make_datacomp_pool(tmp_path_factory.mktemp("dctiny") / "metadata", shards=30, rows=10, seed=4)
    paths = sorted(root.glob("*.parquet"))
    row = pq.read_table(paths[0]).slice(0, 1)
    for s1, r1 in ((5, 2), (29, 1)):
        t = pq.read_table(paths[s1])
        pq.write_table(pa.concat_tables([t.slice(0, r1), row, t.slice(r1 + 1)]), paths[s1])
    return root


def test_uid_ranges_over_many_tiny_shards(tmp_path, tiny_shards, monkeypatch):
    """Many shards, many uid ranges: the recorded outputs (the in-memory plan's), and no
    shard's result carries a per-range array (the driver holds O(ranges) plus O(1) per
    shard; the counts per range stay in each shard's spill folder). ``keep_first``: the
    uid phase before the filters and the subset.npy phase both read the spilled counts.
    The tasks run in process here, so the results seen are the objects the driver keeps."""
    import contextlib

    from pipelines.executors import streaming, uid_phase

    class InProcess:
        workers = 1

        def map(self, fn, items):
            return map(fn, items)

    monkeypatch.setattr(streaming, "task_pool", lambda executor, workers: contextlib.nullcontext(InProcess()))
    groups = []
    bin_groups = streaming._bin_groups
    monkeypatch.setattr(streaming, "_bin_groups", lambda totals: groups.append(bin_groups(totals, 60)) or groups[-1])
    results = []
    filter_shard = streaming._filter
    monkeypatch.setattr(streaming, "_filter", lambda args: results.append(filter_shard(args)) or results[-1])

    b = tmp_path / "run"
    raw = {
        "input": {"datacomp_metadata": str(tiny_shards), "uid": {"duplicates": "keep_first"}},
        "filters": [{"clip_score": {"top_fraction": 0.5}}],
        "output": {"dir": str(b)},
    }
    streamed = run(parse_config(raw), progress=False, log=lambda _m: None)
    assert streamed.manifest["execution"]["plan"] == "streaming"
    check_recorded(b)
    assert streamed.manifest["uids"]["duplicates"]["rows"] == 2
    assert len(results) == 30 and len(groups[-1]) >= 3  # several ranges, each over every shard

    def arrays(value):
        if isinstance(value, np.ndarray):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from arrays(v)
        elif isinstance(value, list | tuple):
            for v in value:
                yield from arrays(v)

    assert not any(x.size >= 1 << uid_phase.FINE_BITS for r in results for x in arrays(r))
    assert all("funnel" not in r and "failures" not in r for r in results)  # summed as they came


@pytest.mark.parametrize(
    "filters",
    [
        [{"score": {"column": B32, "top_fraction": 0.3}}],
        # an integer column is ranked as float64; two reductions over one column, one negated
        [{"not": {"score": {"column": "original_width", "top_fraction": 0.2}}}, {"clip_score": {"top_fraction": 0.5}}],
        [{"clip_score": {"top_fraction": 0.6, "field": B32}}, {"score": {"column": B32, "top_fraction": 0.4}}],
    ],
    ids=["score", "integer-column-under-not", "same-column-twice"],
)
def test_score_top_fraction_streams(tmp_path, nan_metadata, filters):
    """``score``'s top_fraction declares the same reduction as ``clip_score``'s (``TopFraction``)."""
    m = assert_recorded_outputs(nan_metadata, tmp_path, filters)
    assert "scan" in m["execution"]["seconds"]


def test_top_fraction_refined_bin_by_bin(tmp_path, nan_metadata, monkeypatch):
    """The threshold's bin narrowed by further passes over the shards (forced: at most 2 scores gathered)."""
    from filtering.filters import top_fraction

    monkeypatch.setattr(top_fraction, "GATHER_LIMIT", 2)
    assert_recorded_outputs(nan_metadata, tmp_path, [{"clip_score": {"top_fraction": 0.4}}])


# ---------------------------------------------------------------- image clusters


@pytest.fixture(scope="module")
def cluster_files(tmp_path_factory):
    """Centroids and an ImageNet-like reference set for the pool's 24-d ``l14_img``."""
    root = tmp_path_factory.mktemp("clusters")
    rng = np.random.default_rng(5)
    centroids = rng.standard_normal((12, 24)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    np.save(root / "centroids.npy", centroids)
    np.save(root / "reference.npy", rng.standard_normal((4, 24)).astype(np.float32))
    return root


IMAGE_BASED = [{"image_clusters": {}}]
IMAGE_BASED_CLIP = [{"clip_score": {"top_fraction": 0.3}}, {"image_clusters": {}}]


@pytest.mark.parametrize("filters", [IMAGE_BASED, IMAGE_BASED_CLIP], ids=["image_based", "image_based_clip_score"])
@pytest.mark.parametrize("centroids", ["file", "trained"])
def test_image_clusters(tmp_path, metadata, cluster_files, filters, centroids):
    """DataComp's image_based and image_based x clip_score baselines: targets in the driver,
    assignment in the workers, computing everything (a fresh cache): the recorded outputs
    and the stage record (centroids trained or loaded, targets, shard counts)."""
    clusters = {"reference": str(cluster_files / "reference.npy"), "embedding": "l14_img"}
    if centroids == "file":
        clusters["centroids"] = str(cluster_files / "centroids.npy")
    else:
        clusters.update(num_clusters=6, niter=4, seed=2)
    m = assert_recorded_outputs(metadata, tmp_path, filters, clusters, rows_per_part=50)
    info = m["stages"]["clusters"]
    assert info["cache"] == {"targets": "computed", "shards_assigned": 4, "shards_cached": 0}
    assert info["centroids"] == ("loaded" if centroids == "file" else "trained")
    if filters == IMAGE_BASED:
        assert m["counts"]["kept"] == info["rows_in_target"]
    else:  # the clip_score threshold bites inside the target clusters
        assert m["counts"]["kept"] < info["rows_in_target"]
    assert 0 < m["counts"]["kept"] < m["counts"]["input"]
    assert m["counts"]["filters"][-1]["reasons"]["image_cluster_not_in_target"] > 0


def test_image_clusters_rerun_reads_the_caches(tmp_path, metadata, cluster_files):
    """Centroids, reference, targets and per-shard assignments written by one run are read
    by the next: a rerun assigns nothing; with the assignments removed, the workers assign
    and cache again; the subset is the recorded one each time."""
    clusters = {"reference": str(cluster_files / "reference.npy"), "num_clusters": 6, "niter": 4}
    out = tmp_path / "out"

    def rerun():
        result = _run(metadata, out, IMAGE_BASED_CLIP, clusters)
        check_recorded(out)
        return result.manifest["stages"]["clusters"]

    info = rerun()
    assert (info["centroids"], info["cache"]["shards_assigned"]) == ("trained", 4)
    info = rerun()
    assert (info["centroids"], info["reference"], info["cache"]) == (
        "cached",
        "cached",
        {"targets": "cached", "shards_assigned": 0, "shards_cached": 4},
    )
    (assignments,) = (out / "cache").glob("clusters-*")
    shutil.rmtree(assignments)
    info = rerun()  # the workers assign and cache
    assert info["cache"]["shards_assigned"] == 4


def test_image_clusters_on_the_shard_plan(tmp_path, metadata, cluster_files):
    clusters = {"reference": str(cluster_files / "reference.npy"), "centroids": str(cluster_files / "centroids.npy")}
    assert _run(metadata, tmp_path / "out", IMAGE_BASED, clusters).manifest["execution"]["plan"] == "streaming"


# ---------------------------------------------------------------- dedup (pipelines/executors/dedup_phase.py)


@pytest.fixture(scope="module")
def dup_metadata(tmp_path_factory):
    """A pool with exact copies (a few sha256 values shared within and across shards),
    near copies (phash with 1 to 3 bits flipped, chains) and tied scores (one decimal)."""
    root = make_datacomp_pool(tmp_path_factory.mktemp("dcdup") / "metadata", shards=4, rows=90, seed=5)
    rng = np.random.default_rng(7)
    bases = rng.integers(0, 2**63, 40, dtype=np.int64).astype(np.uint64)
    for path in sorted(root.glob("*.parquet")):
        t = pq.read_table(path)
        n = t.num_rows
        sha = np.asarray([f"{v:064x}" for v in rng.integers(0, 2**62, n)], object)
        copy = rng.random(n) < 0.4
        sha[copy] = [f"{v:064x}" for v in rng.integers(0, 12, int(copy.sum()))]
        phash = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64)
        near = rng.random(n) < 0.5
        flips = np.zeros(n, np.uint64)
        for _ in range(3):
            flips |= np.uint64(1) << rng.integers(0, 64, n).astype(np.uint64)
        phash[near] = bases[rng.integers(0, len(bases), n)][near] ^ np.where(rng.random(n) < 0.5, flips, 0)[near]
        score = np.round(t.column(L14).to_numpy(zero_copy_only=False), 1).astype(np.float32)
        t = t.set_column(t.schema.get_field_index("sha256"), "sha256", pa.array(sha, pa.string()))
        t = t.set_column(t.schema.get_field_index(L14), L14, pa.array(score, t.schema.field(L14).type))
        t = t.append_column("phash", pa.array(phash, pa.uint64()))
        pq.write_table(t, path)
    return root


def _recorded_dedup(metadata, tmp_path, filters):
    m = assert_recorded_outputs(metadata, tmp_path, filters)
    assert m["execution"]["seconds"]["dedup"] >= 0  # the dedup phase ran
    return m


@pytest.mark.parametrize(
    "filters",
    [
        [{"dedup": {"method": "exact"}}],
        [{"dedup": {"method": "exact", "with_caption": True, "keep": "smallest_uid"}}],
        [{"dedup": {"method": "perceptual", "max_distance": 6}}],
        [{"dedup": {"method": "exact"}}, {"dedup": {"method": "perceptual", "max_distance": 4}}],
        [{"caption": {"min_words": 3}}, {"dedup": {"method": "exact"}}, {"clip_score": {"min": 0.1}}],
        [{"clip_score": {"top_fraction": 0.5}}, {"dedup": {"method": "perceptual", "keep": "highest_clip_score"}}],
    ],
    ids=["exact", "exact-caption-smallest-uid", "perceptual", "exact-then-perceptual", "after-caption", "after-top"],
)
def test_dedup_streams(tmp_path, dup_metadata, filters):
    m = _recorded_dedup(dup_metadata, tmp_path, filters)
    dropped = sum(f["dropped"] for f in m["counts"]["filters"] if f["name"].startswith("dedup"))
    assert dropped > 0  # the pool has copies: the step decided something


def test_a_filters_scorer_before_a_dedup_is_recorded_as_in_memory(tmp_path, dup_metadata):
    """``language``'s ``language_id`` first runs in the dedup's alive-at pass (which computes
    every shard) and the filter pass reads its cache: the manifest's scorer record counts
    each shard once, as computed, as the in-memory run's did."""
    filters = [{"language": {"languages": ["en"]}}, {"dedup": {"method": "exact"}}]
    m = assert_recorded_outputs(dup_metadata, tmp_path, filters)
    [record] = m["stages"]["scorers"].values()
    assert record["cache"]["shards_scored"] == len(list(dup_metadata.glob("*.parquet")))
    assert record["cache"]["shards_cached"] == 0


def test_dedup_ties_keep_the_smallest_uid(tmp_path, dup_metadata):
    """Scores of one decimal tie: among equal scores the survivor is the smallest uid."""
    _recorded_dedup(dup_metadata, tmp_path, [{"dedup": {"method": "exact"}}])
    pool = pa.concat_tables([pq.read_table(p, columns=["uid", L14]) for p in sorted(dup_metadata.glob("*.parquet"))])
    score = dict(zip(pool.column("uid").to_pylist(), pool.column(L14).to_pylist(), strict=True))
    dups = [
        (r["uid"], r["duplicate_of"]) for r in _table(tmp_path / "run" / "dropped").to_pylist() if r["duplicate_of"]
    ]
    ties = [(u, d) for u, d in dups if score[d] == score[u]]
    assert ties  # the fixture has tied copies
    assert all(d < u for u, d in ties)
    assert all(score[d] >= score[u] for u, d in dups)


@pytest.mark.parametrize(
    "filters",
    [
        [{"any": [{"dedup": {"method": "exact"}}, {"caption": {"min_words": 3}}]}],
        [{"caption": {"min_words": 2}}, {"not": {"dedup": {"method": "perceptual", "max_distance": 4}}}],
        # in an all, after a sibling: survivors among the rows the sibling kept; then a second
        # dedup sharing the first's search, in an any beside a row-local filter
        [
            {
                "any": [
                    {"all": [{"clip_score": {"min": 0.1}}, {"dedup": {"method": "exact"}}]},
                    {"not": {"caption": {"min_words": 4}}},
                ]
            },
            {
                "not": {
                    "any": [
                        {"dedup": {"method": "exact", "keep": "smallest_uid"}},
                        {"clip_score": {"top_fraction": 0.4}},
                    ]
                }
            },
        ],
    ],
    ids=["any", "not", "nested"],
)
def test_dedup_inside_any_and_not_streams(tmp_path, dup_metadata, filters):
    """A dedup under any/not picks its survivors among the rows that reach it, as
    ``apply_filters`` evaluates the tree (``filtering/filters/compose.py``)."""
    m = _recorded_dedup(dup_metadata, tmp_path, filters)
    assert all(f["dropped"] for f in m["counts"]["filters"])  # every entry decided something


def test_upper_case_and_malformed_uids(tmp_path, dup_metadata):
    """A uid is its 128-bit number: upper-case hex is ordered and written lower-case by the
    dedup; a uid that is not 32 hex digits stops the run with one line naming the shard."""
    from filtering.errors import PoolsiftError

    root = tmp_path / "metadata"
    shutil.copytree(dup_metadata, root)
    path = sorted(root.glob("*.parquet"))[1]
    t = pq.read_table(path)
    uids = t.column("uid").to_pylist()
    uids[::3] = [u.upper() for u in uids[::3]]
    pq.write_table(t.set_column(t.column_names.index("uid"), "uid", pa.array(uids, pa.string())), path)
    m = _recorded_dedup(root, tmp_path, [{"dedup": {"method": "exact"}}])
    assert m["counts"]["filters"][0]["dropped"] > 0
    uids[4] = "zz" + uids[4][2:]
    pq.write_table(t.set_column(t.column_names.index("uid"), "uid", pa.array(uids, pa.string())), path)
    with pytest.raises(PoolsiftError, match="is not 32 hex digits") as e:
        _run(root, tmp_path / "bad", [{"clip_score": {"min": 0.1}}])
    assert "00000001.parquet is not 32 hex digits" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_forked_and_spawned_workers_write_the_same(tmp_path, metadata, monkeypatch, method):
    """The local task pool forks when the driver is metadata-only (filtering/tasks.py,
    ``start_method``) and spawns otherwise: either way the outputs are the recorded ones."""
    import filtering.tasks as tasks

    monkeypatch.setattr(tasks, "start_method", lambda: method)
    m = assert_recorded_outputs(
        metadata, tmp_path, [{"caption": {"min_words": 2}}, {"clip_score": {"top_fraction": 0.4}}]
    )
    assert m["counts"]["kept"] > 0


def test_parts_are_flushed_to_disk_before_the_manifest_names_them(tmp_path, metadata, monkeypatch):
    """The workers write parts without waiting on the disk; the switch (writers/commit.py)
    flushes every file of the staged result (parts, subset.npy, the manifest) at once
    before it renames anything into place."""
    import filtering.writers.commit as commit
    from filtering.writers.commit import fsync_files

    flushed: list[str] = []

    def recording(paths):
        assert not (tmp_path / "run" / "manifest.json").exists()
        flushed.extend(paths)
        fsync_files(paths)

    monkeypatch.setattr(commit, "fsync_files", recording)
    out = tmp_path / "run"
    _run(metadata, out, [{"clip_score": {"top_fraction": 0.5}}])
    parts = [p for p in flushed if p.endswith(".parquet")]
    written = [*out.glob("subset/*.parquet"), *out.glob("dropped/*.parquet")]
    assert len(parts) == len(written) == 8  # 4 shards, a subset and a dropped part each
    assert any(p.endswith("manifest.json") for p in flushed)
    assert any(p.endswith("subset.npy") for p in flushed)


class _InProcessTasks:
    """The plan's task pool run in this process: a ``memory://`` folder is one process's."""

    workers = 2

    def map(self, fn, args):
        return [fn(a) for a in args]


def test_remote_output_streams(tmp_path, metadata, monkeypatch):
    """An fsspec output folder on the shard plan: the workers write parts into it, the
    driver moves them into place and uploads subset.npy; the same files as a local
    output's (whose outputs are the recorded ones), and no earlier run's part left beside
    the manifest."""
    import contextlib

    import fsspec

    import pipelines.executors.streaming as streaming

    monkeypatch.setattr(streaming, "task_pool", lambda *_a: contextlib.nullcontext(_InProcessTasks()))
    fs = fsspec.filesystem("memory")
    root = f"/poolsift-{tmp_path.name}"
    out = f"memory://{root}/out"
    filters = [{"caption": {"min_words": 2}}, {"clip_score": {"top_fraction": 0.3}}]
    try:
        _run(metadata, out, [{"clip_score": {"top_fraction": 0.9}}], rows_per_part=10)  # more parts
        streamed = _run(metadata, out, filters, rows_per_part=25)
        assert streamed.manifest["execution"]["plan"] == "streaming"

        def files(d: str) -> dict[str, bytes]:
            return {p[len(d) + 1 :]: fs.cat(p) for p in fs.find(d) if "/cache/" not in p}

        ours = files(f"{root}/out")
        assert set(ours) == {*streamed.manifest["files"], "manifest.json"}  # nothing stale, no spill

        local = _run(metadata, tmp_path / "local", filters, rows_per_part=25)
        check_recorded(tmp_path / "local")
        for key in ("counts", "thresholds"):
            assert streamed.manifest[key] == local.manifest[key], key
        assert set(streamed.manifest["files"]) == set(local.manifest["files"])  # the parts' metadata name the folder
        for rel in [r for r in local.manifest["files"] if not r.endswith(".parquet")]:  # subset.npy, the index
            assert ours[rel] == (tmp_path / "local" / rel).read_bytes(), rel
        for folder in ("subset", "dropped"):
            remote = pa.concat_tables(
                pq.read_table(io.BytesIO(ours[rel])) for rel in sorted(ours) if rel.startswith(f"{folder}/")
            )
            assert remote.replace_schema_metadata(None).equals(_table(tmp_path / "local" / folder)), folder
        assert local.manifest["counts"] == streamed.manifest["counts"]

        _run(metadata, out, filters, rows_per_part=25, dropped=False)
        assert not fs.exists(f"{root}/out/dropped") or not fs.find(f"{root}/out/dropped")
    finally:
        fs.rm(root, recursive=True)
