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

For ``exact`` and ``perceptual`` the candidate search is not done here: a column stage
(:mod:`filtering.dedup.search_stage`, added by the planner for this filter's search
settings) searches the whole pool once by hash partitioning
(:mod:`filtering.dedup.partitioned`), caches the result, and leaves a group label per
row and pairs of labels; this filter restricts them to the rows that reach it and
decides. ``semantic`` is searched by the plan's dedup phase
(``pipelines/executors/dedup_phase.py``) from :mod:`filtering.dedup.semantic`'s steps:
k-means trained on the rows that reach it, rows assigned and spilled shard by shard, each
partition of clusters compared on a worker process.

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
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, PositiveInt, model_validator

from filtering.dedup import groups
from filtering.dedup.partitioned import SearchSettings, components_of
from filtering.dedup.search_stage import label_column, pairs_key
from filtering.errors import ConfigError
from filtering.filters.base import Decision, Filter, Params, Survivors, register
from filtering.pool import Pool
from filtering.sources import source_info
from filtering.uid import uids_to_u8u8

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
            cols |= set(search.columns()) | {label_column(search)}
        against = self.against_settings()
        if against is not None:
            cols.add(against.column)
        return cols

    def against_settings(self) -> AgainstSettings | None:
        """The search against earlier outputs this filter needs (a column stage computes it)."""
        p = self.params
        search = self.search_settings()
        if not p.against or search is None:
            return None
        if search.method == "exact":
            search = SearchSettings("exact")  # the index holds the digest only, not the caption
        return AgainstSettings(search, tuple(p.against))

    def search_settings(self) -> SearchSettings | None:
        """What the candidate search stage (:mod:`filtering.dedup.search_stage`) computes for
        this filter: only the settings that change the candidates, so filters that differ in
        ``keep`` or ``min_similarity`` share one cached search. None for ``semantic``."""
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
        p = self.params
        # Canonical order (by uid): the same rows give the same groups whatever the shard order.
        # A uid is its 128-bit number (DataComp's int(uid, 16)): lower-cased, its string order
        # is that number's order, whatever case the input wrote it in.
        uids_all = pc.utf8_lower(pool.table.column("uid").cast(pa.string())).to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(alive)
        keep = np.ones(pool.n, dtype=bool)
        duplicate_of = np.full(pool.n, None, dtype=object)
        reason: str | np.ndarray = self.reason
        if p.against and (p.method == "semantic" or p.min_similarity is not None):
            raise ConfigError(
                f"filters.dedup.against: method {p.method} with "
                f"{'min_similarity' if p.method != 'semantic' else 'against'} runs on the shard plan only"
            )
        against = self.against_settings()
        if against is not None:
            # Rows that duplicate a reference's kept row go first; the rest dedup among themselves.
            matches = pool.artifacts[against.column]
            hit = np.isin(rows, matches.rows)
            matched = rows[hit]
            at = np.searchsorted(matches.rows, matched)
            keep[matched] = False
            duplicate_of[matched] = matches.uids(at)
            reason = np.full(pool.n, self.reason, dtype=object)
            reason[matched] = REFERENCE_REASON
            rows = rows[~hit]
        rows = rows[np.argsort(np.asarray(uids_all[rows], dtype=str), kind="stable")]
        i, j = self.pairs(pool, rows)
        # the shard plan's survivor step (dedup_phase.py), over this pool's rows
        comp = components_of(np.arange(len(rows)), i, j)
        uids = uids_to_u8u8(uids_all[rows])
        neg_score = None
        if p.keep == "highest_clip_score":
            neg_score = -np.asarray(pool.column(self.score_field)[rows], dtype=np.float64)
        drop, best = groups.survivors(comp, neg_score, uids["f0"], uids["f1"])
        keep[rows[drop]] = False
        duplicate_of[rows[drop]] = uids_all[rows[best]]
        return Decision(keep, reason, duplicate_of)

    def embeddings(self, pool: Pool, rows: np.ndarray) -> np.ndarray:
        try:
            kind = pool.resolve_embedding(self.params.embedding)
        except KeyError as e:
            raise ConfigError(f"filters.dedup.embedding: {e.args[0]}") from e
        return gather_embeddings(pool, kind, rows)

    def pairs(self, pool: Pool, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Duplicate pairs among ``rows``, as positions into ``rows``."""
        p = self.params
        search = self.search_settings()
        if search is not None:
            # The candidates were searched once over the whole pool (cached, search_stage.py);
            # here they are only restricted to ``rows``.
            column = label_column(search)
            pair_a, pair_b = pool.artifacts[pairs_key(column)]
            i, j = groups.label_edges(pool.column(column)[rows], pair_a, pair_b)
            if p.method == "perceptual" and p.min_similarity is not None and len(i):
                # Confirm hash neighbours with the image embeddings: cheap (one dot product per
                # pair) and it removes look-alike images that merely share a coarse layout.
                involved = np.unique(np.concatenate([i, j]))
                emb = groups.unit_rows(self.embeddings(pool, rows[involved]))
                a, b = np.searchsorted(involved, i), np.searchsorted(involved, j)
                close = groups.close_pairs(emb[a], emb[b], p.min_similarity)
                i, j = i[close], j[close]
            return i, j
        # method semantic: searched by the plan's dedup phase only (pipelines/executors/dedup_phase.py:
        # _semantic_pairs, from filtering.dedup.semantic's steps), which decides (``decided``).
        raise NotImplementedError("dedup method semantic is searched by the plan's dedup phase, not on one pool")


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


def gather_embeddings(pool: Pool, kind: str | None, rows: np.ndarray) -> np.ndarray:
    """Embeddings of ``rows`` (any order) in their stored dtype (float16 stays float16:
    half the memory of ``Pool.embeddings``), read shard by shard."""
    in_row_order = np.argsort(rows, kind="stable")
    sorted_rows = rows[in_row_order]
    out = None
    for part, emb in pool.iter_embeddings(kind):
        if out is None:
            out = np.zeros(
                (len(rows), emb.shape[1]), emb.dtype if emb.dtype in (np.float16, np.float32) else np.float32
            )
        lo, hi = np.searchsorted(sorted_rows, [part.start, part.stop])
        if hi > lo:
            out[in_row_order[lo:hi]] = emb[sorted_rows[lo:hi] - part.start]
    return out if out is not None else np.zeros((len(rows), 0), np.float32)


def hash_column(pool: Pool, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A uint64 column as ``(values, null mask)``: numpy would turn a nullable uint64 into float64."""
    col = pool.table.column(name)
    null = col.is_null().to_numpy(zero_copy_only=False)
    return np.asarray(col.fill_null(0).to_numpy(), dtype=np.uint64), np.asarray(null, dtype=bool)
