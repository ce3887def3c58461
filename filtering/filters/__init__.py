"""Built-in filters, registered by name on import. Add a filter: one file, one import here."""

from filtering.filters import clip_score  # noqa: F401
from filtering.filters.base import REGISTRY, Decision, Filter, Params, register

__all__ = ["REGISTRY", "Decision", "Filter", "Params", "register"]
