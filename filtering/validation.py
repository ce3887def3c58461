"""One-line messages for pydantic validation errors: key path, what is wrong, valid choices."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError


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


def format_validation_error(e: ValidationError, model: type[BaseModel], prefix: tuple = ()) -> str:
    """One line for the first error: key path, what is wrong, and the valid choices."""
    err = e.errors()[0]
    loc = prefix + tuple(p for p in err["loc"] if p not in ("function-after",))
    path = format_loc(loc)
    if err["type"] == "extra_forbidden":
        key = str(err["loc"][-1])
        valid = _fields_at(model, tuple(err["loc"][:-1])) or sorted(_all_field_names(model))
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f"did you mean {close[0]}?" if close else f"valid keys: {', '.join(valid)}"
        return f"{path}: unknown key; {hint}"
    if err["type"] == "missing":
        return f"{path}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    shown = f" (got {value!r})" if not isinstance(value, dict | list) and value is not None else ""
    return f"{path}: {msg}{shown}" if path else f"{msg}{shown}"
