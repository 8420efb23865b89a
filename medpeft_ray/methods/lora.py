"""LoRA through peft, on timm ViT blocks chosen by a regex over timm's module names.

peft's ``layers_to_transform`` does not understand timm's root-level ``blocks.N`` names, so the
tuned blocks are selected in the ``target_modules`` regex instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from medpeft_ray.methods.registry import MethodOptions, register_method

if TYPE_CHECKING:
    from torch import nn

#: timm ViT module path (below ``blocks.N.``) of each LoRA target.
VIT_TARGETS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


class LoraOptions(MethodOptions):
    rank: int = Field(8, ge=1, le=1024, description="LoRA rank r")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling alpha (update scaled by alpha / r)")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the LoRA input")
    targets: list[Literal["qkv", "proj", "fc1", "fc2"]] = Field(
        default_factory=lambda: ["qkv"], min_length=1, description="projections of each block to adapt"
    )
    blocks: list[int] | None = Field(None, description="indices of the blocks to adapt (default: all)")


def target_regex(options: LoraOptions) -> str:
    """A full-match regex over module names selecting the targets of the chosen blocks."""
    block = r"\d+" if options.blocks is None else "(?:" + "|".join(str(b) for b in sorted(set(options.blocks))) + ")"
    paths = "|".join(VIT_TARGETS[t].replace(".", r"\.") for t in options.targets)
    return rf"blocks\.{block}\.(?:{paths})"


@register_method(
    "lora",
    options=LoraOptions,
    families=("vit",),
    default_space={
        "lr": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
        "rank": {"type": "categorical", "choices": [2, 4, 8, 16, 32]},
    },
    description="low-rank updates of the attention projections (peft)",
)
def apply_lora(model: "nn.Module", options: LoraOptions, family: str) -> "nn.Module":
    from peft import LoraConfig, inject_adapter_in_model

    if options.blocks is not None:
        depth = len(model.blocks)  # type: ignore[arg-type]
        bad = [b for b in options.blocks if not 0 <= b < depth]
        if bad:
            raise ValueError(f"method.options.blocks: {bad} out of range for a {depth}-block backbone")
    config = LoraConfig(
        r=options.rank, lora_alpha=options.alpha, lora_dropout=options.dropout, target_modules=target_regex(options)
    )
    # inject_adapter_in_model keeps the timm module tree (and its names) and leaves only LoRA
    # weights trainable; no PeftModel wrapper sits between the trainer and timm's forward.
    return inject_adapter_in_model(config, model)
