"""A ``top_fraction`` over a column a ``"global"`` stage computes (``cluster_sim`` of
``image_clusters``), on the shard plan: the stage's whole-pool step runs before the scan,
which computes the column per shard. The oracle: the nearest-centroid similarity in numpy
and DataComp's ``sorted_desc[int(N * f)]`` rule over it (DataComp's keep ``>=``)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.config import parse_config
from pipelines.runner import run
from tests.datacomp_pool import make_datacomp_pool, pool_embeddings, uids_u8u8

pytestmark = pytest.mark.slow  # runs the whole pipeline


def test_score_top_fraction_over_cluster_sim(tmp_path):
    metadata = make_datacomp_pool(tmp_path / "metadata", shards=3, rows=40, seed=5)
    rng = np.random.default_rng(1)
    centroids = rng.standard_normal((12, 24)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    np.save(tmp_path / "centroids.npy", centroids)
    np.save(tmp_path / "reference.npy", rng.standard_normal((5, 24)).astype(np.float32))
    raw = {
        "input": {"datacomp_metadata": str(metadata)},
        "clusters": {
            "centroids": str(tmp_path / "centroids.npy"),
            "reference": str(tmp_path / "reference.npy"),
            "embedding": "l14_img",
        },
        "filters": [{"score": {"column": "cluster_sim", "top_fraction": 0.4}}],
        "output": {"dir": str(tmp_path / "run"), "rows_per_part": 20},
    }
    m = run(parse_config(raw), progress=False, log=lambda _m: None).manifest
    assert m["execution"]["plan"] == "streaming"
    assert m["stages"]["clusters"]["cache"]["shards_assigned"] == 3  # each shard assigned once, by the scan

    uids, emb = pool_embeddings(metadata, "l14_img")
    sims = (emb.astype(np.float32) @ centroids.T).max(axis=1)  # each row's nearest centroid, by inner product
    threshold = -np.sort(-sims)[int(len(sims) * 0.4)]
    assert (
        np.sort(np.abs(sims - threshold))[1] > 1e-5
    )  # no row near the threshold but its own: rounding decides nothing
    kept = [u for u, s in zip(uids, sims, strict=True) if s >= threshold]
    expected = uids_u8u8(kept)
    expected.sort()
    np.testing.assert_array_equal(np.load(tmp_path / "run" / "subset.npy"), expected)
    subset = pq.read_table(tmp_path / "run" / "subset", columns=["uid", "cluster_sim"])
    assert subset.column("uid").to_pylist() == kept  # in pool order
    np.testing.assert_allclose(subset.column("cluster_sim").to_numpy(), sims[sims >= threshold], rtol=1e-5)
