"""language_id: the Score half of the language filter; its fingerprint names the identifier that ran."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from filtering.errors import ConfigError
from filtering.filters.base import InputInfo as FilterInput
from filtering.filters.language import LanguageFilter, LanguageParams
from filtering.pool import ShardPart
from filtering.registry import parse_scorers
from filtering.scorers import language_identifiers
from filtering.scorers.base import Batch, InputInfo

CAPTIONS = np.array(
    [
        "a photo of a red circle on a blue background",
        "ein roter Kreis auf blauem Grund",
        None,
        "a photo of a red circle on a blue background",
        "   ",
    ],
    dtype=object,
)


@pytest.fixture
def fresh_identifiers():
    language_identifiers.identifier.cache_clear()
    yield
    language_identifiers.identifier.cache_clear()


def _scorer(**params):
    [s] = parse_scorers([{"language_id": params}], InputInfo("webdataset"))
    return s


def _score(scorer, captions=CAPTIONS):
    scorer.ensure_setup()
    return scorer.score(Batch(ShardPart("u", "s", 0, len(captions)), 0, columns={scorer.field: captions}))


def test_codes_and_confidences_once_per_distinct_caption(monkeypatch):
    calls = []
    real = language_identifiers._Py3Langid.predict
    monkeypatch.setattr(
        language_identifiers._Py3Langid, "predict", lambda self, texts: calls.append(list(texts)) or real(self, texts)
    )
    s = _scorer()
    assert s.provides() == ("language", "language_confidence")
    out = _score(s)
    assert out["language"].tolist()[:3] == ["en", "de", None]
    assert out["language"][3] == "en"
    assert np.isnan(out["language_confidence"][2]) and (out["language_confidence"][[0, 1, 3]] > 0.5).all()
    assert calls == [[CAPTIONS[0], CAPTIONS[1], "   "]]  # nulls skipped, repeats classified once


def test_same_codes_as_the_filter_alone():
    captions = [c for c in CAPTIONS if c is not None and c.strip()]
    codes, conf = language_identifiers.predict_texts(captions, "py3langid")
    out = _score(_scorer(), np.array(captions, dtype=object))
    assert out["language"].tolist() == codes
    np.testing.assert_array_equal(out["language_confidence"], conf)


def test_fingerprint_names_the_identifier_that_ran_not_the_one_asked_for(monkeypatch, tmp_path, fresh_identifiers):
    monkeypatch.setitem(sys.modules, "fasttext", None)  # fastText not installed: the chain falls back
    s = _scorer(backend="fasttext", fallback="py3langid", model_path=str(tmp_path / "lid.176.bin"))
    fp = s.fingerprint()
    assert fp["backend"] == "py3langid" and fp["model_sha256"] is None
    assert fp == _scorer().fingerprint()  # the same identifier ran: one cache


def test_fingerprint_holds_the_model_file_digest(monkeypatch, tmp_path, fresh_identifiers):
    monkeypatch.setitem(sys.modules, "fasttext", types.SimpleNamespace(load_model=lambda path: object()))
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"model one")
    b.write_bytes(b"model two")
    fa = _scorer(backend="fasttext", model_path=str(a)).fingerprint()
    fb = _scorer(backend="fasttext", model_path=str(b)).fingerprint()
    assert fa["backend"] == fb["backend"] == "fasttext"
    assert fa["model_sha256"] != fb["model_sha256"]


def test_filter_brings_its_scorer_named_by_identifier_settings():
    def f(**params):
        return LanguageFilter(LanguageParams(**params), FilterInput("webdataset"))

    a, b = f(languages=["en"]), f(languages=["en", "de"], min_confidence=0.5)
    assert a.scorer().name == b.scorer().name  # the decision's settings share one scorer
    assert a.scorer().name != f(languages=["en"], candidates=["en", "de"]).scorer().name
    assert a.requires() == {"caption", *a.scorer().provides()}


def test_params_rejected():
    with pytest.raises(ConfigError, match="name"):
        _scorer(name="bad name")
    with pytest.raises(ConfigError, match="model_path"):
        _scorer(model_path="lid.176.bin")  # fastText's setting, for py3langid
