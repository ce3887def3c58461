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
            expect = [(len(t.split()) >= n_words and len(t) >= n_chars and (bool(t.strip()) or n_words == n_chars == 0)) for t in texts]
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
