"""laion2b, uid for uid against DataComp's own logic.

Reference: ``load_uids_with_clip_score_helper`` with ``gcld3_en_filter=True``
(``baselines/apply_filter.py`` lines 312-334) as the ``laion2b`` branch calls it (lines
695-704: B/32 score >= 0.28), in ``tests/datacomp_pool.datacomp_laion2b_uids``. DataComp's
identifier there is gcld3, which has no wheel here: its test runs where gcld3 is installed.
The same rule also runs with one fastText model on both sides, so the rest of the
baseline (threshold, NaN scores, blank and foreign captions) is held everywhere.
"""

import json

import numpy as np
import pytest

from tests.datacomp_pool import (
    datacomp_laion2b_uids,
    fasttext_language,
    gcld3_language,
    make_datacomp_edge_pool,
    run_preset,
)

pytestmark = pytest.mark.slow  # runs the CLI


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
    return make_datacomp_edge_pool(tmp_path_factory.mktemp("dc") / "metadata", shards=3, rows=300, seed=11)


@pytest.fixture(scope="module")
def lid(tmp_path_factory):
    pytest.importorskip("fasttext")
    from tests.fasttext_lid import train_tiny_lid

    return train_tiny_lid(tmp_path_factory.mktemp("lid") / "tiny_lid.bin")


def _run(tmp_path, metadata, *sets):
    out = tmp_path / "run"
    code, err = run_preset(out, "laion2b.yaml", metadata, *sets)
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if "language:" in ln]
    assert len(lines) == 1, err
    return np.load(out / "subset.npy"), lines[0], json.loads((out / "manifest.json").read_text())


def test_laion2b_preset_equals_datacomp_with_gcld3(tmp_path, metadata):
    gcld3 = pytest.importorskip("gcld3")
    got, line, manifest = _run(tmp_path, metadata)
    expected = datacomp_laion2b_uids(
        metadata, gcld3_language(gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000))
    )
    assert 20 < len(expected) < 600
    np.testing.assert_array_equal(got, expected)
    assert line.startswith("poolsift: language: ran gcld3") and "laion2b" in line
    assert manifest["language_identifiers"][0]["backend"] == "gcld3"


def test_laion2b_rule_equals_datacomp_with_fasttext_on_both_sides(tmp_path, metadata, lid):
    import fasttext

    got, line, _ = _run(
        tmp_path,
        metadata,
        "filters[1].language.backend=fasttext",
        "filters[1].language.fallback=null",
        f"filters[1].language.model_path={lid}",
    )
    model = fasttext.load_model(str(lid))
    expected = datacomp_laion2b_uids(metadata, lambda text: fasttext_language(text, model))
    assert 20 < len(expected) < 600
    np.testing.assert_array_equal(got, expected)
    assert "ran fasttext" in line


def test_laion2b_preset_without_gcld3_says_it_is_not_datacomps(tmp_path, metadata, lid, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gcld3", None)  # as on a machine without gcld3
    _, line, manifest = _run(tmp_path, metadata, f"filters[1].language.model_path={lid}")
    assert (
        "ran fasttext" in line and "instead of gcld3 (gcld3 is not installed: apt-get install" in line and "NOT" in line
    )
    record = manifest["language_identifiers"][0]
    assert (record["requested"], record["backend"]) == ("gcld3", "fasttext")
