"""DiffFit and SVDiff: the scale and spectral methods of Dutt et al.'s generation setting, on ViTs and U-Nets.

Both are built on functions of one module each (:func:`~medpeft_ray.methods.modules.scale_branch`,
:func:`~medpeft_ray.methods.modules.shift_singular_values`), so they apply to a diffusion
U-Net's branches and layers as they do to a ViT block's. Both leave the output unchanged at
initialisation and fold into the backbone's weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from medpeft_ray.methods.layers import BlockOptions, chosen_blocks, parse_name_set
from medpeft_ray.methods.registry import register_method
from medpeft_ray.methods.selective import train_groups
from medpeft_ray.models.families import get_family

if TYPE_CHECKING:
    from torch import nn

#: the residual branches of a block, by the family's names for them
_PARTS = ("attention", "mlp")


class DiffFitOptions(BlockOptions):
    """DiffFit trains every bias and norm, and a gamma per channel on the chosen blocks' attention and MLP outputs."""


def merge_difffit(model: "nn.Module") -> "nn.Module":
    from medpeft_ray.methods.modules import BranchScale, merge_attached

    return merge_attached(model, BranchScale)


@register_method(
    "difffit", options=DiffFitOptions, families=("vit", "unet"), identity_at_init=True, merge=merge_difffit,
    description="DiffFit: bias + norm tuning and a gamma (1 at first) scaling each block's attention and MLP output",
)
def apply_difffit(model: "nn.Module", options: DiffFitOptions, family: str) -> "nn.Module":
    from medpeft_ray.methods.modules import scale_branch

    described = get_family(family)
    train_groups(model, ["bias", "norm"], family)
    for _, block in chosen_blocks(model, options, family):
        for part in _PARTS:
            for branch in described.part_modules(block, part):
                scale_branch(branch)
    return model


class SvDiffOptions(BlockOptions):
    targets: list[str] = Field(["attention", "mlp"], description="whose Linear layers are shifted: attention, mlp "
                                                                 "(a ViT: qkv and proj; fc1 and fc2; a U-Net: "
                                                                 "both attentions' projections; the feed-forward)")

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, value: Any) -> list[str]:
        return parse_name_set(value, _PARTS)


def merge_sv_diff(model: "nn.Module") -> "nn.Module":
    from medpeft_ray.methods.modules import SingularShift, merge_attached

    return merge_attached(model, SingularShift)


@register_method(
    "sv_diff", options=SvDiffOptions, families=("vit", "unet"), identity_at_init=True, merge=merge_sv_diff,
    description="SVDiff: learned shifts of the singular values of every Linear of each block, W = U relu(S + delta) V^T",
)
def apply_sv_diff(model: "nn.Module", options: SvDiffOptions, family: str) -> "nn.Module":
    from torch import nn

    from medpeft_ray.methods.modules import shift_singular_values

    described = get_family(family)
    for _, block in chosen_blocks(model, options, family):
        for part in options.targets:
            # listed before attaching: the shifts are modules of their own
            for branch in described.part_modules(block, part):
                for layer in [m for m in branch.modules() if isinstance(m, nn.Linear)]:
                    shift_singular_values(layer)
    return model
