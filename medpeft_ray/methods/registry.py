"""The one registry of PEFT methods.

A method is one function that makes a frozen backbone's chosen parameters trainable (or adds new
trainable modules), registered with its option schema, the backbone families it applies to and
its default search ranges. Importing this module touches no torch, so configs validate fast; the
``apply`` functions import torch/peft when they run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from torch import nn


class MethodOptions(BaseModel):
    """Base of every method's options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


ApplyFn = Callable[["nn.Module", Any, str], "nn.Module"]


@dataclass(frozen=True)
class MethodSpec:
    """What the registry knows about one method.

    Attributes:
        name: the name used in YAML (``method.name``).
        apply: ``apply(model, options, family) -> model``; called on a fully frozen backbone, it
            makes the method's parameters trainable. The classifier head is made trainable after
            it by :func:`medpeft_ray.methods.prepare_model`, for every method.
        options: pydantic model of the method's options, with defaults.
        families: backbone families (``vit``, ``resnet``) the method applies to.
        default_space: search ranges used when a YAML has no ``space`` section.
        description: one line for listings.
    """

    name: str
    apply: ApplyFn
    options: type[MethodOptions]
    families: frozenset[str]
    default_space: dict[str, dict[str, Any]] = field(default_factory=dict)
    description: str = ""


_METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    *,
    options: type[MethodOptions],
    families: tuple[str, ...],
    default_space: dict[str, dict[str, Any]] | None = None,
    description: str = "",
) -> Callable[[ApplyFn], ApplyFn]:
    """Decorator that registers ``apply`` under ``name``."""

    def decorate(apply: ApplyFn) -> ApplyFn:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        _METHODS[name] = MethodSpec(name, apply, options, frozenset(families), dict(default_space or {}), description)
        return apply

    return decorate


def get_method(name: str) -> MethodSpec:
    """The spec of ``name``; an unknown name raises ``KeyError`` listing the known ones."""
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(_METHODS))}") from None


def list_methods(family: str | None = None) -> list[str]:
    """Registered method names, optionally only those applying to a backbone family."""
    return sorted(n for n, s in _METHODS.items() if family is None or family in s.families)
