"""dedup on the shard plan: the candidate search's result is cached under
``DIR/cache/dedup-<fingerprint>/`` (filtering/dedup/search_cache.py). A rerun that changes
only the survivor rule, the embedding check or another filter searches nothing and says
so; a changed search setting or a shard added searches again; the outputs equal a fresh
search's."""

import json

import pyarrow.parquet as pq
import pytest

from pipelines.config import load_config
from pipelines.executors import dedup_phase
from pipelines.runner import run
from tests.conftest import REPO, SAMPLE, write_config

pytestmark = pytest.mark.slow  # runs the whole pipeline (make test-fast leaves these out)

PRESET = REPO / "configs" / "sample_dedup.yaml"


@pytest.fixture
def searches(monkeypatch):
    """The settings of every candidate search run (in the driver), in order."""
    seen = []
    real = dedup_phase._search

    def counting(tasks, sh, shards, shard_rows, starts, n, settings):
        seen.append(settings)
        return real(tasks, sh, shards, shard_rows, starts, n, settings)

    monkeypatch.setattr(dedup_phase, "_search", counting)
    return seen


def _run(tmp_path, out, name, filters, shards=None, lines=None):
    sections = {"filters": filters, "output": {"dir": str(out)}}
    if shards is not None:
        sections["input"] = {"shards": str(SAMPLE / "pool" / shards)}
    cfg = write_config(tmp_path / f"{name}.yaml", base=PRESET, **sections)
    return run(load_config(cfg), progress=False, log=(lines.append if lines is not None else lambda _m: None))


def _dropped(out):
    return sorted(
        (r["uid"], r["filter"], r["reason"], r["duplicate_of"]) for r in pq.read_table(out / "dropped").to_pylist()
    )


def _cache(manifest) -> dict[str, str]:
    return {column: record["cache"] for column, record in manifest["stages"]["dedup"].items()}


def test_rerun_changing_only_the_decision_searches_nothing(tmp_path, rerun_dir, searches):
    exact = {"dedup": {"method": "exact"}}
    near = {"dedup": {"method": "perceptual", "max_distance": 8, "min_similarity": 0.94}}
    first = _run(tmp_path, rerun_dir, "first", [exact, near])
    assert first.manifest["execution"]["plan"] == "streaming"
    assert [s.method for s in searches] == ["exact", "perceptual"]
    assert _cache(first.manifest) == {"dedup_label_exact": "computed", "dedup_label_phash_d8": "computed"}
    entries = sorted((rerun_dir / "cache").glob("dedup-*/labels.npy"))
    assert len(entries) == 2
    assert "dedup_label_exact" not in pq.read_table(rerun_dir / "subset").column_names  # internal column

    # Another survivor rule, another embedding check, a filter before and one after: no search.
    later = [
        {"caption": {"min_words": 1}},
        {"dedup": {"method": "exact", "keep": "smallest_uid"}},
        {"dedup": {"method": "perceptual", "max_distance": 8, "min_similarity": 0.9}},
        {"image_size": {"min_side": 8}},
    ]
    lines: list[str] = []
    second = _run(tmp_path, rerun_dir, "second", later, lines=lines)
    assert len(searches) == 2
    assert set(_cache(second.manifest).values()) == {"reused"}
    for column, record in second.manifest["stages"]["dedup"].items():
        assert record["fingerprint"] == first.manifest["stages"]["dedup"][column]["fingerprint"]
        assert record["pairs"] == first.manifest["stages"]["dedup"][column]["pairs"]
        assert record["workers"] is None
    read = [line for line in lines if "candidate search read from cache" in line]
    assert len(read) == 2, lines

    # The cached result decides as a fresh search does: same dropped table, same counts.
    fresh_dir = tmp_path / "fresh"
    fresh_dir.mkdir()
    (fresh_dir / "cache").symlink_to(rerun_dir / "cache", target_is_directory=True)
    for f in (rerun_dir / "cache").glob("dedup-*"):
        f.rename(f.with_name("old-" + f.name))
    fresh = _run(tmp_path, fresh_dir, "fresh", later)
    assert len(searches) == 4
    assert set(_cache(fresh.manifest).values()) == {"computed"}
    assert _dropped(rerun_dir) == _dropped(fresh_dir)
    assert fresh.manifest["counts"] == second.manifest["counts"]

    # A setting that changes the candidates searches again; so does a shard added.
    near4 = [{"dedup": {"method": "perceptual", "max_distance": 4}}]
    three = _run(tmp_path, rerun_dir, "three", near4, shards="{00000..00002}.tar")
    assert len(searches) == 5 and searches[-1].max_distance == 4
    four = _run(tmp_path, rerun_dir, "four", near4)
    assert len(searches) == 6
    assert _cache(three.manifest) == _cache(four.manifest) == {"dedup_label_phash_d4": "computed"}
    assert json.loads((rerun_dir / "manifest.json").read_text())["stages"]["dedup"] == four.manifest["stages"]["dedup"]
    fingerprints = {m.manifest["stages"]["dedup"]["dedup_label_phash_d4"]["fingerprint"] for m in (three, four)}
    assert len(fingerprints) == 2
    assert four.manifest["counts"]["input"] > three.manifest["counts"]["input"]
