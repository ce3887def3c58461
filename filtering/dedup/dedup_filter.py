"""The ``dedup`` filter: exact, perceptual or semantic duplicates; one copy of each group survives.

- ``method: exact``: same ``sha256`` of the image bytes (``with_caption: true``: and the
  same caption).
- ``method: perceptual``: 64-bit perceptual hashes (``phash``, computed in the scoring
  stage) within Hamming distance ``max_distance``, found by multi-index hashing
  (:mod:`filtering.dedup.hamming`), never by comparing all pairs. ``min_similarity: c``
  also requires the image embeddings' cosine >= c for a hash pair to count: pHash alone
  confuses distinct images with the same coarse layout (plain backgrounds, icons).
- ``method: semantic``: SemDeDup (Abbas et al. 2023): k-means of the unit-norm image
  embeddings into ``num_clusters`` clusters, then pairs with cosine ``>= threshold``
  within a cluster (:mod:`filtering.dedup.semantic`).

The filter decides over the whole pool: it declares a :class:`~filtering.filters.base.Survivors`
reduction, and the plan's dedup phase (``pipelines/executors/dedup_phase.py``) searches the
rows that reach it and picks the survivors. ``exact`` and ``perceptual`` are searched by
hash partitioning (:mod:`filtering.dedup.partitioned`, cached per key columns' contents),
``semantic`` from :mod:`filtering.dedup.semantic`'s steps (k-means trained on the rows that
reach it, rows assigned and spilled shard by shard, each partition of clusters compared on
a worker). Each shard then applies its part of the decision (:meth:`Dedup.decided`).

``against: [DIR, ...]``: earlier outputs (or their index folders,
:mod:`filtering.dedup.index`) whose kept rows count as already taken (``semantic``: their
embeddings, found where each reference's run read them, within ``threshold``; with
``min_similarity``, a hash match confirmed by the two rows' embeddings). A row that
duplicates one of them is dropped with reason ``duplicate_of_reference`` and
``duplicate_of`` set to that row's uid (:mod:`filtering.dedup.against`; the manifest's
``stage_info.dedup`` record names each reference and how many rows matched it); the
other rows are deduplicated among themselves as without ``against``.

Pairs are joined into groups (connected components); in each group the copy preferred
by ``keep`` survives (``highest_clip_score``, ties by smallest uid; or ``smallest_uid``)
and the others are dropped with reason ``duplicate_<method>`` and ``duplicate_of`` set
to the survivor's uid (lower-case hex). Only rows that reached this filter take part. Rows are put in
uid order (the uids' 128-bit numbers) before any computation, so the result does not depend on shard order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field, PositiveInt, model_validator

from filtering.dedup.partitioned import SearchSettings, label_column
from filtering.filters.base import Decision, Filter, Params, Survivors, register
from filtering.pool import Pool
from filtering.sources import source_info

METHOD_KEYS: dict[str, tuple[str, ...]] = {
    "exact": ("with_caption",),
    "perceptual": ("max_distance", "min_similarity", "embedding"),
    "semantic": ("threshold", "num_clusters", "embedding", "niter", "seed"),
}
COMMON_KEYS = ("method", "keep", "against")
DEFAULT_MAX_DISTANCE = 6
DEFAULT_THRESHOLD = 0.95


class DedupParams(Params):
    path_fields: ClassVar[tuple[str, ...]] = ("against",)  # local paths: resolved against the config's folder
    method: Literal["exact", "perceptual", "semantic"]
    keep: Literal["highest_clip_score", "smallest_uid"] = "highest_clip_score"
    with_caption: bool = False
    max_distance: int = Field(default=DEFAULT_MAX_DISTANCE, ge=0, le=32)
    threshold: float = Field(default=DEFAULT_THRESHOLD, gt=0, le=1)
    min_similarity: float | None = Field(default=None, gt=-1, le=1)  # perceptual: also require this cosine
    num_clusters: PositiveInt | None = None  # None: about sqrt(N)
    embedding: str | None = None  # datacomp_metadata input: npz array, e.g. l14_img
    niter: PositiveInt = 10
    seed: int = 0
    against: list[str] | None = Field(default=None, min_length=1)  # earlier outputs or index folders

    @model_validator(mode="after")
    def _method_keys(self) -> DedupParams:
        allowed = set(COMMON_KEYS) | set(METHOD_KEYS[self.method])
        wrong = sorted(self.model_fields_set - allowed)
        if wrong:
            owners = [m for m in METHOD_KEYS if wrong[0] in METHOD_KEYS[m]]
            raise ValueError(
                f"{wrong[0]} applies to method {owners[0]}, not {self.method}; "
                f"method {self.method} takes: {', '.join(sorted(allowed - {'method'}))}"
            )
        return self


@register
class Dedup(Filter):
    name = "dedup"
    Params = DedupParams

    @property
    def score_field(self) -> str:
        return source_info(self.input.kind).score_field

    @property
    def reason(self) -> str:
        return f"duplicate_{self.params.method}"

    def requires(self) -> set[str]:
        p = self.params
        cols = {"uid"}
        if p.keep == "highest_clip_score":
            cols.add(self.score_field)
        search = self.search_settings()
        if search is not None:
            cols |= set(search.columns())
        return cols

    def against_settings(self) -> AgainstSettings | None:
        """The search against earlier outputs this filter needs (the dedup phase runs it)."""
        p = self.params
        search = self.search_settings()
        if not p.against or search is None:
            return None
        if search.method == "exact":
            search = SearchSettings("exact")  # the index holds the digest only, not the caption
        return AgainstSettings(search, tuple(p.against))

    def search_settings(self) -> SearchSettings | None:
        """The candidate search the dedup phase runs for this filter: only the settings that
        change the candidates, so filters that differ in ``keep`` or ``min_similarity`` share
        one cached search. None for ``semantic``."""
        p = self.params
        if p.method == "exact":
            return SearchSettings("exact", with_caption=p.with_caption)
        if p.method == "perceptual":
            return SearchSettings("perceptual", max_distance=p.max_distance, key_column="phash")
        return None

    def embeddings_required(self) -> set[str | None]:
        p = self.params
        uses = p.method == "semantic" or (p.method == "perceptual" and p.min_similarity is not None)
        return {p.embedding} if uses else set()

    def reduction(self) -> Survivors:
        return Survivors()

    def decided(self, result: tuple) -> Dedup:
        """``result``: one shard's dropped rows and the uids (high, low halves) of their
        survivors; with ``against``, then its rows matched to a reference and those rows' uids."""
        return _DecidedDedup(self.params, self.input, *result)

    def apply(self, pool: Pool, alive: np.ndarray) -> Decision:
        raise NotImplementedError("dedup decides over the pool: the plan's dedup phase fixes its survivors (decided)")


class _DecidedDedup(Dedup):
    """A ``dedup`` whose survivors were picked over the whole pool: one shard's decision."""

    def __init__(self, params, input_info, drop, dup_hi, dup_lo, ref_rows=None, ref_hi=None, ref_lo=None):
        super().__init__(params, input_info)
        self.drop, self.dup_hi, self.dup_lo = drop, dup_hi, dup_lo
        self.ref_rows, self.ref_hi, self.ref_lo = ref_rows, ref_hi, ref_lo

    def apply(self, pool: Pool, alive: np.ndarray) -> Decision:
        keep = np.ones(pool.n, dtype=bool)
        keep[self.drop] = False
        duplicate_of = np.full(pool.n, None, dtype=object)
        duplicate_of[self.drop] = _hex(self.dup_hi, self.dup_lo)
        reason: str | np.ndarray = self.reason
        if self.ref_rows is not None:
            keep[self.ref_rows] = False
            duplicate_of[self.ref_rows] = _hex(self.ref_hi, self.ref_lo)
            reason = np.full(pool.n, self.reason, dtype=object)
            reason[self.ref_rows] = REFERENCE_REASON
        return Decision(keep, reason, duplicate_of)


def _hex(hi: np.ndarray, lo: np.ndarray) -> list[str]:
    return [f"{int(h):016x}{int(low):016x}" for h, low in zip(hi, lo, strict=True)]


REFERENCE_REASON = "duplicate_of_reference"


@dataclass(frozen=True)
class AgainstSettings:
    """A search of the pool against earlier outputs' indexes (:mod:`filtering.dedup.against`)."""

    search: SearchSettings
    paths: tuple[str, ...]

    @property
    def column(self) -> str:
        import hashlib

        digest = hashlib.sha256("\0".join(self.paths).encode()).hexdigest()[:8]
        return f"dedup_ref_{label_column(self.search).removeprefix('dedup_label_')}_{digest}"


def hash_column(pool: Pool, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A uint64 column as ``(values, null mask)``: numpy would turn a nullable uint64 into float64."""
    col = pool.table.column(name)
    null = col.is_null().to_numpy(zero_copy_only=False)
    return np.asarray(col.fill_null(0).to_numpy(), dtype=np.uint64), np.asarray(null, dtype=bool)
