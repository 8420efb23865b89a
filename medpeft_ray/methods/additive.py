"""Additive methods with our own modules: SSF, AdaptFormer, Houlsby/Pfeiffer adapters, FacT-TT, TSA.

Each adds small trainable modules to a frozen backbone through :mod:`medpeft_ray.methods.modules`
(attached to the layer they act on, so timm's names and forward code stay as they are).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from medpeft_ray.methods.layers import BlockOptions, chosen_blocks
from medpeft_ray.methods.registry import MethodOptions, register_method
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

    final: bool = Field(True, description="ViT: scale-shift the tokens after the final norm, where the reference "
                                          "does, also when average pooling makes that norm the identity")


def _ssf_hosts(model: "nn.Module", options: SsfOptions, family: str) -> list[tuple["nn.Module", int]]:
    """(layer, channel dim of its output) of every layer SSF follows."""
    from torch import nn

    hosts = get_family(family).ops(model, [block for _, block in chosen_blocks(model, options, family)])
    final = getattr(model, "norm", None)
    # Under average pooling timm's final ``norm`` is the identity (fc_norm, part of the head,
    # normalises the pooled tokens); the reference (dongzelian/SSF) still scale-shifts the tokens
    # there, before pooling. The family lists only a final norm with parameters among its ops.
    if isinstance(final, nn.Identity) and options.final:
        hosts.append((final, -1))
    elif not options.final:
        hosts = [(host, dim) for host, dim in hosts if host is not final]
    return hosts


def merge_ssf(model: "nn.Module") -> "nn.Module":
    from medpeft_ray.methods.modules import ScaleShift, merge_attached

    final = getattr(model, "norm", None)
    if final is not None and isinstance(getattr(final, ScaleShift.slot, None), ScaleShift) and not list(final.parameters(recurse=False)):
        raise ValueError("SSF's final scale-shift follows the final norm that average pooling makes the identity: "
                         "no weight of timm's model can hold it (train with final: false to merge SSF)")
    return merge_attached(model, ScaleShift)


@register_method(
    "ssf", options=SsfOptions, families=("vit", "resnet"),
    description="SSF: a trained per-channel scale and shift after every op", merge=merge_ssf,
)
def apply_ssf(model: "nn.Module", options: SsfOptions, family: str) -> "nn.Module":
    from medpeft_ray.methods.modules import ScaleShift, output_channels

    device = next(model.parameters()).device
    for host, channel_dim in _ssf_hosts(model, options, family):
        channels = model.num_features if host is getattr(model, "norm", None) else output_channels(host)
        ScaleShift(channels, channel_dim).to(device).attach(host)
    return model


# ----------------------------------------------------------------------------------------------
# Bottleneck adapters: AdaptFormer (parallel to the MLP), Houlsby and Pfeiffer (sequential)
# ----------------------------------------------------------------------------------------------


class AdapterOptions(BlockOptions):
    bottleneck: int = Field(64, ge=1, le=4096, description="hidden width d of the adapter")
    scale: float = Field(1.0, gt=0, description="scale s of the adapter's output")
    activation: Literal["relu", "gelu"] = Field("gelu", description="non-linearity between down and up projection")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout after the non-linearity")


class AdaptFormerOptions(AdapterOptions):
    """The official AdaptFormer's image set-up: the un-normalised tokens in, ReLU, dropout 0.1, s = 0.1,
    and the branch added outside drop-path. The bottleneck of 6 gives Dutt et al.'s counts (Table 6:
    0.1M trainable on ViT-B, 0.3M on ViT-L, with the head); the official code's default is 64."""

    bottleneck: int = Field(6, ge=1, le=4096, description="hidden width d of the adapter")
    scale: float = Field(0.1, gt=0, description="scale s of the adapter's output")
    activation: Literal["relu", "gelu"] = Field("relu", description="non-linearity between down and up projection")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout after the non-linearity")
    input: Literal["raw", "normed"] = Field(
        "raw", description="what the adapter reads: the block's tokens before the MLP's LayerNorm (raw, the "
                           "official code's adapter_layernorm_option none) or after it (normed, the paper's figure)")


_ADAPTER_SPACE = {"bottleneck": {"type": "categorical", "choices": [8, 16, 32, 64]}}
_ADAPTFORMER_SPACE = {"bottleneck": {"type": "categorical", "choices": [2, 4, 6, 8, 16, 64]}}
#: where a timm ViT block's MLP branch reads its input and joins the residual stream
_MLP_NORM, _MLP_RESIDUAL = "norm2", "drop_path2"


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
            adapter = Bottleneck(dim, options.bottleneck, options.scale, options.activation, parallel, options.dropout)
            adapter.to(next(host.parameters()).device).attach(host)
    return model


@register_method(
    "adaptformer", options=AdaptFormerOptions, families=("vit",), default_space=_ADAPTFORMER_SPACE,
    identity_at_init=True,
    description="AdaptFormer: x + DropPath(MLP(LN(x))) + s * up(dropout(relu(down(x)))), a bottleneck beside each MLP",
)
def apply_adaptformer(model: "nn.Module", options: AdaptFormerOptions, family: str) -> "nn.Module":
    from medpeft_ray.methods.modules import Bottleneck

    described = get_family(family)
    for _, block in chosen_blocks(model, options, family):
        mlp = block.get_submodule(described.mlp)
        adapter = Bottleneck(block.get_submodule(_MLP_NORM).normalized_shape[0], options.bottleneck, options.scale,
                             options.activation, parallel=True, dropout=options.dropout)
        adapter.to(next(mlp.parameters()).device).attach_beside(
            mlp, block.get_submodule(_MLP_NORM), block.get_submodule(_MLP_RESIDUAL), normed=options.input == "normed")
    return model


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
    # the reference's VTAB configs choose scales from 0.01 to 100
    default_space={"rank": {"type": "categorical", "choices": [4, 8, 16, 32]},
                   "scale": {"type": "float", "low": 0.01, "high": 100.0, "log": True}},
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
    description="TSA: a 1x1 residual adapter beside every 3x3 convolution of layer1-4",
)
def apply_tsa(model: "nn.Module", options: TsaOptions, family: str) -> "nn.Module":
    from torch import nn

    from medpeft_ray.methods.modules import ParallelConv

    for block in get_family(family).blocks(model):
        for host in list(block.modules()):
            if isinstance(host, nn.Conv2d) and host.kernel_size == (3, 3):
                ParallelConv(host).to(host.weight.device).attach(host)
    return model
