"""language: the identifier runs as a cached scorer (language_id), the filter only decides.
A rerun that only changes ``languages:`` classifies nothing; the outputs are those of
classifying inside the filter."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from filtering.scorers import language_identifiers
from pipelines.config import load_config
from pipelines.runner import run
from tests.conftest import REPO, write_config
from tests.golden import check_recorded

pytestmark = pytest.mark.slow  # runs the whole pipeline (make test-fast leaves these out)


@pytest.fixture
def classified(monkeypatch):
    """Every caption the py3langid identifier is asked about, in order (the shard plan's
    tasks run in this process, so that the calls are seen here)."""
    import contextlib

    from pipelines.executors import streaming

    class InProcess:
        workers = 1

        def map(self, fn, items):
            return map(fn, items)

    monkeypatch.setattr(streaming, "task_pool", lambda *_a: contextlib.nullcontext(InProcess()))
    seen: list[str] = []
    real = language_identifiers._Py3Langid.predict

    def counting(self, texts):
        seen.extend(texts)
        return real(self, texts)

    monkeypatch.setattr(language_identifiers._Py3Langid, "predict", counting)
    return seen


def _config(tmp_path, out, name, languages, **sections):
    base = yaml.safe_load((REPO / "configs" / "sample_basic.yaml").read_text())
    filters = base["filters"]
    for f in filters:
        if "language" in f:
            f["language"]["languages"] = languages
    return write_config(
        tmp_path / name,
        base=REPO / "configs" / "sample_basic.yaml",
        filters=filters,
        output={"dir": str(out)},
        **sections,
    )


def test_rerun_changing_languages_reclassifies_nothing(tmp_path, rerun_dir, classified):
    quiet = dict(progress=False, log=lambda msg: None)
    first = run(load_config(_config(tmp_path, rerun_dir, "en.yaml", ["en"])), **quiet)
    assert classified, "the first run classifies the captions"
    n_first = len(classified)
    assert n_first <= first.manifest["counts"]["input"]  # once per distinct caption, at most once per row
    info = first.manifest["stages"]["scorers"]
    [(name, record)] = info.items()
    assert record["kind"] == "language_id" and record["cache"]["shards_scored"] == 4

    logged: list[str] = []
    second = run(
        load_config(_config(tmp_path, rerun_dir, "en_de.yaml", ["en", "de"])), progress=True, log=logged.append
    )
    assert len(classified) == n_first  # nothing classified again: every shard came from the cache
    # Said in the filter's words, never as its internal column (was "score _language_py3langid_2869c9c3: cached").
    assert "all 4 shards cached; the model is not loaded" in logged and not [m for m in logged if "_language" in m], (
        logged
    )
    assert second.manifest["stages"]["scorers"][name]["cache"] == {
        **record["cache"],
        "shards_scored": 0,
        "shards_cached": 4,
    }
    assert second.manifest["counts"]["kept"] > first.manifest["counts"]["kept"]  # German captions now kept
    assert second.manifest["language_identifiers"][0]["backend"] == "py3langid"
    subset = pq.read_table(rerun_dir / "subset")
    assert not [c for c in subset.column_names if c.startswith("_language")]  # the scorer's columns stay internal


def test_scorer_columns_give_the_decision_the_filter_gives_alone(tmp_path, rerun_dir):
    """The cached-column path and the classify-in-the-filter path decide the same rows, on
    one shard's pool as the shard plan's workers build it (its scorer columns from the cache)."""
    from filtering.io.paths import join
    from filtering.stages.base import RunContext
    from pipelines.runner import plan

    cfg = load_config(_config(tmp_path, rerun_dir, "en.yaml", ["en"]))
    run(cfg, progress=False, log=lambda msg: None)  # the scorer's columns cached per shard
    the_plan = plan(cfg, join(cfg.output.dir, "cache"))
    ctx = RunContext(out_dir=cfg.output.dir, cache_dir=join(cfg.output.dir, "cache"), log=lambda msg: None)
    the_plan.source.stream_prepare(ctx)
    pool = the_plan.source.shard_pool(the_plan.source.stream_shards()[0], ctx)
    for stage in the_plan.stages:
        stage.run(ctx, pool)
    [lang] = [f for node in cfg.filter_tree for f in node.leaves() if f.name == "language"]
    code_col, conf_col = lang.scorer().provides()
    assert pool.has_column(code_col)
    alive = ~pool.failed  # failed rows reach no filter (their scorer columns are null)
    assert alive.sum() > 100
    via_columns = lang.apply(pool, alive)
    pool.internal.clear()
    pool.table = pool.table.drop_columns([code_col, conf_col])
    pool._numpy.clear()
    pool.artifacts.pop("language_predictions", None)
    alone = lang.apply(pool, alive)
    np.testing.assert_array_equal(via_columns.keep, alone.keep)
    np.testing.assert_array_equal(via_columns.reason, alone.reason)


def test_streaming_plan_runs_the_language_scorer_per_shard_with_the_same_outputs(tmp_path):
    """DataComp metadata on the streaming plan: the language_id scorer runs in the shard
    workers, through the same per-shard cache; the outputs are the recorded ones (the
    in-memory plan's, tests/golden.py)."""
    from pipelines.config import parse_config
    from tests.datacomp_pool import make_datacomp_pool

    metadata = make_datacomp_pool(tmp_path / "metadata", shards=3, rows=40)

    def run_mode(out, languages):
        raw = {
            "input": {"datacomp_metadata": str(metadata)},
            "filters": [{"language": {"languages": languages}}, {"clip_score": {"top_fraction": 0.5}}],
            "output": {"dir": str(out)},
        }
        return run(parse_config(raw), progress=False, log=lambda msg: None)

    streamed = run_mode(tmp_path / "str", ["en"])
    assert streamed.manifest["execution"]["plan"] == "streaming"
    check_recorded(tmp_path / "str")
    [(name, record)] = streamed.manifest["stages"]["scorers"].items()
    assert record["cache"]["shards_scored"] == 3
    again = run_mode(tmp_path / "str", ["en", "de"])  # the workers classify nothing:
    assert again.manifest["stages"]["scorers"][name]["cache"] == {
        **record["cache"],
        "shards_scored": 0,
        "shards_cached": 3,
    }
