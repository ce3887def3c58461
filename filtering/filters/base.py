"""Filters: cheap, pure functions from pool columns to a keep mask with reason codes.

A filter is one file: a :class:`Filter` subclass with a ``name``, a pydantic ``Params``
model (unknown keys rejected) and ``apply``. Registering it by name makes it usable in
YAML. Scoring lives elsewhere (stages add columns); a filter never recomputes scores,
so changing filter settings and rerunning costs seconds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from filtering.pool import Pool


class Params(BaseModel):
    """Base for filter parameters: frozen, unknown keys rejected, no NaN or infinite
    numbers (a NaN threshold compares false with every score and would drop the pool)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    path_fields: ClassVar[tuple[str, ...]] = ()  # parameters that name local files (read before any data)

    @classmethod
    def path_may_be_missing(cls, params: dict[str, Any], field: str) -> bool:
        """True when a missing file at ``field`` is for the filter to handle (e.g. by a
        fallback), so the check of local paths before the run lets it pass."""
        return False


@dataclass
class Decision:
    """A filter's verdict over every pool row.

    ``keep[i]`` matters only for rows that reached the filter. ``reason`` is a reason
    code for dropped rows: one string for all, or an object array per row.
    ``duplicate_of`` (dedup filters) gives, for each dropped copy, the uid it duplicates.
    ``thresholds`` (score filters) maps each score column to the threshold applied (None:
    everything kept); the funnel, the manifest and ``sweep`` take them from here.
    ``tally`` (filters whose reduction is :class:`Tally`): this pool's counts, which the
    plan adds up over the shards (:func:`add_tally`).
    """

    keep: np.ndarray
    reason: str | np.ndarray
    duplicate_of: np.ndarray | None = None
    thresholds: dict[str, float | None] = field(default_factory=dict)
    tally: dict[str, Any] | None = None

    def reasons_for(self, rows: np.ndarray) -> np.ndarray:
        if isinstance(self.reason, str):
            return np.full(int(rows.sum()) if rows.dtype == bool else len(rows), self.reason, dtype=object)
        return np.asarray(self.reason, dtype=object)[rows]


@dataclass(frozen=True)
class TopFraction:
    """A global threshold (DataComp, ``baselines/apply_filter.py``): the value at index
    ``int(N * fraction)`` of ``column`` sorted in descending order over the N rows not
    failed, NaN counted in N and sorted last, from per-shard histograms
    (:mod:`filtering.filters.top_fraction`)."""

    column: str
    fraction: float
    as_float64: bool = False  # a column that is not float is ranked as float64 (``score``)

    def scores(self, values: np.ndarray) -> np.ndarray:
        """The column's values as the filter ranks them."""
        return np.asarray(values, dtype=np.float64) if self.as_float64 and values.dtype.kind != "f" else values


@dataclass(frozen=True)
class Survivors:
    """Groups of duplicates over the whole pool, one survivor each (``dedup``). The shard
    plan searches and picks them over small per-row arrays before the filter pass
    (``pipelines/executors/dedup_phase.py``); the filter's own settings say how."""


@dataclass(frozen=True)
class Tally:
    """Counts over the whole pool, for a report, not for the decision (``uids``: how many
    rows matched each entry of its list). The filter decides each row from that row
    alone and returns its pool's counts in ``Decision.tally``: per counter an int, or the
    distinct indices counted and their counts (``np.unique(..., return_counts=True)``), so
    a shard returns only what its rows touched. The shard plan adds each shard's counts
    as they come (:func:`add_tally`) and the filter turns the sums into its report
    (``Filter.report``); only a top-level entry's tally is reported."""


def add_tally(total: dict[str, Any] | None, part: dict[str, Any]) -> dict[str, Any]:
    """``total`` with ``part`` added: ints summed; ``(indices, counts)`` pairs into a dense
    array of counts per index (grown as indices arrive)."""
    out = dict(total or {})
    for name, value in part.items():
        if isinstance(value, tuple):
            idx, counts = value
            acc = out.get(name, np.zeros(0, dtype=np.int64))
            if len(idx) and int(idx.max()) >= len(acc):
                acc = np.concatenate([acc, np.zeros(int(idx.max()) + 1 - len(acc), dtype=np.int64)])
            np.add.at(acc, idx, counts)
            out[name] = acc
        else:
            out[name] = out.get(name, 0) + value
    return out


Reduction = TopFraction | Survivors | Tally


@dataclass(frozen=True)
class InputInfo:
    """What a filter may know about the input when it is configured (before any data is read)."""

    kind: str  # "webdataset" | "datacomp"


class Filter(ABC):
    """One keep-or-drop rule. Subclasses set ``name`` and ``Params`` and implement ``apply``."""

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = Params
    report_name: ClassVar[str | None] = None  # a Tally's report: its manifest key and output folder

    def __init__(self, params: BaseModel, input_info: InputInfo):
        self.params = params
        self.input = input_info

    def requires(self) -> set[str]:
        """Pool columns (or stage outputs) this filter reads; checked before any data is read."""
        return set()

    def embeddings_required(self) -> set[str | None]:
        """Embedding kinds read (None: the pool's default)."""
        return set()

    def scorers(self) -> list:
        """The scorers (:class:`filtering.scorers.base.Scorer`) whose columns this filter
        reads; the planner runs each one (shared between filters with the same name),
        caching per shard, and keeps their columns out of the outputs."""
        return []

    def reduction(self) -> Reduction | None:
        """The global step this filter needs before it can decide any row: a threshold
        over the whole pool (:class:`TopFraction`), duplicate survivors
        (:class:`Survivors`), or counts for a report (:class:`Tally`). None, the default: the filter decides each row from that
        row's columns alone, so a shard's rows are decided on that shard's pool."""
        return None

    def check(self) -> None:
        """Read the filter's own files (a list, a table) before any data is read, so a bad
        one fails the run in one line first; the planner calls it after checking that
        every local path exists."""
        return None

    def report(self, sums: dict[str, Any], log) -> tuple[dict[str, Any], dict[str, Any]]:
        """For a :class:`Tally` reduction: the manifest record and the tables (name -> Arrow
        table) made from the counts summed over the pool (:func:`add_tally`)."""
        raise NotImplementedError(f"filter {self.name} declares no tally")

    def decided(self, result: Any) -> Filter:
        """This filter with its reduction's result over the whole pool fixed (the
        threshold; a shard's dropped rows and their survivors), so that applied to one
        shard's pool it decides as it would on the whole pool."""
        raise NotImplementedError(f"filter {self.name} declares no reduction")

    @abstractmethod
    def apply(self, pool: Pool, alive: np.ndarray) -> Decision:
        """Decide for every row; ``alive`` marks the rows that reached this filter."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params.model_dump(mode="json", exclude_none=True)}


REGISTRY: dict[str, type[Filter]] = {}


def register(cls: type[Filter]) -> type[Filter]:
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"filter name {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls
