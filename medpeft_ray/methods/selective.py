"""Baselines and selective methods: they train a subset of the backbone's own parameters."""

from __future__ import annotations

from typing import TYPE_CHECKING

from medpeft_ray.methods.registry import MethodOptions, register_method

if TYPE_CHECKING:
    from torch import nn

# Full fine-tuning prefers ~10x lower learning rates than PEFT methods (Dutt et al.).
_FULL_LR = {"lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}}
_PEFT_LR = {"lr": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True}}


class NoOptions(MethodOptions):
    pass


@register_method(
    "full", options=NoOptions, families=("vit", "resnet"), default_space=_FULL_LR, description="every parameter trains"
)
def apply_full(model: "nn.Module", options: NoOptions, family: str) -> "nn.Module":
    model.requires_grad_(True)
    return model


@register_method(
    "linear",
    options=NoOptions,
    families=("vit", "resnet"),
    default_space={"lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}},
    description="linear probing: only the classifier head (and fc_norm) trains",
)
def apply_linear(model: "nn.Module", options: NoOptions, family: str) -> "nn.Module":
    return model  # the head is made trainable for every method by prepare_model


@register_method(
    "bitfit", options=NoOptions, families=("vit", "resnet"), default_space=_PEFT_LR, description="all biases train"
)
def apply_bitfit(model: "nn.Module", options: NoOptions, family: str) -> "nn.Module":
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            param.requires_grad_(True)
    return model
