"""dedup: the candidate search runs as a cached stage, the filter only decides. A rerun that
changes only the survivor rule, the embedding check or another filter searches nothing;
a changed search setting searches again; the outputs equal a fresh run's. On the
in-memory plan (``execution.mode: memory``): the shard plan's search is not cached."""

import json

import pyarrow.parquet as pq
import pytest

from filtering.dedup import partitioned
from pipelines.config import load_config
from pipelines.runner import run
from tests.conftest import REPO, write_config

pytestmark = pytest.mark.slow  # runs the whole pipeline (make test-fast leaves these out)

PRESET = REPO / "configs" / "sample_dedup.yaml"
QUIET = dict(progress=False, log=lambda msg: None)


@pytest.fixture
def searches(monkeypatch):
    """The settings of every candidate search run, in order."""
    seen: list[partitioned.SearchSettings] = []
    real = partitioned.search

    def counting(shards, n, settings, **kw):
        seen.append(settings)
        return real(shards, n, settings, **kw)

    monkeypatch.setattr(partitioned, "search", counting)
    return seen


def _run(tmp_path, out, name, filters):
    # the in-memory plan's search stage is cached; the shard plan's search is not (yet)
    cfg = write_config(
        tmp_path / f"{name}.yaml",
        base=PRESET,
        filters=filters,
        output={"dir": str(out)},
        execution={"mode": "memory"},
    )
    return run(load_config(cfg), **QUIET)


def _dropped(out):
    return sorted(
        (r["uid"], r["filter"], r["reason"], r["duplicate_of"]) for r in pq.read_table(out / "dropped").to_pylist()
    )


def test_rerun_changing_only_the_decision_searches_nothing(tmp_path, rerun_dir, searches):
    exact = {"dedup": {"method": "exact"}}
    near = {"dedup": {"method": "perceptual", "max_distance": 8, "min_similarity": 0.94}}
    first = _run(tmp_path, rerun_dir, "first", [exact, near])
    assert [s.method for s in searches] == ["exact", "perceptual"]
    info = first.manifest["stages"]["dedup"]
    assert {c: r["cache"] for c, r in info.items()} == {
        "dedup_label_exact": "computed",
        "dedup_label_phash_d8": "computed",
    }
    assert "dedup_label_exact" not in pq.read_table(rerun_dir / "subset").column_names  # internal column

    # Another survivor rule, another embedding check, a filter before and one after: no search.
    later = [
        {"caption": {"min_words": 1}},
        {"dedup": {"method": "exact", "keep": "smallest_uid"}},
        {"dedup": {"method": "perceptual", "max_distance": 8, "min_similarity": 0.9}},
        {"image_size": {"min_side": 8}},
    ]
    second = _run(tmp_path, rerun_dir, "second", later)
    assert len(searches) == 2
    assert {r["cache"] for r in second.manifest["stages"]["dedup"].values()} == {"reused"}
    fresh_dir = tmp_path / "fresh"
    fresh_dir.mkdir()
    (fresh_dir / "cache").symlink_to(rerun_dir / "cache", target_is_directory=True)
    # The cached result decides as a fresh search does: same dropped table, same counts.
    for f in (rerun_dir / "cache").glob("dedup-*"):
        f.rename(f.with_name("old-" + f.name))
    fresh = _run(tmp_path, fresh_dir, "fresh", later)
    assert len(searches) == 4
    assert _dropped(rerun_dir) == _dropped(fresh_dir)
    assert fresh.manifest["counts"] == second.manifest["counts"]

    # A setting that changes the candidates searches again.
    _run(tmp_path, rerun_dir, "third", [{"dedup": {"method": "perceptual", "max_distance": 4}}])
    assert len(searches) == 5 and searches[-1].max_distance == 4
    assert json.loads((rerun_dir / "manifest.json").read_text())["stages"]["dedup"]["dedup_label_phash_d4"][
        "cache"
    ] == ("computed")
