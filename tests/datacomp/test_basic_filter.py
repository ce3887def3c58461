"""basic_filter and image_based's caption pre-filter, uid for uid against DataComp's own logic.

The reference is DataComp's ``baselines/apply_filter.py`` reimplemented line by line in
``tests/datacomp_pool.py`` (``load_uids_with_basic_filter_helper``, lines 200-234;
``caption_filter``, lines 57-77). Both sides run the same language identifier: a tiny
fastText model trained here, standing in for ``lid.176.bin`` (same model class, labels
and predict path). Pools carry captions on which Python's split, fastText's tokenizer and
``len`` disagree, blank and foreign captions, and image sizes at the filter's edges.
"""

import json

import numpy as np
import pytest

from tests.conftest import REPO, run_cli
from tests.datacomp_pool import (
    datacomp_basic_filter_uids,
    datacomp_caption_filter_uids,
    make_datacomp_edge_pool,
    run_preset,
)

pytestmark = pytest.mark.slow  # runs the CLI

fasttext = pytest.importorskip("fasttext")


@pytest.fixture(scope="module")
def lid(tmp_path_factory):
    from tests.fasttext_lid import train_tiny_lid

    return train_tiny_lid(tmp_path_factory.mktemp("lid") / "tiny_lid.bin")


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
    return make_datacomp_edge_pool(tmp_path_factory.mktemp("dc") / "metadata", shards=3, rows=400, seed=3)


def _run(tmp_path, preset, metadata, *sets):
    out = tmp_path / "run"
    code, err = run_preset(out, preset, metadata, *sets)
    assert code == 0, err
    return out, err, json.loads((out / "manifest.json").read_text())


def test_basic_filter_preset_equals_datacomp(tmp_path, metadata, lid):
    out, err, manifest = _run(tmp_path, "basic_filter.yaml", metadata, f"filters[2].language.model_path={lid}")
    expected = datacomp_basic_filter_uids(metadata, fasttext.load_model(str(lid)))
    got = np.load(out / "subset.npy")
    assert 50 < len(expected) < 600  # the pool exercises every rule
    np.testing.assert_array_equal(got, expected)
    # the run says which identifier ran, in one line, and records it
    lines = [ln for ln in err.splitlines() if "language:" in ln]
    assert lines == [
        f"poolsift: language: ran fasttext (a fastText model that is not lid.176.bin (sha256 differs), {lid})"
    ]
    [record] = manifest["language_identifiers"]
    assert record["backend"] == record["requested"] == "fasttext" and record["model_path"] == str(lid)


def test_basic_filter_preset_without_the_model_says_it_is_not_datacomps(tmp_path, metadata):
    """No model and no network (conftest), with the fallback the preset's comment names."""
    missing = tmp_path / "nowhere" / "lid.176.bin"
    sets = [f"filters[2].language.model_path={missing}", "filters[2].language.fallback=py3langid"]
    _, err, manifest = _run(tmp_path, "basic_filter.yaml", metadata, *sets)
    lines = [ln for ln in err.splitlines() if "language:" in ln]
    assert len(lines) == 1 and "ran py3langid instead of fasttext" in lines[0] and "NOT" in lines[0]
    assert manifest["language_identifiers"][0]["backend"] == "py3langid"


@pytest.mark.parametrize("preset", ["image_based.yaml", "image_based_intersect_clip_score.yaml"])
def test_image_based_caption_prefilter_equals_datacomp(tmp_path, metadata, lid, preset):
    """The image_based presets' caption and language entries alone (the clusters are
    tested elsewhere) against ``caption_filter``."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / preset).read_text())
    text_rules = [f for f in cfg["filters"] if next(iter(f)) in ("caption", "language")]
    assert [next(iter(f)) for f in text_rules] == ["caption", "language"]
    text_rules[1]["language"]["model_path"] = str(lid)
    path = tmp_path / "image_based_text.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "input": {"datacomp_metadata": str(metadata)},
                "filters": text_rules,
                "output": {"dir": str(tmp_path / "run")},
            }
        )
    )
    code, _, err = run_cli("run", path, "--quiet")
    assert code == 0, err
    expected = datacomp_caption_filter_uids(metadata, fasttext.load_model(str(lid)))
    np.testing.assert_array_equal(np.load(tmp_path / "run" / "subset.npy"), expected)
