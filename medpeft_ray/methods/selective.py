"""Baselines and selective methods: they train a subset of the backbone's own parameters.

They add nothing to the model, so the tuned model is already a plain timm model (merging is the
identity) and its output at initialisation is the backbone's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medpeft_ray.methods.registry import LR_FULL, LR_LINEAR, LR_PEFT, MethodOptions, register_method
from medpeft_ray.models.families import get_family

if TYPE_CHECKING:
    from torch import nn


class NoOptions(MethodOptions):
    pass


def already_plain(model: "nn.Module") -> "nn.Module":
    """Merge of a selective method: the trained backbone is already timm's own model."""
    return model


def _selective(name: str, families: tuple[str, ...], description: str, lr: dict = LR_PEFT):  # noqa: ANN202
    return register_method(
        name, options=NoOptions, families=families, default_space={"lr": lr}, description=description,
        identity_at_init=True, merge=already_plain,
    )


@_selective("full", ("vit", "resnet"), "full fine-tuning: every parameter trains", LR_FULL)
def apply_full(model: "nn.Module", options: NoOptions, family: str) -> "nn.Module":
    model.requires_grad_(True)
    return model


@_selective("linear", ("vit", "resnet"), "linear probing: only the classifier head (and ViT fc_norm) trains", LR_LINEAR)
def apply_linear(model: "nn.Module", options: NoOptions, family: str) -> "nn.Module":
    return model  # the head is made trainable for every method by prepare_model


@_selective("bitfit", ("vit", "resnet"), "bias tuning (BitFit; TinyTL on ResNet): every bias trains")
def apply_bitfit(model: "nn.Module", options: NoOptions, family: str) -> "nn.Module":
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            param.requires_grad_(True)
    return model


@_selective("layernorm", ("vit",), "LayerNorm tuning: every LayerNorm's scale and bias train")
def apply_layernorm(model: "nn.Module", options: NoOptions, family: str) -> "nn.Module":
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.requires_grad_(True)
    return model


@_selective("attention", ("vit",), "attention tuning: every attention parameter and pos_embed train (patch embedding frozen)")
def apply_attention(model: "nn.Module", options: NoOptions, family: str) -> "nn.Module":
    described = get_family(family)
    for block in described.blocks(model):
        block.get_submodule(described.attention).requires_grad_(True)
    if getattr(model, "pos_embed", None) is not None:
        model.pos_embed.requires_grad_(True)  # type: ignore[union-attr]
    return model


@_selective("batchnorm", ("resnet",), "BatchNorm tuning: every BatchNorm's scale and bias train")
def apply_batchnorm(model: "nn.Module", options: NoOptions, family: str) -> "nn.Module":
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.requires_grad_(True)
    return model
