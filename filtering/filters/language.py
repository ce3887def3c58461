"""Caption language filter (DataComp, Gadre et al. 2023, App. "Basic filtering": English
captions by fastText's ``lid.176.bin``).

Keeps rows whose caption is identified as one of ``languages`` (ISO 639-1 codes).
Identifiers run offline:

- ``py3langid`` (default, a core dependency): langid.py's naive Bayes model, ~97 languages.
- ``lingua``: lingua-language-detector, more accurate on short text (``pip install
  'poolsift[lingua]'``).
- ``fasttext``: fastText's ``lid.176.bin``, DataComp's identifier for basic_filter,
  text_based and image_based (``baselines/apply_filter.py`` lines 24-37 and 70-73:
  newlines replaced by spaces, the top label, no threshold). ``pip install
  'poolsift[fasttext]'``. The model is read from ``model_path:`` (default: ``lid.176.bin``
  in the user cache folder, :func:`filtering.models.download.user_cache_dir`); when it is
  not there, the run downloads it first, as DataComp's scripts do, from ``model_url:``
  (default ``$POOLSIFT_LID176_URL``, else :data:`LID176_URL`) and keeps it only if its
  sha256 is ``model_sha256:`` (default :data:`LID176_SHA256`). Without network the run
  stops with one line naming the URL and where to put the file (exit 2), unless a
  ``fallback:`` is given. A file already at ``model_path`` is used as it is (the run says
  when it is not ``lid.176.bin``).
- ``gcld3``: DataComp's identifier for its LAION-2B reproduction (lines 40-54, 318-324:
  ``NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)``, newlines replaced by
  spaces, ``.language``). ``pip install gcld3`` builds from source and needs protobuf's
  compiler and headers (Debian: ``apt-get install protobuf-compiler libprotobuf-dev``).

``fallback:`` names identifiers to use, in order, when ``backend`` is not available
(package not installed, or no model file and none could be downloaded); the laion2b
preset falls back from gcld3 to fastText, then py3langid. Before any data is read, the run says in one log line which
identifier runs, and, after a fallback, that the result is not the one the wanted
identifier gives; the manifest records it under ``language_identifiers``.

``candidates`` restricts the identifier to the languages a pool is known to contain
(langid.py's ``set_languages``; for fastText, the best-ranked candidate), which makes
short captions far more reliable. ``min_confidence`` additionally drops rows whose top
prediction is less certain.
Predictions are made once per distinct caption and reused by every language filter
of the run with the same backend.

Reason codes: ``language_not_allowed``, ``language_empty`` (missing caption; with py3langid
and lingua also an all-whitespace one), ``language_low_confidence``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field, field_validator, model_validator

from filtering.filters.base import Decision, register
from filtering.filters.caption import TextFilter, caption_array, is_blank
from filtering.pool import Pool
from filtering.scorers.base import InputInfo as ScorerInput
from filtering.scorers.language_id import LanguageIdParams, LanguageIdScorer, implicit_name
from filtering.scorers.language_identifiers import (
    BASELINE_OF,
    IdentifierParams,
    language_codes,
    predict_texts,
    resolve,
)


class LanguageParams(IdentifierParams):
    languages: list[str] = Field(min_length=1)
    min_confidence: float | None = Field(default=None, ge=0, le=1)

    @field_validator("languages")
    @classmethod
    def _codes(cls, value: list[str]) -> list[str]:
        return language_codes(value)

    @model_validator(mode="after")
    def _candidates_cover_languages(self) -> LanguageParams:
        if self.candidates is not None and not set(self.languages) <= set(self.candidates):
            raise ValueError("candidates must include every language in languages")
        return self


def predict_languages(
    pool: Pool,
    field: str,
    rows: np.ndarray,
    backend: str,
    model_path: str | None = None,
    candidates: tuple[str, ...] | None = None,
):
    """Language code and confidence for ``rows`` (indices), predicting each distinct
    caption once per run and identifier (memoised in ``pool.artifacts``)."""
    memo: dict[str, tuple[str, float]] = pool.artifacts.setdefault("language_predictions", {}).setdefault(
        (backend, model_path, candidates, field), {}
    )
    captions = pool.column(field)[rows]
    todo = [t for t in dict.fromkeys(captions.tolist()) if t not in memo]
    if todo:
        codes, conf = predict_texts(todo, backend, model_path, candidates)
        memo.update(zip(todo, zip(codes, conf.tolist(), strict=True), strict=True))
    codes = np.array([memo[t][0] for t in captions], dtype=object)
    conf = np.array([memo[t][1] for t in captions], dtype=np.float64)
    return codes, conf


@register
class LanguageFilter(TextFilter):
    name = "language"
    Params = LanguageParams

    def __init__(self, params: LanguageParams, input_info):
        super().__init__(params, input_info)
        self._identity: dict[str, Any] | None = None
        self._scorer = None

    def identity(self, progress: bool = True) -> dict[str, Any]:
        """Which identifier this filter runs (loaded on first call): see :func:`resolve`."""
        if self._identity is None:
            self._identity = resolve(self.params, progress)
        return self._identity

    def scorer(self):
        """The ``language_id`` scorer whose columns this filter reads (the Score half)."""
        if self._scorer is None:
            p = self.params
            params = LanguageIdParams(
                backend=p.backend,
                fallback=p.fallback,
                model_path=p.model_path,
                model_url=p.model_url,
                model_sha256=p.model_sha256,
                candidates=p.candidates,
                field=self.field,
                name=implicit_name(p),
            )
            self._scorer = LanguageIdScorer(params, ScorerInput(self.input.kind), path=f"filters: {self.name}")
        return self._scorer

    def scorers(self) -> list:
        return [self.scorer()]

    def requires(self) -> set[str]:
        return {self.field, *self.scorer().provides()}

    def apply(self, pool: Pool, alive: np.ndarray) -> Decision:
        p = self.params
        ident = self.identity()
        records = pool.artifacts.setdefault("language_identifiers", [])
        if ident not in records:
            records.append(ident)
        backend = ident["backend"]
        model_path = ident.get("model_path")
        text = caption_array(pool, self.field)
        # DataComp classifies every caption, blank or not, with fastText or gcld3 (one may
        # call "\xa0 \xa0" English); the other identifiers cannot say anything about it.
        blank = text.is_null().to_numpy(zero_copy_only=False) if backend in BASELINE_OF else is_blank(text)
        keep = np.zeros(pool.n, dtype=bool)
        reason = np.full(pool.n, None, dtype=object)
        reason[blank] = "language_empty"
        rows = np.flatnonzero(alive & ~blank)
        if len(rows):
            code_column, conf_column = self.scorer().provides()
            if pool.has_column(code_column):  # the run's language_id scorer classified every caption (cached)
                codes, conf = pool.column(code_column)[rows], pool.column(conf_column)[rows]
            else:  # used on its own (library, tests): classify the rows that reach it
                candidates = tuple(sorted(p.candidates)) if p.candidates else None
                codes, conf = predict_languages(pool, self.field, rows, backend, model_path, candidates)
            allowed = np.isin(codes, p.languages)
            sure = conf >= p.min_confidence if p.min_confidence is not None else np.ones(len(rows), bool)
            keep[rows] = allowed & sure
            reason[rows] = np.where(allowed, "language_low_confidence", "language_not_allowed")
        return Decision(keep, reason)
