"""fastText's ``lid.176.bin`` on first use, through the shipped DataComp presets.

What is real here: the presets as shipped, the CLI, the default cache path, the HTTP
download (from a server on the loopback address), the checksum and the fastText package.
What stands in: the model. ``lid.176.bin`` (126 MB) cannot be had offline, so the served
and cached file is a tiny fastText model trained in the test (``tests/fasttext_lid.py``),
and the expected sha256 is set to that file's where a download must succeed; the
checksum of the real file (``LID176_SHA256``, the one DataComp's ``download`` checks) is
the default, and refusing another file under it is tested too.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from tests.datacomp_pool import datacomp_basic_filter_uids, make_datacomp_edge_pool, run_preset
from tests.loopback_http import closed_port, serve

pytestmark = pytest.mark.slow  # runs the CLI

fasttext = pytest.importorskip("fasttext")

# The DataComp presets whose language step is fastText, and that step's index.
FASTTEXT_PRESETS = {
    "basic_filter.yaml": 2,
    "text_based.yaml": 1,
    "image_based.yaml": 1,
    "image_based_intersect_clip_score.yaml": 2,
}


@pytest.fixture(scope="module")
def lid(tmp_path_factory):
    from tests.fasttext_lid import train_tiny_lid

    return train_tiny_lid(tmp_path_factory.mktemp("lid") / "tiny_lid.bin")


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
    return make_datacomp_edge_pool(tmp_path_factory.mktemp("dc") / "metadata", shards=2, rows=150, seed=5)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh user: ``$HOME`` here, no ``$XDG_CACHE_HOME`` or ``$POOLSIFT_CACHE``; the
    default cache path is then ``~/.cache/poolsift/lid.176.bin``."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("POOLSIFT_CACHE", raising=False)
    return tmp_path / "home"


@pytest.fixture
def fresh_identifiers():
    from filtering.scorers import language_identifiers

    language_identifiers.identifier.cache_clear()
    yield
    language_identifiers.identifier.cache_clear()


@pytest.fixture
def server(tmp_path, lid):
    (tmp_path / "www").mkdir()
    shutil.copy(lid, tmp_path / "www" / "lid.176.bin")
    with serve(tmp_path / "www") as base:
        yield f"{base}/lid.176.bin"


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("poolsift: error:")]


@pytest.mark.parametrize("preset", sorted(FASTTEXT_PRESETS))
def test_presets_pick_fasttext_at_the_default_cache_path(preset, home, lid, metadata, fresh_identifiers):
    """With a model at ``~/.cache/poolsift/lid.176.bin`` every fastText preset, as shipped
    (only its metadata placeholder set), runs fastText from there: checked at plan level,
    where the run decides (``language_identifiers``), without reading the pool."""
    from pipelines.config import load_config
    from pipelines.runner import language_identifiers
    from tests.conftest import REPO

    cached = home / ".cache" / "poolsift" / "lid.176.bin"
    cached.parent.mkdir(parents=True)
    shutil.copy(lid, cached)
    cfg = load_config(REPO / "configs" / preset, [f"input.datacomp_metadata={metadata}"])
    [record] = language_identifiers(cfg)
    assert record["backend"] == record["requested"] == "fasttext"
    assert record["model_path"] == str(cached) and "unavailable" not in record


def test_basic_filter_as_shipped_runs_fasttext_from_the_default_cache_path(tmp_path, home, lid, metadata):
    cached = home / ".cache" / "poolsift" / "lid.176.bin"
    cached.parent.mkdir(parents=True)
    shutil.copy(lid, cached)
    code, err = run_preset(tmp_path / "run", "basic_filter.yaml", metadata)
    assert code == 0, err
    assert (
        f"poolsift: language: ran fasttext (a fastText model that is not lid.176.bin (sha256 differs), {cached})" in err
    )
    np.testing.assert_array_equal(
        np.load(tmp_path / "run" / "subset.npy"), datacomp_basic_filter_uids(metadata, fasttext.load_model(str(lid)))
    )


def _download_sets(lid, server) -> list[str]:
    digest = hashlib.sha256(lid.read_bytes()).hexdigest()
    sets = [f"filters[2].language.model_url={server}", f"filters[2].language.model_sha256={digest}"]
    return sum((["--set", s] for s in sets), [])


def test_first_run_downloads_the_model_into_the_cache(tmp_path, home, lid, metadata, server):
    from tests.conftest import REPO, run_cli

    preset = REPO / "configs" / "basic_filter.yaml"
    where = ["--output", tmp_path / "run", "--set", f"input.datacomp_metadata={metadata}"]
    code, _, err = run_cli("run", preset, *where, *_download_sets(lid, server))
    assert code == 0, err
    cached = home / ".cache" / "poolsift" / "lid.176.bin"
    assert cached.read_bytes() == lid.read_bytes()
    assert sorted(p.name for p in cached.parent.iterdir()) == ["lid.176.bin"]
    assert "downloading lid.176.bin" in err and "100%" in err  # the progress bar, its total from Content-Length
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["language_identifiers"][0]["model_path"] == str(cached)
    np.testing.assert_array_equal(
        np.load(tmp_path / "run" / "subset.npy"), datacomp_basic_filter_uids(metadata, fasttext.load_model(str(lid)))
    )


def test_a_wrong_checksum_is_refused_in_one_line_and_nothing_is_cached(tmp_path, home, metadata, server):
    """The served file is not lid.176.bin: under the default (lid.176.bin's sha256) it is refused."""
    from filtering.scorers.language_identifiers import LID176_SHA256

    code, err = run_preset(tmp_path / "run", "basic_filter.yaml", metadata, f"filters[2].language.model_url={server}")
    assert code == 2
    [line] = _error_lines(err)
    assert line.startswith(f"poolsift: error: language: refused {server}: its sha256 is ")
    assert f"expected {LID176_SHA256}" in line
    assert not (home / ".cache").exists()  # neither the file nor a partial one, nor the folders
    assert not (tmp_path / "run" / "subset.npy").exists()


def test_no_network_is_one_line_naming_the_url_and_where_to_put_the_file(tmp_path, home, metadata):
    url = f"http://127.0.0.1:{closed_port()}/lid.176.bin"
    code, err = run_preset(tmp_path / "run", "basic_filter.yaml", metadata, f"filters[2].language.model_url={url}")
    assert code == 2
    cached = home / ".cache" / "poolsift" / "lid.176.bin"
    assert err.strip().splitlines() == [
        f"poolsift: error: language: cannot download {url} (Connection refused); "
        f"download it yourself and put it at {cached}, or let the language entry fall back: "
        "--set 'filters[N].language.fallback=py3langid' (N: its index; then the kept set is not DataComp's)"
    ]
    assert not (home / ".cache").exists()


def test_quiet_downloads_without_a_bar(tmp_path, home, lid, metadata, server):
    from tests.conftest import REPO, run_cli

    preset = REPO / "configs" / "basic_filter.yaml"
    where = ["--output", tmp_path / "run", "--quiet", "--set", f"input.datacomp_metadata={metadata}"]
    code, _, err = run_cli("run", preset, *where, *_download_sets(lid, server))
    assert code == 0, err
    assert (home / ".cache" / "poolsift" / "lid.176.bin").read_bytes() == lid.read_bytes()
    assert "downloading" not in err


def test_a_language_id_scorer_downloads_before_the_run_reads_data(tmp_path, home, lid, metadata, server):
    """Listed under ``scorers:`` (no language filter), the model is fetched before any shard is read."""
    import yaml

    from tests.conftest import run_cli

    digest = hashlib.sha256(lid.read_bytes()).hexdigest()
    cfg = {
        "input": {"datacomp_metadata": str(metadata)},
        "scorers": [{"language_id": {"backend": "fasttext", "model_url": server, "model_sha256": digest}}],
        "filters": [],
        "output": {"dir": str(tmp_path / "run")},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli("run", tmp_path / "c.yaml")
    assert code == 0, err
    assert (home / ".cache" / "poolsift" / "lid.176.bin").read_bytes() == lid.read_bytes()
    # on the shard plan the first shard is read by the filter pass, which scores the language there
    assert err.index("downloading lid.176.bin") < err.index("filter:")
    import pyarrow.parquet as pq

    assert "language" in pq.read_table(tmp_path / "run" / "subset").column_names  # the scorer's column, written
