"""The ground floor of every YAML section: a strict pydantic base and one-line errors naming the key.

Config, datasets and methods all parse their sections through :func:`parse_section`, so that a
bad key anywhere reads ``<key.path>: <message>``. This module imports nothing of the project but
its errors, so any floor can use it.
"""

from __future__ import annotations

import difflib
import math
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from medpeft_ray.errors import ConfigError


class Strict(BaseModel):
    """A section that refuses keys it does not know (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid")


def parse_section(model: type[BaseModel], raw: Any, prefix: str) -> Any:
    """Validates ``raw`` with ``model``; raises :class:`ConfigError` naming ``prefix.key`` on the first error."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = [str(part) for part in error["loc"]]
        key = ".".join(p for p in [prefix, *loc] if p)
        if error["type"] == "extra_forbidden":
            parent = _section_model(model, loc[:-1])
            known = sorted(parent.model_fields) if parent is not None else []
            hint = did_you_mean(loc[-1], known) + (f"; known: {', '.join(known)}" if known else "")
            raise ConfigError(key, f"unknown key{hint}") from None
        message = error_message(error)
        if error["type"] == "value_error":
            # a section's own check names the key it is about ("offload_param: needs zero_stage 3")
            field, sep, rest = message.partition(": ")
            section = _section_model(model, loc)
            if sep and section is not None and field in section.model_fields:
                key, message = f"{key}.{field}" if key else field, rest
        raise ConfigError(key, message) from None


def _section_model(model: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    """The pydantic model of the section at ``loc`` inside ``model`` (None past a plain field)."""
    parent: type[BaseModel] | None = model
    for part in loc:
        annotation = parent.model_fields.get(part) if parent is not None else None
        sub = getattr(annotation, "annotation", None) if annotation else None
        # an optional section (``ConfirmConfig | None``) is the section
        candidates = typing.get_args(sub) or (sub,)
        parent = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if parent is None:
            break
    return parent


def error_message(error: dict[str, Any]) -> str:
    """A short, user-facing message for one pydantic error."""
    kind, ctx, value = error["type"], error.get("ctx", {}), error.get("input")
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"must be {bounds[kind]} {limit} (got {value!r})"
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')} (got {value!r})"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be an integer (got {value!r})"
    if kind in ("float_type", "float_parsing"):
        return f"must be a number (got {value!r})"
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false (got {value!r})"
    if kind in ("list_type", "dict_type", "model_type", "model_attributes_type"):
        wanted = "a list" if kind == "list_type" else "a mapping"
        return f"must be {wanted} (got {type(value).__name__})"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} item(s)"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if isinstance(value, float) and math.isnan(value):
        return "must not be NaN"
    return f"{error['msg']} (got {value!r})"


def did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
