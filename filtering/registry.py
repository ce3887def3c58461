"""Every built-in filter and scorer, registered by importing its module, and the parsing
of the config's ``filters:`` and ``scorers:`` lists by those names.

This is the one module that knows them all: it sits above the feature packages
(``filtering/dedup/``, ``filtering/decontaminate/``, ``filtering/image_clusters/``) whose
filters it registers, so no package imports up into another to register it. Adding a
filter or a scorer: one file, one import here, one test. Parse through here, so every
built-in is registered before a name is looked up."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from filtering.decontaminate import decontaminate_filter  # noqa: F401  (registers on import)
from filtering.dedup import dedup_filter  # noqa: F401
from filtering.errors import ConfigError
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
from filtering.filters.base import REGISTRY as FILTERS
from filtering.filters.base import InputInfo
from filtering.filters.compose import COMBINATORS, AllOf, AnyOf, FilterNode, Leaf, Not
from filtering.image_clusters import image_clusters_filter  # noqa: F401
from filtering.scorers import clip, embedding_head, language_id, phash  # noqa: F401
from filtering.scorers.base import REGISTRY as SCORERS
from filtering.scorers.base import InputInfo as ScorerInput
from filtering.scorers.base import Scorer
from filtering.validation import format_validation_error, unknown_name


def _unknown_name(name: str, path: str) -> ConfigError:
    return unknown_name(path, "filter", name, sorted(FILTERS) + list(COMBINATORS))


def parse_filter(spec: Any, path: str, input_kind: str) -> FilterNode:
    """Parse one filter entry ``{name: params}`` (or a combinator) into a node."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{path}: each filter is a mapping with exactly one key, the filter name")
    ((name, params),) = spec.items()
    name = str(name)
    sub = f"{path}.{name}"
    if name in ("all", "any"):
        if not isinstance(params, list) or not params:
            raise ConfigError(f"{sub}: expects a non-empty list of filters")
        children = [parse_filter(p, f"{sub}[{i}]", input_kind) for i, p in enumerate(params)]
        return AllOf(children) if name == "all" else AnyOf(children)
    if name == "not":
        if isinstance(params, list):
            if len(params) != 1:
                raise ConfigError(f"{sub}: expects one filter")
            params = params[0]
        return Not(parse_filter(params, sub, input_kind))
    cls = FILTERS.get(name)
    if cls is None:
        raise _unknown_name(name, path)
    try:
        model = cls.Params.model_validate(params or {})
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, cls.Params, prefix=(sub,))) from e
    return Leaf(cls(model, InputInfo(kind=input_kind)))


def parse_filters(specs: list[Any], path: str = "filters", input_kind: str = "webdataset") -> list[FilterNode]:
    return [parse_filter(s, f"{path}[{i}]", input_kind) for i, s in enumerate(specs)]


def scorer_class(kind: str, path: str = "scorers") -> type[Scorer]:
    cls = SCORERS.get(kind)
    if cls is None:
        raise unknown_name(path, "scorer", kind, sorted(SCORERS))
    return cls


def parse_scorers(specs: Any, input_info: ScorerInput, path: str = "scorers") -> list[Scorer]:
    """Parse the ``scorers:`` list, each entry ``{kind: params}``; two scorers may not
    write the same column."""
    if specs is None:
        return []
    if not isinstance(specs, list):
        raise ConfigError(f"{path}: must be a list of scorers, each {{kind: {{...}}}}")
    scorers: list[Scorer] = []
    owner: dict[str, str] = {}
    for i, spec in enumerate(specs):
        where = f"{path}[{i}]"
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"{where}: each scorer is a mapping with exactly one key, the scorer kind")
        ((kind, params),) = spec.items()
        cls = scorer_class(str(kind), where)
        sub = f"{where}.{kind}"
        try:
            model = cls.Params.model_validate(params or {})
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, cls.Params, prefix=(sub,))) from e
        scorer = cls(model, input_info, sub)
        for column in scorer.provides():
            if column in owner:
                raise ConfigError(
                    f"{sub}: column {column!r} is already written by {owner[column]}; give it another name"
                )
            owner[column] = sub
        scorers.append(scorer)
    return scorers
