"""Baselines and selective methods: they train a subset of the backbone's own parameters.

They add nothing to the model, so the tuned model is already a plain timm model (merging is the
identity) and its output at initialisation is the backbone's.

Selective tuning is one method, ``selective``, over parameter groups (``bias``, ``norm``,
``attention``, ``mlp``, the ViT's ``pos_embed``, ``patch_embed`` and ``cls_token``, a CNN's
``conv``), combined freely: ``groups: "bias,norm,attention"`` is Dutt et al.'s bias + norm +
attention. ``bitfit``, ``layernorm``, ``attention`` and ``batchnorm`` are its named presets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Iterator

from pydantic import Field, field_validator

from medpeft_ray.methods.layers import parse_name_set
from medpeft_ray.methods.registry import MethodOptions, register_method
from medpeft_ray.models.families import BackboneFamily, get_family

if TYPE_CHECKING:
    from torch import nn

#: groups named after top-level ViT parameters/modules; offered where the family's stem has them
_STEM_GROUPS = ("pos_embed", "patch_embed", "cls_token")


class NoOptions(MethodOptions):
    pass


def groups_of(family: str) -> tuple[str, ...]:
    """The parameter groups selective tuning offers on ``family`` backbones, in canonical order."""
    described = get_family(family)
    names = ["bias", "norm"]
    names += [part for part in ("attention", "mlp") if described.part_paths(part)]
    names += [name for name in _STEM_GROUPS if name in described.stem]
    if not described.part_paths("attention"):  # a CNN: its convolution kernels are the rest of its weights
        names.append("conv")
    return tuple(names)


def _norm_types() -> tuple[type, ...]:
    from torch import nn

    return (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


def _block_parts(model: "nn.Module", described: BackboneFamily, part: str) -> Iterator["nn.Parameter"]:
    for block in described.blocks(model):
        for module in described.part_modules(block, part):
            yield from module.parameters()


def group_parameters(model: "nn.Module", group: str, family: str) -> Iterator["nn.Parameter"]:
    """The parameters of one group (:func:`groups_of`) of a ``family`` backbone."""
    from torch import nn

    described = get_family(family)
    if group == "bias":
        yield from (p for name, p in model.named_parameters() if name.endswith(".bias"))
    elif group == "norm":
        yield from (p for m in model.modules() if isinstance(m, _norm_types()) for p in m.parameters(recurse=False))
    elif group in ("attention", "mlp"):
        yield from _block_parts(model, described, group)
    elif group == "conv":
        yield from (m.weight for m in model.modules() if isinstance(m, nn.Conv2d))
    elif group in _STEM_GROUPS:
        found = getattr(model, group, None)
        if isinstance(found, nn.Parameter):
            yield found
        elif isinstance(found, nn.Module):
            yield from found.parameters()
    else:
        raise ValueError(f"unknown parameter group {group!r}")


class SelectiveOptions(MethodOptions):
    """Which parameter groups train: a list or a comma string, searchable as categorical strings."""

    #: the groups when the YAML names none: Dutt et al.'s bias + norm + attention (bias + norm on a CNN)
    default_groups: ClassVar[dict[str, str]] = {"vit": "bias,norm,attention", "resnet": "bias,norm",
                                                 "unet": "bias,norm,attention"}

    groups: list[str] | None = Field(
        None, description="ViT: among bias, norm, attention, mlp, pos_embed, patch_embed, cls_token "
                          "[bias,norm,attention]; ResNet: among bias, norm, conv [bias,norm]; diffusion U-Net: "
                          "among bias, norm, attention, mlp [bias,norm,attention]"
    )

    @field_validator("groups", mode="before")
    @classmethod
    def _groups(cls, value: Any) -> list[str] | None:
        return None if value is None else parse_name_set(value)

    def check_family(self, family: str) -> None:
        try:
            self.group_names(family)
        except ValueError as exc:
            raise ValueError(f"groups: {exc}") from None

    def group_names(self, family: str) -> list[str]:
        return parse_name_set(self.groups or self.default_groups.get(family, "bias"), groups_of(family))


def train_groups(model: "nn.Module", groups: list[str], family: str) -> "nn.Module":
    for group in groups:
        for param in group_parameters(model, group, family):
            param.requires_grad_(True)
    return model


def already_plain(model: "nn.Module") -> "nn.Module":
    """Merge of a selective method: the trained backbone is already timm's own model."""
    return model


def _selective(name: str, families: tuple[str, ...], description: str, lr: str = "peft",
               options: type[MethodOptions] = NoOptions):  # noqa: ANN202
    return register_method(
        name, options=options, families=families, lr=lr, description=description,
        identity_at_init=True, merge=already_plain,
    )


@_selective("full", ("vit", "resnet", "unet"), "full fine-tuning: every parameter trains", "full")
def apply_full(model: "nn.Module", options: NoOptions, family: str) -> "nn.Module":
    model.requires_grad_(True)
    return model


@_selective("linear", ("vit", "resnet"), "linear probing: only the classifier head (and ViT fc_norm) trains", "linear")
def apply_linear(model: "nn.Module", options: NoOptions, family: str) -> "nn.Module":
    return model  # the head is made trainable for every method by prepare_model


# with attention among its default groups it trains about a third of a ViT: full fine-tuning's lr range
@_selective("selective", ("vit", "resnet", "unet"), "selective tuning of parameter groups (groups: bias, norm, attention, ...)",
            "full", SelectiveOptions)
def apply_selective(model: "nn.Module", options: SelectiveOptions, family: str) -> "nn.Module":
    return train_groups(model, options.group_names(family), family)


@_selective("bitfit", ("vit", "resnet", "unet"), "bias tuning (BitFit; TinyTL on ResNet): every bias trains "
            "(groups: bias)")
def apply_bitfit(model: "nn.Module", options: NoOptions, family: str) -> "nn.Module":
    return train_groups(model, ["bias"], family)


@_selective("layernorm", ("vit",), "LayerNorm tuning: every LayerNorm's scale and bias train (groups: norm)")
def apply_layernorm(model: "nn.Module", options: NoOptions, family: str) -> "nn.Module":
    return train_groups(model, ["norm"], family)


# a third of ViT-B's parameters train: full fine-tuning's lr range, not PEFT's
@_selective("attention", ("vit", "unet"), "attention tuning: every attention parameter trains (a ViT's pos_embed "
            "too, its patch embedding frozen; a U-Net's self- and cross-attention) (groups: attention[, pos_embed])",
            "full")
def apply_attention(model: "nn.Module", options: NoOptions, family: str) -> "nn.Module":
    return train_groups(model, [g for g in ("attention", "pos_embed") if g in groups_of(family)], family)


@_selective("norm", ("unet",), "norm tuning: every normalisation layer's scale and shift train (a U-Net's GroupNorms "
            "and LayerNorms) (groups: norm)")
def apply_norm(model: "nn.Module", options: NoOptions, family: str) -> "nn.Module":
    return train_groups(model, ["norm"], family)


@_selective("batchnorm", ("resnet",), "BatchNorm tuning: every BatchNorm's scale and bias train (groups: norm)")
def apply_batchnorm(model: "nn.Module", options: NoOptions, family: str) -> "nn.Module":
    return train_groups(model, ["norm"], family)
