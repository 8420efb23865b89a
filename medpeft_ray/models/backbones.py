"""timm backbones and the loading of local pre-trained checkpoints (see :mod:`medpeft_ray.models.checkpoints`).

Nothing is downloaded: weights come from a local file named in ``model.checkpoint`` or the model
starts from random initialisation.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import torch
    from torch import nn

_FAMILIES = (("vit", re.compile(r"^(vit|deit3?)_")), ("resnet", re.compile(r"^(resnet|resnetv2_|wide_resnet)")))


def backbone_family(name: str) -> str | None:
    """``vit`` or ``resnet`` from a timm model name, without importing timm; None if neither."""
    for family, pattern in _FAMILIES:
        if pattern.match(name):
            return family
    return None


def check_backbone_name(name: str) -> None:
    """Raises :class:`ConfigError` (key ``model.backbone``) unless timm knows ``name`` as a ViT or ResNet."""
    import difflib

    import timm

    from medpeft_ray.errors import ConfigError

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError("model.backbone", f"unknown timm model {name!r}{hint}")
    if backbone_family(name) is None:
        raise ConfigError("model.backbone", f"{name!r} is not a supported timm ViT (vit_*, deit_*) or ResNet (resnet*) name")


def build_backbone(
    name: str,
    num_classes: int,
    image_size: int,
    checkpoint: str | Path | None = None,
    drop_path: float = 0.0,
) -> "nn.Module":
    """A timm classifier with a fresh ``num_classes`` head, optionally initialised from ``checkpoint``.

    ViTs use global average pooling of patch tokens, then ``fc_norm`` and ``head`` (as in MED-PEFT),
    and are built for ``image_size`` (position embeddings of a checkpoint are resized to it).
    """
    import timm

    family = backbone_family(name)
    kwargs: dict = {"num_classes": num_classes, "drop_path_rate": drop_path}
    if family == "vit":
        kwargs.update(img_size=image_size, global_pool="avg")
    else:
        # timm zeroes each residual branch's last BatchNorm scale; in a frozen backbone without
        # pre-trained weights that would block every gradient to adapters inside the branches
        kwargs.update(zero_init_last=False)
    model = timm.create_model(name, pretrained=False, **kwargs)
    if checkpoint is not None:
        load_checkpoint(model, Path(checkpoint))
    return model


def load_checkpoint(model: "nn.Module", path: Path) -> tuple[list[str], list[str]]:
    """Loads a pre-trained checkpoint into ``model`` the way MED-PEFT does, after checking it fits.

    :func:`medpeft_ray.models.checkpoints.match_checkpoint` (the pre-flight step's check) finds the
    file's layout and refuses a file that does not cover the backbone; the head is dropped when its
    shape differs and re-initialised (trunc normal, std 2e-5), ``pos_embed`` is resized to the
    model's grid.

    Returns:
        (missing, unexpected) keys: backbone and head tensors the file did not provide, and file
        tensors the model does not have.
    """
    import torch

    from medpeft_ray.models.checkpoints import match_checkpoint

    match = match_checkpoint(model, path)
    result = model.load_state_dict(match.state, strict=False)
    head = getattr(model, "head", None)
    if isinstance(head, torch.nn.Linear):
        torch.nn.init.trunc_normal_(head.weight, std=2e-5)
        torch.nn.init.zeros_(head.bias)
    return list(result.missing_keys), match.unexpected


def head_parameters(model: "nn.Module", family: str) -> Iterator["torch.nn.Parameter"]:
    """The classifier's parameters: ViT ``head`` and ``fc_norm``, ResNet ``fc``."""
    names = ("head", "fc_norm") if family == "vit" else ("fc",)
    for name in names:
        module = getattr(model, name, None)
        if module is not None:
            yield from module.parameters()
