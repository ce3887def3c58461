"""caption: DataComp's basic rule (> 2 words and > 5 characters) as min_words 3 / min_chars 6."""

import numpy as np
import pyarrow as pa
import pytest

from filtering.filters.base import InputInfo
from filtering.filters.caption import Caption, CaptionParams, has_words
from filtering.pool import Pool

CAPTIONS = [
    "a red circle",  # 3 words, 12 chars: kept
    "red circle",  # 2 words
    "a b c",  # 3 words, 5 chars
    "",  # empty
    "   \t ",  # whitespace only
    None,  # missing
    "  a  red\u3000circle  ",  # Unicode whitespace separates words too
    "abcdefghij",  # 1 word
]


def decide(captions, **params):
    pool = Pool(pa.table({"caption": pa.array(captions, pa.string())}), parts=[])
    f = Caption(CaptionParams(**params), InputInfo("webdataset"))
    alive = np.ones(pool.n, dtype=bool)
    d = f.apply(pool, alive)
    return d.keep, np.asarray(d.reasons_for(~d.keep), dtype=object), d


def test_datacomp_basic_rule_and_every_reason_code():
    keep, reasons, d = decide(CAPTIONS, min_words=3, min_chars=6)
    assert keep.tolist() == [True, False, False, False, False, False, True, False]
    assert reasons.tolist() == [
        "caption_too_few_words",
        "caption_too_short",
        "caption_empty",
        "caption_empty",
        "caption_empty",
        "caption_too_few_words",
    ]


def test_matches_python_split_and_len():
    texts = [c for c in CAPTIONS if c is not None] + ["x\u00a0y", "a\x1cb c", "tab\tsep\nnew line", "é è ê"]
    arr = pa.array(texts, pa.string())
    for k in range(0, 5):
        assert has_words(arr, k).tolist() == [len(t.split()) >= k for t in texts]
    every_space = "".join(chr(c) for c in range(0x3001) if chr(c).isspace())
    assert has_words(pa.array([every_space, f"a{every_space}b", "a\u200bb"]), 2).tolist() == [False, True, False]
    for n_words in range(0, 5):
        for n_chars in range(0, 14):
            keep, _, _ = decide(texts, min_words=n_words, min_chars=n_chars)
            expect = [
                (len(t.split()) >= n_words and len(t) >= n_chars and (bool(t.strip()) or n_words == n_chars == 0))
                for t in texts
            ]
            assert keep.tolist() == expect, (n_words, n_chars)


def test_one_threshold_alone():
    keep, _, _ = decide(["ab", "abcdefgh", "a b c d"], min_chars=6)
    assert keep.tolist() == [False, True, True]
    keep, _, _ = decide(["ab", "abcdefgh", "a b c d"], min_words=2)
    assert keep.tolist() == [False, False, True]


def test_field_and_datacomp_default():
    pool = Pool(pa.table({"text": pa.array(["one two three", "x"])}), parts=[])
    f = Caption(CaptionParams(min_words=2, field="text"), InputInfo("datacomp"))
    assert f.requires() == {"text"}
    assert f.apply(pool, np.ones(2, bool)).keep.tolist() == [True, False]
    assert Caption(CaptionParams(min_words=2), InputInfo("datacomp")).requires() == {"caption"}


@pytest.mark.parametrize("params", [{}, {"min_words": -1}, {"min_words": 3, "max_words": 5}, {"min_chars": "x"}])
def test_params_rejected(params):
    with pytest.raises(ValueError):
        CaptionParams(**params)


# --- tokenizer: fasttext (DataComp's image_based caption pre-filter) -----------------------

# Every separator fastText knows, Unicode spaces it does not, and word characters of
# 1, 2, 3 and 4 UTF-8 bytes.
_PIECES = [
    " ",
    "\n",
    "\r",
    "\t",
    "\v",
    "\f",
    "\0",
    "\xa0",
    "\u2009",
    "\u3000",
    "\x1c",
    "\x85",
    "\u200b",
    "\u2028",
    "a",
    "é",
    "猫",
    "\U0001f600",
    "</s>",
]
ODD_CAPTIONS = [
    "",
    " ",
    "\n",
    "\n\n",
    "\r\n",
    "Watch\n",
    "\nWatch",
    "1178\xa0city",
    "a\u2009b\u3000c",
    "  a  b ",
    "a\n\nb",
    "x\0y",
    "a\x0bb\x0cc\rd\te",
    "é ü",
    "a\x1cb",
    "a\x85b",
    " \t\n lead and trail \n\t ",
    "word",
    "two words",
]


def _random_captions(n: int = 3000, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(_PIECES, size=rng.integers(0, 9))) for _ in range(n)]


def test_fasttext_tokens_known_counts():
    # Counts taken from fasttext 0.9.2's fasttext.tokenize (the same as DataComp's pinned version).
    from filtering.filters.caption import fasttext_tokens

    expect = [0, 0, 1, 2, 1, 2, 2, 1, 1, 2, 4, 2, 5, 2, 1, 1, 5, 1, 2]
    assert fasttext_tokens(pa.array(ODD_CAPTIONS, pa.string())).tolist() == expect
    assert fasttext_tokens(pa.array([None, "a b"], pa.string())).tolist() == [0, 2]


def test_fasttext_tokens_match_fasttext_itself():
    fasttext = pytest.importorskip("fasttext")
    from filtering.filters.caption import fasttext_tokens

    texts = ODD_CAPTIONS + _random_captions()
    got = fasttext_tokens(pa.array(texts, pa.string())).tolist()
    want = [len(fasttext.tokenize(t)) for t in texts]
    bad = [(t, g, w) for t, g, w in zip(texts, got, want, strict=True) if g != w]
    assert not bad, bad[:5]


def test_fasttext_tokenizer_decides_like_datacomp_image_based():
    # DataComp apply_filter.py:67-75: len(fasttext.tokenize(x)) > 1 and len(x) > 5.
    texts = ["Watch\n", "Watches", "1178\xa0city", "two words", "\n\n\n\n\n\n", "ab\u3000cd ef", None, "   \t  "]
    keep, reasons, _ = decide(texts, min_words=2, min_chars=6, tokenizer="fasttext")
    assert keep.tolist() == [True, False, False, True, True, True, False, False]
    assert reasons.tolist() == ["caption_too_few_words", "caption_too_few_words", "caption_empty", "caption_empty"]
    keep_split, _, _ = decide(texts, min_words=2, min_chars=6)  # Python's split: the other way round
    assert keep_split.tolist() == [False, False, True, True, False, True, False, False]
    with pytest.raises(ValueError):
        CaptionParams(min_words=2, tokenizer="nltk")
