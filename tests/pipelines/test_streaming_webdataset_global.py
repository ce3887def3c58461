"""The shard plan's global steps on a WebDataset pool: ``image_clusters`` (the target
clusters from the source's ``skeleton_pool``) and ``dedup`` (exact, perceptual with
``min_similarity``, semantic), with failed rows (unreadable images; bad uids failed by
``input.uid.on_invalid: fail``), against the outputs recorded from the in-memory plan it
replaced (tests/golden.py): subset.npy byte for byte, the subset and dropped rows in order,
the manifest's counts, failures and thresholds. The sample presets that use them
(``configs/sample_dedup.yaml``, ``configs/sample_image_clusters.yaml``) are checked against
their golden outputs in tests/pipelines/test_golden_outputs.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from bench.bench_refilter import MODEL, make_shards, write_caches
from filtering.errors import ConfigError
from filtering.stages.img2dataset import source_stamp
from pipelines.config import parse_config
from pipelines.runner import plan, run
from tests.pipelines.test_streaming_webdataset import _recorded

pytestmark = pytest.mark.slow  # runs the whole pipeline

QUIET = dict(progress=False, log=lambda _m: None)
UID = {"on_invalid": "fail"}
CORRUPT = (3, 49)  # row 50 is an exact copy of row 49 (bench_refilter.planted)
BAD_UID = (7, 99)  # row 100 is an exact copy of row 99


def _raw(pattern: str, out: Path, filters, clusters=None) -> dict:
    raw = {
        "input": {"shards": pattern, "uid": UID},
        "model": MODEL,
        "filters": filters,
        "output": {"dir": str(out)},
    }
    if clusters is not None:
        raw["clusters"] = clusters
    return raw


def _plant_faults(cfg) -> None:
    """Each cached shard as a scoring run leaves one with failed rows and near copies:
    rows ``CORRUPT`` unreadable (``error`` set, no size, null scores and phash, zero
    embeddings), rows ``BAD_UID`` with a uid that is not 32 hex digits (failed by
    ``on_invalid: fail``, their scores and embeddings kept); every 30th row offset by 23
    an exact copy of the row before, row 5 of every shard one of shard 0's row 4; every 10th row an image
    embedding close to the row before (semantic copies), every 10th offset by 5 a phash
    two bits from the row before, its embedding close to it on every other one (what
    ``min_similarity`` confirms)."""
    stage = plan(cfg, str(Path(cfg.output.dir) / "cache")).source
    clip, phash = stage.scorers[:2]
    first = None  # shard 0's image hashes
    for s, url in enumerate(stage.urls):
        stamp = source_stamp(url)
        rows = stage.cache.read_table(url)
        n = rows.num_rows
        rng = np.random.default_rng([9, s])
        emb = {k: np.array(stage.scorer_cache(clip).read_array(url, k)) for k in clip.embeddings()}
        img = emb["image"].astype(np.float32)
        close = np.arange(10, n, 10)
        img[close] = img[close - 1] + 0.02 * rng.standard_normal((len(close), img.shape[1]), dtype=np.float32)
        near = np.arange(15, n, 10)
        img[near[::2]] = img[near[::2] - 1] + 0.05 * rng.standard_normal((len(near[::2]), img.shape[1]), np.float32)
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        hashes = stage.scorer_cache(phash).read_table(url).column("phash").to_numpy(zero_copy_only=False).copy()
        hashes[near] = hashes[near - 1] ^ np.uint64(0b11)
        scores = stage.scorer_cache(clip).read_table(url).column("clip_score").to_numpy(zero_copy_only=False)
        bad = np.zeros(n, bool)
        bad[list(CORRUPT)] = True
        img[bad] = 0
        emb = {k: np.where(bad[:, None], 0, e).astype(np.float16) for k, e in emb.items()}
        emb["image"] = img.astype(np.float16)
        error = np.full(n, None, object)
        error[bad] = "decode_error: cannot identify image file"
        sha = rows.column("image_sha256").to_numpy(zero_copy_only=False).copy()
        copies = np.arange(23, n, 30)
        sha[copies] = sha[copies - 1]
        first = sha if first is None else first
        sha[5] = first[4]  # a copy in every shard of shard 0's row 4
        rows = rows.set_column(rows.schema.get_field_index("image_sha256"), "image_sha256", pa.array(sha, pa.string()))
        uid = rows.column("uid").to_numpy(zero_copy_only=False).copy()
        uid[list(BAD_UID)] = "not-a-uid"
        rows = rows.set_column(rows.schema.get_field_index("uid"), "uid", pa.array(uid, pa.string()))
        rows = rows.set_column(rows.schema.get_field_index("error"), "error", pa.array(error, pa.string()))
        for name in ("width", "height"):
            rows = rows.set_column(rows.schema.get_field_index(name), name, pa.array(rows.column(name), mask=bad))
        stage.scorer_cache(phash).write(url, pa.table({"phash": pa.array(hashes, mask=bad)}), {}, source=stamp)
        stage.scorer_cache(clip).write(url, pa.table({"clip_score": pa.array(scores, mask=bad)}), emb, source=stamp)
        stage.cache.write(url, rows, {}, source=stamp)


@pytest.fixture(scope="module")
def faulty(tmp_path_factory) -> tuple[str, Path, Path]:
    """Three shards of 120 samples (the last 110), cached with failed rows and copies; a
    reference set of image embeddings near some of the pool's."""
    root = tmp_path_factory.mktemp("wdsfail")
    pattern = make_shards(root / "shards", 350, shard_rows=120)
    cfg = parse_config(_raw(pattern, root / "cache-src", [{"caption": {"min_words": 1}}]))
    write_caches(cfg, shard_rows=120)
    _plant_faults(cfg)
    stage = plan(cfg, str(root / "cache-src" / "cache")).source
    clip = stage.scorers[0]
    image = np.concatenate([np.asarray(stage.scorer_cache(clip).read_array(url, "image")) for url in stage.urls])
    np.save(root / "reference.npy", image[::37])
    return pattern, root / "cache-src" / "cache", root / "reference.npy"


def _recorded_run(tmp_path: Path, faulty, filters, clusters=None):
    """The run from the shard caches alone (every column stage computed): the recorded outputs."""
    pattern, cache, _ = faulty
    b = tmp_path / "run"
    shutil.copytree(cache, b / "cache")
    streamed = run(parse_config(_raw(pattern, b, filters, clusters)), **QUIET)
    counts = streamed.manifest["counts"]
    assert counts["failed"] == 3 * (len(CORRUPT) + len(BAD_UID))
    assert counts["failed_reasons"] == {"bad_uid": 6, "decode_error": 6}
    _recorded(streamed, b)
    return streamed


@pytest.mark.parametrize("centroids", ["trained", "file"])
def test_image_clusters(tmp_path, faulty, centroids):
    """The k-means sample leaves the failed rows out, bad uids included: the recorded
    centroids' targets and assignments."""
    _, _, reference = faulty
    clusters = {"reference": str(reference), "num_clusters": 8, "niter": 5, "seed": 1}
    if centroids == "file":
        ref = np.load(reference).astype(np.float32)
        others = np.random.default_rng(4).standard_normal((5, ref.shape[1]), dtype=np.float32)
        centroids_ = np.concatenate([ref[:3], others / np.linalg.norm(others, axis=1, keepdims=True)])
        np.save(tmp_path / "centroids.npy", centroids_)
        np.save(tmp_path / "reference.npy", ref[:3])  # the three targets; the other five are not
        clusters = {"reference": str(tmp_path / "reference.npy"), "centroids": str(tmp_path / "centroids.npy")}
    filters = [{"clip_score": {"top_fraction": 0.5}}, {"image_clusters": {}}]
    streamed = _recorded_run(tmp_path, faulty, filters, clusters)
    info = streamed.manifest["stages"]["clusters"]
    assert info["centroids"] == ("trained" if centroids == "trained" else "loaded")
    if centroids == "trained":
        assert info["training_points"] <= 350 - 12  # the failed rows are not sampled
    assert info["cache"] == {"targets": "computed", "shards_assigned": 3, "shards_cached": 0}
    reasons = streamed.manifest["counts"]["filters"][-1]["reasons"]
    assert reasons.get("image_cluster_not_in_target", 0) > 0
    assert streamed.manifest["counts"]["kept"] > 0


@pytest.mark.parametrize(
    "filters",
    [
        [{"dedup": {"method": "exact"}}],
        [{"dedup": {"method": "perceptual", "max_distance": 4, "min_similarity": 0.9}}],
        [{"caption": {"min_words": 2}}, {"dedup": {"method": "semantic", "threshold": 0.95, "num_clusters": 3}}],
        [
            {"clip_score": {"top_fraction": 0.8}},
            {"dedup": {"method": "exact", "keep": "smallest_uid"}},
            {"dedup": {"method": "perceptual", "max_distance": 4}},
        ],
    ],
    ids=["exact", "perceptual-min-similarity", "semantic", "top-exact-perceptual"],
)
def test_dedup(tmp_path, faulty, filters):
    streamed = _recorded_run(tmp_path, faulty, filters)
    assert streamed.manifest["execution"]["seconds"]["dedup"] >= 0  # the dedup phase ran
    dropped = [f for f in streamed.manifest["counts"]["filters"] if f["name"].startswith("dedup")]
    assert all(f["dropped"] > 0 for f in dropped)  # the pool has copies: every step decided something


@pytest.mark.parametrize(
    "filters",
    [
        [{"caption": {"min_words": 1}}],
        [{"dedup": {"method": "exact"}}],
        [{"dedup": {"method": "semantic", "num_clusters": 2}}],
        [{"clip_score": {"top_fraction": 0.5}}],
    ],
    ids=["no-dedup", "exact", "semantic", "top-fraction"],
)
def test_bad_uids_stop_the_run(tmp_path, faulty, filters):
    """With ``input.uid.on_invalid: error`` (the default) bad uids in several shards stop
    the run with one message that counts them over the whole pool (and names the first,
    as the in-memory plan's did): the shard plan counts them before any worker builds a pool."""
    pattern, cache, _ = faulty
    out = tmp_path / "run"
    shutil.copytree(cache, out / "cache")
    raw = _raw(pattern, out, filters)
    del raw["input"]["uid"]
    with pytest.raises(ConfigError) as e:
        run(parse_config(raw), **QUIET)
    assert not (out / "subset.npy").exists()
    assert "6 sample(s) have no valid uid" in str(e.value) and "\n" not in str(e.value)


def test_good_uids_are_not_read_in_the_driver(tmp_path, rerun_dir, monkeypatch):
    """The whole pool's bad-uid count is made only once a shard has stopped the run: a run
    whose uids are good (the bundled sample, ``on_invalid: error``) never reads them in the
    driver (at 12.8B rows that read alone would take hours)."""
    from filtering.stages.webdataset import WebDatasetStage
    from pipelines.config import load_config
    from tests.conftest import write_config

    def refused(self):
        raise AssertionError("check_uids ran on a pool whose uids are good")

    monkeypatch.setattr(WebDatasetStage, "check_uids", refused)
    cfg = write_config(tmp_path / "sample.yaml", output={"dir": str(rerun_dir)})
    result = run(load_config(cfg), **QUIET)
    assert result.manifest["execution"]["plan"] == "streaming"
    assert 0 < result.manifest["counts"]["kept"] < result.manifest["counts"]["input"]
