"""The registry of backbone families: how each kind of timm backbone is built, grouped and adapted.

A family is described once, by its own module (:mod:`medpeft_ray.models.vit`,
:mod:`medpeft_ray.models.resnet`), and registered under the name methods list in
``families=(...)``. The rest of the package asks the description instead of testing names: which
timm models belong to the family, how to build them, which modules are the classifier, the depth
of each parameter for layer-wise lr decay, where the blocks are and what methods attach to inside
them.

Importing this module touches neither torch nor timm (configs validate fast); the callables of a
description import torch when they run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

if TYPE_CHECKING:
    from torch import nn

#: where a block's index stands in :attr:`BackboneFamily.block_regex`
INDEX = "{index}"

#: ``ops(model, blocks) -> [(layer, channel dim of its output), ...]``
OpsFn = Callable[["nn.Module", Sequence["nn.Module"]], list[tuple["nn.Module", int]]]


@dataclass(frozen=True)
class BackboneFamily:
    """What the package needs to know about one family of timm backbones.

    Attributes:
        name: the registry key (``vit``), the name methods list in ``families=(...)``.
        title: how messages name the family (``ViT``).
        name_forms: the timm names it covers, as messages show them (``vit_*, deit_*``).
        model_names: regex matched at the start of a timm model name; families' names are disjoint.
        example: a small timm model of the family; tests check this description on it.
        create_options: ``create_options(image_size)``: ``timm.create_model`` arguments besides the
            number of classes and the drop-path rate.
        head: top-level modules that train under every method: the classifier
            (timm's ``get_classifier()``) and modules that belong with it.
        stem: top-level names of what comes before the first block: depth 0 in layer-wise lr decay.
        depths: ``(regex, offset)`` pairs tried in order on a parameter's name (searched, not
            anchored): the first that matches gives depth ``int(group 1) + offset``. A name none
            matches and outside the stem sits above the last block (final norm, head, a method's
            shared modules): the top depth.
        block_regex: full-match regex of the blocks' module paths, where ``{index}`` stands for
            a block's index if block sets can choose blocks; peft target regexes start with it.
        targets: what peft methods can target inside a block, by the option's name (in the order
            options list them), with the module path under the block (or the paths, for a target
            found in several places of a block).
        ops: ``ops(model, blocks)``: the layers whose outputs carry the features, in forward order,
            with the dimension of their channels (-1 for tokens, 1 for NCHW maps): the stem, the
            ops of ``blocks`` and what follows the last block. Per-channel methods (SSF) follow each.
        attention: path of a block's attention module under the block, or the paths of its
            attention modules (a U-Net block's self- and cross-attention); None: the family has none.
        mlp: path of a block's MLP under the block (None: the family has none).
        task: what its models do: ``classification`` (timm classifiers) or ``generation``
            (a diffusion pipeline's denoiser); a search's ``task`` must match its backbone's.
        build: ``build(name, num_classes, image_size, checkpoint, drop_path) -> nn.Module`` for a
            family that timm does not build (None: ``timm.create_model`` with ``create_options``).
    """

    name: str
    title: str
    name_forms: str
    model_names: str
    example: str
    create_options: Callable[[int], dict[str, Any]]
    head: tuple[str, ...]
    stem: tuple[str, ...]
    depths: tuple[tuple[str, int], ...]
    block_regex: str
    targets: Mapping[str, str | tuple[str, ...]]
    ops: OpsFn
    attention: str | tuple[str, ...] | None = None
    mlp: str | None = None
    task: str = "classification"
    build: Callable[..., "nn.Module"] | None = None

    @property
    def label(self) -> str:
        """``ViT (vit_*, deit_*)``: the family and its names, for messages."""
        return f"{self.title} ({self.name_forms})"

    @property
    def block_sets(self) -> bool:
        """Whether block sets (``blocks`` options) choose among the blocks: where blocks have an index."""
        return INDEX in self.block_regex

    @property
    def timm(self) -> bool:
        """Whether timm builds the family's models (a diffusion U-Net is built by diffusers)."""
        return self.build is None

    def part_paths(self, part: str) -> tuple[str, ...]:
        """The paths under a block of its ``attention`` or ``mlp`` modules (none where the family has none)."""
        paths = getattr(self, part)
        return () if paths is None else (paths,) if isinstance(paths, str) else tuple(paths)

    def part_modules(self, block: "nn.Module", part: str) -> list["nn.Module"]:
        """A block's ``attention`` or ``mlp`` modules."""
        return [block.get_submodule(path) for path in self.part_paths(part)]

    def owns(self, backbone: str) -> bool:
        """Whether the timm model name ``backbone`` belongs to this family."""
        return re.match(self.model_names, backbone) is not None

    def depth_of(self, parameter: str) -> int | None:
        """A parameter's depth for layer-wise lr decay: 0 the stem, then the blocks; None above the last block."""
        for pattern, offset in self.depths:
            match = re.search(pattern, parameter)
            if match:
                return int(match.group(1)) + offset
        if parameter.split(".")[0] in self.stem:
            return 0
        return None

    def blocks(self, model: "nn.Module") -> list["nn.Module"]:
        """The model's blocks in forward order (a block's position is its index in a block set)."""
        pattern = re.compile(self.block_regex.replace(INDEX, r"\d+"))
        return [module for path, module in model.named_modules() if pattern.fullmatch(path)]

    def targets_regex(self, targets: Sequence[str], indices: Sequence[int] | None = None) -> str:
        """A full-match regex over module names selecting ``targets`` (option names) in the chosen blocks.

        ``indices``: the chosen blocks where the family has block sets (None, or no block sets: every block).
        """
        chosen = r"\d+" if indices is None else "(?:" + "|".join(str(i) for i in indices) + ")"
        blocks = self.block_regex.replace(INDEX, chosen)
        paths = "|".join(path.replace(".", r"\.") for name in targets for path in self.target_paths(name))
        return rf"{blocks}\.(?:{paths})"

    def target_paths(self, target: str) -> tuple[str, ...]:
        """The module paths under a block of one target (a U-Net's ``to_q`` is in both its attentions)."""
        paths = self.targets[target]
        return (paths,) if isinstance(paths, str) else tuple(paths)


_FAMILIES: dict[str, BackboneFamily] = {}


def register_family(family: BackboneFamily) -> BackboneFamily:
    """Adds ``family`` to the registry; its name and model names must be new."""
    if family.name in _FAMILIES:
        raise ValueError(f"backbone family {family.name!r} is registered twice")
    if not family.owns(family.example):
        raise ValueError(f"backbone family {family.name!r}: its example {family.example!r} is not one of its names")
    for other in _FAMILIES.values():
        if other.owns(family.example):
            raise ValueError(f"backbone family {family.name!r}: {family.example!r} already belongs to {other.name!r}")
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> BackboneFamily:
    """The family registered as ``name``; an unknown name raises ``KeyError`` listing the known ones."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown backbone family {name!r}; known: {', '.join(_FAMILIES)}") from None


def list_families() -> list[str]:
    """Registered family names, in registration order."""
    return list(_FAMILIES)


def family_of(backbone: str) -> BackboneFamily | None:
    """The family a timm model name belongs to (None: no registered family), without importing timm."""
    for family in _FAMILIES.values():
        if family.owns(backbone):
            return family
    return None


def unsupported_backbone(backbone: str) -> str:
    """The message for a timm name no family covers, listing what every family covers."""
    timm_labels = [f.label for f in _FAMILIES.values() if f.timm]
    others = [f.label for f in _FAMILIES.values() if not f.timm]
    return (f"{backbone!r} is not a supported timm {' or '.join(timm_labels)} name"
            + (f", nor a {' or '.join(others)}" if others else ""))


def require_family(backbone: str) -> BackboneFamily:
    """The family of ``backbone``; ``ValueError`` (:func:`unsupported_backbone`) if none covers it."""
    family = family_of(backbone)
    if family is None:
        raise ValueError(unsupported_backbone(backbone))
    return family


def family_of_model(model: "nn.Module") -> BackboneFamily:
    """The family of a model timm built, from the model name timm records in its ``pretrained_cfg``."""
    config = getattr(model, "pretrained_cfg", None)
    architecture = config.get("architecture") if isinstance(config, Mapping) else None
    family = family_of(architecture) if isinstance(architecture, str) else None
    if family is None:
        raise ValueError(
            f"cannot tell the backbone family of a {type(model).__name__} (timm architecture {architecture!r})"
        )
    return family
