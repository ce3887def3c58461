"""End to end on a DataComp-format pool: selections equal DataComp's own, no torch, provenance."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import REPO, run_cli
from tests.datacomp_pool import datacomp_clip_score_uids, datacomp_threshold, make_datacomp_pool

pytestmark = pytest.mark.slow  # runs the CLI (make test-fast leaves these out)

B32, L14 = "clip_b32_similarity_score", "clip_l14_similarity_score"


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
    return make_datacomp_pool(tmp_path_factory.mktemp("dc") / "metadata", shards=4, rows=90)


def _config(path, metadata, out, filters, **output):
    cfg = {"input": {"datacomp_metadata": str(metadata)}, "filters": filters, "output": {"dir": str(out), **output}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(tmp_path, metadata, filters, **output):
    out = tmp_path / "run"
    code, stdout, stderr = run_cli("run", _config(tmp_path / "c.yaml", metadata, out, filters, **output), "--quiet")
    assert code == 0, stderr
    return out


@pytest.mark.parametrize("field", [B32, L14])
@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.9])
def test_top_fraction_equals_datacomp_including_ties(tmp_path, metadata, field, fraction):
    params = {"top_fraction": fraction} if field == L14 else {"top_fraction": fraction, "field": field}
    out = _run(tmp_path, metadata, [{"clip_score": params}])  # L/14 is the default field for DataComp input
    expected = datacomp_clip_score_uids(metadata, field, fraction=fraction)
    got = np.load(out / "subset.npy")
    assert got.dtype == np.dtype("u8,u8")
    np.testing.assert_array_equal(got, expected)
    threshold = datacomp_threshold(metadata, field, fraction)
    n_total = 90 + 91 + 92 + 93
    assert len(expected) > int(n_total * fraction)  # ties at the threshold are all kept
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["thresholds"][field] == pytest.approx(float(threshold), abs=0)


@pytest.mark.parametrize("field", [B32, L14])
def test_min_threshold_equals_datacomp(tmp_path, metadata, field):
    out = _run(tmp_path, metadata, [{"clip_score": {"min": 0.3, "field": field}}])
    np.testing.assert_array_equal(np.load(out / "subset.npy"), datacomp_clip_score_uids(metadata, field, threshold=0.3))


def test_provenance_and_subset_readers(tmp_path, metadata, monkeypatch):
    out = _run(tmp_path, metadata, [{"clip_score": {"top_fraction": 0.3}}])
    manifest = json.loads((out / "manifest.json").read_text())
    files = sorted(p for p in metadata.iterdir())
    assert sorted(i["path"] for i in manifest["inputs"]) == [str(p) for p in files]  # parquet + npz
    import hashlib

    assert all(i["sha256"] == hashlib.sha256(Path(i["path"]).read_bytes()).hexdigest() for i in manifest["inputs"])
    assert manifest["input_checksum"] == "sha256"
    assert manifest["input_kind"] == "datacomp"
    assert manifest["model"]["arch"] is None  # scores came from DataComp, no model ran
    assert len(manifest["config_sha256"]) == 64 and manifest["poolsift_version"]
    c = manifest["counts"]
    assert c["input"] == 366 and c["failed"] == 0 and c["kept"] + c["filters"][0]["dropped"] == 366

    part = out / "subset" / "part-00000.parquet"
    meta = json.loads(pq.read_schema(part).metadata[b"poolsift"])
    assert meta["config_sha256"] == manifest["config_sha256"]
    assert meta["config"]["input"]["datacomp_metadata"] == str(metadata)

    import duckdb
    import pandas as pd

    parts = str(out / "subset" / "part-*.parquet")  # the streaming plan writes a part per source shard
    df = pd.read_parquet(out / "subset")
    assert {"uid", "key", "caption", "source_shard", L14, B32, "sha256", "original_width"} <= set(df.columns)
    assert len(df) == c["kept"]
    assert duckdb.sql(f"select count(*) from '{parts}'").fetchall() == [(c["kept"],)]

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import datasets

    ds = datasets.load_dataset("parquet", data_files=parts, split="train", cache_dir=str(tmp_path / "hf_cache"))
    assert ds.num_rows == c["kept"]
    assert sorted(ds["uid"]) == sorted(df["uid"])

    dropped = pd.read_parquet(out / "dropped")
    assert len(dropped) == 366 - c["kept"]
    assert set(dropped["reason"]) == {"clip_score_below_top_fraction"}
    assert set(dropped["filter"]) == {"clip_score"}


def test_metadata_only_run_never_imports_torch(tmp_path, metadata):
    cfg = _config(tmp_path / "c.yaml", metadata, tmp_path / "run", [{"clip_score": {"top_fraction": 0.3}}])
    code = (
        "import sys\n"
        "from pipelines.cli import main\n"
        f"rc = main(['run', {str(cfg)!r}, '--quiet'])\n"
        "heavy = sorted(m for m in ('torch', 'open_clip', 'torchvision', 'faiss', 'ray') if m in sys.modules)\n"
        "print(rc, heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "0 []"


def test_resharding_needs_images(tmp_path, metadata):
    cfg = _config(
        tmp_path / "c.yaml", metadata, tmp_path / "run", [{"clip_score": {"top_fraction": 0.3}}], webdataset=True
    )
    code, _, stderr = run_cli("validate", cfg)
    assert code == 2
    assert "output.webdataset" in stderr and "subset.npy" in stderr


def test_clip_score_intersect_image_clusters_equals_datacomp(tmp_path, metadata):
    from tests.datacomp_pool import datacomp_image_cluster_uids

    rng = np.random.default_rng(1)
    centroids = rng.standard_normal((12, 24)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    reference = rng.standard_normal((5, 24)).astype(np.float32)
    np.save(tmp_path / "centroids.npy", centroids)
    np.save(tmp_path / "reference.npy", reference)
    cfg = {
        "input": {"datacomp_metadata": str(metadata)},
        "clusters": {
            "centroids": str(tmp_path / "centroids.npy"),
            "reference": str(tmp_path / "reference.npy"),
            "embedding": "l14_img",
        },
        "filters": [{"clip_score": {"top_fraction": 0.3}}, {"image_clusters": {}}],
        "output": {"dir": str(tmp_path / "run")},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, _, stderr = run_cli("run", tmp_path / "c.yaml", "--quiet")
    assert code == 0, stderr
    expected = datacomp_image_cluster_uids(metadata, centroids, reference, L14, 0.3)
    got = np.load(tmp_path / "run" / "subset.npy")
    assert 0 < len(got) < len(datacomp_clip_score_uids(metadata, L14, fraction=0.3))  # both rules bite
    np.testing.assert_array_equal(got, expected)


def test_validate_and_run_name_a_missing_folder(tmp_path):
    cfg = _config(tmp_path / "c.yaml", tmp_path / "nowhere", tmp_path / "run", [{"clip_score": {"top_fraction": 0.3}}])
    code, stdout, stderr = run_cli("validate", cfg)
    assert code == 2 and "input.datacomp_metadata" in stderr and "nowhere" in stderr, stderr
    code, _, stderr = run_cli("run", cfg, "--quiet")
    assert code == 2
    assert "input.datacomp_metadata" in stderr and "nowhere" in stderr


def test_subset_npy_answers_datacomp_resharders_lookup(tmp_path, metadata):
    """DataComp's resharder memory-maps subset.npy and, for each sample's json uid, counts
    ``searchsorted(subset, divmod(int(uid, 16), 2**64), "right") - "left"``."""
    import pandas as pd

    out = _run(tmp_path, metadata, [{"clip_score": {"top_fraction": 0.5}}])
    subset = np.load(out / "subset.npy", mmap_mode="r")
    assert subset.dtype == np.dtype("u8,u8")
    kept = set(pd.read_parquet(out / "subset")["uid"])
    everyone = pd.concat([pd.read_parquet(p, columns=["uid"]) for p in sorted(metadata.glob("*.parquet"))])["uid"]
    for uid in everyone:
        key = np.array([divmod(int(uid, 16), 2**64)], np.dtype("u8,u8"))[0]
        count = np.searchsorted(subset, key, "right") - np.searchsorted(subset, key, "left")
        assert count == (1 if uid in kept else 0)


def test_subset_rows_carry_the_source_metadata_across_parts(tmp_path, metadata):
    """Captions, urls and hashes are read shard by shard for the kept rows only; the parts
    put together are exactly DataComp's rows for the kept uids, in pool order."""
    import pyarrow as pa

    out = _run(tmp_path, metadata, [{"clip_score": {"top_fraction": 0.4}}], rows_per_part=25)
    parts = sorted((out / "subset").glob("part-*.parquet"))
    assert len(parts) > 3 and all(0 < pq.ParquetFile(p).metadata.num_rows <= 25 for p in parts)
    # the streaming plan's parts follow the source shards: one shard's rows each, in order
    shards = [set(pq.read_table(p, columns=["source_shard"]).column(0).to_pylist()) for p in parts]
    assert all(len(s) == 1 for s in shards)
    order = [s.pop() for s in shards]
    assert order == sorted(order) and len(set(order)) == len(list(metadata.glob("*.parquet")))
    subset = pq.read_table(out / "subset")
    source = pa.concat_tables([pq.read_table(p) for p in sorted(metadata.glob("*.parquet"))])
    keep = np.asarray(source.column(L14)) >= datacomp_threshold(metadata, L14, 0.4)
    kept = source.filter(pa.array(keep))
    assert subset.column("uid").to_pylist() == kept.column("uid").to_pylist()
    for ours, theirs in [("caption", "text"), ("url", "url"), ("sha256", "sha256"), ("key", "key"), (B32, B32)]:
        assert subset.column(ours).to_pylist() == kept.column(theirs).to_pylist(), ours
    assert subset.column_names[:4] == ["uid", "key", "source_shard", "caption"]
