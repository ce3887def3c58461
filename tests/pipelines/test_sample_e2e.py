"""The demo config end to end on the bundled sample, checked against the planted ground truth."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import cached_rows

pytestmark = pytest.mark.slow  # runs the CLI (make test-fast leaves these out)


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    scores = np.concatenate([pos, neg])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for s in np.unique(scores):  # average ranks over ties
        tie = scores == s
        ranks[tie] = ranks[tie].mean()
    return (ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def load_scores(out_dir):
    return {r["uid"]: (r["clip_score"], r["error"]) for r in cached_rows(out_dir)}


def test_tiny_clip_separates_matching_from_mismatched(scored_sample, truth):
    scores = load_scores(scored_sample)
    clean = np.array([scores[u][0] for u, m in truth.items() if m["truth"]["fault"] == "clean"])
    mismatched = np.array([scores[u][0] for u, m in truth.items() if m["truth"]["fault"] == "mismatched"])
    assert len(clean) > 400 and len(mismatched) > 100
    assert roc_auc(clean, mismatched) >= 0.95


def test_sample_config_drops_mismatched_keeps_matching(scored_sample, truth):
    kept = set(pq.read_table(scored_sample / "subset", columns=["uid"])["uid"].to_pylist())
    faults = {u: m["truth"]["fault"] for u, m in truth.items()}
    mismatched = [u for u, f in faults.items() if f == "mismatched"]
    matching = [u for u, f in faults.items() if f == "clean"]
    assert sum(u not in kept for u in mismatched) / len(mismatched) >= 0.90
    assert sum(u in kept for u in matching) / len(matching) >= 0.90


def test_corrupt_images_are_failures_with_reasons_and_nothing_is_lost(scored_sample, truth):
    manifest = json.loads((scored_sample / "manifest.json").read_text())
    c = manifest["counts"]
    assert c["input"] == len(truth)
    assert c["input"] == c["kept"] + c["failed"] + sum(f["dropped"] for f in c["filters"])
    corrupt = {u for u, m in truth.items() if m["truth"]["fault"] == "corrupt"}
    failed = {f["uid"]: f["reason"] for f in manifest["failures"]}
    assert set(failed) == corrupt
    assert all(r.startswith("corrupt_image: ") and len(r) > len("corrupt_image: ") for r in failed.values())

    dropped = pq.read_table(scored_sample / "dropped").to_pydict()  # every part
    kept = pq.read_table(scored_sample / "subset", columns=["uid"])["uid"].to_pylist()
    assert sorted(dropped["uid"] + kept) == sorted(truth)  # every sample kept, dropped or failed, exactly once
    assert {u for u, f in zip(dropped["uid"], dropped["filter"], strict=True) if f == "failed"} == corrupt

    subset = np.load(scored_sample / "subset.npy")
    assert subset.dtype == np.dtype("u8,u8") and len(subset) == c["kept"]


def test_outputs_carry_provenance(scored_sample):
    manifest = json.loads((scored_sample / "manifest.json").read_text())
    assert manifest["model"]["arch"] == "poolsift-tiny"
    assert len(manifest["model"]["checkpoint_sha256"]) == 64
    assert len(manifest["inputs"]) == 4 and all(len(i["sha256"]) == 64 for i in manifest["inputs"])
    meta = json.loads(pq.read_schema(scored_sample / "subset" / "part-00000.parquet").metadata[b"poolsift"])
    assert meta["config_sha256"] == manifest["config_sha256"]
    assert meta["model"]["checkpoint_sha256"] == manifest["model"]["checkpoint_sha256"]
    row = pq.read_table(scored_sample / "subset" / "part-00000.parquet").slice(0, 1).to_pylist()[0]
    for column in ("uid", "key", "caption", "source_shard", "clip_score", "width", "height", "sha256"):
        assert row[column] is not None, column


def test_same_config_gives_byte_identical_subset(scored_sample, tmp_path):
    """Scoring from scratch twice with the same config reproduces the outputs byte for byte.

    The session's sample run (``scored_sample``) is the first; the second runs from scratch
    in the same folder (outputs record their folder), the first moved aside meanwhile and put
    back after. One scoring instead of two (8.5-17 s of CI before)."""
    import shutil

    from tests.conftest import run_cli

    out = scored_sample
    first = tmp_path / "first"
    out.rename(first)
    try:
        code, _, err = run_cli("run", out.parent / "sample.yaml", "--quiet")
        assert code == 0, err
        assert "scoring 4 of 4 shards (0 cached)" in err
        written = sorted(
            str(p.relative_to(out))
            for p in [out / "subset.npy", *out.glob("subset/*"), *out.glob("dropped/*"), *out.glob("index/*")]
        )
        assert written == sorted(
            str(p.relative_to(first))
            for p in [first / "subset.npy", *first.glob("*/part-*"), first / "index/index.json"]
        )
        for rel in written:
            assert (out / rel).read_bytes() == (first / rel).read_bytes(), rel
    finally:
        shutil.rmtree(out, ignore_errors=True)
        first.rename(out)
