"""filtering.models.download.fetch against a file server on the loopback address: the file
lands only with the expected sha256, a progress bar is drawn, and a refused or failed
download leaves nothing where the model is looked for."""

from __future__ import annotations

import hashlib

import pytest

from filtering.errors import InputError
from filtering.models.download import ChecksumError, DownloadError, fetch, user_cache_dir
from tests.loopback_http import closed_port, serve

PAYLOAD = bytes(range(256)) * 4099  # ~1 MB: more than one read block


@pytest.fixture
def served(tmp_path):
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "lid.176.bin").write_bytes(PAYLOAD)
    with serve(tmp_path / "www") as base:
        yield f"{base}/lid.176.bin"


def test_fetch_keeps_the_file_with_the_expected_sha256(tmp_path, served, capsys):
    dest = tmp_path / "cache" / "poolsift" / "lid.176.bin"
    got = fetch(served, dest, hashlib.sha256(PAYLOAD).hexdigest(), what="language")
    assert got == dest and dest.read_bytes() == PAYLOAD
    assert sorted(p.name for p in dest.parent.iterdir()) == ["lid.176.bin"]  # no temporary file left
    err = capsys.readouterr().err
    assert "downloading lid.176.bin" in err and "100%" in err  # the progress bar, with the size from Content-Length
    # present: not fetched again (the server is not asked)
    assert fetch("http://127.0.0.1:1/never", dest, "0" * 64, what="language") == dest


def test_a_wrong_checksum_is_refused_and_nothing_is_kept(tmp_path, served):
    dest = tmp_path / "cache" / "poolsift" / "lid.176.bin"
    with pytest.raises(ChecksumError) as e:
        fetch(served, dest, "ab" * 32, what="language", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("language: refused " + served)
    assert hashlib.sha256(PAYLOAD).hexdigest() in msg and "ab" * 32 in msg
    assert not (tmp_path / "cache").exists()  # the folders it made are gone too
    assert isinstance(e.value, InputError) and e.value.exit_code == 2


def test_a_wrong_checksum_leaves_an_existing_cache_folder_as_it_was(tmp_path, served):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "other").write_text("kept")
    with pytest.raises(ChecksumError):
        fetch(served, cache / "lid.176.bin", "ab" * 32, what="language", progress=False)
    assert sorted(p.name for p in cache.iterdir()) == ["other"]


def test_no_network_is_one_line_naming_the_url_and_where_to_put_the_file(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/lid.176.bin"
    dest = tmp_path / "cache" / "lid.176.bin"
    with pytest.raises(DownloadError) as e:
        fetch(url, dest, "ab" * 32, what="language", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and url in msg and str(dest) in msg and "refused" in msg.lower()
    assert not (tmp_path / "cache").exists() and e.value.exit_code == 2


def test_an_http_error_is_one_line(tmp_path, served):
    with pytest.raises(DownloadError, match=r"^language: cannot download .*/missing.bin \(HTTP 404 File not found\)"):
        fetch(served.replace("lid.176.bin", "missing.bin"), tmp_path / "x.bin", "ab" * 32, "language", False)
    assert not (tmp_path / "x.bin").exists()


def test_user_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("POOLSIFT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir() == tmp_path / "xdg" / "poolsift"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_cache_dir() == tmp_path / "home" / ".cache" / "poolsift"
    monkeypatch.setenv("POOLSIFT_CACHE", str(tmp_path / "mine"))
    assert user_cache_dir() == tmp_path / "mine"
