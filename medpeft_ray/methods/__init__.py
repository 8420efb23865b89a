"""PEFT methods: ``prepare_model`` applies a registered method to a backbone.

Adding a method means writing one module that calls ``register_method`` and importing it below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from medpeft_ray.methods import lora, selective  # noqa: F401  (registers the methods)
from medpeft_ray.methods.registry import MethodOptions, MethodSpec, get_method, list_methods, register_method

if TYPE_CHECKING:
    from torch import nn

__all__ = ["MethodOptions", "MethodSpec", "get_method", "list_methods", "register_method", "prepare_model", "count_parameters"]


def prepare_model(model: "nn.Module", method: str, options: dict[str, Any], family: str) -> "nn.Module":
    """Freezes ``model``, applies ``method`` with ``options``, and makes the classifier head trainable.

    The head (and ViT's ``fc_norm``) trains under every method: a new task needs a new head.
    """
    from medpeft_ray.models.backbones import head_parameters

    spec = get_method(method)
    if family not in spec.families:
        raise ValueError(f"method {method!r} does not apply to {family} backbones (it applies to {sorted(spec.families)})")
    model.requires_grad_(False)
    model = spec.apply(model, spec.options.model_validate(options), family)
    for param in head_parameters(model, family):
        param.requires_grad_(True)
    return model


def count_parameters(model: "nn.Module") -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
