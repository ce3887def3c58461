"""Filter algebra: a list is an intersection applied in order; ``all``, ``any`` and ``not`` nest.

YAML form (docs/spec.md, "Config")::

    filters:
      - clip_score: {top_fraction: 0.3}
      - any:
          - caption: {min_words: 3}
          - not: {language: {languages: [en]}}

Each entry of a list sees only the rows its predecessors kept, and the funnel records
what each top-level entry received, kept and dropped, with reason codes. ``any`` keeps a
row that any child keeps (children all see the same rows); ``not`` inverts its child.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from filtering.filters.base import Decision, Filter
from filtering.pool import Pool

COMBINATORS = ("all", "any", "not")


class FilterNode(ABC):
    @abstractmethod
    def evaluate(self, pool: Pool, alive: np.ndarray) -> Decision: ...

    @abstractmethod
    def label(self) -> str: ...

    @abstractmethod
    def leaves(self) -> list[Filter]: ...

    def describe(self) -> Any:
        return self.label()


@dataclass
class Leaf(FilterNode):
    filter: Filter

    def evaluate(self, pool: Pool, alive: np.ndarray) -> Decision:
        return self.filter.apply(pool, alive)

    def label(self) -> str:
        return self.filter.name

    def leaves(self) -> list[Filter]:
        return [self.filter]

    def describe(self) -> Any:
        return self.filter.describe()


@dataclass
class AllOf(FilterNode):
    children: list[FilterNode]

    def evaluate(self, pool: Pool, alive: np.ndarray) -> Decision:
        reason = np.full(pool.n, None, dtype=object)
        dup = None
        thresholds: dict[str, float | None] = {}
        current = alive.copy()
        for child in self.children:
            d = child.evaluate(pool, current)
            thresholds.update(d.thresholds)
            dropped = current & ~d.keep
            reason[dropped] = d.reason if isinstance(d.reason, str) else d.reasons_for(dropped)
            if d.duplicate_of is not None:
                dup = np.full(pool.n, None, dtype=object) if dup is None else dup
                dup[dropped] = d.duplicate_of[dropped]
            current &= d.keep
        return Decision(current, reason, dup, thresholds)

    def label(self) -> str:
        return f"all({', '.join(c.label() for c in self.children)})"

    def leaves(self) -> list[Filter]:
        return [f for c in self.children for f in c.leaves()]

    def describe(self) -> Any:
        return {"all": [c.describe() for c in self.children]}


@dataclass
class AnyOf(FilterNode):
    children: list[FilterNode]

    def evaluate(self, pool: Pool, alive: np.ndarray) -> Decision:
        decisions = [c.evaluate(pool, alive) for c in self.children]
        keep = np.zeros(pool.n, dtype=bool)
        for d in decisions:
            keep |= d.keep
        dropped = alive & ~keep
        reason = np.full(pool.n, None, dtype=object)
        if dropped.any():
            parts = [d.reasons_for(dropped) for d in decisions]
            reason[dropped] = ["|".join(r) for r in zip(*parts, strict=True)]
        return Decision(keep, reason, thresholds={k: v for d in decisions for k, v in d.thresholds.items()})

    def label(self) -> str:
        return f"any({', '.join(c.label() for c in self.children)})"

    def leaves(self) -> list[Filter]:
        return [f for c in self.children for f in c.leaves()]

    def describe(self) -> Any:
        return {"any": [c.describe() for c in self.children]}


@dataclass
class Not(FilterNode):
    child: FilterNode

    def evaluate(self, pool: Pool, alive: np.ndarray) -> Decision:
        d = self.child.evaluate(pool, alive)
        return Decision(~d.keep, f"not_{self.child.label()}", thresholds=d.thresholds)

    def label(self) -> str:
        return f"not({self.child.label()})"

    def leaves(self) -> list[Filter]:
        return self.child.leaves()

    def describe(self) -> Any:
        return {"not": self.child.describe()}


@dataclass
class FilterOutcome:
    """The result of applying a filter list: who is kept, why the rest were dropped, the funnel."""

    keep: np.ndarray
    drop_filter: np.ndarray  # object: label of the top-level entry that dropped the row
    drop_reason: np.ndarray  # object: reason code
    duplicate_of: np.ndarray  # object: uid duplicated (dedup drops) or None
    funnel: list[dict[str, Any]]
    thresholds: dict[str, float | None] = field(default_factory=dict)  # score column -> threshold applied
    tallies: dict[int, dict[str, Any]] = field(default_factory=dict)  # top-level position -> Decision.tally


def funnel_labels(nodes: list[FilterNode], path: str = "filters") -> list[str]:
    """Each top-level entry's name in the funnel and in ``dropped/``: its label
    (``clip_score``, ``any(caption, not(language))``), with its position added when two
    entries would otherwise share one (``clip_score (filters[2])``)."""
    labels = [node.label() for node in nodes]
    repeated = {label for label in labels if labels.count(label) > 1}
    return [f"{label} ({path}[{i}])" if label in repeated else label for i, label in enumerate(labels)]


def apply_filters(nodes: list[FilterNode], pool: Pool, progress=None) -> FilterOutcome:
    """Apply the top-level list in order to the rows that did not fail, recording the funnel."""
    alive = ~pool.failed
    drop_filter = np.full(pool.n, None, dtype=object)
    drop_reason = np.full(pool.n, None, dtype=object)
    duplicate_of = np.full(pool.n, None, dtype=object)
    funnel = []
    thresholds: dict[str, float | None] = {}
    tallies: dict[int, dict[str, Any]] = {}
    for k, (node, label) in enumerate(zip(nodes, funnel_labels(nodes), strict=True)):
        d = node.evaluate(pool, alive)
        thresholds.update(d.thresholds)
        if d.tally is not None:
            tallies[k] = d.tally
        dropped = alive & ~d.keep
        n_dropped = int(dropped.sum())
        drop_filter[dropped] = label
        if isinstance(d.reason, str):  # one code for every row: no per-row objects
            drop_reason[dropped] = d.reason
            counts = {d.reason: n_dropped} if n_dropped else {}
        else:
            reasons = d.reasons_for(dropped)
            reasons[reasons == None] = label  # noqa: E711  (a row dropped without a code keeps the filter's name)
            drop_reason[dropped] = reasons
            counts = Counter(reasons.tolist())
        if d.duplicate_of is not None:
            duplicate_of[dropped] = d.duplicate_of[dropped]
        n_in = int(alive.sum())
        alive = alive & d.keep
        funnel.append(
            {
                "name": label,
                "in": n_in,
                "kept": int(alive.sum()),
                "dropped": n_dropped,
                "reasons": dict(sorted(counts.items())),
            }
        )
        if progress is not None:
            progress(label)
    return FilterOutcome(alive, drop_filter, drop_reason, duplicate_of, funnel, thresholds, tallies)
