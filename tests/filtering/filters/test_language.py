"""language: keep listed languages, with py3langid (default), lingua or DataComp's fastText."""

import sys
import types

import numpy as np
import pyarrow as pa
import pytest

from filtering.errors import ConfigError, InputError
from filtering.filters.base import InputInfo
from filtering.filters.language import LanguageFilter, LanguageParams
from filtering.pool import Pool
from filtering.scorers import language_identifiers

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
    language_identifiers.identifier.cache_clear()
    yield
    language_identifiers.identifier.cache_clear()


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
    real = language_identifiers._Py3Langid.predict

    def counting(self, texts):
        calls.append(list(texts))
        return real(self, texts)

    monkeypatch.setattr(language_identifiers._Py3Langid, "predict", counting)
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
            return [("__label__nl", "__label__en", "__label__de")] * len(texts), [np.array([0.5, 0.3, 0.2])] * len(
                texts
            )

    monkeypatch.setitem(sys.modules, "fasttext", types.SimpleNamespace(load_model=lambda path: FakeModel()))
    d, _ = decide(
        ["a cross"], languages=["en"], backend="fasttext", model_path=str(model_file), candidates=["en", "de"]
    )
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
    language_identifiers.identifier.cache_clear()
    monkeypatch.setitem(sys.modules, "fasttext", types.SimpleNamespace(load_model=lambda path: None))
    # no model and no network (conftest points the download at a closed loopback port)
    with pytest.raises(InputError, match=r"cannot download http://127\.0\.0\.1:\d+/lid\.176\.bin .* put it at "):
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
    language_identifiers.identifier.cache_clear()
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
        {"languages": ["en"], "model_path": "lid.176.bin"},
        {"languages": ["en"], "model_url": "http://127.0.0.1/lid.176.bin"},  # fastText's settings, for py3langid
        {"languages": ["en"], "backend": "fasttext", "model_sha256": "not-a-digest"},
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
        "a photo of a dog on the beach",
        "ein Hund am Strand",
        "un chien sur la plage",
        "un perro en la playa",
        "een hond op het strand",
        "un cane sulla spiaggia",
        "",
        "12345",
        "cat",
        "猫がソファの上で寝ている",
    ]
    texts = [f"{t} {i}" if t else t for i, t in enumerate(texts * 12)]
    serial = language_identifiers.predict_texts(texts, "py3langid", workers=1)
    parallel = language_identifiers.predict_texts(texts, "py3langid", workers=2, min_parallel=0)
    assert serial[0] == parallel[0]
    np.testing.assert_array_equal(serial[1], parallel[1])
    assert len(parallel[0]) == len(texts) == len(parallel[1])


# --- DataComp's identifiers: a real (tiny) fastText model, gcld3, fallbacks -----------------


@pytest.fixture(scope="module")
def tiny_lid(tmp_path_factory):
    pytest.importorskip("fasttext")
    from tests.fasttext_lid import train_tiny_lid

    return train_tiny_lid(tmp_path_factory.mktemp("lid") / "tiny_lid.bin")


def datacomp_fasttext_en(model, texts):
    """DataComp's rule (apply_filter.py:70-73): predict(k=1) on newline-free text; top label == en."""
    labels, _ = model.predict([t.replace("\n", " ") for t in texts], k=1)
    return [lab[0].replace("__label__", "") == "en" for lab in labels]


ODD = [
    "a dog on the beach",
    "ein Hund am Strand",
    "un chien\nsur la plage",
    "",
    " ",
    "\xa0 \xa0",
    "dog\n",
    "the red car",
    "Katze",
    "\n\n",
    "1178\xa0city",
]


def test_fasttext_backend_decides_as_datacomp_with_the_same_model(tiny_lid, fresh_identifiers):
    import fasttext

    d, pool = decide(ODD, languages=["en"], backend="fasttext", model_path=str(tiny_lid))
    expect = datacomp_fasttext_en(fasttext.load_model(str(tiny_lid)), ODD)
    assert d.keep.tolist() == expect
    assert "language_empty" not in d.reasons_for(~d.keep).tolist()
    [record] = pool.artifacts["language_identifiers"]
    assert record["backend"] == "fasttext" and record["lid176"] is False
    assert "not lid.176.bin" in record["note"] and "DataComp's identifier" not in record["note"]


def test_fasttext_numpy2_path_gives_the_same_labels(tiny_lid, fresh_identifiers, monkeypatch):
    ident = language_identifiers.identifier("fasttext", str(tiny_lid))
    want = ident.predict(ODD)

    def broken(texts, k=1):
        raise ValueError("Unable to avoid copy while creating an array as requested.")

    monkeypatch.setattr(ident.model, "predict", broken)
    got = ident.predict(ODD)
    assert got[0] == want[0]
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6)


def test_lid176_is_recognised_by_its_sha256(tiny_lid, fresh_identifiers, monkeypatch):
    from filtering.filters.language import LanguageParams
    from filtering.scorers.language_identifiers import LID176_SHA256, resolve

    monkeypatch.setattr(language_identifiers, "_file_sha256", lambda *a: LID176_SHA256)
    record = resolve(LanguageParams(languages=["en"], backend="fasttext", model_path=str(tiny_lid)))
    assert (
        record["note"]
        == f"language: ran fasttext (lid.176.bin, {tiny_lid}), {language_identifiers.BASELINE_OF['fasttext']}"
    )


def test_fallback_runs_py3langid_and_says_the_result_is_not_datacomps(tmp_path, fresh_identifiers):
    from filtering.scorers.language_identifiers import resolve

    missing = tmp_path / "lid.176.bin"
    params = LanguageParams(languages=["en"], backend="fasttext", model_path=str(missing), fallback="py3langid")
    record = resolve(params)
    assert record["backend"] == "py3langid" and record["requested"] == "fasttext"
    assert record["note"].startswith("language: ran py3langid instead of fasttext (")
    assert str(missing) in record["note"] and "NOT what DataComp's identifier" in record["note"]
    assert "\n" not in record["note"]
    d, _ = decide(CAPTIONS, languages=["en"], backend="fasttext", model_path=str(missing), fallback=["py3langid"])
    assert d.keep.tolist() == [True, False, False, False, False, False, True]  # py3langid's answer
    with pytest.raises(InputError, match="cannot download"):  # no fallback: the error (conftest: no network)
        resolve(LanguageParams(languages=["en"], backend="fasttext", model_path=str(missing)))


def test_model_path_expands_home(tiny_lid, fresh_identifiers, monkeypatch):
    from filtering.scorers.language_identifiers import resolve

    monkeypatch.setenv("HOME", str(tiny_lid.parent))
    record = resolve(LanguageParams(languages=["en"], backend="fasttext", model_path=f"~/{tiny_lid.name}"))
    assert record["backend"] == "fasttext" and record["model_path"] == str(tiny_lid)


def test_gcld3_missing_says_how_to_get_it_and_falls_back(tiny_lid, monkeypatch, fresh_identifiers):
    from filtering.scorers.language_identifiers import resolve

    monkeypatch.setitem(sys.modules, "gcld3", None)
    with pytest.raises(ConfigError, match="protobuf-compiler libprotobuf-dev"):
        resolve(LanguageParams(languages=["en"], backend="gcld3"))
    record = resolve(
        LanguageParams(languages=["en"], backend="gcld3", fallback=["fasttext", "py3langid"], model_path=str(tiny_lid))
    )
    assert record["backend"] == "fasttext"
    assert record["unavailable"].keys() == {"gcld3"}
    assert "NOT what DataComp's identifier for its laion2b baseline gives" in record["note"]


def test_gcld3_adapter_as_datacomp_calls_it(monkeypatch, fresh_identifiers):
    seen = {}

    class Ident:
        def __init__(self, min_num_bytes, max_num_bytes):
            seen["args"] = (min_num_bytes, max_num_bytes)

        def FindLanguage(self, text):  # noqa: N802 (gcld3's name)
            seen.setdefault("texts", []).append(text)
            code = "en" if "dog" in text else "und" if not text.strip() else "de"
            return types.SimpleNamespace(language=code, probability=0.9, is_reliable=True)

    monkeypatch.setitem(sys.modules, "gcld3", types.SimpleNamespace(NNetLanguageIdentifier=Ident))
    d, pool = decide(["a\ndog", "ein Hund", " ", None], languages=["en"], backend="gcld3")
    assert d.keep.tolist() == [True, False, False, False]
    assert seen["args"] == (0, 1000)
    assert seen["texts"] == ["a dog", "ein Hund", " "]  # blank captions classified, as DataComp does
    assert d.reasons_for(~d.keep).tolist() == ["language_not_allowed", "language_not_allowed", "language_empty"]
    assert pool.artifacts["language_identifiers"][0]["note"].startswith("language: ran gcld3 (NNetLanguageIdentifier")


@pytest.mark.parametrize(
    "params",
    [
        {"languages": ["en"], "backend": "fasttext", "model_path": "x", "fallback": ["fasttext"]},
        {"languages": ["en"], "backend": "gcld3", "candidates": ["en", "de"]},
        {"languages": ["en"], "fallback": []},
        {"languages": ["en"], "fallback": ["cld2"]},
    ],
)
def test_fallback_params_rejected(params):
    with pytest.raises(ValueError):
        LanguageParams(**params)


@pytest.mark.parametrize("backend", ["fasttext", "gcld3"])
def test_datacomp_identifiers_on_several_cores_give_the_same_result(backend, tmp_path_factory, fresh_identifiers):
    if backend == "gcld3":
        pytest.importorskip("gcld3")
        model_path = None
    else:
        pytest.importorskip("fasttext")
        from tests.fasttext_lid import train_tiny_lid

        model_path = str(train_tiny_lid(tmp_path_factory.mktemp("lid") / "tiny_lid.bin"))
    texts = [f"{t} {i}" for i, t in enumerate(ODD * 10)]
    serial = language_identifiers.predict_texts(texts, backend, model_path, workers=1)
    parallel = language_identifiers.predict_texts(texts, backend, model_path, workers=2, min_parallel=0)
    assert serial[0] == parallel[0]
    np.testing.assert_array_equal(serial[1], parallel[1])


# --- lid.176.bin on first use: the user cache folder, a download, its checksum -----------------


def test_without_model_path_fasttext_reads_lid176_in_the_user_cache(tiny_lid, tmp_path, monkeypatch, fresh_identifiers):
    """A file at the default cache path is used as it is (here the tiny model: the run says it
    is not lid.176.bin); nothing is downloaded."""
    import shutil

    from filtering.scorers.language_identifiers import resolve

    monkeypatch.setenv("POOLSIFT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    shutil.copy(tiny_lid, tmp_path / "cache" / "lid.176.bin")
    record = resolve(LanguageParams(languages=["en"], backend="fasttext"))
    assert record["backend"] == "fasttext" and record["model_path"] == str(tmp_path / "cache" / "lid.176.bin")
    assert "not lid.176.bin" in record["note"]


def test_a_missing_model_is_downloaded_into_the_user_cache(tiny_lid, tmp_path, monkeypatch, fresh_identifiers, capsys):
    import hashlib
    import shutil

    from filtering.scorers.language_identifiers import resolve
    from tests.loopback_http import serve

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("POOLSIFT_CACHE")
    (tmp_path / "www").mkdir()
    shutil.copy(tiny_lid, tmp_path / "www" / "lid.176.bin")
    digest = hashlib.sha256(tiny_lid.read_bytes()).hexdigest()
    with serve(tmp_path / "www") as base:
        monkeypatch.setenv("POOLSIFT_LID176_URL", f"{base}/lid.176.bin")  # the default model_url
        record = resolve(LanguageParams(languages=["en"], backend="fasttext", model_sha256=digest))
    cached = tmp_path / "xdg" / "poolsift" / "lid.176.bin"
    assert cached.read_bytes() == tiny_lid.read_bytes()
    assert record["backend"] == "fasttext" and record["model_path"] == str(cached) and record["model_sha256"] == digest
    assert "downloading lid.176.bin" in capsys.readouterr().err
    d, _ = decide(["a photo of a dog on the beach", "ein Hund am Strand"], languages=["en"], backend="fasttext")
    assert d.keep.tolist() == [True, False]  # the downloaded model classifies


def test_a_download_with_the_wrong_checksum_is_refused_even_with_a_fallback(
    tiny_lid, tmp_path, monkeypatch, fresh_identifiers
):
    """lid.176.bin's own sha256 (the default) against another file: refused, nothing in the
    cache, and no fallback hides it."""
    import shutil

    from filtering.models.download import ChecksumError
    from filtering.scorers.language_identifiers import resolve
    from tests.loopback_http import serve

    monkeypatch.setenv("POOLSIFT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "www").mkdir()
    shutil.copy(tiny_lid, tmp_path / "www" / "lid.176.bin")
    with serve(tmp_path / "www") as base:
        params = LanguageParams(
            languages=["en"], backend="fasttext", model_url=f"{base}/lid.176.bin", fallback=["py3langid"]
        )
        with pytest.raises(ChecksumError, match=f"expected {language_identifiers.LID176_SHA256}"):
            resolve(params)
    assert not (tmp_path / "cache").exists()


def test_no_network_with_a_fallback_runs_the_fallback_and_says_why(tmp_path, monkeypatch, fresh_identifiers):
    from filtering.scorers.language_identifiers import resolve

    monkeypatch.setenv("POOLSIFT_CACHE", str(tmp_path / "cache"))
    record = resolve(LanguageParams(languages=["en"], backend="fasttext", fallback=["py3langid"]))
    assert record["backend"] == "py3langid"
    assert "could not download http://127.0.0.1:" in record["note"] and "NOT" in record["note"]
    assert not (tmp_path / "cache").exists()


def test_fasttext_candidate_confidence_is_the_candidates_own_probability(tiny_lid, fresh_identifiers):
    """With ``candidates`` the whole ranking is read (k=-1); each caption's confidence is its
    best candidate's probability, as fastText's binding gives it. (fasttext-wheel 0.9.2's
    ``predict`` on a list under numpy 2 repeats the top probability over the whole ranking:
    a caption whose top label is not a candidate got that label's confidence.)"""
    import fasttext

    texts = ["a photo of a dog on the beach", "ein Hund am Strand", "un chien sur la plage"]
    codes, conf = language_identifiers.identifier("fasttext", str(tiny_lid), ("de", "fr")).predict(texts)
    model = fasttext.load_model(str(tiny_lid))
    for text, code, p in zip(texts, codes, conf, strict=True):
        ranked = [
            (prob, label.removeprefix("__label__")) for prob, label in model.f.predict(text + "\n", -1, 0.0, "strict")
        ]
        best = max((prob, c) for prob, c in ranked if c in ("de", "fr"))
        assert (code, p) == (best[1], pytest.approx(best[0], rel=1e-6))
    assert codes[0] in ("de", "fr") and conf[0] < 0.5  # an English caption: its best candidate is unlikely
