"""Built-in filters, registered by name on import. Add a filter: one file, one import here."""

from filtering.dedup import dedup_filter  # noqa: F401  (dedup lives in one package: filtering/dedup/)
from filtering.filters import (  # noqa: F401
    caption,
    clip_score,
    decontaminate,
    image_clusters,
    image_size,
    language,
    score,
    text_entities,
    uids,
    wordnet_synsets,
)
from filtering.filters.base import REGISTRY, Decision, Filter, Params, register

__all__ = ["REGISTRY", "Decision", "Filter", "Params", "register"]
