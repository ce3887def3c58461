"""DataComp's text-based rule (Gadre et al. 2023, §3.4): keep a caption when one of its
words' first WordNet synset is an ImageNet-21k synset.

DataComp's ``baselines/apply_filter.py`` (``does_contain_text_entity``, lines 237-260)
splits the caption with Python's ``str.split()``, calls NLTK's
``wordnet.synsets(word)`` (NLTK 3.8.1, WordNet 3.0) on every word and keeps the caption
when ``synsets[0].offset()`` is in ``imagenet21k_wordnet_ids.txt`` read as
``int(wnid[1:])`` (``load_uids_with_text_entity``, lines 491-493): only the offset is
compared, whatever the synset's part of speech.

This module answers ``wordnet.synsets(word)[0].offset()`` without NLTK or WordNet
installed, from ``filtering/data/wordnet_first_synsets.npz`` (built by
``python -m filtering.data.build_wordnet_table``), reproducing NLTK 3.8.1's lookup:
the word is lower-cased (``str.lower``); parts of speech are tried in the order noun,
verb, adjective, adverb, and the first that yields a base form gives the synset; a base
form comes from ``_morphy``: the word's exception-list entry if it has one (the word
itself first, then its listed bases, that are lemmas of the part of speech), else the
word itself or a suffix rule applied once (``dogs``), else the rules applied again and
again (``dogsss``; NLTK 3.9 and later stop after one round, DataComp pins 3.8.1); the
synset is the base form's first sense. Tested word for word
against NLTK on every WordNet lemma and many inflected and odd tokens
(``tests/filtering/filters/test_wordnet_synsets.py``).

Vectorized: the captions are split into words with Arrow, each distinct word is looked
up once; a word that is a WordNet lemma (most of them) is answered from a table, the
rest (inflections, typos, punctuation) through the rules in Python.

Reason code: ``caption_no_synset``.
"""

from __future__ import annotations

import functools
import io
import json
import re
import zipfile
from importlib import resources

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from filtering.errors import InputError
from filtering.filters.base import Decision, Params, register
from filtering.filters.caption import _SPACE, TextFilter, caption_array
from filtering.io.paths import open_file
from filtering.pool import Pool

POS = ("n", "v", "a", "r")  # NLTK's POS_LIST
# NLTK 3.8.1 WordNetCorpusReader.MORPHOLOGICAL_SUBSTITUTIONS, in its order
SUBSTITUTIONS = (
    (
        ("s", ""),
        ("ses", "s"),
        ("ves", "f"),
        ("xes", "x"),
        ("zes", "z"),
        ("ches", "ch"),
        ("shes", "sh"),
        ("men", "man"),
        ("ies", "y"),
    ),
    (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")),
    (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    (),
)
TABLE = "data/wordnet_first_synsets.npz"
CHUNK_ROWS = 1 << 18
_SPLIT = f"[{_SPACE}]+"  # Python's str.split() separators


SUFFIXES = tuple(tuple({old for old, _ in rules}) for rules in SUBSTITUTIONS)


def _apply_rules(forms: list[str], j: int) -> list[str]:
    """NLTK's ``apply_rules`` for ``POS[j]``, without repeats (a repeat's results repeat
    earlier ones, so the first base form found is the same)."""
    out: list[str] = []
    seen: set[str] = set()
    rules, suffixes = SUBSTITUTIONS[j], SUFFIXES[j]
    for form in forms:
        if not form.endswith(suffixes):  # one C call rules out most forms
            continue
        for old, new in rules:
            if form.endswith(old):
                derived = form[: -len(old)] + new
                if derived not in seen:
                    seen.add(derived)
                    out.append(derived)
    return out


class FirstSynset:
    """``wordnet.synsets(word)[0].offset()`` (NLTK 3.8.1, WordNet 3.0), or -1 when
    ``wordnet.synsets(word)`` is empty."""

    def __init__(self, lemmas: list[str], first_offset: np.ndarray, exceptions: list[dict[str, tuple[str, ...]]]):
        self.lemmas = lemmas
        self.first_offset = first_offset
        self.exceptions = exceptions
        self.row = {lemma: i for i, lemma in enumerate(lemmas)}
        self.by_pos = [
            frozenset(np.asarray(lemmas, dtype=object)[first_offset[:, j] >= 0].tolist()) for j in range(len(POS))
        ]
        # A word holding a character that no lemma or exception holds can reach no lemma:
        # the rules only replace letter suffixes.
        chars = set("".join(lemmas)).union(*("".join(e) for e in exceptions))
        self.alphabet = frozenset(chars)
        self.alphabet_re = "^[" + "".join(re.escape(c) for c in sorted(chars)) + "]+$"
        # A word that is no lemma, no exception entry and ends with no rule's suffix has no synset.
        self.keys = frozenset(self.row).union(*exceptions)
        self.suffixes = tuple(set().union(*SUFFIXES))
        self.lemma_array = pa.array(lemmas, pa.string())
        # The answer for each lemma spelled as it is (most words of a caption are lemmas); a
        # noun lemma is its own noun base form, so its first noun sense.
        self.resolved = first_offset[:, 0].astype(np.int64)
        for i in np.flatnonzero(self.resolved < 0).tolist():
            self.resolved[i] = self._lookup(lemmas[i])

    def _morphy(self, form: str, j: int) -> str | None:
        """The first form ``_morphy(form, POS[j])`` returns (NLTK 3.8.1), or None."""
        lemmas = self.by_pos[j]
        exc = self.exceptions[j].get(form)
        if exc is not None:  # 0. an exception entry decides alone
            return next((f for f in (form, *exc) if f in lemmas), None)
        if form in lemmas:
            return form
        forms = _apply_rules([form], j)  # 1.-2. the rules once
        while forms:  # 3. and again, while nothing is found
            for f in forms:
                if f in lemmas:
                    return f
            forms = _apply_rules(forms, j)
        return None

    def _lookup(self, word: str) -> int:
        for j in range(len(POS)):
            base = self._morphy(word, j)
            if base is not None:
                return int(self.first_offset[self.row[base], j])
        return -1

    def __call__(self, word: str) -> int:
        word = word.lower()
        if not self.alphabet.issuperset(word) or (word not in self.keys and not word.endswith(self.suffixes)):
            return -1
        return self._lookup(word)

    def offsets(self, words: pa.Array) -> np.ndarray:
        """The first synset's offset (-1: none) of every string of ``words``."""
        out = np.full(len(words), -1, np.int64)
        if len(words) == 0:
            return out
        ascii_ = pc.string_is_ascii(words).fill_null(False).to_numpy(zero_copy_only=False)
        lower = pc.ascii_lower(words)  # str.lower() for ASCII strings
        idx = pc.index_in(lower, value_set=self.lemma_array).fill_null(-1).to_numpy(zero_copy_only=False)
        direct = ascii_ & (idx >= 0)
        out[direct] = self.resolved[idx[direct]]
        candidate = pc.match_substring_regex(lower, self.alphabet_re).fill_null(False).to_numpy(zero_copy_only=False)
        rest = np.flatnonzero(~direct & (candidate | ~ascii_) & pc.is_valid(words).to_numpy(zero_copy_only=False))
        if len(rest):
            for i, word in zip(rest.tolist(), words.take(pa.array(rest)).to_pylist(), strict=True):
                out[i] = self(word)
        return out


def read_table(raw: bytes) -> FirstSynset:
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        lemmas = z["lemmas"].tobytes().decode("utf-8").split("\n")
        first_offset = z["first_offset"]
        exc_lines = z["exceptions"].tobytes().decode("utf-8").split("\n")
    exceptions: list[dict[str, tuple[str, ...]]] = [{} for _ in POS]
    for line in exc_lines:
        pos, key, forms = line.split("\t")
        exceptions[POS.index(pos)][key] = tuple(forms.split())
    return FirstSynset(lemmas, first_offset, exceptions)


def _table_bytes() -> bytes:
    return resources.files("filtering").joinpath(TABLE).read_bytes()


@functools.lru_cache(maxsize=1)
def first_synset() -> FirstSynset:
    """The bundled WordNet 3.0 table (loaded once, ~1 s)."""
    return read_table(_table_bytes())


def table_meta() -> dict:
    with zipfile.ZipFile(io.BytesIO(_table_bytes())) as zf, zf.open("meta.npy") as f:
        return json.loads(np.load(f).tobytes())


def imagenet21k_offsets() -> np.ndarray:
    """DataComp's ``imagenet21k_wordnet_ids.txt`` as it compares them: ``int(wnid[1:])``."""
    with np.load(io.BytesIO(_table_bytes()), allow_pickle=False) as z:
        return z["imagenet21k"].astype(np.int64)


def parse_wnids(text: str, path: str) -> np.ndarray:
    """A synset list, one WordNet id (``n01440764``) per line, as DataComp reads it."""
    ids = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not re.fullmatch(r"[nvarsNVARS]?\d{1,8}", line):
            raise InputError(
                f"wordnet_synsets.synsets_file: {path!r} line {n}: {line!r} is not a WordNet id like n01440764"
            )
        ids.append(int(line[1:] if line[0].isalpha() else line))
    if not ids:
        raise InputError(f"wordnet_synsets.synsets_file: {path!r} lists no synsets")
    return np.unique(np.array(ids, np.int64))


def contains_synset(text: pa.Array, synsets: np.ndarray, table: FirstSynset | None = None) -> np.ndarray:
    """True where some whitespace-separated word's first synset offset is in ``synsets``."""
    table = table or first_synset()
    found = np.zeros(len(text), dtype=bool)
    for lo in range(0, len(text), CHUNK_ROWS):
        lists = pc.split_pattern_regex(text.slice(lo, CHUNK_ROWS), _SPLIT)
        words = pc.list_flatten(lists)
        if len(words) == 0:
            continue
        parents = pc.list_parent_indices(lists).to_numpy()
        encoded = pc.dictionary_encode(words)  # each distinct word is looked up once
        hit = np.isin(table.offsets(encoded.dictionary), synsets)
        found[lo + parents[hit[encoded.indices.to_numpy()]]] = True
    return found


class WordNetSynsetsParams(Params):
    synsets_file: str | None = Field(default=None, min_length=1)  # default: DataComp's ImageNet-21k list
    field: str | None = None  # text column; default caption


@register
class WordNetSynsets(TextFilter):
    name = "wordnet_synsets"
    Params = WordNetSynsetsParams

    def synsets(self) -> np.ndarray:
        path = self.params.synsets_file
        if path is None:
            return imagenet21k_offsets()
        try:
            with open_file(path, "rb") as f:
                text = f.read().decode("utf-8")
        except FileNotFoundError as e:
            raise InputError(f"wordnet_synsets.synsets_file: no file at {path!r}") from e
        return parse_wnids(text, path)

    def apply(self, pool: Pool, alive: np.ndarray) -> Decision:
        text = caption_array(pool, self.field)
        keep = np.zeros(pool.n, dtype=bool)
        rows = np.flatnonzero(alive)
        keep[rows] = contains_synset(text.take(pa.array(rows)), self.synsets())
        return Decision(keep, "caption_no_synset")
