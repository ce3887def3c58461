"""Inputs and outputs as fsspec URLs (issue 7), against moto's S3 server on loopback.

No network beyond 127.0.0.1: the server runs in this process's threads, the
credentials are dummies.
"""

import json
import logging
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from filtering.cache import ShardCache
from filtering.io.atomic import atomic_write_text, remove_temp_files
from filtering.io.paths import expand_shards, file_info
from tests.conftest import SAMPLE, run_cli, write_config
from tests.golden import check_recorded

BUCKET = "pool"


@pytest.fixture(scope="module")
def s3():
    """An S3 endpoint on loopback holding the sample shards under s3://pool/sample/."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import fsspec
    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # moto keeps its buckets per process, not per server: another module's server (the same
    # xdist worker) left its bucket behind, and mkdir below raised FileExistsError
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=30).close()
    mp = pytest.MonkeyPatch()
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }.items():
        mp.setenv(key, value)
    mp.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})  # every s3:// URL goes to the stand-in
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir(BUCKET)
    for shard in sorted((SAMPLE / "pool").glob("*.tar")):
        fs.put(str(shard), f"{BUCKET}/sample/{shard.name}")
    try:
        yield fs
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        mp.undo()
        server.stop()


def test_shard_specs_expand_on_s3(s3):
    expected = [f"s3://{BUCKET}/sample/{i:05d}.tar" for i in range(4)]
    assert expand_shards(f"s3://{BUCKET}/sample/{{00000..00003}}.tar") == expected
    assert expand_shards(f"s3://{BUCKET}/sample/*.tar") == expected
    assert expand_shards(f"s3://{BUCKET}/sample") == expected
    assert expand_shards([f"s3://{BUCKET}/sample/0000[23].tar", expected[0]]) == [expected[0], *expected[2:]]
    info = file_info(expected[0])
    assert info["size"] == (SAMPLE / "pool" / "00000.tar").stat().st_size and info["mtime"]


def test_cache_and_atomic_writes_on_s3(s3):
    shard = f"s3://{BUCKET}/sample/00000.tar"
    cache = ShardCache(f"s3://{BUCKET}/unit/cache", "score", {"arch": "x"})
    assert not cache.is_done(shard)
    emb = np.arange(12, dtype=np.float16).reshape(3, 4)
    cache.write(shard, pa.table({"uid": ["a", "b", "c"]}), {"image": emb})
    assert cache.is_done(shard)
    assert cache.read_table(shard).column("uid").to_pylist() == ["a", "b", "c"]
    loaded = cache.read_array(shard, "image")  # loaded whole: no memory map over S3
    assert isinstance(loaded, np.ndarray) and np.array_equal(loaded, emb)
    atomic_write_text(f"s3://{BUCKET}/unit/manifest.json", "{}")
    written = {cache.table_path(shard), cache.array_path(shard, "image"), f"s3://{BUCKET}/unit/manifest.json"}
    assert {f"s3://{p}" for p in s3.find(f"{BUCKET}/unit")} == written, "no temporary objects left behind"
    assert remove_temp_files(f"s3://{BUCKET}/unit") == 0  # remote roots are never swept


@pytest.mark.slow
def test_run_from_s3_to_s3_gives_the_local_subset(tmp_path, s3, scored_sample):
    out = f"s3://{BUCKET}/runs/sample"
    cfg = write_config(
        tmp_path / "s3.yaml", input={"shards": f"s3://{BUCKET}/sample/{{00000..00003}}.tar"}, output={"dir": out}
    )
    code, stdout, err = run_cli("run", cfg, "--quiet")
    assert code == 0, err

    def remote_table(path):
        with s3.open(path, "rb") as f:
            return pq.read_table(f)

    def remote_subset():  # every part, in order (one per source shard)
        return pa.concat_tables([remote_table(p) for p in sorted(s3.glob(f"{BUCKET}/runs/sample/subset/part-*"))])

    local = pq.read_table(scored_sample / "subset")
    remote = remote_subset()
    assert remote.column("source_shard")[0].as_py().startswith(f"s3://{BUCKET}/sample/")
    drop = ["source_shard"]
    assert (
        remote.drop_columns(drop)
        .replace_schema_metadata(None)
        .equals(local.drop_columns(drop).replace_schema_metadata(None))
    )
    assert json.loads(remote.schema.metadata[b"poolsift"])["config"]["output"]["dir"] == out
    with s3.open(f"{BUCKET}/runs/sample/subset.npy", "rb") as f:
        assert f.read() == (scored_sample / "subset.npy").read_bytes()
    manifest = json.loads(s3.cat(f"{BUCKET}/runs/sample/manifest.json"))
    assert manifest["counts"] == json.loads((scored_sample / "manifest.json").read_text())["counts"]
    assert [i["path"] for i in manifest["inputs"]] == [f"s3://{BUCKET}/sample/{i:05d}.tar" for i in range(4)]
    names = {p.rsplit("/", 1)[-1] for p in s3.find(f"{BUCKET}/runs/sample")}
    assert {"manifest.json", "subset.npy", "part-00000.parquet"} <= names
    assert not [n for n in names if n.startswith(".tmp-") or n == ".poolsift.lock"]  # no lock on object stores

    again = run_cli("run", cfg, "--quiet")
    assert again[0] == 0 and "all 4 shards cached" in again[2]
    assert remote_subset().equals(remote)


@pytest.mark.slow
def test_shard_plan_writes_to_s3_from_its_workers(tmp_path, s3):
    """A DataComp pool filtered on the shard plan by worker processes into s3://: the
    workers write the parts there, the driver moves them into place; the local run's rows."""
    from pipelines.config import parse_config
    from pipelines.runner import run
    from tests.datacomp_pool import make_datacomp_pool

    metadata = make_datacomp_pool(tmp_path / "metadata", shards=3, rows=60)

    def go(out: str):
        raw = {
            "input": {"datacomp_metadata": str(metadata)},
            "filters": [{"clip_score": {"top_fraction": 0.4}}],
            "output": {"dir": out, "rows_per_part": 25},
        }
        return run(parse_config(raw), progress=False, log=lambda _m: None)

    remote = go(f"s3://{BUCKET}/runs/shard-plan")
    local = go(str(tmp_path / "local"))
    assert remote.manifest["execution"] == {**remote.manifest["execution"], "plan": "streaming", "executor": "local"}
    assert remote.manifest["counts"] == local.manifest["counts"]
    names = sorted(p.split("/runs/shard-plan/", 1)[1] for p in s3.find(f"{BUCKET}/runs/shard-plan"))
    assert [n for n in names if not n.startswith("cache/")] == sorted([*remote.manifest["files"], "manifest.json"])
    assert s3.cat(f"{BUCKET}/runs/shard-plan/subset.npy") == (tmp_path / "local" / "subset.npy").read_bytes()
    for folder in ("subset", "dropped"):
        parts = sorted(n for n in names if n.startswith(f"{folder}/"))
        assert parts == sorted(str(p.relative_to(tmp_path / "local")) for p in (tmp_path / "local" / folder).iterdir())
        for rel in parts:
            with s3.open(f"{BUCKET}/runs/shard-plan/{rel}", "rb") as f:
                ours = pq.read_table(f).replace_schema_metadata(None)
            assert ours.equals(pq.read_table(tmp_path / "local" / rel).replace_schema_metadata(None)), rel


@pytest.mark.slow
def test_shard_plan_reads_datacomp_metadata_from_s3(tmp_path, s3):
    """DataComp metadata on s3:// (parquet and npz per shard), read per shard by the shard
    plan's workers through fsspec, as ``run`` read it: the top_fraction threshold from the
    remote parquets, the cluster targets from the remote npz embeddings; DataComp's own
    rule (numpy, over the local copy) gives the same subset."""
    from pipelines.config import parse_config
    from pipelines.runner import run
    from tests.datacomp_pool import datacomp_clip_score_uids, datacomp_image_cluster_uids, make_datacomp_pool

    metadata = make_datacomp_pool(tmp_path / "metadata", shards=3, rows=50, seed=3)
    for f in sorted(metadata.iterdir()):
        s3.put(str(f), f"{BUCKET}/dcmeta/{f.name}")
    rng = np.random.default_rng(1)
    centroids = rng.standard_normal((12, 24)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    reference = rng.standard_normal((5, 24)).astype(np.float32)
    np.save(tmp_path / "centroids.npy", centroids)
    np.save(tmp_path / "reference.npy", reference)
    raw = {
        "input": {"datacomp_metadata": f"s3://{BUCKET}/dcmeta"},
        "clusters": {
            "centroids": str(tmp_path / "centroids.npy"),
            "reference": str(tmp_path / "reference.npy"),
            "embedding": "l14_img",
        },
        "filters": [{"clip_score": {"top_fraction": 0.3}}, {"image_clusters": {}}],
        "output": {"dir": str(tmp_path / "run"), "rows_per_part": 20},
    }
    result = run(parse_config(raw), progress=False, log=lambda _m: None)
    assert result.manifest["execution"]["plan"] == "streaming"
    assert [i["path"] for i in result.manifest["inputs"]][:2] == [
        f"s3://{BUCKET}/dcmeta/00000000.parquet",
        f"s3://{BUCKET}/dcmeta/00000000.npz",
    ]
    l14 = "clip_l14_similarity_score"
    expected = datacomp_image_cluster_uids(metadata, centroids, reference, l14, 0.3)
    got = np.load(tmp_path / "run" / "subset.npy")
    assert 0 < len(got) < len(datacomp_clip_score_uids(metadata, l14, fraction=0.3))  # both rules bite
    np.testing.assert_array_equal(got, expected)
    subset = pq.read_table(tmp_path / "run" / "subset")
    assert set(subset.column("source_shard").to_pylist()) <= {f"s3://{BUCKET}/dcmeta/{i:08d}.parquet" for i in range(3)}


@pytest.mark.slow
def test_shard_plan_reshards_from_s3_to_s3(tmp_path, s3, rerun_dir):
    """Shards, cache and output on s3://, resharding on the shard plan: the workers copy
    each source shard's kept samples into tars there; the local run's tars (recorded from
    the in-memory plan, tests/golden.py)."""
    out = f"s3://{BUCKET}/runs/sample"  # the cache of the run above, if it ran
    resharding = {"webdataset": True, "samples_per_shard": 64}
    cfg = write_config(
        tmp_path / "s3.yaml",
        input={"shards": f"s3://{BUCKET}/sample/{{00000..00003}}.tar"},
        output={"dir": out, **resharding},
    )
    code, _, err = run_cli("run", cfg, "--quiet")
    assert code == 0, err
    manifest = json.loads(s3.cat(f"{BUCKET}/runs/sample/manifest.json"))
    assert manifest["execution"]["plan"] == "streaming"

    local_cfg = write_config(tmp_path / "local.yaml", output={"dir": str(rerun_dir), **resharding})
    code, _, err = run_cli("run", local_cfg, "--quiet")
    assert code == 0, err
    check_recorded(rerun_dir)
    local = json.loads((rerun_dir / "manifest.json").read_text())
    names = sorted(p.name for p in (rerun_dir / "shards").iterdir())
    assert [s["path"] for s in manifest["shards"]] == [f"{out}/shards/{n}" for n in names]
    assert [s["count"] for s in manifest["shards"]] == [s["count"] for s in local["shards"]]
    for n in names:  # the same members, in the same order, with the same bytes
        assert s3.cat(f"{BUCKET}/runs/sample/shards/{n}") == (rerun_dir / "shards" / n).read_bytes(), n
    assert not s3.exists(f"{BUCKET}/runs/sample/.streaming")
