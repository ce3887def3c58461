r"""Caption length filter (DataComp, Gadre et al. 2023, App. "Basic filtering").

DataComp counts words two ways (``baselines/apply_filter.py``), and ``tokenizer:`` picks one:

- ``split`` (default): Python's ``len(text.split())``, which splits on every Unicode
  whitespace character. DataComp's ``basic_filter`` (line 219: ``> 2`` words, so
  ``min_words: 3``).
- ``fasttext``: ``len(fasttext.tokenize(text))``. DataComp's ``image_based`` caption
  pre-filter (line 67: ``> 1`` token, so ``min_words: 2``). fastText's
  ``Dictionary::readWord`` splits only on ASCII space, ``\n``, ``\r``, ``\t``, ``\v``,
  ``\f`` and NUL, and every ``\n`` is a token of its own (the end-of-sentence ``</s>``):
  ``"Watch\n"`` is 2 tokens, ``"1178\xa0city"`` (non-breaking space) is 1.

Both are ``>=`` here; DataComp's "more than 5 characters" is ``min_chars: 6``. Characters
are Unicode code points of the caption as stored (not stripped), as ``len(text)`` counts
them. A missing or all-whitespace caption (Python's whitespace) is ``caption_empty``
(unless both minimums are 0); with ``tokenizer: fasttext`` the keep decision is
fastText's count even there (``"\n\n"`` is 2 tokens).

Reason codes: ``caption_empty``, ``caption_too_few_words``, ``caption_too_short``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from filtering.filters.base import Decision, Filter, Params, register
from filtering.pool import Pool


def caption_field(field: str | None, input_kind: str) -> str:
    """The text column a caption filter reads: ``field`` if given, else ``caption`` (the
    WebDataset ``.txt``, or DataComp parquet's ``text``, which its input stage exposes as
    ``caption`` too)."""
    return field or "caption"


class TextFilter(Filter):
    """A filter of one text column: ``params.field``, by default ``caption``."""

    @property
    def field(self) -> str:
        return caption_field(self.params.field, self.input.kind)

    def requires(self) -> set[str]:
        return {self.field}


def caption_array(pool: Pool, field: str) -> pa.Array:
    """The caption column as one Arrow string array (nulls kept)."""
    col = pool.table.column(field)
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return col.cast(pa.string()) if not pa.types.is_string(col.type) else col


# The characters Python's str.split() splits on (exactly those with str.isspace()).
_SPACE = r"\t-\r\x1c-\x20\x85\xa0\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}"
MAX_MIN_WORDS = 1000  # RE2's repetition limit


def has_words(text: pa.Array, k: int) -> np.ndarray:
    """``len(s.split()) >= k`` for every string (False for nulls when k > 0), vectorized:
    one anchored RE2 match per row, stopping at the k-th word."""
    if k <= 0:
        return np.ones(len(text), dtype=bool)
    pattern = f"^[{_SPACE}]*[^{_SPACE}]+(?:[{_SPACE}]+[^{_SPACE}]+){{{k - 1}}}"
    return pc.match_substring_regex(text, pattern).fill_null(False).to_numpy(zero_copy_only=False)


# fastText's separators (src/dictionary.cc, Dictionary::readWord: ' ', '\n', '\r', '\t', '\v',
# '\f', '\0'), compared byte by byte; none of them occurs inside a UTF-8 multi-byte
# character, so matching code points is the same. Each '\n' is also a token: readWord
# puts it back after a word and returns it alone as EOS ("</s>").
_FASTTEXT_TOKEN = r"[^ \n\r\t\x0b\x0c\x00]+|\n"


def fasttext_tokens(text: pa.Array) -> np.ndarray:
    """``len(fasttext.tokenize(s))`` for every string (0 for nulls), vectorized: one RE2
    count per row."""
    counts = pc.count_substring_regex(text, _FASTTEXT_TOKEN).fill_null(0)
    return counts.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def is_blank(text: pa.Array) -> np.ndarray:
    """True where the caption is missing, empty or only whitespace."""
    return ~has_words(text, 1)


class CaptionParams(Params):
    min_words: int | None = Field(default=None, ge=0, le=MAX_MIN_WORDS)
    min_chars: int | None = Field(default=None, ge=0)
    tokenizer: Literal["split", "fasttext"] = "split"  # how min_words counts words (module docstring)
    field: str | None = None  # text column; default caption

    @model_validator(mode="after")
    def _some(self) -> CaptionParams:
        if self.min_words is None and self.min_chars is None:
            raise ValueError("give min_words, min_chars or both")
        return self


@register
class Caption(TextFilter):
    name = "caption"
    Params = CaptionParams

    def apply(self, pool: Pool, alive: np.ndarray) -> Decision:
        p = self.params
        text = caption_array(pool, self.field)
        reason = np.full(pool.n, None, dtype=object)
        if not (p.min_words or p.min_chars):
            return Decision(np.ones(pool.n, dtype=bool), reason)  # an all-zero rule keeps everything
        # One regex pass answers ">= k words" and, where it holds, "not blank"; only the
        # rows that fail it are checked for blankness.
        if p.tokenizer == "fasttext" and p.min_words:
            enough = fasttext_tokens(text) >= p.min_words
        else:
            enough = has_words(text, max(p.min_words or 0, 1))
        blank = ~enough
        if blank.any():
            blank[blank] = ~has_words(text.filter(pa.array(blank)), 1)
        reason[blank] = "caption_empty"
        keep = enough.copy() if p.min_words else ~blank
        reason[~keep & ~blank] = "caption_too_few_words"
        if p.min_chars is not None:
            chars = pc.utf8_length(text).fill_null(0).to_numpy(zero_copy_only=False)
            short = keep & (chars < p.min_chars)
            reason[short] = "caption_too_short"
            keep &= ~short
        return Decision(keep, reason)
