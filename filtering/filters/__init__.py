"""Filters: cheap, pure functions from columns to a keep mask, each registered by name.
The built-ins are registered by :mod:`filtering.registry`, which imports each one (and the
feature packages' filters: ``filtering/dedup/``, ``filtering/decontaminate/``,
``filtering/image_clusters/``)."""

from filtering.filters.base import REGISTRY, Decision, Filter, Params, register

__all__ = ["REGISTRY", "Decision", "Filter", "Params", "register"]
