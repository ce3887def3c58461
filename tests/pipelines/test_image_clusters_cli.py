"""image_clusters through the CLI on the bundled sample: it selects the reference classes,
and reruns with other filter thresholds reuse centroids, reference and assignments."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import REPO, SAMPLE, run_cli, write_config

pytestmark = pytest.mark.slow  # runs the CLI (make test-fast leaves these out)

PRESET = REPO / "configs" / "sample_image_clusters.yaml"


def kept_uids(out) -> set[str]:
    return {
        u
        for p in sorted((out / "subset").glob("*.parquet"))
        for u in pq.read_table(p, columns=["uid"]).column("uid").to_pylist()
    }


def manifest(out) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def clustered(tmp_path_factory, scored_sample):
    """The sample preset run once with image_clusters alone (scores reused from the session run)."""
    out = tmp_path_factory.mktemp("clusters") / "run"
    out.mkdir()
    shutil.copytree(scored_sample / "cache", out / "cache")
    clusters = yaml.safe_load(PRESET.read_text())["clusters"] | {"reference": str(SAMPLE / "reference")}
    cfg = write_config(
        out.parent / "ic.yaml",
        base=PRESET,
        clusters=clusters,
        filters=[{"image_clusters": {}}],
        output={"dir": str(out)},
    )
    code, _, err = run_cli("run", cfg, "--quiet")
    assert code == 0, err
    return out, cfg, kept_uids(out), manifest(out)


def test_keeps_reference_classes_and_drops_the_others(clustered, truth):
    from filtering.sample.make import REFERENCE_CLASSES

    _, _, kept, man = clustered
    info = man["stages"]["clusters"]
    assert info["centroids"] == "trained" and info["reference"] == "embedded"
    assert info["reference_count"] > 0
    ok = {u: m["truth"]["class"] for u, m in truth.items() if m["truth"]["fault"] != "corrupt"}
    inside = [u for u, c in ok.items() if c in REFERENCE_CLASSES]
    outside = [u for u, c in ok.items() if c not in REFERENCE_CLASSES]
    kept_inside = sum(u in kept for u in inside) / len(inside)
    dropped_outside = sum(u not in kept for u in outside) / len(outside)
    assert kept_inside >= 0.9, f"kept {kept_inside:.1%} of reference-class images"
    assert dropped_outside >= 0.9, f"dropped {dropped_outside:.1%} of other images"
    funnel = man["counts"]["filters"]
    assert funnel[0]["name"] == "image_clusters" and "image_cluster_not_in_target" in funnel[0]["reasons"]


def test_rerun_with_other_clip_threshold_reuses_clusters(clustered, monkeypatch):
    out, cfg, kept_clusters, _ = clustered

    def boom(*args, **kwargs):
        raise AssertionError("a rerun with new filter thresholds must not load the model or re-cluster")

    monkeypatch.setattr("filtering.models.clip.load_clip", boom)
    monkeypatch.setattr("filtering.clustering.train_kmeans", boom)
    sizes = {}
    for fraction in (0.3, 0.6):
        code, _, err = run_cli(
            "run",
            cfg,
            "--quiet",
            "--set",
            f"filters=[{{clip_score: {{top_fraction: {fraction}}}}}, {{image_clusters: {{}}}}]",
        )
        assert code == 0, err
        info = manifest(out)["stages"]["clusters"]
        assert info["centroids"] == "cached" and info["reference"] == "cached"
        assert info["cache"] == {"targets": "cached", "shards_assigned": 0, "shards_cached": 4}
        kept = kept_uids(out)
        assert kept <= kept_clusters  # the intersection
        sizes[fraction] = len(kept)
    assert 0 < sizes[0.3] < sizes[0.6]
