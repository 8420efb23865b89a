"""timm backbones and the loading of local pre-trained checkpoints (see :mod:`medpeft_ray.models.checkpoints`).

How a backbone is built and which modules are its head come from its family
(:mod:`medpeft_ray.models.families`). Nothing is downloaded: weights come from a local file named
in ``model.checkpoint`` or the model starts from random initialisation.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from medpeft_ray.errors import ConfigError
from medpeft_ray.models.checkpoints import match_checkpoint
from medpeft_ray.models.families import family_of, get_family, require_family, unsupported_backbone

if TYPE_CHECKING:
    import torch
    from torch import nn


def backbone_family(name: str) -> str | None:
    """The name of the family (``vit``, ``resnet``) of a timm model name, without importing timm; None if none."""
    family = family_of(name)
    return None if family is None else family.name


def check_backbone_name(name: str) -> None:
    """Raises :class:`ConfigError` (key ``model.backbone``) unless timm knows ``name`` and a family covers it.

    A name may carry timm's pretrained tag (``vit_huge_patch14_224.orig_in21k``); it must be one timm
    lists. The tag only names the weights: they still come from ``model.checkpoint``, never a hub.
    """
    family = family_of(name)
    if family is not None and not family.timm:
        return  # the family's own names (its regex matched the whole name)
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError("model.backbone", f"unknown timm model {name!r}{hint}")
    architecture, _, tag = name.partition(".")
    # timm.is_model ignores the tag (``vit_huge_patch14_224.orig_in21k``), create_model does not
    if tag and name not in timm.list_pretrained(f"{architecture}.*"):
        known = [n.partition(".")[2] for n in timm.list_pretrained(f"{architecture}.*")]
        raise ConfigError("model.backbone", f"timm has no weights tagged {tag!r} for {architecture} "
                                            f"(known tags: {', '.join(known) or 'none'})")
    if family_of(name) is None:
        raise ConfigError("model.backbone", unsupported_backbone(name))


def build_backbone(
    name: str,
    num_classes: int,
    image_size: int,
    checkpoint: str | Path | None = None,
    drop_path: float = 0.0,
) -> "nn.Module":
    """A timm classifier with a fresh ``num_classes`` head, optionally initialised from ``checkpoint``.

    The family adds its own ``timm.create_model`` options (``create_options``): ViTs use global
    average pooling of patch tokens, then ``fc_norm`` and ``head`` (as in MED-PEFT), and are built
    for ``image_size`` (position embeddings of a checkpoint are resized to it).

    Raises:
        ValueError: no family covers ``name``.
    """
    family = require_family(name)
    if family.build is not None:
        return family.build(name, num_classes, image_size, None if checkpoint is None else Path(checkpoint), drop_path)
    import timm

    kwargs: dict = {"num_classes": num_classes, "drop_path_rate": drop_path}
    kwargs.update(family.create_options(image_size))
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

    match = match_checkpoint(model, path)
    result = model.load_state_dict(match.state, strict=False)
    head = getattr(model, "head", None)
    if isinstance(head, torch.nn.Linear):
        torch.nn.init.trunc_normal_(head.weight, std=2e-5)
        torch.nn.init.zeros_(head.bias)
    return list(result.missing_keys), match.unexpected


def head_parameters(model: "nn.Module", family: str) -> Iterator["torch.nn.Parameter"]:
    """The parameters of the family's head modules: ViT ``head`` and ``fc_norm``, ResNet ``fc``."""
    for name in get_family(family).head:
        module = getattr(model, name, None)
        if module is not None:
            yield from module.parameters()
