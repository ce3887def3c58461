"""decontaminate: the stage's nearest-reference columns and the filter's thresholds, on synthetic data."""

import numpy as np
import pyarrow as pa
import pytest

from filtering.decontaminate.decontaminate_stage import DecontaminateStage
from filtering.errors import ConfigError
from filtering.filters.compose import apply_filters
from filtering.pool import Pool, ShardPart
from filtering.stages.base import RunContext
from pipelines.config import parse_config
from tests.shard_plan import run_global_stage


def pool_with(emb: np.ndarray, phash: list[int], failed: list[bool]) -> Pool:
    n = len(phash)
    table = pa.table(
        {
            "uid": [f"{i:032x}" for i in range(n)],
            "phash": pa.array(phash, pa.uint64()),
            "clip_score": pa.array(np.full(n, 0.3), pa.float32()),
            "error": pa.array(["corrupt_image: x" if f else None for f in failed], pa.string()),
        }
    )
    parts = [ShardPart("a", "a", 0, 2), ShardPart("b", "b", 2, n)]
    return Pool(table, parts, lambda kind, part: emb[part.start : part.stop], ("image",), "image")


def run_stage(tmp_path, filters, pool):
    # jpeg_draft off: hashing reference images then needs no model
    cfg = parse_config(
        {"input": {"shards": str(tmp_path / "none.tar")}, "model": {"jpeg_draft": False}, "filters": filters}
    )
    ctx = RunContext(
        model=cfg.model, out_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"), progress=None, log=lambda m: None
    )
    stage = DecontaminateStage(cfg.filter_tree, cfg.model, ctx.cache_dir)
    run_global_stage(stage, ctx, pool)  # the reference sets in the driver, each shard alone
    return cfg, stage, ctx


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(10, 16)).astype(np.float32)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    pool_emb = rng.normal(size=(6, 16)).astype(np.float32)
    pool_emb[1] = ref[7] + 0.01  # a near copy of reference item 7
    pool_emb[4] = ref[2]  # an exact copy, but the row failed
    pool_emb /= np.linalg.norm(pool_emb, axis=1, keepdims=True)
    np.save(tmp_path / "evalset.npy", ref)
    hashes = rng.integers(0, 2**63, 10, dtype=np.uint64)
    np.save(tmp_path / "evalhashes.npy", hashes)
    phash = rng.integers(0, 2**63, 6, dtype=np.uint64).tolist()
    phash[3] = int(hashes[5] ^ np.uint64(0b11))  # distance 2 from reference hash 5
    return tmp_path, pool_with(pool_emb.astype(np.float16), phash, [False, False, False, False, True, False])


def test_semantic_similarity_and_match_columns(data):
    tmp_path, pool = data
    filters = [{"decontaminate": {"reference": str(tmp_path / "evalset.npy"), "threshold": 0.9}}]
    cfg, stage, ctx = run_stage(tmp_path, filters, pool)
    assert stage.provides() == {"decontam_evalset_similarity", "decontam_evalset_match"}
    sims = pool.table.column("decontam_evalset_similarity")
    assert sims.null_count == 1  # the failed row
    assert sims[1].as_py() > 0.99 and pool.column("decontam_evalset_match")[1] == "evalset.npy:7"
    out = apply_filters(cfg.filter_tree, pool)
    np.testing.assert_array_equal(out.keep, [True, False, True, True, False, True])
    assert out.drop_reason[1] == "contaminated_semantic"
    assert out.duplicate_of[1] == "evalset.npy:7"
    assert ctx.stage_info["decontaminate"]["decontam_evalset_similarity"]["reference_cache"] == "loaded"
    # a rerun loads the cached reference set
    _, _, ctx2 = run_stage(tmp_path, filters, pool)
    assert ctx2.stage_info["decontaminate"]["decontam_evalset_similarity"]["reference_cache"] == "cached"
    assert len(list((tmp_path / "cache").glob("decontam-nearest-*/*.parquet"))) == 2  # one per shard, reused


def test_perceptual_distance_against_hashes(data):
    tmp_path, pool = data
    filters = [
        {
            "decontaminate": {
                "reference": str(tmp_path / "evalhashes.npy"),
                "method": "perceptual",
                "max_distance": 2,
                "name": "evalh",
            }
        }
    ]
    cfg, _, _ = run_stage(tmp_path, filters, pool)
    assert pool.table.column("decontam_evalh_distance")[3].as_py() == 2
    out = apply_filters(cfg.filter_tree, pool)
    assert (~out.keep[:4]).tolist() == [False, False, False, True]
    assert out.duplicate_of[3] == "evalhashes.npy:5" and out.drop_reason[3] == "contaminated_perceptual"


def test_dimension_mismatch_is_a_config_error(tmp_path):
    np.save(tmp_path / "wide.npy", np.ones((3, 32), np.float32))
    pool = pool_with(np.ones((3, 16), np.float16), [1, 2, 3], [False] * 3)
    with pytest.raises(ConfigError, match="dimension 32"):
        run_stage(tmp_path, [{"decontaminate": {"reference": str(tmp_path / "wide.npy")}}], pool)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"reference": "x.npy", "max_distance": 3}, "max_distance applies to method perceptual, not semantic"),
        ({"reference": "x.npy", "method": "perceptual", "threshold": 0.9}, "threshold applies to method semantic"),
        ({"method": "semantic"}, "reference"),
        ({"reference": "x.npy", "method": "exact"}, "method"),
    ],
)
def test_rejects_bad_params(params, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"input": {"shards": "x.tar"}, "filters": [{"decontaminate": params}]})


def test_two_references_with_one_name_are_rejected(tmp_path):
    filters = [{"decontaminate": {"reference": "a/evalset.npy"}}, {"decontaminate": {"reference": "b/evalset.npy"}}]
    cfg = parse_config({"input": {"shards": "x.tar"}, "filters": filters})
    with pytest.raises(ConfigError, match="distinct name"):
        DecontaminateStage(cfg.filter_tree, cfg.model, str(tmp_path))


def test_perceptual_reference_from_shards(tmp_path):
    """A shard reference is hashed as the scoring stage hashes pool images; ids are shard name/key."""
    from filtering.io.reader import iter_shard
    from filtering.stages.image_decode import decode_image, reference_plan
    from tests.conftest import SAMPLE

    shard = SAMPLE / "pool" / "00001.tar"
    plan = reference_plan()  # the perceptual hash alone, at full size (jpeg_draft off)
    decoded = (decode_image(s.image, plan.required, plan) for s in iter_shard(str(shard)))
    h = int(next(d for d in decoded if d.error is None).values["phash"]["phash"])
    pool = pool_with(np.zeros((3, 4), np.float16), [h, h ^ 1, h ^ 0xFFFF_FFFF], [False] * 3)
    filters = [{"decontaminate": {"reference": str(shard), "method": "perceptual", "max_distance": 1}}]
    cfg, _, ctx = run_stage(tmp_path, filters, pool)
    info = ctx.stage_info["decontaminate"]["decontam_00001_distance"]
    assert info["reference_cache"] == "hashed" and info["reference_items"] >= 240
    out = apply_filters(cfg.filter_tree, pool)
    assert out.keep.tolist()[2] is True and not out.keep[0] and not out.keep[1]
    assert out.duplicate_of[0].startswith("00001.tar/")  # that sample, or an identical copy of it
