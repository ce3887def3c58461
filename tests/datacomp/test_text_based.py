"""configs/text_based.yaml's caption rule equals DataComp's ``text_based``, uid for uid.

The reference is DataComp's own code (``tests/datacomp_pool.datacomp_text_entity_uids``,
from baselines/apply_filter.py) running NLTK 3.8.1 on WordNet 3.0 and DataComp's
ImageNet-21k list, on a generated pool in DataComp's layout whose captions hold WordNet
lemmas, inflections (regular, irregular, repeated suffixes), case and punctuation
variants, digits, unicode letters and unicode whitespace.

DataComp's ``text_based`` also keeps only captions fastText calls English; that step is
the preset's ``language`` filter, which is DataComp's exactly when it runs fastText with
DataComp's ``lid.176.bin`` (not available offline). This test checks that the preset is
[wordnet_synsets, language: en] and compares the caption rule alone, so the
preset's selection is DataComp's given the same language identifier.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import REPO, run_cli
from tests.datacomp_pool import datacomp_text_entity_uids, make_datacomp_pool, set_captions
from tests.nltk_wordnet import ODD, nltk_first, nltk_wordnet, variants

ISSUE_WORDS = ["laptop", "purple", "road", "MOUNTAIN!", "partridge"]
GLUE = ["a", "the", "of", "on", "with", "and", "in", "photo", "image", "by", "at", "!", "-", "2019", "#1"]
SPACES = [" ", " ", " ", "  ", "\n", "\t", "\u00a0", "\u3000", "\u2009", "\x1c", "\u200b"]


@pytest.fixture(scope="module")
def wn(tmp_path_factory):
    return nltk_wordnet(tmp_path_factory.mktemp("wordnet"))


@pytest.fixture(scope="module")
def imagenet21k_ids() -> list[str]:
    spec = importlib.util.find_spec("timm")
    if spec is None:
        pytest.skip("timm not installed (its imagenet21k_goog_synsets.txt is DataComp's list)")
    path = Path(spec.origin).parent / "data" / "_info" / "imagenet21k_goog_synsets.txt"
    return path.read_text().splitlines(keepends=True)


def captions(wn, in21k: set[int], n: int, seed: int = 0) -> list[str]:
    """Captions of 1-5 words: glue words, odd tokens, WordNet lemmas and their variants;
    about one word in seven is (the plural of) a lemma whose first synset is in ImageNet-21k, so that
    both outcomes are common."""
    rng = np.random.default_rng(seed)
    lemmas = rng.choice(sorted(wn._lemma_pos_offset_map), 800, replace=False).tolist()
    pool = [w for w in ODD if w] + ISSUE_WORDS
    for lemma in lemmas:
        pool += [lemma, *rng.choice(variants(lemma), 3, replace=False).tolist()]
    hits = [w for lemma in lemmas if nltk_first(wn, lemma) in in21k for w in (lemma, lemma.title(), lemma + "s")]
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 6))
        r = rng.random(k)
        words = [str(rng.choice(hits if x < 0.15 else pool if x < 0.45 else GLUE)) for x in r]
        text = words[0]
        for w in words[1:]:
            text += str(rng.choice(SPACES)) + w
        out.append(text if rng.random() > 0.05 else " " + text + "\n")
    return out


@pytest.mark.slow
def test_text_based_preset_equals_datacomp(tmp_path, wn, imagenet21k_ids):
    preset = yaml.safe_load((REPO / "configs" / "text_based.yaml").read_text())
    assert preset["filters"][0] == {"wordnet_synsets": {}}
    assert [next(iter(f)) for f in preset["filters"][1:]] == ["language"]  # English: the identifier's part
    assert preset["filters"][1]["language"]["languages"] == ["en"]

    metadata = make_datacomp_pool(tmp_path / "metadata", shards=4, rows=300, seed=3)
    in21k = {int(x.strip()[1:]) for x in imagenet21k_ids}
    set_captions(metadata, captions(wn, in21k, 4 * 300 + 6))
    expected = datacomp_text_entity_uids(metadata, wn, imagenet21k_ids)
    assert 0.25 < len(expected) / 1206 < 0.75  # both outcomes are well represented

    config = {
        "input": {"datacomp_metadata": str(metadata)},
        "filters": preset["filters"][:1],  # the caption rule; the language step is the identifier's
        "output": {"dir": str(tmp_path / "run")},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    code, _, stderr = run_cli("run", tmp_path / "c.yaml", "--quiet")
    assert code == 0, stderr
    got = np.load(tmp_path / "run" / "subset.npy")
    assert got.dtype == np.dtype("u8,u8")
    np.testing.assert_array_equal(got, expected)
