"""NLTK 3.8.1's WordNet reader on Debian's WordNet 3.0 files, the reference for the
``wordnet_synsets`` filter and DataComp's ``text_based`` baseline.

Needs NLTK 3.8.1 (DataComp's requirements.txt pin; the ``dev`` extra installs it) and
``wordnet-base`` (``.ci/run`` installs it); tests skip without them. NLTK's reader also
wants a ``lexnames`` file, which Debian does not ship: the database files are linked into
a folder next to a stand-in ``lexnames`` (lexicographer file names play no part in
``synsets()`` or ``offset()``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

DEBIAN_WORDNET = Path("/usr/share/wordnet")
WORDNET_FILES = [f"{kind}.{pos}" for kind in ("index", "data") for pos in ("noun", "verb", "adj", "adv")]
WORDNET_FILES += [f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv")]


def nltk_wordnet(root: Path):
    """NLTK's WordNetCorpusReader on Debian's WordNet 3.0 files, or a skip."""
    nltk = pytest.importorskip("nltk")
    if nltk.__version__ != "3.8.1":
        pytest.skip(f"DataComp ran NLTK 3.8.1 (its requirements.txt); installed: {nltk.__version__}")
    if not all((DEBIAN_WORDNET / f).is_file() for f in WORDNET_FILES):
        pytest.skip("WordNet 3.0 files missing: apt-get install wordnet-base")
    import warnings

    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    for f in WORDNET_FILES:
        (root / f).symlink_to(DEBIAN_WORDNET / f)
    (root / "lexnames").write_text("".join(f"{i:02d}\tlex{i}\t0\n" for i in range(45)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available"
        return WordNetCorpusReader(str(root), None)


def nltk_first(wn, word: str) -> int:
    """DataComp's ``does_contain_text_entity`` per word: ``wordnet.synsets(word)[0].offset()``."""
    synsets = wn.synsets(word)
    return synsets[0].offset() if synsets else -1


# Tokens as str.split() yields them, plus a few it never yields ("", "hot dog"), and odd
# characters: Kelvin sign (lower() is "k"), dotted I, ligature, full-width, zero-width space.
_TOKENS = """
! ... a A I MOUNTAIN! mountain Mountains mountain. (dog) dog's dogs' dogsss dogssss Dogsss churcheses wolveses
boxeses runninging happierer hot_dog hot-dog ice_cream u.s. U.S. a.m. 1 2 10 1000 4x4 3d café cafe \u212aitten K
\u212a İstanbul straße ΣΑΣ naïve ﬁsh ｄｏｇ dog\u200b men women geese mice feet oxen children teeth leaves wolves
knives axes best better worse ran went was is are been saw flies flying dying partridge Partridge laptop purple
road sunset beach the of photo jpg
"""
ODD = _TOKENS.split() + ["", "hot dog", "x" * 60, "s" * 40, "es" * 20, "ing" * 10, "dog" + "s" * 30]


def variants(lemma: str) -> list[str]:
    out = [lemma.upper(), lemma.title(), lemma + "!", "(" + lemma, lemma + ".", lemma + "'s"]
    for suffix in ("s", "es", "ed", "ing", "er", "est", "ses", "ss", "sss", "ies", "men", "ves", "xes"):
        out.append(lemma + suffix)
    if lemma.endswith("y"):
        out.append(lemma[:-1] + "ies")
    if lemma.endswith("e"):
        out += [lemma[:-1] + "ing", lemma + "d"]
    return out
