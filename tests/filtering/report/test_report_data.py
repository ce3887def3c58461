"""What the report reads and shows, without a browser: numbers against the run's own outputs."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from filtering.report import gather
from filtering.report.data import Reservoir, Sample, TopK, _UidSet
from filtering.uid import u8u8_to_uids
from tests.conftest import run_cli, write_config
from tests.datacomp_pool import make_datacomp_pool


def test_topk_over_batches_equals_a_full_sort():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=5000)
    hi, lo = TopK(7, largest=True), TopK(7, largest=False)
    for start in range(0, len(scores), 613):
        batch = scores[start : start + 613]
        hi.offer(batch, lambda j, s=start: Sample(str(s + j)))
        lo.offer(batch, lambda j, s=start: Sample(str(s + j)))
    assert [int(x.uid) for x in hi.result()] == np.argsort(-scores)[:7].tolist()
    assert [int(x.uid) for x in lo.result()] == np.argsort(scores)[:7].tolist()


def test_reservoir_is_seeded_and_uniform():
    def draw(seed):
        r = Reservoir(5, seed)
        for start in range(0, 1000, 100):
            r.offer(100, lambda j, s=start: Sample(str(s + j)))
        return sorted(int(x.uid) for x in r.result())

    assert draw(1) == draw(1) and draw(1) != draw(2)
    counts = np.bincount(np.concatenate([draw(s) for s in range(400)]) // 100, minlength=10)
    assert counts.min() > 120  # each tenth of the stream gets about 200 of the 2000 picks


def test_kept_membership_with_equal_high_halves():
    kept = np.array([(1, 0), (2, 1), (2, 3), (2, 7), (5, 5), (9, 0)], dtype="u8,u8")
    query = np.array([(1, 0), (2, 1), (2, 3), (2, 7), (2, 4), (9, 0), (10, 0), (0, 0)], dtype="u8,u8")
    found = _UidSet(kept).contains(pa.array(u8u8_to_uids(query)))
    assert found.tolist() == [True, True, True, True, False, True, False, False]


def _run_top30(rerun_dir, tmp_path, **output):
    cfg = write_config(
        tmp_path / "c.yaml", filters=[{"clip_score": {"top_fraction": 0.3}}], output={"dir": str(rerun_dir), **output}
    )
    code, _, stderr = run_cli("run", cfg, "--quiet")
    assert code == 0, stderr
    return json.loads((rerun_dir / "manifest.json").read_text())


@pytest.mark.slow
def test_report_numbers_match_the_run(rerun_dir, tmp_path):
    manifest = _run_top30(rerun_dir, tmp_path, report=True)
    assert manifest["outputs"]["report"] == str(rerun_dir / "report.html")
    assert (rerun_dir / "report.html").stat().st_size > 10_000  # written at the end of the run

    data = gather(str(rerun_dir))
    c = manifest["counts"]
    h = data.histogram
    assert data.score_scope == "pool"
    assert int(h.kept.sum()) == c["kept"]
    assert int(h.kept.sum() + h.dropped.sum()) == c["input"] - c["failed"]
    assert h.thresholds == [pytest.approx(manifest["thresholds"]["clip_score"])]
    threshold = h.thresholds[0]
    kept_scores = pq.read_table(rerun_dir / "subset").column("clip_score").to_numpy()
    best, weakest, below = (
        data.grids[k] for k in ("highest-scored kept", "lowest-scored kept", "highest-scored dropped")
    )
    assert [s.score for s in best] == pytest.approx(np.sort(kept_scores)[::-1][:12].tolist())
    assert [s.score for s in weakest] == pytest.approx(np.sort(kept_scores)[:12].tolist())
    assert all(s.score < threshold for s in below) and all(s.score >= threshold for s in weakest)
    dropped = pq.read_table(rerun_dir / "dropped").to_pandas()
    failed = dropped[dropped["filter"] == "failed"]
    assert {s.uid for s in data.failures} <= set(failed["uid"])
    assert len(data.failures) == min(12, len(failed))
    assert all(s.note == failed.set_index("uid").loc[s.uid, "reason"] for s in data.failures)


@pytest.mark.slow
def test_report_cli_and_missing_score_cache(rerun_dir, tmp_path):
    _run_top30(rerun_dir, tmp_path)
    bare = tmp_path / "bare"
    shutil.copytree(rerun_dir, bare, ignore=shutil.ignore_patterns("cache"))
    code, stdout, stderr = run_cli("report", bare, "--output", tmp_path / "r.html")
    assert code == 0, stderr
    html = (tmp_path / "r.html").read_text()
    assert "kept rows only" in html and 'class="plot histogram"' in html  # plots from the subset alone

    code, _, stderr = run_cli("report", tmp_path / "nowhere")
    assert code == 2 and "manifest.json" in stderr


@pytest.mark.slow
def test_metadata_only_datacomp_report(tmp_path):
    meta = make_datacomp_pool(tmp_path / "metadata", shards=2, rows=80)
    cfg = {
        "input": {"datacomp_metadata": str(meta)},
        "filters": [{"clip_score": {"top_fraction": 0.3, "field": "clip_b32_similarity_score"}}],
        "output": {"dir": str(tmp_path / "run"), "report": True},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, _, stderr = run_cli("run", tmp_path / "c.yaml", "--quiet")
    assert code == 0, stderr
    data = gather(str(tmp_path / "run"))
    assert data.score_scope == "pool" and data.histogram.field == "clip_b32_similarity_score"
    assert int(data.histogram.kept.sum() + data.histogram.dropped.sum()) == 161
    html = (tmp_path / "run" / "report.html").read_text()
    assert 'class="plot histogram"' in html and "<img" not in html  # plots, no thumbnails
    assert len(re.findall(r'class="card kept"', html)) == 24 and 'class="noimg"' not in html


@pytest.mark.slow
def test_clusters_and_duplicates_from_the_stages(clustered_run):
    manifest = json.loads((clustered_run / "manifest.json").read_text())
    info, counts = manifest["stages"]["clusters"], manifest["counts"]
    data = gather(str(clustered_run))
    cl = data.clusters
    assert cl.scope == "pool" and cl.n_clusters <= 16
    assert sum(n for _, n, _ in cl.sizes) == counts["input"] - counts["failed"]  # failed rows have no cluster
    assert cl.n_target == info["target_clusters"]
    assert sum(n for _, n, target in cl.sizes if target) == info["rows_in_target"]
    assert cl.examples and all(0 < len(v) <= 5 for v in cl.examples.values())
    kept = set(pq.read_table(clustered_run / "subset", columns=["uid"]).column("uid").to_pylist())
    assert all(s.uid in kept for v in cl.examples.values() for s in v)

    dropped = pq.read_table(clustered_run / "dropped").to_pandas()
    links = dropped.dropna(subset=["duplicate_of"])
    assert data.duplicate_rows == len(links) > 0
    sizes = links.groupby("duplicate_of").size()
    assert [g.total_copies for g in data.duplicates] == sorted(sizes, reverse=True)[: len(data.duplicates)]
    for g in data.duplicates:
        assert {c.uid for c in g.copies} <= set(links[links["duplicate_of"] == g.survivor.uid]["uid"])
        assert g.survivor.caption is not None and g.survivor.score is not None  # details joined from the scores
    html = (clustered_run / "report.html").read_text()
    assert 'id="clusters"' in html and 'id="duplicates"' in html
