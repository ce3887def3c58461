"""Semantic dedup on the streaming plan (pipelines/executors/dedup_phase.py: k-means trained
in the driver on the in-memory path's sample, rows assigned and spilled per shard, each
partition of clusters compared on one worker) against the outputs recorded from the
in-memory plan it replaced (tests/golden.py): subset.npy byte for byte, the subset and
dropped rows in order, the manifest's counts."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from filtering.errors import ConfigError
from tests.datacomp_pool import make_datacomp_pool
from tests.pipelines.test_streaming import L14, _run, _table, assert_recorded_outputs

pytestmark = pytest.mark.slow  # runs the whole pipeline

SEM = {"method": "semantic", "embedding": "l14_img"}


@pytest.fixture(scope="module")
def sem_metadata(tmp_path_factory):
    """l14_img with planted near copies within and across shards: exact copies, chains
    (each link >= 0.95 apart, the chain's ends below), some all-zero rows (the filter skips
    them), scores of one decimal (ties: the smallest uid survives). A ``phash`` column: a
    near copy's is its base's with 0 to 3 bits flipped; a few other rows take a base's hash
    too (look-alikes whose embeddings differ: ``min_similarity`` rejects them)."""
    root = make_datacomp_pool(tmp_path_factory.mktemp("dcsem") / "metadata", shards=4, rows=90, seed=11)
    rng = np.random.default_rng(3)
    d = 24
    bases = rng.standard_normal((30, d))
    bases /= np.linalg.norm(bases, axis=1, keepdims=True)
    side = rng.standard_normal((30, d))
    side -= np.einsum("ij,ij->i", side, bases)[:, None] * bases  # orthogonal to the base
    side /= np.linalg.norm(side, axis=1, keepdims=True)
    hashes = rng.integers(0, 2**63, len(bases), dtype=np.int64).astype(np.uint64)
    for path in sorted(root.glob("*.npz")):
        with np.load(path) as z:
            arrays = dict(z)
        emb = arrays["l14_img"].astype(np.float64)
        n = len(emb)
        near = np.flatnonzero(rng.random(n) < 0.45)
        b = rng.integers(0, len(bases), len(near))
        step = rng.integers(0, 4, len(near)) * 0.25  # chain position: 0, 0.25, 0.5, 0.75
        emb[near] = bases[b] + step[:, None] * side[b] + rng.normal(0, 0.003, (len(near), d))
        phash = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64)
        flips = np.zeros(len(near), np.uint64)
        for _ in range(3):
            flips |= np.where(
                rng.random(len(near)) < 0.5, np.uint64(1) << rng.integers(0, 64, len(near)).astype(np.uint64), 0
            )
        phash[near] = hashes[b] ^ flips
        alike = np.setdiff1d(rng.choice(n, 12, replace=False), near)
        phash[alike] = hashes[rng.integers(0, len(hashes), len(alike))]
        emb[rng.choice(n, 3, replace=False)] = 0.0
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        arrays["l14_img"] = (emb / np.where(norms > 0, norms, 1)).astype(np.float16)
        np.savez(path, **arrays)
        pq_path = path.with_suffix(".parquet")
        t = pq.read_table(pq_path)
        score = np.round(t.column(L14).to_numpy(zero_copy_only=False), 1)
        t = t.set_column(t.schema.get_field_index(L14), L14, pa.array(score, t.schema.field(L14).type))
        t = t.append_column("phash", pa.array(phash, pa.uint64()))
        pq.write_table(t, pq_path)
    return root


@pytest.mark.parametrize(
    "filters",
    [
        [{"dedup": SEM}],
        # 3 clusters train on 192 of the 366 rows: the driver fetches that sample only
        [{"dedup": {**SEM, "num_clusters": 3, "keep": "smallest_uid", "seed": 4}}],
        [{"dedup": {**SEM, "num_clusters": 1, "threshold": 0.9}}],
        [{"clip_score": {"top_fraction": 0.7}}, {"caption": {"min_words": 2}}, {"dedup": {**SEM, "niter": 3}}],
        [{"dedup": {"method": "exact"}}, {"dedup": {**SEM, "num_clusters": 5}}, {"dedup": {**SEM, "threshold": 0.8}}],
    ],
    ids=["default", "sampled-smallest-uid", "one-cluster", "after-filters", "exact-then-two-semantic"],
)
def test_semantic_dedup_streams(tmp_path, sem_metadata, filters):
    m = assert_recorded_outputs(sem_metadata, tmp_path, filters)
    assert m["execution"]["seconds"]["dedup"] >= 0  # the dedup phase ran
    dropped = [f["dropped"] for f in m["counts"]["filters"] if f["name"].startswith("dedup")]
    assert max(dropped) > 20 and dropped[-1] > 0  # the planted copies were found
    if filters == [{"dedup": SEM}]:  # chains: some copies are dropped for a survivor they are not near
        emb = {}
        for path in sorted(sem_metadata.glob("*.parquet")):
            uids = pq.read_table(path, columns=["uid"]).column("uid").to_pylist()
            with np.load(path.with_suffix(".npz")) as z:
                emb.update(zip(uids, z["l14_img"].astype(np.float32), strict=True))
        pairs = [(r["uid"], r["duplicate_of"]) for r in _table(tmp_path / "run" / "dropped").to_pylist()]
        sims = [float(emb[u] @ emb[d]) for u, d in pairs if d]
        assert min(sims) < 0.95 <= max(sims)


CONFIRMED = {"method": "perceptual", "max_distance": 4, "min_similarity": 0.9, "embedding": "l14_img"}


@pytest.mark.parametrize(
    "filters",
    [
        [{"dedup": CONFIRMED}],
        # two dedups share one search: the confirmed one first, the plain one frees the labels
        [{"dedup": {**CONFIRMED, "max_distance": 6, "keep": "smallest_uid"}}, {"dedup": {"method": "perceptual"}}],
        [
            {"caption": {"min_words": 2}},
            {"dedup": {"method": "exact"}},
            {"dedup": {**CONFIRMED, "min_similarity": 0.99}},
        ],
    ],
    ids=["confirmed", "confirmed-then-plain", "after-filters"],
)
def test_min_similarity_streams(tmp_path, sem_metadata, filters):
    """``min_similarity``: the filter's edges among the rows that reach it, confirmed by
    cosines of embeddings read per shard in the workers."""
    m = assert_recorded_outputs(sem_metadata, tmp_path, filters)
    dropped = [f["dropped"] for f in m["counts"]["filters"] if f["name"].startswith("dedup")]
    assert dropped[0 if len(filters) < 3 else -1] > 20
    if filters == [{"dedup": CONFIRMED}]:  # the look-alikes are rejected: fewer dropped than by hashes alone
        plain = {k: v for k, v in CONFIRMED.items() if k not in ("min_similarity", "embedding")}
        alone = _run(sem_metadata, tmp_path / "plain", [{"dedup": plain}])
        assert alone.manifest["counts"]["filters"][0]["dropped"] > dropped[0]


def test_missing_embedding_is_one_config_error(tmp_path, sem_metadata):
    filters = [{"dedup": {"method": "semantic", "embedding": "nope"}}]
    with pytest.raises(ConfigError) as e:
        _run(sem_metadata, tmp_path / "b", filters)
    assert "nope" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "b" / "subset.npy").exists()


@pytest.mark.parametrize(
    "filters",
    [
        [{"not": {"dedup": {**SEM, "num_clusters": 3}}}],
        [{"any": [{"caption": {"min_words": 4}}, {"dedup": CONFIRMED}]}, {"not": {"dedup": {"method": "exact"}}}],
    ],
    ids=["semantic-under-not", "confirmed-under-any"],
)
def test_dedup_under_any_and_not_streams(tmp_path, sem_metadata, filters):
    """Survivors among the rows that reach the dedup inside ``any``/``not``."""
    m = assert_recorded_outputs(sem_metadata, tmp_path, filters)
    assert all(f["dropped"] for f in m["counts"]["filters"])


def test_mixed_embedding_dtypes_stream(tmp_path):
    """The filter gathers embeddings in the first shard's dtype: a float32 shard after a
    float16 one is cast to float16 (the recorded outputs: the in-memory plan's)."""
    root = make_datacomp_pool(tmp_path / "metadata", shards=2, rows=30, seed=2)
    path = sorted(root.glob("*.npz"))[1]
    with np.load(path) as z:
        arrays = dict(z)
    arrays["l14_img"] = arrays["l14_img"].astype(np.float32)
    np.savez(path, **arrays)
    m = assert_recorded_outputs(root, tmp_path, [{"dedup": {**SEM, "threshold": 0.3}}])
    assert m["counts"]["filters"][0]["dropped"] > 0
