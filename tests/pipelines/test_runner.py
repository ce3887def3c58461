import subprocess
import sys

import pytest

from filtering.errors import FunnelError, PoolsiftError
from pipelines import manifest, runner
from pipelines.config import load_config
from tests.conftest import REPO, SAMPLE_CONFIG


def _counts(input_, kept, failed, dropped):
    return {"input": input_, "kept": kept, "failed": failed, "filters": [{"name": "f", "dropped": d} for d in dropped]}


def test_check_funnel_accepts_counts_that_add_up():
    manifest.check_funnel(_counts(10, 4, 1, [3, 2]))


def test_check_funnel_raises_a_one_line_error_naming_the_counts():
    with pytest.raises(FunnelError, match=r"input 10 != kept 4 \+ failed 1 \+ dropped 4") as e:
        manifest.check_funnel(_counts(10, 4, 1, [3, 1]))
    assert isinstance(e.value, PoolsiftError) and "\n" not in str(e.value)


def test_check_funnel_holds_under_python_optimisations():
    code = (
        "from pipelines.manifest import check_funnel\n"
        "check_funnel({'input': 3, 'kept': 1, 'failed': 0, 'filters': [{'dropped': 1}]})\n"
    )
    proc = subprocess.run([sys.executable, "-O", "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "FunnelError" in proc.stderr


def test_a_broken_cluster_stage_import_is_not_hidden(monkeypatch, tmp_path):
    """An import bug in the cluster stage must surface as itself, not drop the stage silently
    (which later reads as "no stage provides cluster_id", a misleading config error)."""
    cfg = load_config(SAMPLE_CONFIG)
    monkeypatch.setitem(
        sys.modules, "filtering.image_clusters.image_clusters_stage", None
    )  # makes the import raise ImportError
    with pytest.raises(ImportError):
        runner.column_stages(cfg, str(tmp_path))


def test_the_funnels_reason_counts_have_thousands_separators_like_its_totals():
    """A DataComp pool printed 'clip_score  -1,399 ... (clip_score_below_top_fraction 1399)'."""
    reasons = {"clip_score_below_top_fraction": 1399}
    counts = {
        "input": 3399,
        "failed": 2000,
        "failed_reasons": {"corrupt_image": 2000},
        "kept": 0,
        "filters": [{"name": "clip_score", "dropped": 1399, "kept": 0, "reasons": reasons}],
    }
    text = runner.format_funnel({"counts": counts})
    assert "(corrupt_image 2,000)" in text and "-1,399  -> 0 left  (clip_score_below_top_fraction 1,399)" in text, text


def test_a_run_the_shard_plan_cannot_take_stops_before_any_data_is_read(monkeypatch, tmp_path):
    """No second plan to fall back to: what the shard plan refuses is one config error, raised
    before the inputs are listed (the pool below is an empty folder) or the output folder made."""
    from filtering.errors import ConfigError
    from pipelines.config import parse_config
    from pipelines.executors import streaming

    (tmp_path / "empty-pool").mkdir()
    raw = {
        "input": {"datacomp_metadata": str(tmp_path / "empty-pool")},
        "filters": [{"dedup": {"method": "exact"}}],
        "output": {"dir": str(tmp_path / "out")},
    }
    monkeypatch.setattr(streaming, "why_not", lambda *_a: "a step it has not got")
    with pytest.raises(ConfigError, match=r"^this run cannot run on the shard plan: a step it has not got$"):
        runner.run(parse_config(raw), progress=False, log=lambda _m: None)
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    with pytest.raises(PoolsiftError, match="empty-pool"):  # the plan takes it: the missing input is next
        runner.run(parse_config(raw), progress=False, log=lambda _m: None)


def test_the_plan_asks_the_source_for_dedups_key_columns(tmp_path):
    """``dedup`` needs no column stage: the plan asks the source for its key columns (read
    by the dedup phase's search), the uid and the keep score."""
    from pipelines.config import parse_config
    from tests.datacomp_pool import make_datacomp_pool

    metadata = make_datacomp_pool(tmp_path / "metadata", shards=1, rows=4)
    for params, key in [({"method": "perceptual"}, "phash"), ({"method": "exact", "with_caption": True}, "caption")]:
        raw = {"input": {"datacomp_metadata": str(metadata)}, "filters": [{"dedup": params}]}
        plan = runner.plan(parse_config({**raw, "output": {"dir": str(tmp_path / "run")}}), str(tmp_path / "cache"))
        assert plan.stages == []
        assert {key, "uid", "clip_l14_similarity_score"} <= plan.source.requested
