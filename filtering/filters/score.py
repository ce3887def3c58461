"""``score``: keep rows by any score column (a scorer's ``aesthetic_score``, ``nsfw_score``...).

- ``min: t`` keeps score >= t; ``max: t`` keeps score <= t; both give a range.
- ``top_fraction: f`` keeps the best fraction by DataComp's rule (Gadre et al. 2023,
  ``baselines/apply_filter.py``), as ``clip_score`` does: the threshold is
  ``sorted_desc[int(N * f)]`` over the N scored rows of the whole pool, and every row
  with score >= threshold is kept, ties included.
- A row without a score (null: a failed row, or NaN) is dropped as ``<column>_missing``.

Reason codes name the column: ``<column>_below_min``, ``<column>_above_max``,
``<column>_below_top_fraction``. ``clip_score`` stays the familiar name for CLIP scores.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field, model_validator

from filtering.filters import top_fraction
from filtering.filters.base import Decision, Filter, Params, TopFraction, register
from filtering.pool import Pool


class ScoreParams(Params):
    column: str
    min: float | None = None
    max: float | None = None
    top_fraction: float | None = Field(default=None, ge=0, le=1)

    @model_validator(mode="after")
    def _rule(self) -> ScoreParams:
        if self.top_fraction is not None and (self.min is not None or self.max is not None):
            raise ValueError("give top_fraction alone, or min and/or max")
        if self.top_fraction is None and self.min is None and self.max is None:
            raise ValueError("give min, max (or both), or top_fraction")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self


@register
class Score(Filter):
    name = "score"
    Params = ScoreParams
    fixed: tuple = ()  # (top_fraction threshold,) found over the whole pool (:meth:`decided`)

    def requires(self) -> set[str]:
        return {self.params.column}

    def reduction(self) -> TopFraction | None:
        p = self.params
        return TopFraction(p.column, p.top_fraction, as_float64=True) if p.top_fraction is not None else None

    def decided(self, result) -> Score:
        fixed = Score(self.params, self.input)
        fixed.fixed = (result,)
        return fixed

    def apply(self, pool: Pool, alive: np.ndarray) -> Decision:
        p, column = self.params, self.params.column
        scores = pool.column(column)
        if scores.dtype.kind != "f":  # integer or object (nulls) columns: compare as float64
            scores = np.asarray(scores, dtype=np.float64)
        missing = np.isnan(scores)
        low = p.min
        if p.top_fraction is not None:
            low = (
                self.fixed[0] if self.fixed else top_fraction.threshold(scores[~pool.failed], p.top_fraction)
            )  # NaN counts in N, as in clip_score
        thresholds = {column: low if low is not None else p.max}
        # Comparisons in the column's own dtype, so float64 scores are not rounded.
        with np.errstate(invalid="ignore"):
            below = ~(scores >= scores.dtype.type(low)) & ~missing if low is not None else np.zeros(pool.n, dtype=bool)
            above = (
                ~(scores <= scores.dtype.type(p.max)) & ~missing if p.max is not None else np.zeros(pool.n, dtype=bool)
            )
        keep = ~missing & ~below & ~above
        low_code = f"{column}_below_top_fraction" if p.top_fraction is not None else f"{column}_below_min"
        if not missing.any() and (p.max is None or low is None):  # one code for every drop: no per-row objects
            return Decision(keep, low_code if p.max is None else f"{column}_above_max", thresholds=thresholds)
        reason = np.full(pool.n, None, dtype=object)
        reason[below] = low_code
        reason[above] = f"{column}_above_max"
        reason[missing] = f"{column}_missing"
        return Decision(keep, reason, thresholds=thresholds)
