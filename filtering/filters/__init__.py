"""Built-in filters, registered by name on import. Add a filter: one file, one import here.

A feature with code of its own beside its filter lives in one package, its filter
registered by an import here: ``filtering/dedup/``, ``filtering/decontaminate/`` and
``filtering/image_clusters/``."""

from filtering.decontaminate import decontaminate_filter  # noqa: F401
from filtering.dedup import dedup_filter  # noqa: F401
from filtering.filters import (  # noqa: F401
    caption,
    clip_score,
    image_size,
    language,
    score,
    text_entities,
    uids,
    wordnet_synsets,
)
from filtering.filters.base import REGISTRY, Decision, Filter, Params, register
from filtering.image_clusters import image_clusters_filter  # noqa: F401

__all__ = ["REGISTRY", "Decision", "Filter", "Params", "register"]
