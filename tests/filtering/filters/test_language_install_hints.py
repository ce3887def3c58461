"""A fallback's log line names the command that installs the identifier it stood in for."""

from __future__ import annotations

import sys

import pytest

from filtering.filters.language import LanguageParams
from filtering.scorers import language_identifiers
from filtering.scorers.language_identifiers import resolve


@pytest.fixture
def fresh_identifiers():
    language_identifiers.identifier.cache_clear()
    yield
    language_identifiers.identifier.cache_clear()


@pytest.mark.parametrize(
    ("backend", "module", "hint"),
    [
        ("fasttext", "fasttext", "(fasttext is not installed: pip install fasttext-community)"),
        ("lingua", "lingua", "(lingua is not installed: pip install lingua-language-detector)"),
        (
            "gcld3",
            "gcld3",
            "(gcld3 is not installed: apt-get install protobuf-compiler libprotobuf-dev, then pip install gcld3)",
        ),
    ],
)
def test_fallback_line_names_the_install_command(backend, module, hint, monkeypatch, tmp_path, fresh_identifiers):
    monkeypatch.setitem(sys.modules, module, None)  # as on a machine without the package
    model = tmp_path / "lid.176.bin"
    model.touch()
    path = {"model_path": str(model)} if backend == "fasttext" else {}
    params = LanguageParams(languages=["en"], backend=backend, fallback=["py3langid"], **path)
    record = resolve(params)
    assert record["backend"] == "py3langid"
    assert record["note"].startswith(f"language: ran py3langid instead of {backend} {hint}")
