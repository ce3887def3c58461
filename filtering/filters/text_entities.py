"""Text-based filter: the caption names an ImageNet class (DataComp, Gadre et al. 2023,
§3.4 "Text-based filtering": keep captions that contain ImageNet class names).

Class names are data: ``filtering/data/imagenet_classes.txt`` holds the 1000
ImageNet-1k names (open_clip's ``IMAGENET_CLASSNAMES``); ``classes_file:`` points to a
user list instead (one name per line, ``#`` comments). Matching is case-insensitive, on
whole words and phrases: captions and names are split into words at every character
that is not a letter or digit (so ``go-kart`` matches "go kart" and "Go-Karts"), and a
name's last word may take a simple English plural (``-s``, ``-es``, ``-y``/``-ies``,
``-man``/``-men``, ``-f``/``-ves``). The lookup packs every word n-gram of the
caption column into an integer key and tests membership, vectorized (Arrow + numpy).

Reason code: ``caption_no_entity``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from filtering.errors import InputError
from filtering.filters.base import Decision, Params, register
from filtering.filters.caption import TextFilter, caption_array
from filtering.io.paths import open_file
from filtering.pool import Pool

_WORD = re.compile(r"[^\W_]+")  # runs of letters and digits (Unicode)
_SPLIT = r"[^\p{L}\p{N}]+"  # the same split, in RE2 for Arrow
CHUNK_ROWS = 1 << 18


def parse_names(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def imagenet_classes() -> list[str]:
    """The bundled ImageNet-1k class names, in class-index order."""
    return parse_names(resources.files("filtering").joinpath("data/imagenet_classes.txt").read_text("utf-8"))


def plurals(word: str) -> set[str]:
    """``word`` and its regular English plurals (simple rules, over-generation is harmless)."""
    out = {word, word + "s", word + "es"}
    if len(word) > 2 and word.endswith("y") and word[-2] not in "aeiou":
        out.add(word[:-1] + "ies")
    if word.endswith("man"):
        out.add(word[:-3] + "men")
    if len(word) > 2 and word.endswith("f"):
        out.add(word[:-1] + "ves")
    if len(word) > 3 and word.endswith("fe"):
        out.add(word[:-2] + "ves")
    return out


@dataclass(frozen=True)
class EntityIndex:
    """Every accepted spelling of every name, as word-id n-grams packed into int64 keys.

    ``vocab`` lists the words that occur in names; an n-gram of word ids ``(a, b, c)``
    becomes ``(a * V + b) * V + c`` with ``V = len(vocab)``, one key array per n.
    """

    vocab: pa.Array
    keys: dict[int, pa.Array]

    @property
    def base(self) -> int:
        return len(self.vocab)


@functools.lru_cache(maxsize=8)
def entity_index(names: tuple[str, ...]) -> EntityIndex:
    spellings: set[tuple[str, ...]] = set()
    for name in names:
        words = _WORD.findall(name.lower())
        if words:
            spellings.update((*words[:-1], last) for last in plurals(words[-1]))
    vocab = sorted({w for s in spellings for w in s})
    ids = {w: i for i, w in enumerate(vocab)}
    if spellings and len(vocab) ** max(map(len, spellings)) >= 2**63:
        raise ValueError("class names are too long or too many to index")
    keys: dict[int, list[int]] = {}
    for spelling in spellings:
        key = 0
        for w in spelling:
            key = key * len(vocab) + ids[w]
        keys.setdefault(len(spelling), []).append(key)
    return EntityIndex(pa.array(vocab, pa.string()), {k: pa.array(sorted(set(v)), pa.int64()) for k, v in keys.items()})


def contains_entity(text: pa.Array, index: EntityIndex) -> np.ndarray:
    """True where a string contains one of the indexed names as consecutive whole words.

    Vectorized over the column: split into words, map each word to its id in the names'
    vocabulary, pack every word n-gram (for the lengths that names have) into an int64
    key and test membership.
    """
    found = np.zeros(len(text), dtype=bool)
    base = np.int64(index.base)
    for lo in range(0, len(text), CHUNK_ROWS):
        lists = pc.split_pattern_regex(pc.utf8_lower(text.slice(lo, CHUNK_ROWS)), _SPLIT)
        words = pc.list_flatten(lists)
        parents = pc.list_parent_indices(lists).to_numpy()
        ids = pc.index_in(words, value_set=index.vocab).fill_null(-1).to_numpy().astype(np.int64)
        for k, keys in index.keys.items():
            m = len(ids) - k + 1
            if m <= 0:
                continue
            key = ids[:m].copy()
            known = key >= 0
            for j in range(1, k):
                known &= ids[j : j + m] >= 0
                key = key * base + ids[j : j + m]
            hit = known & (parents[:m] == parents[k - 1 :])  # the n-gram lies within one caption
            hit[hit] = pc.is_in(key[hit], value_set=keys).to_numpy(zero_copy_only=False)  # a hash lookup
            found[lo + parents[:m][hit]] = True
    return found


class TextEntitiesParams(Params):
    path_fields: ClassVar[tuple[str, ...]] = ("classes_file",)  # local paths: resolved against the config's folder
    classes_file: str | None = Field(default=None, min_length=1)  # default: bundled ImageNet-1k names
    field: str | None = None  # text column; default caption


@register
class TextEntities(TextFilter):
    name = "text_entities"
    Params = TextEntitiesParams

    def names(self) -> tuple[str, ...]:
        path = self.params.classes_file
        if path is None:
            return tuple(imagenet_classes())
        try:
            with open_file(path, "rb") as f:
                names = parse_names(f.read().decode("utf-8"))
        except FileNotFoundError as e:
            raise InputError(f"text_entities.classes_file: no file at {path!r}") from e
        if not names:
            raise InputError(f"text_entities.classes_file: {path!r} lists no class names")
        return tuple(names)

    def apply(self, pool: Pool, alive: np.ndarray) -> Decision:
        found = contains_entity(caption_array(pool, self.field), entity_index(self.names()))
        return Decision(found, "caption_no_entity")
