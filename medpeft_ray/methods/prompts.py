"""Prompt methods on ViTs: visual prompt tuning (shallow and deep) and prefix tuning.

VPT inserts ``p`` learnable tokens after the class token (they get no position embedding).
The backbone's ``num_prefix_tokens`` grows by ``p``, so timm's average pooling still averages
the patch tokens only. Prefix tuning concatenates learnable keys and values to K and V of every
chosen attention layer. Neither is designed to leave the output unchanged at initialisation,
and neither can be merged into the backbone's weights.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from pydantic import Field

from medpeft_ray.methods.layers import BlockOptions, chosen_blocks
from medpeft_ray.methods.registry import MethodOptions, register_method
from medpeft_ray.models.families import get_family

if TYPE_CHECKING:
    from torch import nn

_PROMPT_SPACE = {"tokens": {"type": "categorical", "choices": [5, 10, 20, 50]}}


class VptOptions(MethodOptions):
    tokens: int = Field(10, ge=1, le=512, description="number p of prompt tokens")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the prompts")


def _apply_vpt(model: "nn.Module", options: VptOptions, family: str, deep: bool) -> "nn.Module":
    from medpeft_ray.methods.modules import PromptTokens

    blocks = get_family(family).blocks(model)
    patch = model.patch_embed.patch_size  # type: ignore[union-attr]
    vpt = PromptTokens(
        len(blocks) if deep else 1, options.tokens, model.embed_dim, patch[0] * patch[1],  # type: ignore[arg-type]
        model.num_prefix_tokens, options.dropout,  # type: ignore[arg-type]
    ).to(model.pos_embed.device)  # type: ignore[union-attr]
    model.vpt = vpt
    blocks[0].register_forward_pre_hook(vpt.enter)
    if deep:
        for layer, block in enumerate(blocks[1:], start=1):
            block.register_forward_pre_hook(functools.partial(vpt.refresh, layer))
    # pooling skips prefix tokens: counting the prompts there keeps them out of the average
    model.num_prefix_tokens += options.tokens
    return model


@register_method(
    "vpt_shallow", options=VptOptions, families=("vit",), default_space=_PROMPT_SPACE, lr="scaling",
    description="visual prompt tuning, shallow: p learnable tokens enter before the first block",
)
def apply_vpt_shallow(model: "nn.Module", options: VptOptions, family: str) -> "nn.Module":
    return _apply_vpt(model, options, family, deep=False)


@register_method(
    "vpt_deep", options=VptOptions, families=("vit",), default_space=_PROMPT_SPACE, lr="scaling",
    description="visual prompt tuning, deep: fresh prompt tokens before every block",
)
def apply_vpt_deep(model: "nn.Module", options: VptOptions, family: str) -> "nn.Module":
    return _apply_vpt(model, options, family, deep=True)


class PrefixOptions(BlockOptions):
    tokens: int = Field(10, ge=1, le=512, description="number of key/value prefixes per attention layer")


@register_method(
    "prefix", options=PrefixOptions, families=("vit",), default_space=_PROMPT_SPACE, lr="scaling",
    description="prefix tuning: learnable key/value prefixes in every attention layer",
)
def apply_prefix(model: "nn.Module", options: PrefixOptions, family: str) -> "nn.Module":
    from timm.layers import Attention

    from medpeft_ray.methods.modules import Prefix, PrefixAttention

    for index, block in chosen_blocks(model, options, family):
        attention = block.get_submodule(get_family(family).attention)
        if type(attention) is not Attention:
            raise ValueError(f"prefix: block {index} uses {type(attention).__name__}, not timm's standard Attention")
        attention.__class__ = PrefixAttention  # same state, forward with prefixes
        attention.prefix = Prefix(options.tokens, attention.attn_dim).to(attention.qkv.weight.device)
    return model
