"""language: keep listed languages, with py3langid (default), lingua or DataComp's fastText."""

import sys
import types

import numpy as np
import pyarrow as pa
import pytest

from filtering.errors import ConfigError, InputError
from filtering.filters import language
from filtering.filters.base import InputInfo
from filtering.filters.language import LanguageFilter, LanguageParams
from filtering.pool import Pool

CAPTIONS = [
    "a photo of a red circle on a blue background",
    "ein roter Kreis auf einem blauen Hintergrund",
    "un cercle rouge sur un fond bleu",
    "",
    None,
    "   ",
    "a green triangle next to a small yellow square",
]


def decide(captions, alive=None, **params):
    pool = Pool(pa.table({"caption": pa.array(captions, pa.string())}), parts=[])
    f = LanguageFilter(LanguageParams(**params), InputInfo("webdataset"))
    alive = np.ones(pool.n, dtype=bool) if alive is None else alive
    d = f.apply(pool, alive)
    return d, pool


@pytest.fixture
def fresh_identifiers():
    language.identifier.cache_clear()
    yield
    language.identifier.cache_clear()


def test_py3langid_keeps_english_and_names_reasons():
    d, _ = decide(CAPTIONS, languages=["en"])
    assert d.keep.tolist() == [True, False, False, False, False, False, True]
    dropped = ~d.keep
    assert d.reasons_for(dropped).tolist() == [
        "language_not_allowed",
        "language_not_allowed",
        "language_empty",
        "language_empty",
        "language_empty",
    ]


def test_several_languages_and_case():
    d, _ = decide(CAPTIONS, languages=["EN", "de"])
    assert d.keep.tolist() == [True, True, False, False, False, False, True]


def test_min_confidence_drops_unsure_predictions():
    d, _ = decide(["a photo of a red circle on a blue background", "red"], languages=["en"], min_confidence=0.5)
    assert d.keep[0] and not d.keep[1]
    d, _ = decide(["a photo of a red circle on a blue background"] * 2, languages=["en"], min_confidence=1.0)
    assert d.reasons_for(~d.keep).tolist() == ["language_low_confidence"] * 2


def test_predictions_are_made_once_per_caption_and_only_for_alive_rows(monkeypatch, fresh_identifiers):
    calls = []
    real = language._Py3Langid.predict

    def counting(self, texts):
        calls.append(list(texts))
        return real(self, texts)

    monkeypatch.setattr(language._Py3Langid, "predict", counting)
    captions = ["a red circle on a blue background"] * 5 + ["ein roter Kreis"] * 5
    alive = np.array([True] * 5 + [False] * 4 + [True])
    pool = Pool(pa.table({"caption": pa.array(captions)}), parts=[])
    f = LanguageFilter(LanguageParams(languages=["en"]), InputInfo("webdataset"))
    d = f.apply(pool, alive)
    assert d.keep[:5].all() and not d.keep[9]
    assert calls == [["a red circle on a blue background", "ein roter Kreis"]]
    f.apply(pool, np.ones(10, bool))  # same run (pool): everything is memoised
    assert len(calls) == 1


def test_fasttext_backend_reads_datacomp_labels(monkeypatch, tmp_path, fresh_identifiers):
    model_file = tmp_path / "lid.176.bin"
    model_file.write_bytes(b"not really a model")
    seen = {}

    class FakeModel:  # stands in for fastText's binding: the adapter's parsing is under test
        def predict(self, texts, k=1):
            seen["texts"] = texts
            labels = [("__label__en",) if "circle" in t else ("__label__de",) for t in texts]
            return labels, [np.array([0.9]) for _ in texts]

    monkeypatch.setitem(sys.modules, "fasttext", types.SimpleNamespace(load_model=lambda path: FakeModel()))
    d, _ = decide(["a red\ncircle", "ein Kreis"], languages=["en"], backend="fasttext", model_path=str(model_file))
    assert d.keep.tolist() == [True, False]
    assert seen["texts"] == ["a red circle", "ein Kreis"]  # newlines replaced, as DataComp does


def test_candidates_make_short_captions_reliable(fresh_identifiers):
    short = ["a cross", "a square", "a photo of an arrow", "a blue square", "ein Stern", "une croix"]
    d, _ = decide(short, languages=["en"])
    assert d.keep.sum() < 4  # unrestricted, langid.py misreads most of these
    d, _ = decide(short, languages=["en"], candidates=["en", "de", "fr", "es"])
    assert d.keep.tolist() == [True, True, True, True, False, False]
    with pytest.raises(ConfigError, match="does not know"):
        decide(short, languages=["en"], candidates=["en", "xx"])


def test_fasttext_candidates_pick_the_best_ranked_candidate(monkeypatch, tmp_path, fresh_identifiers):
    model_file = tmp_path / "lid.176.bin"
    model_file.write_bytes(b"")

    class FakeModel:
        def predict(self, texts, k=1):
            assert k == -1
            return [("__label__nl", "__label__en", "__label__de")] * len(texts), [np.array([0.5, 0.3, 0.2])] * len(texts)

    monkeypatch.setitem(sys.modules, "fasttext", types.SimpleNamespace(load_model=lambda path: FakeModel()))
    d, _ = decide(["a cross"], languages=["en"], backend="fasttext", model_path=str(model_file), candidates=["en", "de"])
    assert d.keep.tolist() == [True]


def test_fasttext_numpy2_fallback(monkeypatch, tmp_path, fresh_identifiers):
    model_file = tmp_path / "lid.176.bin"
    model_file.write_bytes(b"")

    class Binding:
        def predict(self, line, k, threshold, on_unicode_error):
            return [(0.9, "__label__en")] if "circle" in line else [(0.8, "__label__fr")]

    class FakeModel:  # fasttext 0.9.2 under numpy 2: predict raises, the binding still works
        f = Binding()

        def predict(self, texts, k=1):
            raise ValueError("Unable to avoid copy while creating an array as requested.")

    monkeypatch.setitem(sys.modules, "fasttext", types.SimpleNamespace(load_model=lambda path: FakeModel()))
    d, _ = decide(["a circle", "un cercle"], languages=["en"], backend="fasttext", model_path=str(model_file))
    assert d.keep.tolist() == [True, False]


def test_fasttext_missing_package_or_model(monkeypatch, tmp_path, fresh_identifiers):
    monkeypatch.setitem(sys.modules, "fasttext", None)  # import fails
    with pytest.raises(ConfigError, match="pip install fasttext"):
        decide(["a red circle"], languages=["en"], backend="fasttext", model_path=str(tmp_path / "lid.176.bin"))
    language.identifier.cache_clear()
    monkeypatch.setitem(sys.modules, "fasttext", types.SimpleNamespace(load_model=lambda path: None))
    with pytest.raises(InputError, match="no fastText model"):
        decide(["a red circle"], languages=["en"], backend="fasttext", model_path=str(tmp_path / "lid.176.bin"))


def test_lingua_backend(monkeypatch, fresh_identifiers):
    def value(code, v):
        lang = types.SimpleNamespace(iso_code_639_1=types.SimpleNamespace(name=code))
        return types.SimpleNamespace(language=lang, value=v)

    class FakeDetector:  # lingua's API shape; the adapter's mapping to ISO codes is under test
        def compute_language_confidence_values_in_parallel(self, texts):
            return [[value("EN", 0.8), value("DE", 0.2)] if "circle" in t else [value("FR", 0.0)] for t in texts]

    builder = types.SimpleNamespace(from_all_languages=lambda: types.SimpleNamespace(build=lambda: FakeDetector()))
    monkeypatch.setitem(sys.modules, "lingua", types.SimpleNamespace(LanguageDetectorBuilder=builder))
    d, _ = decide(["a red circle", "qqq"], languages=["en"], backend="lingua")
    assert d.keep.tolist() == [True, False]
    language.identifier.cache_clear()
    monkeypatch.setitem(sys.modules, "lingua", None)
    with pytest.raises(ConfigError, match=r"poolsift\[lingua\]"):
        decide(["a red circle"], languages=["en"], backend="lingua")


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"languages": []},
        {"languages": ["english"]},
        {"languages": ["en"], "backend": "cld3"},
        {"languages": ["en"], "backend": "fasttext"},
        {"languages": ["en"], "model_path": "lid.176.bin"},
        {"languages": ["en"], "min_confidence": 1.5},
        {"languages": ["en"], "candidates": ["de", "fr"]},
        {"languages": ["en"], "candidates": ["en"]},
    ],
)
def test_params_rejected(params):
    with pytest.raises(ValueError):
        LanguageParams(**params)


def test_many_captions_are_classified_on_several_cores_with_the_same_result():
    texts = [
        "a photo of a dog on the beach", "ein Hund am Strand", "un chien sur la plage", "un perro en la playa",
        "een hond op het strand", "un cane sulla spiaggia", "", "12345", "cat", "猫がソファの上で寝ている",
    ]
    texts = [f"{t} {i}" if t else t for i, t in enumerate(texts * 12)]
    serial = language.predict_texts(texts, "py3langid", workers=1)
    parallel = language.predict_texts(texts, "py3langid", workers=2, min_parallel=0)
    assert serial[0] == parallel[0]
    np.testing.assert_array_equal(serial[1], parallel[1])
    assert len(parallel[0]) == len(texts) == len(parallel[1])
