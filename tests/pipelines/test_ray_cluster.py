"""The Ray executor on a simulated multi-node cluster (issue 16): two Ray nodes on this
machine (``ray.cluster_utils.Cluster``, one CPU each) score the bundled sample, and the
outputs equal a local run's with the same filters (clip_score top_fraction, caption):
subset.npy byte for byte, subset and dropped tables, the manifest's counts and thresholds."""

import shutil

import pyarrow.parquet as pq
import pytest

from tests.conftest import write_config

pytestmark = pytest.mark.slow  # starts a two-node Ray and runs the pipeline


def _table(path):
    return pq.read_table(path).replace_schema_metadata(None)


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
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
