"""CLIP-score filter (DataComp, Gadre et al. 2023, §3.4 and ``baselines/apply_filter.py``).

- ``min: t`` keeps rows with score >= t.
- ``top_fraction: f`` over the N rows of the whole pool: the threshold is the value at
  index ``int(N * f)`` of the scores sorted in descending order, and every row with
  score >= threshold is kept (so ties at the threshold are all kept). ``f = 1`` keeps
  every scored row (DataComp's index is out of range there).
- NaN scores (DataComp's ``get_threshold``, ``apply_filter.py:390-392``): NaN rows count
  in N and sort last (``-np.sort(-scores)``), and are never kept (``NaN >= t`` is False).
  When ``int(N * f)`` lands among the NaNs the threshold is NaN and, as in DataComp, no
  row is kept. Rows that failed before scoring (WebDataset input) are not in N.
- The threshold is computed over the whole pool, not over the rows
  that earlier filters kept, so ``[clip_score, image_clusters]`` equals DataComp's
  intersection of the two baselines whatever the order.

Comparisons run in the column's own dtype, so float64 DataComp scores are not rounded.
The threshold is found by the shard plan's reduction (:mod:`filtering.filters.top_fraction`);
a pool filtered whole in this process runs it with the pool as its only shard.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field, model_validator

from filtering.filters import top_fraction
from filtering.filters.base import Decision, Filter, Params, TopFraction, register
from filtering.pool import Pool
from filtering.sources import source_info


class ClipScoreParams(Params):
    min: float | None = None
    top_fraction: float | None = Field(default=None, ge=0, le=1)
    field: str | None = None  # score column; default clip_score (webdataset) / clip_l14_similarity_score

    @model_validator(mode="after")
    def _one(self) -> ClipScoreParams:
        if (self.min is None) == (self.top_fraction is None):
            raise ValueError("give exactly one of min or top_fraction")
        return self


@register
class ClipScore(Filter):
    name = "clip_score"
    Params = ClipScoreParams
    fixed: tuple = ()  # (threshold,) found over the whole pool (:meth:`decided`)

    @property
    def field(self) -> str:
        if self.params.field:
            return self.params.field
        return source_info(self.input.kind).score_field

    def requires(self) -> set[str]:
        return {self.field}

    def reduction(self) -> TopFraction | None:
        return TopFraction(self.field, self.params.top_fraction) if self.params.top_fraction is not None else None

    def decided(self, result) -> ClipScore:
        fixed = ClipScore(self.params, self.input)
        fixed.fixed = (result,)
        return fixed

    def threshold(self, pool: Pool) -> float | None:
        if self.params.min is not None:
            return self.params.min
        if self.fixed:
            return self.fixed[0]
        scores = pool.column(self.field)
        return top_fraction.threshold(scores[~pool.failed], self.params.top_fraction)

    def apply(self, pool: Pool, alive: np.ndarray) -> Decision:
        scores = pool.column(self.field)
        threshold = self.threshold(pool)
        missing = np.isnan(scores)
        if threshold is None:
            keep = ~missing
        else:
            with np.errstate(invalid="ignore"):
                keep = (scores >= scores.dtype.type(threshold)) & ~missing
        code = "clip_score_below_min" if self.params.min is not None else "clip_score_below_top_fraction"
        reason = np.where(missing, "clip_score_missing", code).astype(object) if missing.any() else code
        return Decision(keep, reason, thresholds={self.field: threshold})
