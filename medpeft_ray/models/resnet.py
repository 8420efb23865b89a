"""The ResNet family: timm ResNets (``resnet*``, ``resnetv2_*``, ``wide_resnet*``).

A ResNet is a stem (``conv1``, ``bn1``), four stages ``layer1``-``layer4`` of residual blocks
(``conv1``-``conv3`` with their BatchNorms, and a ``downsample`` on the first block of a stage)
and the classifier ``fc``. Block sets do not apply: methods act on every residual block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from medpeft_ray.models.families import BackboneFamily, register_family

if TYPE_CHECKING:
    from torch import nn


def create_options(image_size: int) -> dict[str, Any]:
    # timm zeroes each residual branch's last BatchNorm scale; in a frozen backbone without
    # pre-trained weights that would block every gradient to adapters inside the branches
    return {"zero_init_last": False}


def ops(model: "nn.Module", blocks: Sequence["nn.Module"]) -> list[tuple["nn.Module", int]]:
    from torch import nn

    # a convolution and its BatchNorm are one op, whose output is the BatchNorm's (channels first)
    return [(m, 1) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


RESNET = register_family(BackboneFamily(
    name="resnet",
    title="ResNet",
    name_forms="resnet*",
    model_names=r"(resnet|resnetv2_|wide_resnet)",
    example="resnet18",
    create_options=create_options,
    head=("fc",),
    stem=("conv1", "bn1"),
    # layer1-4 are stages 1-4; ResNetV2 names its blocks stages.S.blocks.B, and block B of
    # every stage takes depth B + 1
    depths=((r"(?:^|\.)blocks\.(\d+)\.", 1), (r"(?:^|\.)layer(\d+)\.", 0)),
    block_regex=r"layer\d+\.\d+",
    targets={"conv1": "conv1", "conv2": "conv2", "conv3": "conv3", "downsample": "downsample.0"},
    ops=ops,
))
