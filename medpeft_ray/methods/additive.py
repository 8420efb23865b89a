"""Additive methods with our own modules: SSF, AdaptFormer, Houlsby/Pfeiffer adapters, FacT-TT, TSA.

Each adds small trainable modules to a frozen backbone through :mod:`medpeft_ray.methods.modules`
(attached to the layer they act on, so timm's names and forward code stay as they are).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from medpeft_ray.methods.layers import BlockOptions, chosen_blocks
from medpeft_ray.methods.registry import LR_PEFT, MethodOptions, register_method
from medpeft_ray.models.families import get_family

if TYPE_CHECKING:
    from torch import nn

# ----------------------------------------------------------------------------------------------
# SSF: scale and shift after every op (Lian et al. 2022)
# ----------------------------------------------------------------------------------------------


class SsfOptions(BlockOptions):
    """SSF follows every op of the chosen blocks, plus the stem and what follows the last block
    (the family's :attr:`BackboneFamily.ops`: on a ViT the patch embedding and the final norm; on
    a ResNet every convolution + BatchNorm pair)."""


def _ssf_hosts(model: "nn.Module", options: SsfOptions, family: str) -> list[tuple["nn.Module", int]]:
    """(layer, channel dim of its output) of every layer SSF follows."""
    return get_family(family).ops(model, [block for _, block in chosen_blocks(model, options, family)])


def merge_ssf(model: "nn.Module") -> "nn.Module":
    from medpeft_ray.methods.modules import ScaleShift, merge_attached

    return merge_attached(model, ScaleShift)


@register_method(
    "ssf", options=SsfOptions, families=("vit", "resnet"), default_space={"lr": LR_PEFT},
    description="SSF: a trained per-channel scale and shift after every op", merge=merge_ssf,
)
def apply_ssf(model: "nn.Module", options: SsfOptions, family: str) -> "nn.Module":
    from medpeft_ray.methods.modules import ScaleShift, output_channels

    for host, channel_dim in _ssf_hosts(model, options, family):
        ScaleShift(output_channels(host), channel_dim).to(next(host.parameters()).device).attach(host)
    return model


# ----------------------------------------------------------------------------------------------
# Bottleneck adapters: AdaptFormer (parallel to the MLP), Houlsby and Pfeiffer (sequential)
# ----------------------------------------------------------------------------------------------


class AdapterOptions(BlockOptions):
    bottleneck: int = Field(64, ge=1, le=4096, description="hidden width d of the adapter")
    scale: float = Field(1.0, gt=0, description="scale s of the adapter's output")
    activation: Literal["relu", "gelu"] = Field("gelu", description="non-linearity between down and up projection")


class AdaptFormerOptions(AdapterOptions):
    scale: float = Field(0.1, gt=0, description="scale s of the adapter's output")
    activation: Literal["relu", "gelu"] = Field("relu", description="non-linearity between down and up projection")


_ADAPTER_SPACE = {"lr": LR_PEFT, "bottleneck": {"type": "categorical", "choices": [8, 16, 32, 64]}}


def _add_bottlenecks(model: "nn.Module", options: AdapterOptions, family: str, sites: tuple[str, ...],
                     parallel: bool) -> "nn.Module":
    """A bottleneck on each of ``sites`` (``attention``, ``mlp``: the family's parts) of the chosen blocks."""
    from torch import nn

    from medpeft_ray.methods.modules import Bottleneck

    described = get_family(family)
    for _, block in chosen_blocks(model, options, family):
        mlp_linears = [m for m in block.get_submodule(described.mlp).modules() if isinstance(m, nn.Linear)]
        dim = mlp_linears[-1].out_features  # the block's width: what its MLP puts out
        for site in sites:
            host = block.get_submodule(getattr(described, site))
            adapter = Bottleneck(dim, options.bottleneck, options.scale, options.activation, parallel)
            adapter.to(next(host.parameters()).device).attach(host)
    return model


@register_method(
    "adaptformer", options=AdaptFormerOptions, families=("vit",), default_space=_ADAPTER_SPACE, identity_at_init=True,
    description="AdaptFormer: x + MLP(LN(x)) + s * up(relu(down(LN(x)))), a bottleneck beside each MLP",
)
def apply_adaptformer(model: "nn.Module", options: AdaptFormerOptions, family: str) -> "nn.Module":
    return _add_bottlenecks(model, options, family, ("mlp",), parallel=True)


@register_method(
    "adapter_houlsby", options=AdapterOptions, families=("vit",), default_space=_ADAPTER_SPACE, identity_at_init=True,
    description="Houlsby adapters: a residual bottleneck after attention and after the MLP of each block",
)
def apply_houlsby(model: "nn.Module", options: AdapterOptions, family: str) -> "nn.Module":
    return _add_bottlenecks(model, options, family, ("attention", "mlp"), parallel=False)


@register_method(
    "adapter_pfeiffer", options=AdapterOptions, families=("vit",), default_space=_ADAPTER_SPACE, identity_at_init=True,
    description="Pfeiffer adapters: a residual bottleneck after the MLP of each block",
)
def apply_pfeiffer(model: "nn.Module", options: AdapterOptions, family: str) -> "nn.Module":
    return _add_bottlenecks(model, options, family, ("mlp",), parallel=False)


# ----------------------------------------------------------------------------------------------
# FacT-TT: every layer's update factorised with shared U, V and a per-layer core
# ----------------------------------------------------------------------------------------------


class FactOptions(BlockOptions):
    rank: int = Field(8, ge=1, le=256, description="rank r of the shared factors U (d->r) and V (r->d)")
    scale: float = Field(1.0, gt=0, description="scale s of every update")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the core's output")


def merge_fact(model: "nn.Module") -> "nn.Module":
    from medpeft_ray.methods.modules import FactCore, merge_attached

    merge_attached(model, FactCore)
    del model.fact_shared
    return model


@register_method(
    "fact_tt", options=FactOptions, families=("vit",), identity_at_init=True, merge=merge_fact,
    default_space={"lr": LR_PEFT, "rank": {"type": "categorical", "choices": [4, 8, 16, 32]},
                   "scale": {"type": "float", "low": 0.01, "high": 10.0, "log": True}},
    description="FacT-TT: updates of qkv, proj, fc1, fc2 as s * V core U, U and V shared by all blocks",
)
def apply_fact(model: "nn.Module", options: FactOptions, family: str) -> "nn.Module":
    from torch import nn

    from medpeft_ray.methods.modules import FactCore, FactShared

    device = model.pos_embed.device if getattr(model, "pos_embed", None) is not None else None
    shared = FactShared(model.embed_dim, options.rank).to(device)
    model.fact_shared = shared
    for _, block in chosen_blocks(model, options, family):
        # every Linear layer of the block (a ViT's qkv, proj, fc1, fc2), listed before cores add their own
        for host in [m for m in block.modules() if isinstance(m, nn.Linear)]:
            FactCore(host, shared, options.scale, options.dropout).to(host.weight.device).attach(host)
    return model


# ----------------------------------------------------------------------------------------------
# TSA: parallel residual adapters beside every 3x3 convolution of a ResNet
# ----------------------------------------------------------------------------------------------


class TsaOptions(MethodOptions):
    """TSA adapts every 3x3 convolution of the residual stages (layer1-4); it has no options."""


def merge_tsa(model: "nn.Module") -> "nn.Module":
    from medpeft_ray.methods.modules import ParallelConv, merge_attached

    return merge_attached(model, ParallelConv)


@register_method(
    "tsa", options=TsaOptions, families=("resnet",), identity_at_init=True, merge=merge_tsa,
    default_space={"lr": LR_PEFT}, description="TSA: a 1x1 residual adapter beside every 3x3 convolution of layer1-4",
)
def apply_tsa(model: "nn.Module", options: TsaOptions, family: str) -> "nn.Module":
    from torch import nn

    from medpeft_ray.methods.modules import ParallelConv

    for block in get_family(family).blocks(model):
        for host in list(block.modules()):
            if isinstance(host, nn.Conv2d) and host.kernel_size == (3, 3):
                ParallelConv(host).to(host.weight.device).attach(host)
    return model
