"""Caption length filter (DataComp, Gadre et al. 2023, App. "Basic filtering").

DataComp's basic filter keeps captions with more than 2 words and more than 5
characters; here that reads ``caption: {min_words: 3, min_chars: 6}`` (both ``>=``).
Words are whitespace-separated tokens, as Python's ``len(text.split())`` counts them;
characters are Unicode code points of the caption as stored (not stripped), as
``len(text)`` counts them. A missing or all-whitespace caption is ``caption_empty``
(unless both minimums are 0).

Reason codes: ``caption_empty``, ``caption_too_few_words``, ``caption_too_short``.
"""

from __future__ import annotations

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


def is_blank(text: pa.Array) -> np.ndarray:
    """True where the caption is missing, empty or only whitespace."""
    return ~has_words(text, 1)


class CaptionParams(Params):
    min_words: int | None = Field(default=None, ge=0, le=MAX_MIN_WORDS)
    min_chars: int | None = Field(default=None, ge=0)
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
