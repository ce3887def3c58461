"""wordnet_synsets: ``wordnet.synsets(word)[0]`` from the bundled table equals NLTK's, word
for word (NLTK 3.8.1 on Debian's WordNet 3.0 files: see ``tests/nltk_wordnet.py``)."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from filtering.errors import InputError
from filtering.filters.base import InputInfo
from filtering.filters.wordnet_synsets import (
    WordNetSynsets,
    WordNetSynsetsParams,
    contains_synset,
    first_synset,
    imagenet21k_offsets,
    table_meta,
)
from tests.nltk_wordnet import DEBIAN_WORDNET, ODD, WORDNET_FILES, nltk_first, nltk_wordnet, variants


@pytest.fixture(scope="module")
def wn(tmp_path_factory):
    return nltk_wordnet(tmp_path_factory.mktemp("wordnet"))


def decide(captions, **params):
    from filtering.pool import Pool

    pool = Pool(pa.table({"caption": pa.array(captions, pa.string())}), parts=[])
    d = WordNetSynsets(WordNetSynsetsParams(**params), InputInfo("webdataset")).apply(pool, np.ones(pool.n, bool))
    return d.keep.tolist(), d.reasons_for(~d.keep).tolist()


def test_odd_tokens_match_nltk(wn):
    fs = first_synset()
    expected = [nltk_first(wn, w) for w in ODD]
    assert [fs(w) for w in ODD] == expected  # the rules, word by word
    assert fs.offsets(pa.array(ODD, pa.string())).tolist() == expected  # the column path: table, then rules


def test_issue_examples(wn):
    """Issue 13: DataComp keeps 'laptop', 'purple', 'road'; drops 'MOUNTAIN!' and 'partridge'
    (whose first synset is the food)."""
    in21k = set(imagenet21k_offsets().tolist())
    for word, kept in [("laptop", True), ("purple", True), ("road", True), ("MOUNTAIN!", False), ("partridge", False)]:
        assert (nltk_first(wn, word) in in21k) is kept, word
    keep, reasons = decide(["a laptop on a desk", "Purple", "the open road", "MOUNTAIN!", "roast partridge", None, ""])
    assert keep == [True, True, True, False, False, False, False]
    assert reasons == ["caption_no_synset"] * 4


@pytest.mark.slow
def test_every_lemma_and_inflections_match_nltk(wn):
    """Every WordNet 3.0 lemma, every exception-list entry and its base forms, and case,
    punctuation and suffix variants of a sample of lemmas, through the vectorized path."""
    fs = first_synset()
    words = sorted(wn._lemma_pos_offset_map)
    for pos_map in wn._exception_map.values():
        for key, bases in pos_map.items():
            words += [key, key.upper(), *bases]
    rng = np.random.default_rng(0)
    for lemma in rng.choice(sorted(wn._lemma_pos_offset_map), 6000, replace=False).tolist():
        words += variants(lemma)
    words += ODD
    words = sorted(set(words))
    expected = np.array([nltk_first(wn, w) for w in words])
    got = fs.offsets(pa.array(words, pa.string()))
    diff = np.flatnonzero(got != expected)
    assert len(diff) == 0, [(words[i], int(got[i]), int(expected[i])) for i in diff[:20]]
    assert len(words) > 250_000


def test_table_provenance():
    meta = table_meta()
    # DataComp's baselines/utils.py pins this sha256 for imagenet21k_wordnet_ids.txt
    assert meta["imagenet21k_sha256"] == "66362bdedf36d933382edca5493fc562dcc17128ce36403c9e730a75f48cb2f2"
    offsets = imagenet21k_offsets()
    assert len(offsets) == 21843 and offsets[0] == 4475  # n00004475 'organism'


def test_table_is_datacomps_list_from_timm():
    spec = importlib.util.find_spec("timm")
    if spec is None:
        pytest.skip("timm not installed")
    path = Path(spec.origin).parent / "data" / "_info" / "imagenet21k_goog_synsets.txt"
    raw = path.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == table_meta()["imagenet21k_sha256"]
    # DataComp's load_uids_with_text_entity: [int(x.strip()[1:]) for x in lines]
    np.testing.assert_array_equal(
        imagenet21k_offsets(), sorted({int(x.strip()[1:]) for x in raw.decode().splitlines()})
    )


@pytest.mark.slow  # rebuilds the table (reads the 25 MB database)
def test_builder_reproduces_the_shipped_table(tmp_path):
    if not all((DEBIAN_WORDNET / f).is_file() for f in WORDNET_FILES) or importlib.util.find_spec("timm") is None:
        pytest.skip("needs wordnet-base and timm")
    from filtering.data import build_wordnet_table

    out = tmp_path / "t.npz"
    assert build_wordnet_table.main(["--out", str(out)]) == 0
    shipped = Path(build_wordnet_table.__file__).with_name("wordnet_first_synsets.npz")
    assert out.read_bytes() == shipped.read_bytes()


def test_offset_is_compared_whatever_the_part_of_speech():
    """DataComp compares ``synset.offset()`` alone, so a verb or adjective whose first
    synset's offset equals an ImageNet-21k noun offset counts; such words exist."""
    fs = first_synset()
    in21k = imagenet21k_offsets()
    not_noun = fs.first_offset[:, 0] < 0
    resolved = fs.resolved[not_noun]
    assert np.isin(resolved, in21k).any()
    word = np.asarray(fs.lemmas, dtype=object)[not_noun][np.isin(resolved, in21k)][0]
    assert decide([f"just {word}"])[0] == [True]


def test_whitespace_is_pythons_split():
    captions = ["dog\u00a0house", "xx\u3000laptop", "xx\x1claptop", "xx\u200blaptop", "laptop\n", "\tlaptop "]
    expected = [any(first_synset()(w) in set(imagenet21k_offsets().tolist()) for w in c.split()) for c in captions]
    assert decide(captions)[0] == expected
    assert expected[2] and not expected[3]  # \x1c splits in Python, zero-width space does not


def test_chunks_and_alive_rows(monkeypatch):
    from filtering.filters import wordnet_synsets
    from filtering.pool import Pool

    monkeypatch.setattr(wordnet_synsets, "CHUNK_ROWS", 2)
    captions = ["a laptop", "nothing here", "", None, "purple road", "xyzzy"] * 3
    assert decide(captions)[0] == [True, False, False, False, True, False] * 3
    pool = Pool(pa.table({"caption": pa.array(captions, pa.string())}), parts=[])
    alive = np.array([True, True, True, True, False, True] * 3)
    d = WordNetSynsets(WordNetSynsetsParams(), InputInfo("webdataset")).apply(pool, alive)
    assert d.keep[alive].tolist() == [True, False, False, False, False] * 3


def test_synsets_file(tmp_path):
    (tmp_path / "ids.txt").write_text("# mine\nn03642806\n\n")  # laptop
    keep, _ = decide(["a laptop", "purple"], synsets_file=str(tmp_path / "ids.txt"))
    assert keep == [True, False]
    with pytest.raises(InputError, match="synsets_file: no file"):
        decide(["x"], synsets_file=str(tmp_path / "missing.txt"))
    (tmp_path / "bad.txt").write_text("laptop\n")
    with pytest.raises(InputError, match="line 1"):
        decide(["x"], synsets_file=str(tmp_path / "bad.txt"))
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(InputError, match="no synsets"):
        decide(["x"], synsets_file=str(tmp_path / "empty.txt"))


def test_contains_synset_on_empty_column():
    assert contains_synset(pa.array([], pa.string()), imagenet21k_offsets()).tolist() == []
    assert contains_synset(pa.array([None, ""], pa.string()), imagenet21k_offsets()).tolist() == [False, False]
