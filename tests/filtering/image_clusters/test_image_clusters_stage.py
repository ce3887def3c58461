"""The cluster stage on a synthetic pool: DataComp's rule, failed rows, and what its cache reuses."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from filtering import clustering
from filtering.image_clusters.image_clusters_stage import ImageClustersStage
from filtering.pool import Pool, ShardPart
from filtering.stages.base import RunContext
from pipelines.config import parse_config
from tests.shard_plan import run_global_stage


def make_pool(embs: list[np.ndarray], failed_rows=()) -> Pool:
    parts, start = [], 0
    for i, e in enumerate(embs):
        parts.append(ShardPart(f"/pool/{i:05d}.tar", f"sid{i}", start, start + len(e)))
        start += len(e)
    error = [("corrupt_image: x" if i in failed_rows else None) for i in range(start)]
    table = pa.table({"uid": [f"{i:032x}" for i in range(start)], "error": pa.array(error, pa.string())})
    return Pool(
        table,
        parts,
        embedding_loader=lambda kind, part: embs[parts.index(part)],
        embedding_kinds=("image", "text"),
        default_embedding="image",
    )


def blobs(n, centers, rng, noise=0.2):
    x = centers[rng.integers(0, len(centers), n)] + noise * rng.standard_normal((n, centers.shape[1]))
    return clustering.normalize(x).astype(np.float16)


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    centers = clustering.normalize(rng.standard_normal((12, 32)))
    embs = [blobs(400, centers, rng) for _ in range(3)]
    ref = blobs(60, centers[:4], rng)  # the reference covers 4 of the 12 blobs
    np.save(tmp_path / "ref.npy", ref)
    return embs, ref, tmp_path


def config(tmp_path, **clusters):
    raw = {
        "input": {"shards": "unused.tar"},
        "clusters": {"num_clusters": 16, "reference": str(tmp_path / "ref.npy"), "niter": 10, **clusters},
        "filters": [{"image_clusters": {}}],
        "output": {"dir": str(tmp_path / "run")},
    }
    return parse_config(raw)


def run_stage(cfg, tmp_path, pool) -> dict:
    """The stage as the shard plan runs it: the targets in the driver, each shard assigned alone."""
    ctx = RunContext(
        model=cfg.model, out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "run" / "cache"), log=lambda m: None
    )
    run_global_stage(ImageClustersStage(cfg.clusters, cfg.model, ctx.cache_dir), ctx, pool)
    return ctx.stage_info["clusters"]


def test_columns_follow_datacomp_rule_and_failed_rows_are_out(data):
    embs, ref, tmp = data
    pool = make_pool(embs, failed_rows={5, 900})
    info = run_stage(config(tmp), tmp, pool)
    assert info["centroids"] == "trained" and info["reference"] == "loaded"
    assert info["cache"] == {"targets": "computed", "shards_assigned": 3, "shards_cached": 0}

    centroids = next((tmp / "run" / "cache").glob("centroids-*/centroids.npy"))
    c = np.load(centroids)
    x = np.concatenate(embs).astype(np.float32)
    ids = np.argmax(x @ c.T, axis=1)
    target = np.unique(np.argmax(ref.astype(np.float32) @ c.T, axis=1))
    expected = np.isin(ids, target)
    expected[[5, 900]] = False
    np.testing.assert_array_equal(pool.column("cluster_target"), expected)
    got_ids = pool.table.column("cluster_id")
    assert got_ids.null_count == 2 and not got_ids[5].is_valid
    np.testing.assert_array_equal(np.delete(got_ids.to_numpy(zero_copy_only=False), [5, 900]), np.delete(ids, [5, 900]))
    assert 0.2 < expected.mean() < 0.5  # ~4 of 12 blobs


def test_rerun_reuses_everything(data, monkeypatch):
    embs, _, tmp = data
    run_stage(config(tmp), tmp, make_pool(embs))

    def boom(*a, **k):
        raise AssertionError("re-clustered")

    monkeypatch.setattr(clustering, "train_kmeans", boom)
    monkeypatch.setattr(clustering, "target_clusters", boom)
    pool = make_pool(embs)
    info = run_stage(config(tmp), tmp, pool)
    assert info["centroids"] == "cached" and info["reference"] == "cached"
    assert info["cache"] == {"targets": "cached", "shards_assigned": 0, "shards_cached": 3}
    assert pool.column("cluster_target").any()


def test_given_centroids_and_a_changed_shard(data):
    embs, _, tmp = data
    rng = np.random.default_rng(1)
    np.save(tmp / "cent.npy", clustering.normalize(rng.standard_normal((20, 32))))
    cfg = config(tmp, centroids=str(tmp / "cent.npy"))
    assert run_stage(cfg, tmp, make_pool(embs))["centroids"] == "loaded"
    embs = [embs[0], embs[1][::-1].copy(), embs[2]]  # shard 1 rescored differently
    info = run_stage(cfg, tmp, make_pool(embs))
    assert info["centroids"] == "cached"
    assert info["cache"]["shards_assigned"] == 1 and info["cache"]["shards_cached"] == 2


def test_dimension_mismatch_names_the_reference(data):
    from filtering.errors import ConfigError

    embs, _, tmp = data
    np.save(tmp / "ref.npy", np.ones((3, 8), np.float32))
    with pytest.raises(ConfigError, match="clusters.reference"):
        run_stage(config(tmp), tmp, make_pool(embs))


def test_targets_on_a_task_pool_are_the_drivers(tmp_path, monkeypatch):
    """With an executor that runs tasks (Ray) the reference set's nearest centroids are found
    in chunks of whole assignment batches, one task each: the same target set as the
    driver's one pass, here over three chunks."""
    from filtering.image_clusters import image_clusters_stage as stage_module
    from tests.filtering.dedup.test_partitioned import InProcessTasks

    class RecordingTasks(InProcessTasks):
        def __init__(self, root):
            super().__init__(root)
            self.sent: list[str] = []

        def map(self, fn, args):
            for a in args:
                self.sent.append(fn.__name__)
                yield self.submit(fn, a).result()

    class ClusterExecutor:
        tasks = RecordingTasks(str(tmp_path / "unused"))

        def task_pool(self):
            return self.tasks

    rng = np.random.default_rng(4)
    centroids = clustering.normalize(rng.standard_normal((40, 16)))
    reference = clustering.normalize(rng.standard_normal((10_000, 16)))
    st = ImageClustersStage.__new__(ImageClustersStage)
    st.cache_root = str(tmp_path / "cache")
    monkeypatch.setattr(stage_module, "TARGET_CHUNK_ROWS", clustering.DEFAULT_BATCH)
    (tmp_path / "cache" / "centroids-c").mkdir(parents=True)
    np.save(tmp_path / "cache" / "centroids-c" / "centroids.npy", centroids)
    executor = ClusterExecutor()
    got = st.targets(centroids, "c", reference, "r1", {"cache": {}}, executor)
    assert executor.tasks.sent == ["_target_chunk"] * 3
    expected = clustering.target_clusters(reference, clustering.Assigner(centroids))
    assert got.tolist() == expected.tolist() and 0 < len(got) <= 40


def test_training_rows_skip_failed_rows_shard_by_shard():
    """The k-means sample's rows among those not failed, found per shard, are the rows
    ``np.flatnonzero(~pool.failed)[ranks]`` gives over the whole pool; with the failed
    rows held as a chunked validity bitmap (a WebDataset skeleton pool) too."""
    from filtering.image_clusters.image_clusters_stage import _alive_rows

    rng = np.random.default_rng(3)
    sizes = [7, 0, 12, 1, 9]
    failed_rows = set(rng.choice(sum(sizes), 10, replace=False).tolist()) | {0, sum(sizes) - 1}
    pool = make_pool([np.zeros((n, 4), np.float16) for n in sizes], failed_rows)
    failed = pool.failed
    bitmap = pa.chunked_array(
        [pa.array(np.zeros(p.n, bool), mask=~failed[p.start : p.stop]) for p in pool.parts], pa.bool_()
    )
    usable = int((~failed).sum())
    for error in (pool.table.column("error"), bitmap):
        alive = [error.slice(p.start, p.n).null_count for p in pool.parts]
        assert sum(alive) == usable
        for m in (1, 5, usable):
            ranks = clustering.sample_indices(usable, m, seed=m)
            np.testing.assert_array_equal(_alive_rows(error, pool.parts, alive, ranks), np.flatnonzero(~failed)[ranks])
