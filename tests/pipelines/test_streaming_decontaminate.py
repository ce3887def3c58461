"""Decontamination on the shard plan (``DecontaminateStage``, scope ``global``: the
reference sets in the driver, each shard's nearest items in the workers) against the
outputs recorded from the in-memory plan it replaced (tests/golden.py): subset.npy byte for byte, the subset and dropped rows in order, the
manifest's counts and decontamination records; on DataComp metadata and on the bundled
WebDataset sample (whose corrupt images are failed rows)."""

from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import REPO, SAMPLE
from tests.datacomp_pool import make_datacomp_pool, pool_embeddings
from tests.pipelines.test_streaming import assert_recorded_outputs
from tests.pipelines.test_streaming_webdataset import _recorded, _sample_run

pytestmark = pytest.mark.slow  # runs the whole pipeline


@pytest.fixture(scope="module")
def leaky(tmp_path_factory):
    """A DataComp pool with a ``phash`` column, and evaluation sets that leak into it: l14
    embeddings (some the pool's own, one per shard) and perceptual hashes (some a few
    bits from the pool's)."""
    root = tmp_path_factory.mktemp("dcleak")
    metadata = make_datacomp_pool(root / "metadata", shards=3, rows=60, seed=11)
    rng = np.random.default_rng(4)
    pool_hashes = []
    for path in sorted(metadata.glob("*.parquet")):
        t = pq.read_table(path)
        phash = rng.integers(0, 2**63, t.num_rows, dtype=np.int64).astype(np.uint64)
        pq.write_table(t.append_column("phash", pa.array(phash, pa.uint64())), path)
        pool_hashes.append(phash)
    hashes = np.concatenate(pool_hashes)
    flips = np.uint64(1) << rng.integers(0, 64, 12).astype(np.uint64)
    leaked = hashes[rng.choice(len(hashes), 12, replace=False)] ^ flips
    np.save(root / "eval_hashes.npy", np.r_[leaked, rng.integers(0, 2**63, 30, dtype=np.int64).astype(np.uint64)])
    _, emb = pool_embeddings(metadata, "l14_img")
    leaked_emb = emb[[3, 70, 150]].astype(np.float32)
    others = rng.standard_normal((20, emb.shape[1])).astype(np.float32)
    np.save(root / "eval_emb.npy", np.r_[leaked_emb, others])
    return root


SEMANTIC = {"reference": "eval_emb.npy", "method": "semantic", "embedding": "l14_img", "threshold": 0.999}
PERCEPTUAL = {"reference": "eval_hashes.npy", "method": "perceptual", "max_distance": 1}


@pytest.mark.parametrize(
    "specs", [[SEMANTIC], [PERCEPTUAL], [PERCEPTUAL, SEMANTIC]], ids=["semantic", "perceptual", "both"]
)
def test_datacomp(tmp_path, leaky, specs):
    filters = [{"caption": {"min_words": 2}}]
    filters += [{"decontaminate": {**s, "reference": str(leaky / s["reference"])}} for s in specs]
    m = assert_recorded_outputs(leaky / "metadata", tmp_path, filters, rows_per_part=40)
    steps = [f for f in m["counts"]["filters"] if f["name"].startswith("decontaminate")]
    assert len(steps) == len(specs) and all(f["dropped"] > 0 for f in steps)
    records = m["stages"]["decontaminate"]
    assert len(records) == len(specs) and all(r["nearest"] is not None for r in records.values())
    assert "decontaminate" in m["execution"]["seconds"]


def test_shipped_semantic_datacomp_preset(tmp_path, leaky):
    """configs/dedup_semantic_datacomp.yaml's filters (exact dedup, SemDeDup,
    decontamination, clip_score top_fraction), every step on the shard plan."""
    raw = yaml.safe_load((REPO / "configs" / "dedup_semantic_datacomp.yaml").read_text())
    filters = json.loads(json.dumps(raw["filters"]).replace("path/to/eval_l14_img.npy", str(leaky / "eval_emb.npy")))
    m = assert_recorded_outputs(leaky / "metadata", tmp_path, filters)
    assert {f["name"]: f for f in m["counts"]["filters"]}["decontaminate"]["dropped"] == 3


def _pool_images(n: int) -> list[tuple[str, bytes]]:
    """(key, jpg bytes) of the first ``n`` clean samples of the sample's first shard."""
    out = []
    with tarfile.open(sorted((SAMPLE / "pool").glob("*.tar"))[0]) as tf:
        members = {m.name: m for m in tf.getmembers()}
        for name in sorted(members):
            if name.endswith(".json") and json.load(tf.extractfile(members[name]))["truth"]["fault"] == "clean":
                key = name[: -len(".json")]
                out.append((key, tf.extractfile(members[key + ".jpg"]).read()))
                if len(out) == n:
                    break
    return out


@pytest.mark.parametrize(
    ("method", "params"), [("perceptual", {"max_distance": 0}), ("semantic", {"threshold": 0.9995})]
)
def test_webdataset_with_failed_rows(tmp_path, rerun_dir, method, params):
    """An image folder with copies of pool images, embedded or hashed once in the driver."""
    ref = tmp_path / "evalset"
    ref.mkdir()
    for key, data in _pool_images(3):
        (ref / f"{key}.jpg").write_bytes(data)
    for src in sorted((SAMPLE / "reference").rglob("*.jpg"))[:3]:
        shutil.copy(src, ref / src.name)
    filters = [
        {"caption": {"min_words": 2}},
        {"decontaminate": {"reference": str(ref), "method": method, **params}},
    ]
    streamed = _sample_run(rerun_dir, filters)  # the scores cached, the reference set and nearest items computed
    _recorded(streamed, rerun_dir)
    m = streamed.manifest
    assert m["counts"]["failed"] > 0
    assert {f["name"]: f for f in m["counts"]["filters"]}["decontaminate"]["dropped"] >= 3
    [record] = m["stages"]["decontaminate"].values()
    assert record["reference_items"] == 6 and record["reference_cache"] == (
        "embedded" if method == "semantic" else "hashed"
    )


def test_webdataset_against_reference_shards(tmp_path, rerun_dir):
    """A reference given as WebDataset shards (one of the pool's own, corrupt images
    included: skipped), hashed once in the driver."""
    shard = sorted((SAMPLE / "pool").glob("*.tar"))[1]
    filters = [{"decontaminate": {"reference": str(shard), "method": "perceptual", "max_distance": 0}}]
    streamed = _sample_run(rerun_dir, filters)
    _recorded(streamed, rerun_dir)
    [record] = streamed.manifest["stages"]["decontaminate"].values()
    assert record["reference_cache"] == "hashed" and record["nearest"] == 0
    assert {f["name"]: f for f in streamed.manifest["counts"]["filters"]}["decontaminate"]["dropped"] > 0
