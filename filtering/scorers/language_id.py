"""``language_id``: the caption's language and the identifier's confidence, cached per shard.

The Score half of the ``language`` filter (NeMo Curator's Score/Filter split): this
scorer classifies every non-null caption once and writes two columns, ``<name>`` (ISO
639-1 code, or the identifier's own label such as ``und``) and ``<name>_confidence``;
the filter only reads them and decides. A rerun that changes ``languages:`` or
``min_confidence:`` therefore classifies nothing: every shard comes from the cache.

The identifiers (py3langid, lingua, fastText's ``lid.176.bin``, gcld3) and the
``fallback:`` chain are those of :mod:`filtering.filters.language`. The cache
fingerprint holds the identifier that actually loaded (after any fallback), the
sha256 of a fastText model file, the candidate languages and the identifier package's
version; the column read is part of each shard's input key. The requested chain is not
in it: two configs that end up running the same identifier share one cache.

Each ``language`` filter adds its scorer by itself (columns named after a short hash
of its identifier settings, kept out of the outputs); the scorer may also be listed
under ``scorers:`` to write the columns into the subset::

    scorers:
      - language_id: {backend: fasttext}     # lid.176.bin in the user cache, downloaded on first use

Null captions get null codes and NaN confidences. Captions are classified once per
distinct text within a batch of rows; large batches are split over worker processes
(:func:`filtering.scorers.language_identifiers.predict_texts`).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import numpy as np
from pydantic import field_validator

from filtering.scorers.base import Batch, Needs, Scorer, register
from filtering.scorers.language_identifiers import IdentifierParams, predict_texts, resolve

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# The packages (any one installed) whose version each identifier's results depend on.
PACKAGE = {
    "py3langid": ("py3langid",),
    "lingua": ("lingua-language-detector",),
    "fasttext": ("fasttext-community", "fasttext-wheel", "fasttext"),  # each installs the module fasttext
    "gcld3": ("gcld3",),
}


class LanguageIdParams(IdentifierParams):
    """The identifier settings of :class:`~filtering.scorers.language_identifiers.IdentifierParams`
    and the columns' name (``<name>``, ``<name>_confidence``)."""

    name: str = "language"

    @field_validator("name")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError("must be a name of letters, digits and underscores")
        return value


def _package_version(backend: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for name in PACKAGE[backend]:
        try:
            return f"{name}=={version(name)}" if len(PACKAGE[backend]) > 1 else version(name)
        except PackageNotFoundError:
            continue
    return None


@register
class LanguageIdScorer(Scorer):
    kind = "language_id"
    Params = LanguageIdParams

    @property
    def field(self) -> str:
        return self.params.field or "caption"

    @property
    def confidence_column(self) -> str:
        return f"{self.name}_confidence"

    def provides(self) -> tuple[str, ...]:
        return (self.name, self.confidence_column)

    def needs(self) -> Needs:
        return Needs(columns=frozenset({self.field}))

    def identity(self, progress: bool = True) -> dict[str, Any]:
        """The identifier that loads (first available of the chain): see :func:`resolve`."""
        if getattr(self, "_identity", None) is None:
            self._identity = resolve(self.params, progress)
        return self._identity

    def fingerprint(self) -> dict[str, Any]:
        ident = self.identity()
        backend = ident["backend"]
        return {
            "backend": backend,
            "model_sha256": ident.get("model_sha256"),
            "candidates": sorted(self.params.candidates) if self.params.candidates else None,
            "package": _package_version(backend),
        }

    # No check(): `poolsift validate` loads no model. The run loads the identifier (and
    # says which one runs) before any data is read (pipelines/runner.py: language_identifiers).

    def setup(self) -> None:
        self.identity()

    def score(self, batch: Batch) -> dict[str, np.ndarray]:
        texts = batch.columns[self.field]
        n = len(texts)
        codes = np.full(n, None, dtype=object)
        conf = np.full(n, np.nan, dtype=np.float64)
        present = np.array([t is not None for t in texts], dtype=bool) if n else np.zeros(0, bool)
        distinct = list(dict.fromkeys(texts[present].tolist()))
        if distinct:
            ident = self.identity()
            candidates = tuple(sorted(self.params.candidates)) if self.params.candidates else None
            got, p = predict_texts(distinct, ident["backend"], ident.get("model_path"), candidates)
            index = {t: i for i, t in enumerate(distinct)}
            at = np.fromiter((index[t] for t in texts[present]), dtype=np.int64, count=int(present.sum()))
            codes[present] = np.asarray(got, dtype=object)[at]
            conf[present] = p[at]
        return {self.name: codes, self.confidence_column: conf}

    @property
    def label(self) -> str:
        """A ``language`` filter's own scorer is named by an internal column
        (``_language_py3langid_2869c9c3``): its bars and log lines say ``language id``."""
        return "language id" if self.name.startswith("_language_") else self.name

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_identity", None)
        return state


def implicit_name(params: IdentifierParams) -> str:
    """The column name a ``language`` filter's own scorer writes: one per identifier setting,
    so two filters with the same identifier share one scorer and one cache."""
    key = json.dumps([params.chain, params.model_path, sorted(params.candidates or []), params.field or "caption"])
    return f"_language_{params.backend}_{hashlib.sha256(key.encode()).hexdigest()[:8]}"
