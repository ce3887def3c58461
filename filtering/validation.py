"""One-line messages for pydantic validation errors: key path, what is wrong, valid choices."""

from __future__ import annotations

import difflib
import reprlib
from typing import Any

from pydantic import BaseModel, ValidationError

from filtering.errors import ConfigError


def _all_field_names(model: type[BaseModel], seen: set | None = None) -> set[str]:
    seen = set() if seen is None else seen
    names = set(model.model_fields)
    for f in model.model_fields.values():
        for sub in _model_types(f.annotation):
            if sub not in seen:
                seen.add(sub)
                names |= _all_field_names(sub, seen)
    return names


def _model_types(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [t for a in getattr(annotation, "__args__", ()) for t in _model_types(a)]


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """The valid keys of the model found by following ``loc`` from ``model``."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return sorted(model.model_fields)
        subs = _model_types(field.annotation)
        if not subs:
            return None
        model = subs[0]
    return sorted(model.model_fields)


def format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_TAG_NAMES = {"str", "int", "float", "bool", "bytes", "none", "list", "dict"}
_TAG_PREFIXES = ("function-", "lax-or-strict", "json-or-python", "tagged-union", "chain", "nullable")


def _is_union_tag(part: str) -> bool:
    return part in _TAG_NAMES or "[" in part or part.startswith(_TAG_PREFIXES)


def clean_loc(model: type[BaseModel] | None, loc: tuple) -> tuple[tuple, int | None, str | None]:
    """``loc`` without pydantic's union-member tags (``str``, ``list[str]``...), which
    name no key; also returns where the first tag was (in the cleaned loc) and the tag."""
    cleaned: list = []
    where, tag = None, None
    for part in loc:
        if isinstance(part, int):
            cleaned.append(part)
        elif model is not None and part in model.model_fields:
            cleaned.append(part)
            subs = _model_types(model.model_fields[part].annotation)
            model = subs[0] if subs else None
        elif model is None and _is_union_tag(part):
            if where is None:
                where, tag = len(cleaned), part
        else:
            cleaned.append(part)
            model = None
    return tuple(cleaned), where, tag


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, 50, 50
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4


def _shown(value: Any) -> str:
    """The value, shown short: the repr is bounded while it is built (a YAML alias
    structure can expand to billions of values; ``repr`` would build all of them)."""
    if value is None:
        return ""
    text = _REPR.repr(value)
    return f" (got {text if len(text) <= 60 else text[:57] + '...'})"


def format_validation_error(e: ValidationError, model: type[BaseModel], prefix: tuple = ()) -> str:
    """One line for the first error: key path, what is wrong, and the valid choices."""
    errors = e.errors()
    err = errors[0]
    loc, where, tag = clean_loc(model, tuple(err["loc"]))
    path = format_loc(prefix + loc)
    if err["type"] == "extra_forbidden":
        key = str(loc[-1])
        valid = _fields_at(model, tuple(loc[:-1])) or sorted(_all_field_names(model))
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f"did you mean {close[0]}?" if close else f"valid keys: {', '.join(valid)}"
        return f"{path}: unknown key; {hint}"
    if err["type"] == "missing":
        return f"{path}: required key is missing"
    if tag is not None:
        # A value that fits none of a union's types: name the types, not the first miss.
        base = loc[:where]
        tags = [tag]
        for other in errors[1:]:
            o_loc, o_where, o_tag = clean_loc(model, tuple(other["loc"]))
            if o_tag is not None and o_loc[:o_where] == base and o_tag not in tags:
                tags.append(o_tag)
        if len(tags) > 1:
            return f"{format_loc(prefix + base)}: expected {' or '.join(tags)}{_shown(err.get('input'))}"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] in ("model_type", "model_attributes_type", "dict_type"):
        msg = "expected a mapping of keys to values"
    value = err.get("input")
    shown = _shown(value) if not isinstance(value, dict | list) else ""
    return f"{path}: {msg}{shown}" if path else f"{msg}{shown}"


def unknown_name(path: str, what: str, name: str, valid: list[str]) -> ConfigError:
    """``PATH: unknown filter 'x'; did you mean y? valid filters: ...`` for any registry."""
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return ConfigError(f"{path}: unknown {what} {name!r}; {hint}valid {what}s: {', '.join(valid)}")
