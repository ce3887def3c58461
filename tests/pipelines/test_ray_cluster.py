"""The Ray executor on a simulated multi-node cluster (issue 16): two Ray nodes on this
machine (``ray.cluster_utils.Cluster``, one CPU each), one cluster and one connection to it
(one Ray job) for the module.

- The bundled sample scored on the cluster: outputs equal a local run's with the same
  filters (clip_score top_fraction, caption).
- A DataComp-metadata pool through the whole plan as Ray tasks (``RayExecutor.task_pool``):
  the streaming plan for clip_score top_fraction and image_clusters (DataComp's
  image_based), an exact dedup (its search, alive-at-dedup and filter phases), a
  semantic one (training sample, assignment, partitions of clusters) and a perceptual
  one with min_similarity (touched rows spilled, edges confirmed), a configured head
  scored in the scan's tasks under a ``score`` ``top_fraction``, the language_id scorer
  and semantic and perceptual decontamination's nearest items in each shard's filter
  task; subset.npy and every
  subset and dropped part byte for byte, the manifest's counts and thresholds equal to
  the local process pool's.
- Every shipped ``configs/sample*.yaml`` and DataComp's image_based ∩ clip_score baseline
  (``configs/image_based_intersect_clip_score.yaml`` on a generated pool), as shipped, on
  the cluster (``--executor ray``) and locally: the same outputs, and the manifest's
  ``execution.plan`` says which plan ran (the shard plan for each of them).
- ``dedup: {against: [...]}`` (exact, perceptual with min_similarity, semantic) against
  an earlier output: the same outputs on the cluster as locally.
"""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.manifest import json_default
from tests.conftest import write_config
from tests.datacomp_pool import make_datacomp_pool
from tests.filtering.io.test_remote import BUCKET, s3  # noqa: F401 (a fixture: S3 on loopback)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]  # starts a two-node Ray and runs the pipeline


def test_the_ray_modules_share_one_xdist_worker(request):
    """Under ``--dist loadgroup`` (``make test``) every test of xdist_group "ray" carries the
    group in its node id, which is what the controller groups by: otherwise the Ray modules
    run on both workers at once (two two-node clusters and a local Ray on two cores). pytest
    9.2 ignores the suffix pytest-xdist 3.8 sets (pytest-xdist#1386): the CI run on c8069fb
    ran this module on both workers; pyproject's dev extra pins pytest<9.2."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("checks an xdist worker under --dist loadgroup (make test)")
    group = [i for i in request.session.items if any(m.args == ("ray",) for m in i.iter_markers("xdist_group"))]
    assert request.node in group
    assert [i.nodeid for i in group if not i.nodeid.endswith("@ray")] == []


def _table(path):
    return pq.read_table(path).replace_schema_metadata(None)


@pytest.fixture(scope="module")
def cluster():
    """Two nodes of one CPU each, joined once for the module: each test's
    ``RayExecutor(address=...)`` finds Ray initialised and reuses the connection, so the
    tests run as one Ray job whose worker processes (poolsift imported) serve them all,
    instead of a job per test starting its own workers on both nodes."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from pipelines.executors.ray import RayExecutor

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    joined = RayExecutor(address=c.address)
    joined.connect()
    yield c
    joined.close()
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()


FILTERS = [{"clip_score": {"top_fraction": 0.3}}, {"caption": {"min_words": 2}}]


def test_two_node_cluster_matches_local(tmp_path, scored_sample, cluster):
    import ray

    from pipelines.config import load_config
    from pipelines.executors.ray import RayExecutor
    from pipelines.runner import run

    # the local reference: the sample's local scores (its cache), these filters
    reference = tmp_path / "local-run"
    reference.mkdir()
    shutil.copytree(scored_sample / "cache", reference / "cache")
    cfg = load_config(write_config(tmp_path / "local.yaml", output={"dir": str(reference)}, filters=FILTERS))
    local_result = run(cfg, progress=False, log=lambda _m: None)

    out = tmp_path / "cluster-run"
    cfg = load_config(write_config(tmp_path / "sample.yaml", output={"dir": str(out)}, filters=FILTERS))
    logs = []
    with RayExecutor(address=cluster.address) as executor:
        result = run(cfg, executor=executor, progress=False, log=logs.append)
        alive = [n for n in ray.nodes() if n["Alive"]]
        assert len(alive) == 2 and ray.cluster_resources()["CPU"] == 2
    assert any(m.startswith("ray: 4 shards") for m in logs), logs  # scored from scratch, on the cluster

    local = local_result.manifest
    assert result.manifest["counts"] == local["counts"]
    assert result.manifest["thresholds"] == local["thresholds"]
    assert 0 < local["counts"]["kept"] < local["counts"]["input"]
    assert (out / "subset.npy").read_bytes() == (reference / "subset.npy").read_bytes()
    for folder in ("subset", "dropped"):
        ours = sorted(p.name for p in (out / folder).glob("*.parquet"))
        assert ours and ours == sorted(p.name for p in (reference / folder).glob("*.parquet"))
        for name in ours:
            assert _table(out / folder / name).equals(_table(reference / folder / name)), f"{folder}/{name}"


# ---------------------------------------------------------------- the whole plan on Ray


@pytest.fixture(scope="module")
def datacomp(tmp_path_factory):
    """A DataComp pool whose sha256 and phash values repeat (dedup finds groups across shards),
    with centroids and a reference set for ``image_clusters`` on its 24-d ``l14_img``."""
    root = tmp_path_factory.mktemp("dc")
    metadata = make_datacomp_pool(root / "metadata", shards=4, rows=60)
    rng = np.random.default_rng(7)
    hashes = [f"{v:064x}" for v in rng.integers(0, 2**62, size=50)]
    for path in sorted(metadata.glob("*.parquet")):
        table = pq.read_table(path)
        dup = pa.array([hashes[k] for k in rng.integers(0, len(hashes), table.num_rows)], pa.string())
        table = table.set_column(table.schema.get_field_index("sha256"), "sha256", dup)
        phash = rng.integers(0, 2**63, 60, dtype=np.int64).astype(np.uint64)[rng.integers(0, 60, table.num_rows)]
        pq.write_table(table.append_column("phash", pa.array(phash, pa.uint64())), path)
    centroids = rng.standard_normal((8, 24)).astype(np.float32)
    np.save(root / "centroids.npy", centroids / np.linalg.norm(centroids, axis=1, keepdims=True))
    np.save(root / "reference.npy", rng.standard_normal((3, 24)).astype(np.float32))
    return root


class _Recording:
    """A RayExecutor whose task pools record which functions were sent to Ray."""

    def __init__(self, executor):
        self.executor = executor
        self.sent: list[str] = []

    def __getattr__(self, name):
        return getattr(self.executor, name)

    def task_pool(self):
        pool = self.executor.task_pool()
        submit, map_ = pool.submit, pool.map

        def record(fn):
            self.sent.append(fn.__name__)
            return fn

        pool.submit = lambda fn, *args: submit(record(fn), *args)
        pool.map = lambda fn, args: map_(record(fn), args)
        return pool


def _run_datacomp(datacomp, out, filters, executor=None, scorers=()):
    from pipelines.config import parse_config
    from pipelines.runner import run

    raw = {
        "input": {"datacomp_metadata": str(datacomp / "metadata")},
        "scorers": list(scorers),
        "filters": filters,
        "clusters": {"reference": str(datacomp / "reference.npy"), "centroids": str(datacomp / "centroids.npy")},
        "output": {"dir": str(out), "rows_per_part": 40},
    }
    return run(parse_config(raw), executor=executor, progress=False, log=lambda _m: None)


def _same_outputs(a, b) -> None:
    assert (a / "subset.npy").read_bytes() == (b / "subset.npy").read_bytes()
    for folder in ("subset", "dropped"):  # the same parts, byte for byte (provenance included)
        names = sorted(p.name for p in (a / folder).glob("part-*.parquet"))
        assert names and names == sorted(p.name for p in (b / folder).glob("part-*.parquet")), folder
        for name in names:
            assert (a / folder / name).read_bytes() == (b / folder / name).read_bytes(), f"{folder}/{name}"


@pytest.mark.parametrize(
    "filters, sent",
    [
        ([{"clip_score": {"top_fraction": 0.3}}], {"_scan", "_gather", "_filter", "check_range"}),
        (
            [{"clip_score": {"top_fraction": 0.3}}, {"image_clusters": {}}],
            {"_scan", "_target_chunk", "_filter"},
        ),
        # the streaming plan's dedup phase (pipelines/executors/dedup_phase.py)
        ([{"dedup": {"method": "exact"}}], {"_emit", "_reduce_task", "_alive_at", "_filter"}),
        # semantic: the training sample, the assignment and each partition of clusters as tasks
        (
            [{"dedup": {"method": "semantic", "embedding": "l14_img", "num_clusters": 3, "threshold": 0.5}}],
            {"_alive_at", "_rows_of", "_assign_spill", "_compare_partition", "_filter"},
        ),
        # min_similarity: the rows the edges touch spilled per shard, chunks of edges confirmed
        (
            [{"dedup": {"method": "perceptual", "min_similarity": 0.0, "embedding": "l14_img"}}],
            {"_emit", "_alive_at", "_normalized_spill", "_close_edges", "_filter"},
        ),
        # each shard's language_id scorer (the filter's own) in its _filter task, set up once per Ray worker
        ([{"language": {"languages": ["en"]}}, {"clip_score": {"top_fraction": 0.5}}], {"_filter"}),
        # the streaming plan: the reference set in the driver, each shard's nearest items in its _filter task
        (
            [
                {"decontaminate": {"reference": "@DC@/reference.npy", "method": "semantic", "threshold": 0.3}},
                {"clip_score": {"top_fraction": 0.5}},
            ],
            {"_scan", "_filter"},
        ),
    ],
    ids=[
        "clip_score_top_fraction",
        "image_clusters",
        "dedup_exact",
        "dedup_semantic",
        "dedup_min_similarity",
        "language",
        "decontaminate_semantic",
    ],
)
def test_whole_plan_on_two_nodes_matches_local(tmp_path, datacomp, cluster, filters, sent):
    _matches_local(tmp_path, datacomp, cluster, filters, sent)


def test_configured_head_and_its_top_fraction_on_two_nodes_match_local(tmp_path, datacomp, cluster):
    """The streaming plan: a configured head (an MLP over l14_img) scores each shard in its
    ``_scan`` task, set up once per Ray worker, and the ``_filter`` task reads the shard's
    cache; ``score`` ``top_fraction`` over its column."""
    from safetensors.numpy import save_file

    from tests.datacomp_pool import random_state_dict

    root = tmp_path / "dc768"  # l14_img of DataComp's width (the planner checks the head against it)
    make_datacomp_pool(root / "metadata", shards=4, rows=30, dims=(16, 768))
    for name in ("reference.npy", "centroids.npy"):  # named by the config's clusters section
        shutil.copy(datacomp / name, root / name)
    save_file(random_state_dict({"0": (8, 768), "1": (1, 8)}, seed=7), str(root / "head.safetensors"))
    head = {
        "embedding_head": {"name": "q", "preset": "mlp", "weights": "@DC@/head.safetensors", "embedding": "l14_img"}
    }
    filters = [{"score": {"column": "q_score", "top_fraction": 0.5}}]
    _matches_local(tmp_path, root, cluster, filters, {"_scan", "_filter"}, scorers=[head])
    (ours,) = (tmp_path / "ray" / "cache").glob("scorer-q-*")  # cached as the local run caches it
    names = sorted(p.name for p in ours.glob("*.parquet"))
    assert len(names) == 4
    for name in names:
        assert pq.read_table(ours / name).equals(pq.read_table(tmp_path / "local" / "cache" / ours.name / name))
    for run in ("local", "ray"):
        record = json.loads((tmp_path / run / "manifest.json").read_text())["stages"]["scorers"]["q"]
        assert (record["cache"]["shards_scored"], record["cache"]["shards_cached"]) == (4, 0)


def test_dedup_against_an_earlier_output_on_two_nodes_matches_local(tmp_path, datacomp, cluster):
    """``dedup: {against: [...]}`` on Ray: an exact search against an earlier output (the
    pool side emitted and each partition joined as tasks), a perceptual one with
    ``min_similarity`` (the matches confirmed as tasks), then a semantic one (the
    reference's index files assigned and each partition of clusters compared as tasks);
    the same outputs as the local process pool's."""
    reference = tmp_path / "earlier"
    _run_datacomp(datacomp, reference, [{"clip_score": {"top_fraction": 0.3}}])
    semantic = {"method": "semantic", "embedding": "l14_img", "num_clusters": 3, "threshold": 0.6}
    perceptual = {"method": "perceptual", "embedding": "l14_img", "min_similarity": 0.0}
    filters = [
        {"dedup": {"method": "exact", "against": [str(reference)]}},
        {"dedup": {**perceptual, "against": [str(reference)]}},
        {"dedup": {**semantic, "against": [str(reference)]}},
    ]
    sent = {"_emit_against", "_reduce_exact_task", "_reduce_blocks_task", "_spill_reference_rows", "_close_edges"}
    sent |= {"_spill_reference", "_semantic_partition", "_filter"}
    _matches_local(tmp_path, datacomp, cluster, filters, sent)
    counts = json.loads((tmp_path / "ray" / "manifest.json").read_text())["counts"]["filters"]
    assert all(step["reasons"].get("duplicate_of_reference") for step in counts), counts


def _matches_local(tmp_path, datacomp, cluster, filters, sent, scorers=()) -> None:
    from pipelines.executors.ray import RayExecutor

    filters, scorers = json.loads(json.dumps([filters, scorers]).replace("@DC@", str(datacomp)))
    # Both runs write to the same folder (the config, output.dir included, goes into every
    # part's provenance); the local run's outputs are moved aside, its cache dropped.
    out = tmp_path / "ray"
    local = _run_datacomp(datacomp, out, filters, scorers=scorers)
    shutil.copytree(out, tmp_path / "local")
    shutil.rmtree(out)
    executor = _Recording(RayExecutor(address=cluster.address))
    try:
        on_ray = _run_datacomp(datacomp, out, filters, executor, scorers)
    finally:
        executor.close()
    assert sent <= set(executor.sent), executor.sent  # the phases ran as Ray tasks
    streamed = "_filter" in sent
    assert on_ray.manifest["execution"]["plan"] == local.manifest["execution"]["plan"] == "streaming"
    if streamed:
        assert on_ray.manifest["execution"]["executor"] == "ray"
        assert local.manifest["execution"]["executor"] == "local"
        assert not (tmp_path / "ray" / ".streaming").exists()
    mine, theirs = on_ray.manifest, local.manifest
    assert mine["counts"] == theirs["counts"]
    assert json.dumps(mine["thresholds"], default=json_default) == json.dumps(
        theirs["thresholds"], default=json_default
    )
    assert 0 < theirs["counts"]["kept"] < theirs["counts"]["input"]
    _same_outputs(tmp_path / "local", tmp_path / "ray")
    if "_target_chunk" in sent:  # the target set Ray's tasks found is the local one
        (ours,) = (out / "cache").glob("centroids-*/targets-*.npy")
        theirs = tmp_path / "local" / "cache" / ours.parent.name / ours.name
        assert np.load(ours).tolist() == np.load(theirs).tolist() and len(np.load(ours))


def test_perceptual_decontamination_on_two_nodes_matches_local(tmp_path, scored_sample, cluster):
    """Each shard's nearest reference hashes are found in its ``_filter`` Ray task: the
    distances, matches and outputs are the local run's."""
    from pipelines.config import load_config
    from pipelines.executors.ray import RayExecutor
    from pipelines.runner import run

    pieces = [pq.read_table(p) for p in sorted((scored_sample / "cache").glob("scorer-*/*.parquet"))]
    pool_hashes = np.concatenate(
        [t.column("phash").drop_null().to_numpy() for t in pieces if "phash" in t.column_names]
    )
    rng = np.random.default_rng(3)
    reference = np.r_[pool_hashes[:6].astype(np.uint64), rng.integers(0, 2**63, 20, dtype=np.int64).astype(np.uint64)]
    np.save(tmp_path / "eval_hashes.npy", reference)
    filters = [
        {"decontaminate": {"reference": str(tmp_path / "eval_hashes.npy"), "method": "perceptual", "max_distance": 4}},
        *FILTERS,
    ]
    outs = {}
    for name in ("local", "ray"):
        outs[name] = tmp_path / name
        shutil.copytree(scored_sample / "cache", outs[name] / "cache")
    local = run(
        load_config(write_config(tmp_path / "local.yaml", output={"dir": str(outs["local"])}, filters=filters)),
        progress=False,
        log=lambda _m: None,
    )
    executor = _Recording(RayExecutor(address=cluster.address))
    try:
        on_ray = run(
            load_config(write_config(tmp_path / "ray.yaml", output={"dir": str(outs["ray"])}, filters=filters)),
            executor=executor,
            progress=False,
            log=lambda _m: None,
        )
    finally:
        executor.close()
    assert "_filter" in executor.sent, executor.sent
    steps = {f["name"]: f for f in local.manifest["counts"]["filters"]}
    assert steps["decontaminate"]["dropped"] > 0
    assert on_ray.manifest["counts"] == local.manifest["counts"]
    assert on_ray.manifest["stages"]["decontaminate"] == {
        k: {**v, "seconds": on_ray.manifest["stages"]["decontaminate"][k]["seconds"]}
        for k, v in local.manifest["stages"]["decontaminate"].items()
    }
    assert (outs["ray"] / "subset.npy").read_bytes() == (outs["local"] / "subset.npy").read_bytes()
    for folder in ("subset", "dropped"):
        names = sorted(p.name for p in (outs["local"] / folder).glob("*.parquet"))
        assert names and names == sorted(p.name for p in (outs["ray"] / folder).glob("*.parquet"))
        for name in names:
            assert _table(outs["ray"] / folder / name).equals(_table(outs["local"] / folder / name)), name


# ---------------------------------------------------------------- every shipped config on Ray

SAMPLE_CONFIGS = [
    "sample.yaml",
    "sample_basic.yaml",
    "sample_dedup.yaml",
    "sample_image_clusters.yaml",
    "sample_quality.yaml",
]
# The plan each shipped config takes under ``execution.mode: auto``, on the cluster and locally.
PLANS = dict.fromkeys(SAMPLE_CONFIGS, "streaming")


def test_every_sample_config_is_listed():
    from tests.conftest import REPO

    assert sorted(p.name for p in (REPO / "configs").glob("sample*.yaml")) == sorted(SAMPLE_CONFIGS)


def _local_then_ray(tmp_path, cluster, cfg_path, cache=None):
    """Run ``cfg_path`` locally, then on the two-node cluster (``--executor ray``), into the
    same folder (its path is in every part's provenance); the local outputs are moved to
    ``tmp_path / "local"``, the cache stays for the Ray run (``cache``: a scoring cache to
    start from). Returns (local result, Ray result, recorded Ray task names)."""
    from pipelines.config import load_config
    from pipelines.executors.ray import RayExecutor
    from pipelines.runner import run

    out = tmp_path / "ray"
    if cache is not None:
        shutil.copytree(cache, out / "cache")
    cfg = load_config(cfg_path)
    assert str(cfg.output.dir) == str(out)
    local = run(cfg, progress=False, log=lambda _m: None)
    shutil.copytree(out, tmp_path / "local", ignore=shutil.ignore_patterns("cache"))
    for entry in out.iterdir():
        if entry.name != "cache":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    executor = _Recording(RayExecutor(address=cluster.address))
    try:
        on_ray = run(load_config(cfg_path), executor=executor, progress=False, log=lambda _m: None)
    finally:
        executor.close()
    return local, on_ray, executor.sent


def _equal_runs(tmp_path, local, on_ray, plan: str) -> None:
    mine, theirs = on_ray.manifest, local.manifest
    assert mine["counts"] == theirs["counts"]
    assert 0 < theirs["counts"]["kept"] < theirs["counts"]["input"]
    assert json.dumps(mine["thresholds"], default=json_default) == json.dumps(
        theirs["thresholds"], default=json_default
    )
    assert (mine["execution"]["plan"], theirs["execution"]["plan"]) == (plan, plan)
    assert (mine["execution"]["executor"], theirs["execution"]["executor"]) == ("ray", "local")
    _same_outputs(tmp_path / "local", tmp_path / "ray")


@pytest.mark.parametrize("name", SAMPLE_CONFIGS)
def test_sample_config_on_two_nodes_matches_local(tmp_path, scored_sample, cluster, name):
    """Each shipped sample config as a user runs it, from the sample's scoring cache (scores
    the config needs beyond it are computed by the local run and cached for the Ray one)."""
    from tests.conftest import REPO

    path = write_config(tmp_path / name, base=REPO / "configs" / name, output={"dir": str(tmp_path / "ray")})
    local, on_ray, sent = _local_then_ray(tmp_path, cluster, path, cache=scored_sample / "cache")
    _equal_runs(tmp_path, local, on_ray, PLANS[name])
    if PLANS[name] == "streaming":
        assert {"_filter"} <= set(sent), sent  # each shard filtered and written as a Ray task


def test_datacomp_baseline_on_two_nodes_matches_local(tmp_path, datacomp, cluster):
    """``configs/image_based_intersect_clip_score.yaml`` (DataComp's image_based ∩ clip_score
    baseline) on a generated DataComp pool: its paths pointed at the pool, the module's
    centroids and reference set, and a fastText language model trained here (standing in
    for lid.176.bin); everything else as shipped."""
    import yaml

    pytest.importorskip("fasttext")
    from tests.conftest import REPO
    from tests.fasttext_lid import train_tiny_lid

    raw = yaml.safe_load((REPO / "configs" / "image_based_intersect_clip_score.yaml").read_text())
    raw["input"]["datacomp_metadata"] = str(datacomp / "metadata")
    raw["clusters"].update(
        reference=str(datacomp / "reference.npy"), centroids=str(datacomp / "centroids.npy"), num_clusters=8
    )
    (tmp_path / "lid").mkdir()
    lid = train_tiny_lid(tmp_path / "lid" / "tiny_lid.bin")
    for f in raw["filters"]:
        if "language" in f:
            f["language"]["model_path"] = str(lid)
    raw["output"] = {"dir": str(tmp_path / "ray")}
    path = tmp_path / "baseline.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    local, on_ray, sent = _local_then_ray(tmp_path, cluster, path)
    _equal_runs(tmp_path, local, on_ray, "streaming")
    assert {"_scan", "_filter"} <= set(sent), sent  # the threshold's histograms, each shard filtered, on Ray


def test_remote_output_on_two_nodes_spills_to_execution_spill_dir(tmp_path, datacomp, cluster, s3):  # noqa: F811
    """Output on S3 (moto's server on loopback, which the Ray workers reach through the
    environment they are given) from the shard plan's Ray tasks on two nodes: without
    ``execution.spill_dir`` a config error naming it; with it (a folder both nodes see)
    the run's arrays spill there, the parts and subset.npy land on S3, and the subset is
    DataComp's own (numpy) top 30% by CLIP L/14 score."""
    import os

    import ray

    from filtering.errors import ConfigError
    from pipelines.config import parse_config
    from pipelines.executors.ray import RayExecutor
    from pipelines.runner import run
    from tests.datacomp_pool import datacomp_clip_score_uids

    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    env["FSSPEC_S3_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL"]  # fsspec's config, in each worker
    ray.shutdown()  # the module's connection: this test's workers need the environment above (a job of its own)
    ray.init(address=cluster.address, runtime_env={"env_vars": env}, logging_level="ERROR", log_to_driver=False)
    out = f"s3://{BUCKET}/runs/two-nodes"
    raw = {
        "input": {"datacomp_metadata": str(datacomp / "metadata")},
        "filters": [{"clip_score": {"top_fraction": 0.3}}],
        "output": {"dir": out, "rows_per_part": 40},
    }
    try:
        with RayExecutor(address=cluster.address) as executor:  # joins the Ray above
            with pytest.raises(ConfigError, match=r"Ray runs on 2 nodes: set execution\.spill_dir"):
                run(parse_config(raw), executor=executor, progress=False, log=lambda _m: None)
            raw["execution"] = {"spill_dir": str(tmp_path / "shared")}
            m = run(parse_config(raw), executor=executor, progress=False, log=lambda _m: None).manifest
    finally:
        ray.shutdown()
    assert (m["execution"]["plan"], m["execution"]["executor"]) == ("streaming", "ray")
    expected = datacomp_clip_score_uids(datacomp / "metadata", "clip_l14_similarity_score", fraction=0.3)
    with s3.open(f"{BUCKET}/runs/two-nodes/subset.npy", "rb") as f:
        np.testing.assert_array_equal(np.load(f), expected)
    parts = sorted(p for p in s3.find(f"{BUCKET}/runs/two-nodes") if "/subset/" in p)
    assert len(parts) == len(m["outputs"]["subset"]) > 1
    assert list((tmp_path / "shared").iterdir()) == []  # the run's spill folder removed
    assert not s3.exists(f"{BUCKET}/runs/two-nodes/.streaming")
