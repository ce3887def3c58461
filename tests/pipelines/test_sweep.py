"""``poolsift sweep``: per-value subset sizes from cached scores equal real runs with ``--set``."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.sweep import parse_param
from tests.conftest import run_cli, write_config
from tests.datacomp_pool import datacomp_clip_score_uids, datacomp_threshold, make_datacomp_pool

PARAM = "filters[0].clip_score.top_fraction"


@pytest.mark.slow
def test_sweep_matches_real_runs(rerun_dir, tmp_path):
    cfg = write_config(
        tmp_path / "c.yaml", filters=[{"clip_score": {"top_fraction": 0.3}}], output={"dir": str(rerun_dir)}
    )
    code, stdout, stderr = run_cli("sweep", cfg, "--param", f"{PARAM}=0.1,0.2,0.5", "--quiet")
    assert code == 0, stderr
    assert "all 4 shards cached" in stderr  # the stages ran, from the cache
    assert not (rerun_dir / "subset").exists() and not (rerun_dir / "manifest.json").exists()
    record = json.loads((rerun_dir / "sweep.json").read_text())
    assert record["param"] == PARAM and [r["value"] for r in record["results"]] == [0.1, 0.2, 0.5]
    sizes = [r["kept"] for r in record["results"]]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3
    for line, r in zip(stdout.splitlines()[1:4], record["results"], strict=True):
        assert line.split()[:2] == [str(r["value"]), f"{r['kept']:,}"]

    for r in (record["results"][0], record["results"][2]):
        real = tmp_path / f"real-{r['value']}"
        shutil.copytree(rerun_dir / "cache", real / "cache")
        code, _, stderr = run_cli("run", cfg, "--set", f"{PARAM}={r['value']}", "--output", real, "--quiet")
        assert code == 0, stderr
        manifest = json.loads((real / "manifest.json").read_text())
        assert r["kept"] == manifest["counts"]["kept"]
        assert r["filters"] == manifest["counts"]["filters"]
        assert r["thresholds"]["clip_score"] == pytest.approx(manifest["thresholds"]["clip_score"])


@pytest.mark.slow
def test_sweep_curve_in_report(rerun_dir, tmp_path):
    cfg = write_config(
        tmp_path / "c.yaml",
        filters=[{"clip_score": {"top_fraction": 0.3}}],
        output={"dir": str(rerun_dir), "report": True},
    )
    assert run_cli("run", cfg, "--quiet")[0] == 0
    code, _, stderr = run_cli("sweep", cfg, "--param", f"{PARAM}=0.25,0.75", "--quiet")
    assert code == 0, stderr
    html = (rerun_dir / "report.html").read_text()  # rewritten with the sweep
    assert 'class="plot sweep"' in html and html.count("<circle") == 2


@pytest.mark.parametrize("spec", ["filters[0].clip_score.top_fraction", "=0.1", "x=", "x=,"])
def test_bad_param(spec):
    with pytest.raises(Exception, match="expected key.path=value1,value2"):
        parse_param(spec)


@pytest.mark.parametrize(
    ("spec", "values"),
    [
        ("a.b=0.1, 0.2,0.3", ["0.1", "0.2", "0.3"]),
        ("filters[1].language.languages=[en],[en, de]", ["[en]", "[en, de]"]),
        ("x={min: 1, max: 2},{min: 3}", ["{min: 1, max: 2}", "{min: 3}"]),
        ("x='a,b',c", ["'a,b'", "c"]),
    ],
)
def test_values_split_outside_lists_mappings_and_quotes(spec, values):
    assert parse_param(spec)[1] == values


@pytest.mark.slow
def test_bad_value_names_the_key(tmp_path):
    cfg = write_config(
        tmp_path / "c.yaml", filters=[{"clip_score": {"top_fraction": 0.3}}], output={"dir": str(tmp_path / "out")}
    )
    code, _, stderr = run_cli("sweep", cfg, "--param", f"{PARAM}=0.1,1.5")
    assert code == 2 and "top_fraction" in stderr


def _sections(html: str) -> list[str]:
    import re

    return re.findall(r'<section id="([^"]+)"', html)


@pytest.mark.slow
def test_a_new_run_with_other_settings_leaves_the_old_sweep_out_of_the_report(rerun_dir, tmp_path):
    """Reusing an output folder for another config replaced the earlier result without a
    word, and the report drew the earlier run's sweep ("Sweep: filters[0].clip_score.min")
    beside a funnel without a clip_score filter."""
    first = write_config(tmp_path / "a.yaml", filters=[{"clip_score": {"min": 0.5}}], output={"dir": str(rerun_dir)})
    assert run_cli("run", first, "--quiet")[0] == 0
    assert run_cli("sweep", first, "--param", "filters[0].clip_score.min=0.4,0.6", "--quiet")[0] == 0
    code, _, stderr = run_cli("report", rerun_dir)
    assert code == 0 and "sweep" in _sections((rerun_dir / "report.html").read_text())

    other = write_config(
        tmp_path / "b.yaml", filters=[{"caption": {"min_words": 2}}], output={"dir": str(rerun_dir), "report": True}
    )
    code, _, stderr = run_cli("run", other, "--quiet")
    assert code == 0, stderr
    assert f"poolsift: replaced the earlier result in {rerun_dir}, made with other settings (filters)" in stderr
    html = (rerun_dir / "report.html").read_text()
    assert "sweep" not in _sections(html) and "Sweep: filters[0].clip_score.min" not in html
    assert "sweep.json (filters[0].clip_score.min" in html and "left out" in html

    # The same settings again (a rerun, or a report flag changed): the sweep still belongs.
    code, _, stderr = run_cli("run", first, "--quiet", "--set", "output.report=true")
    assert code == 0 and "replaced the earlier result" in stderr
    code, _, stderr = run_cli("run", first, "--quiet", "--set", "output.report=true")
    assert code == 0 and "replaced" not in stderr  # the same settings: nothing to say
    assert "sweep" in _sections((rerun_dir / "report.html").read_text())


@pytest.mark.slow
def test_a_sweep_takes_the_runs_settings_and_says_where_its_own_differ(rerun_dir, tmp_path):
    """``run --set filters[0].clip_score.min=0.6`` then a sweep of another setting: the sweep
    used the file's 0.5, so its "this run" point disagreed with the funnel."""
    cfg = write_config(
        tmp_path / "c.yaml",
        filters=[{"clip_score": {"min": 0.5}}, {"caption": {"min_words": 1}}],
        output={"dir": str(rerun_dir), "report": True},
    )
    code, _, stderr = run_cli("run", cfg, "--quiet", "--set", "filters[0].clip_score.min=0.6")
    assert code == 0, stderr
    kept = json.loads((rerun_dir / "manifest.json").read_text())["counts"]["kept"]
    code, _, stderr = run_cli("sweep", cfg, "--param", "filters[1].caption.min_words=1,3", "--quiet")
    assert code == 0, stderr
    assert "sweep: based on the run in" in stderr and "filters[0].clip_score.min=0.6 (file: 0.5)" in stderr
    record = json.loads((rerun_dir / "sweep.json").read_text())
    assert record["results"][0]["kept"] == kept  # min_words 1 is the run itself
    assert record["differs_from_run"] == []
    html = (rerun_dir / "report.html").read_text()
    assert "this run: 1" in html and "differ from this run" not in html

    # The sweep's own --set wins, and the report says the sweep's base is not the run's.
    code, _, stderr = run_cli(
        "sweep",
        cfg,
        "--set",
        "filters[0].clip_score.min=0.55",
        "--param",
        "filters[1].caption.min_words=1,3",
        "--quiet",
    )
    assert code == 0, stderr
    record = json.loads((rerun_dir / "sweep.json").read_text())
    assert record["differs_from_run"] == [{"key": "filters[0].clip_score.min", "sweep": 0.55, "run": 0.6}]
    html = (rerun_dir / "report.html").read_text()
    assert "differ from this run" in html and "filters[0].clip_score.min: sweep 0.55, run 0.6" in html
    assert "this run: 1" not in html  # no point on the curve is this run


@pytest.mark.slow
def test_sweep_counts_equal_datacomps_rule_and_the_runs_with_later_uid_copies(tmp_path):
    """A DataComp pool: each top_fraction's subset size and threshold are DataComp's own
    (``tests/datacomp_pool.py``: its arithmetic); with ``input.uid.duplicates: keep_first``
    and an exact dedup after the threshold, each value's counts equal its run's (the sweep
    on the in-memory pool left the later copies in: its funnel had no ``uid_duplicates``)."""
    meta = make_datacomp_pool(tmp_path / "meta", shards=3, rows=40)
    out = tmp_path / "out"
    fractions = [0.1, 0.3, 0.7]
    cfg = tmp_path / "c.yaml"
    filters = [{"clip_score": {"top_fraction": 0.3}}]
    cfg.write_text(
        yaml.safe_dump({"input": {"datacomp_metadata": str(meta)}, "filters": filters, "output": {"dir": str(out)}})
    )
    code, _, stderr = run_cli("sweep", cfg, "--param", f"{PARAM}={','.join(map(str, fractions))}", "--quiet")
    assert code == 0, stderr
    results = json.loads((out / "sweep.json").read_text())["results"]
    field = "clip_l14_similarity_score"  # the default for DataComp input
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in meta.glob("*.parquet"))
    for f, r in zip(fractions, results, strict=True):
        assert r["input"] == rows and r["kept"] == len(datacomp_clip_score_uids(meta, field, fraction=f))
        assert r["thresholds"][field] == pytest.approx(float(datacomp_threshold(meta, field, f)), abs=0)

    # a uid of shard 0 again in shard 2; its sha256 on another row (an exact copy to drop)
    first, _, last = sorted(meta.glob("*.parquet"))
    a, c = pq.read_table(first), pq.read_table(last)
    uids, sha = c.column("uid").to_pylist(), c.column("sha256").to_pylist()
    uids[5], sha[7] = a.column("uid")[3].as_py(), a.column("sha256")[9].as_py()
    c = c.set_column(c.column_names.index("uid"), "uid", pa.array(uids, pa.string()))
    pq.write_table(c.set_column(c.column_names.index("sha256"), "sha256", pa.array(sha, pa.string())), last)
    filters.append({"dedup": {"method": "exact"}})
    sets = ["--set", "input.uid.duplicates=keep_first", "--set", f"filters={json.dumps(filters)}"]
    code, _, stderr = run_cli("sweep", cfg, *sets, "--param", f"{PARAM}=0.5,1.0", "--quiet")
    assert code == 0, stderr
    results = json.loads((out / "sweep.json").read_text())["results"]
    for r in results:
        real = tmp_path / f"real-{r['value']}"
        code, _, stderr = run_cli("run", cfg, *sets, "--set", f"{PARAM}={r['value']}", "--output", real, "--quiet")
        assert code == 0, stderr
        counts = json.loads((real / "manifest.json").read_text())["counts"]
        assert [r["input"], r["failed"], r["kept"], r["filters"]] == [
            counts["input"],
            counts["failed"],
            counts["kept"],
            counts["filters"],
        ]
        assert r["filters"][0]["name"] == "uid_duplicates" and r["filters"][0]["dropped"] == 1
        assert r["filters"][2]["name"] == "dedup"
    assert results[1]["filters"][2]["dropped"] == 1  # top_fraction 1.0 keeps all: the sha256 copy goes


def test_the_table_lines_up_values_whose_funnels_differ():
    """A sweep over the filter list itself (or ``input.uid.duplicates`` on a pool with repeated
    uids) gives funnels of different lengths: each filter keeps its own column, blank where a
    value has no such step."""
    from pipelines.sweep import format_sweep

    def step(name, dropped):
        return {"name": name, "dropped": dropped, "kept": 0, "reasons": {}}

    record = {
        "param": "input.uid.duplicates",
        "results": [
            {"value": "report", "input": 10, "kept": 6, "thresholds": {}, "filters": [step("clip_score", 4)]},
            {
                "value": "keep_first",
                "input": 10,
                "kept": 5,
                "thresholds": {"clip_score": 0.25},
                "filters": [step("uid_duplicates", 1), step("clip_score", 4), step("clip_score", 0)],
            },
        ],
    }
    lines = format_sweep(record).splitlines()
    assert lines[0].split() == [
        "input.uid.duplicates", "kept", "of", "input", "threshold",
        "uid_duplicates", "dropped", "clip_score", "dropped", "clip_score", "dropped",
    ]  # fmt: skip
    assert lines[1].split() == ["report", "6", "60.0%", "-", "-", "4", "-"]
    assert lines[2].split() == ["keep_first", "5", "50.0%", "0.2500", "1", "4", "0"]
