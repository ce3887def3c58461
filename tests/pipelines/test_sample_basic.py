"""configs/sample_basic.yaml on the bundled sample: each planted fault is dropped by the
filter meant for it (ground truth in each sample's .json)."""

from collections import Counter

import pyarrow.parquet as pq
import pytest

from pipelines.config import load_config
from pipelines.runner import run
from tests.conftest import REPO, write_config

pytestmark = pytest.mark.slow  # runs the CLI (make test-fast leaves these out)


def test_sample_basic_drops_the_planted_faults(tmp_path, rerun_dir, truth):
    cfg = write_config(
        tmp_path / "sample_basic.yaml", base=REPO / "configs" / "sample_basic.yaml", output={"dir": str(rerun_dir)}
    )
    result = run(load_config(cfg), progress=False, log=lambda msg: None)
    dropped = {r["uid"]: r for r in pq.read_table(rerun_dir / "dropped").to_pylist()}
    kept = set(pq.read_table(rerun_dir / "subset").column("uid").to_pylist())
    expected = {
        "empty_caption": ("caption", "caption_empty"),
        "non_english": ("language", "language_not_allowed"),
        "tiny": ("image_size", "image_too_small"),
        "extreme_aspect": ("image_size", "image_aspect_ratio"),
    }
    for fault, (filter_name, reason) in expected.items():
        uids = [u for u, meta in truth.items() if meta["truth"]["fault"] == fault]
        assert uids and not set(uids) & kept, fault
        by_its_filter = [u for u in uids if (dropped[u]["filter"], dropped[u]["reason"]) == (filter_name, reason)]
        assert len(by_its_filter) >= 0.9 * len(uids), (
            fault,
            Counter((dropped[u]["filter"], dropped[u]["reason"]) for u in uids),
        )
    clean = [u for u, meta in truth.items() if meta["truth"]["fault"] == "clean"]
    by_rules = [u for u in clean if u in dropped and dropped[u]["filter"] in ("caption", "image_size", "language")]
    assert len(by_rules) < 0.2 * len(clean)  # the caption, size and language rules spare most clean samples
    assert result.manifest["counts"]["kept"] == len(kept)
