"""Image size filter (DataComp, Gadre et al. 2023, App. "Basic filtering": both sides
>= 200 px and aspect ratio <= 3.0).

- ``min_side: s`` keeps rows whose shorter side is >= s pixels.
- ``max_aspect_ratio: r`` keeps rows with ``max(w, h) / min(w, h) <= r``.

Sizes come from ``original_width`` / ``original_height`` (the size before any
download-time resize, as DataComp's metadata records it) where present, else from the
decoded image's ``width`` / ``height``; ``size_from`` forces one or the other.

Reason codes: ``image_too_small``, ``image_aspect_ratio``, ``image_size_unknown``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from filtering.filters.base import Decision, Filter, Params, register
from filtering.pool import Pool

ORIGINAL = ("original_width", "original_height")
DECODED = ("width", "height")


class ImageSizeParams(Params):
    min_side: int | None = Field(default=None, ge=1)
    max_aspect_ratio: float | None = Field(default=None, ge=1)
    size_from: Literal["auto", "original", "decoded"] = "auto"

    @model_validator(mode="after")
    def _some(self) -> ImageSizeParams:
        if self.min_side is None and self.max_aspect_ratio is None:
            raise ValueError("give min_side, max_aspect_ratio or both")
        return self


def _size_columns(pool: Pool, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray] | None:
    if not all(pool.has_column(n) for n in names):
        return None
    w, h = (pool.table.column(n).to_numpy(zero_copy_only=False) for n in names)
    # Nulls come back as NaN (float) or None (object); both become NaN.
    return np.asarray(w, dtype=np.float64), np.asarray(h, dtype=np.float64)


def image_sizes(pool: Pool, size_from: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Width and height per row (NaN where unknown), original size first."""
    nan = np.full(pool.n, np.nan)
    original = _size_columns(pool, ORIGINAL) if size_from != "decoded" else None
    decoded = _size_columns(pool, DECODED) if size_from != "original" else None
    w, h = original if original is not None else (nan, nan)
    if decoded is not None:
        missing = ~(np.isfinite(w) & np.isfinite(h) & (w > 0) & (h > 0))
        w, h = np.where(missing, decoded[0], w), np.where(missing, decoded[1], h)
    return w, h


@register
class ImageSize(Filter):
    name = "image_size"
    Params = ImageSizeParams

    def requires(self) -> set[str]:
        return set(DECODED) if self.params.size_from == "decoded" else set(ORIGINAL)

    def apply(self, pool: Pool, alive: np.ndarray) -> Decision:
        p = self.params
        w, h = image_sizes(pool, p.size_from)
        known = np.isfinite(w) & np.isfinite(h) & (w > 0) & (h > 0)
        short = np.where(known, np.minimum(w, h), 0)
        long = np.where(known, np.maximum(w, h), 0)
        reason = np.full(pool.n, None, dtype=object)
        reason[~known] = "image_size_unknown"
        keep = known.copy()
        if p.min_side is not None:
            small = keep & (short < p.min_side)
            reason[small] = "image_too_small"
            keep &= ~small
        if p.max_aspect_ratio is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                wide = keep & (long / np.where(known, short, 1) > p.max_aspect_ratio)
            reason[wide] = "image_aspect_ratio"
            keep &= ~wide
        return Decision(keep, reason)
