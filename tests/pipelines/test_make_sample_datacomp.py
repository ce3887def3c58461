"""``poolsift make-sample --datacomp DIR``: a DataComp-format pool that the shipped presets
filter end to end, the same bytes on a second generation."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.datacomp_pool import datacomp_basic_filter_uids, datacomp_clip_score_uids, run_preset

pytestmark = pytest.mark.slow  # runs the CLI


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    out = tmp_path_factory.mktemp("dc") / "pool"
    code, stdout, err = run_cli("make-sample", "--datacomp", out, "--rows", "600", "--shards", "3", "--phash")
    assert code == 0, err
    assert f"wrote a DataComp-format pool to {out}: 600 rows in 3 shards" in stdout
    assert "--set input.datacomp_metadata=" in stdout  # the next step
    return out


def test_a_second_generation_is_byte_identical(pool, tmp_path):
    code, _, err = run_cli("make-sample", "--datacomp", tmp_path / "again", "--rows", "600", "--shards", "3", "--phash")
    assert code == 0, err
    first = {p.name: p.read_bytes() for p in sorted(pool.iterdir())}
    assert first == {p.name: p.read_bytes() for p in sorted((tmp_path / "again").iterdir())}
    assert len(first) == 6


def test_the_clip_score_preset_runs_on_it_as_datacomp_does(pool, tmp_path):
    code, err = run_preset(tmp_path / "run", "clip_score_l14_30pct.yaml", pool)
    assert code == 0, err
    expected = datacomp_clip_score_uids(pool, "clip_l14_similarity_score", fraction=0.3)
    np.testing.assert_array_equal(np.load(tmp_path / "run" / "subset.npy"), expected)


def test_basic_filter_as_shipped_runs_on_it(pool, tmp_path, monkeypatch):
    """With a fastText model at the default cache path (a tiny one trained here: lid.176.bin
    cannot be had offline), basic_filter runs unchanged and equals DataComp's rule."""
    fasttext = pytest.importorskip("fasttext")
    from tests.fasttext_lid import train_tiny_lid

    monkeypatch.setenv("POOLSIFT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    lid = train_tiny_lid(tmp_path / "tiny.bin")
    shutil.copy(lid, tmp_path / "cache" / "lid.176.bin")
    code, err = run_preset(tmp_path / "run", "basic_filter.yaml", pool)
    assert code == 0, err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    dropped = manifest["counts"]["filters"]
    assert all(f["dropped"] > 0 for f in dropped), dropped  # each of the three rules drops something
    expected = datacomp_basic_filter_uids(pool, fasttext.load_model(str(lid)))
    np.testing.assert_array_equal(np.load(tmp_path / "run" / "subset.npy"), expected)


def test_perceptual_and_exact_dedup_find_its_duplicates(pool, tmp_path):
    cfg = tmp_path / "dedup.yaml"
    cfg.write_text(
        f"input: {{datacomp_metadata: '{pool}'}}\n"
        "filters:\n  - dedup: {method: exact}\n  - dedup: {method: perceptual, max_distance: 3}\n"
        f"output: {{dir: '{tmp_path / 'run'}'}}\n"
    )
    code, _, err = run_cli("run", cfg, "--quiet")
    assert code == 0, err
    counts = json.loads((tmp_path / "run" / "manifest.json").read_text())["counts"]["filters"]
    assert [c["dropped"] > 0 for c in counts] == [True, True], counts


def test_datacomp_options_without_datacomp_are_refused(tmp_path):
    code, _, err = run_cli("make-sample", tmp_path / "x", "--rows", "10")
    assert code == 2 and "--rows only go with --datacomp" in err


def test_a_folder_with_a_pool_is_not_overwritten(pool):
    code, _, err = run_cli("make-sample", "--datacomp", pool)
    assert code == 2 and "already holds .parquet files" in err
