"""dropped/ lists every dropped or failed sample exactly once, with the filter and reason;
the manifest funnel is the filters' own counts."""

import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.config import load_config
from pipelines.runner import run
from tests.conftest import write_config

pytestmark = pytest.mark.slow  # runs the CLI (make test-fast leaves these out)

FILTERS = [
    {"caption": {"min_words": 2, "min_chars": 6}},
    {"any": [{"image_size": {"min_side": 64, "max_aspect_ratio": 3.0}}, {"not": {"text_entities": {}}}]},
    {"language": {"languages": ["en"], "candidates": ["en", "de", "fr", "es"]}},
    {"clip_score": {"top_fraction": 0.6}},
]


def run_in(tmp_path, out_dir, **output):
    cfg = write_config(tmp_path / "audit.yaml", filters=FILTERS, output={"dir": str(out_dir), **output})
    return run(load_config(cfg), progress=False, log=lambda msg: None)


def test_every_dropped_or_failed_sample_once(tmp_path, rerun_dir, truth):
    run_in(tmp_path, rerun_dir)
    manifest = json.loads((rerun_dir / "manifest.json").read_text())
    dropped = pq.read_table(rerun_dir / "dropped").to_pylist()
    kept = pq.read_table(rerun_dir / "subset").column("uid").to_pylist()

    dropped_uids = [r["uid"] for r in dropped]
    assert len(dropped_uids) == len(set(dropped_uids))  # exactly once
    assert not set(dropped_uids) & set(kept)
    assert set(dropped_uids) | set(kept) == set(truth)  # nothing lost: every sample of the pool

    counts = manifest["counts"]
    assert counts["input"] == counts["kept"] + counts["failed"] + sum(f["dropped"] for f in counts["filters"])
    by_filter = Counter(r["filter"] for r in dropped)
    assert by_filter.pop("failed") == counts["failed"]
    assert by_filter == {f["name"]: f["dropped"] for f in counts["filters"] if f["dropped"]}
    for f in counts["filters"]:
        assert Counter(r["reason"] for r in dropped if r["filter"] == f["name"]) == f["reasons"]
    failed = [r for r in dropped if r["filter"] == "failed"]
    assert all(truth[r["uid"]]["truth"]["fault"] == "corrupt" and r["reason"] for r in failed)
    assert all(set(r) >= {"uid", "key", "source_shard", "filter", "reason", "duplicate_of"} for r in dropped)


def test_funnel_is_the_filters_own_counts(tmp_path, rerun_dir):
    """Each funnel entry's ``in`` is what the entries before it left alive, and its
    ``dropped`` and ``reasons`` are the dropped rows that name it (recounted from dropped/)."""
    result = run_in(tmp_path, rerun_dir)
    dropped = pq.read_table(rerun_dir / "dropped").to_pylist()
    counts = result.manifest["counts"]
    alive = counts["input"] - counts["failed"]
    for node, entry in zip(load_config(tmp_path / "audit.yaml").filter_tree, counts["filters"], strict=True):
        mine = [r for r in dropped if r["filter"] == node.label()]
        assert entry["name"] == node.label()
        assert (entry["in"], entry["dropped"]) == (alive, len(mine))
        assert entry["reasons"] == dict(Counter(r["reason"] for r in mine))
        alive -= len(mine)
    assert alive == counts["kept"] == len(np.load(rerun_dir / "subset.npy"))


def test_dropped_can_be_turned_off(tmp_path, rerun_dir):
    run_in(tmp_path, rerun_dir)
    assert list((rerun_dir / "dropped").glob("part-*.parquet"))
    result = run_in(tmp_path, rerun_dir, dropped=False)
    assert "dropped" not in result.manifest["outputs"]
    assert not list((rerun_dir / "dropped").glob("part-*.parquet"))  # no stale audit trail left behind
    assert (rerun_dir / "subset.npy").is_file()
