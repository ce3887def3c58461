"""The report reads right on both input kinds: the funnel's failed row, provenance without
a model, and cards whose reasons end at a word (issue 24)."""

from __future__ import annotations

import re
from html import unescape

import pytest
import yaml

from filtering.report import write_report
from filtering.report.data import Sample
from filtering.report.html import card, shorten
from filtering.report.svg import funnel
from tests.conftest import run_cli
from tests.datacomp_pool import make_datacomp_pool


def _values(svg: str) -> list[str]:
    return re.findall(r'class="val">([^<]*)<', svg)


def test_the_failed_row_counts_failures_not_rows_left():
    """With no failures the failed bar read "20,000 (100.0%)", as if every row had failed."""
    none = _values(funnel([("input", 20000, 0, ""), ("failed", 20000, 0, ""), ("kept", 6000, 0, "")], 20000))
    assert none[1] == "none failed"
    some = _values(funnel([("input", 1000, 0, ""), ("failed", 991, 9, "corrupt_image 9"), ("kept", 726, 0, "")], 1000))
    assert some[1] == "9 failed  (0.9%)"
    assert some[0] == "1,000  (100.0%)" and some[2] == "726  (72.6%)"  # the other rows as before


def test_a_long_reason_ends_at_a_word_with_the_whole_in_the_tooltip():
    reason = "image file is truncated (21 bytes not processed) while decoding the JPEG stream of this sample"
    html = card(Sample("ab" * 16, "k", "s.tar", "a caption", note=reason), "failed")
    [(title, shown)] = re.findall(r'<div class="reason" title="([^"]*)">([^<]*)</div>', html)
    assert unescape(title) == reason
    assert shown.endswith("…") and reason.startswith(shown[:-1]) and reason[len(shown) - 1] == " "
    assert shorten("duplicate", 60) == "duplicate"


def test_a_duplicate_card_note_wraps_instead_of_being_cut():
    """The note sat in a nowrap, ellipsised line of a 126-px card: "0.3129 · duplic…"."""
    html = card(Sample("ab" * 16, note="duplicate", score=0.3129), "duplicate")
    assert re.search(r'<div class="why" title="duplicate"><span class="score">0.3129</span> · duplicate</div>', html)
    from filtering.report.html import CSS

    [rule] = re.findall(r"\.card \.why\{([^}]*)\}", CSS)
    assert "nowrap" not in rule and "ellipsis" not in rule and "break-all" not in rule


def _provenance(html: str) -> str:
    return unescape(re.sub(r"<[^>]+>", " ", html[html.index('id="provenance"') :]))


@pytest.mark.slow
def test_datacomp_report_without_failures_or_model(tmp_path):
    meta = make_datacomp_pool(tmp_path / "metadata", shards=2, rows=80)
    cfg = {
        "input": {"datacomp_metadata": str(meta)},
        "filters": [{"clip_score": {"top_fraction": 0.3, "field": "clip_l14_similarity_score"}}],
        "output": {"dir": str(tmp_path / "run"), "report": True},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, _, stderr = run_cli("run", tmp_path / "c.yaml", "--quiet")
    assert code == 0, stderr
    html = (tmp_path / "run" / "report.html").read_text()
    assert _values(html)[:2] == ["161  (100.0%)", "none failed"]
    prov = _provenance(html)
    assert "None" not in prov.split("Inputs")[0]
    assert "model none loaded (scores and embeddings from DataComp metadata)" in " ".join(prov.split())
    assert '"model"' not in prov and "ViT-B-32" not in prov and "checkpoint" not in prov


@pytest.mark.slow
def test_webdataset_report_names_its_model_and_failures(scored_sample, tmp_path):
    html = write_report(str(scored_sample), output=str(tmp_path / "report.html"))
    with open(html) as f:
        text = f.read()
    assert _values(text)[1] == "9 failed  (0.9%)"
    prov = _provenance(text)
    assert "poolsift-tiny" in prov and '"model"' in prov and "checkpoint sha256" in prov
    assert "none loaded" not in prov


def test_the_this_run_label_clears_every_value_label():
    """It sat inside the plot at the top, where the highest point's value label is drawn."""
    from filtering.report.svg import curve

    font = 12  # .tick's font size (11.5px): a label spans (baseline - font, baseline + descent]
    for mark in (0.5, 0.55, 0.6):
        plot = curve([0.5, 0.55, 0.6], [738, 725, 721], "filters[0].clip_score.min", "rows kept", mark)
        [(mx, my)] = re.findall(r'<text x="([\d.]+)" y="([\d.]+)"[^>]*>this run: ', plot)
        values = [float(y) for y in re.findall(r'<text x="[\d.]+" y="([\d.]+)" class="tick">[\d,]+</text>', plot)]
        assert len(values) >= 3 and all(float(my) + 3 < y - font for y in values), (my, values)
        assert 40 < float(mx) < 860  # the label fits in the plot's width
