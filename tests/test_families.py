"""Backbone families: every registered family's description holds on a small model of the family.

The contract checks run on each family's ``example`` model, so a newly registered family is
checked without editing this file. A ConvNeXt family, registered only for one test, shows that
a registration alone is what the registry, layer decay and target resolution need.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from medpeft_ray.methods import list_methods, prepare_model
from medpeft_ray.methods.modules import output_channels
from medpeft_ray.methods.peft_family import split_qkv
from medpeft_ray.models import build_backbone, families
from medpeft_ray.models.families import (
    INDEX,
    BackboneFamily,
    family_of,
    family_of_model,
    get_family,
    list_families,
    register_family,
    require_family,
    unsupported_backbone,
)
from medpeft_ray.train import engine

FAMILIES = list_families()
#: the families timm builds: their descriptions are also checked against timm's own grouping and heads
TIMM_FAMILIES = [name for name in FAMILIES if get_family(name).timm]


def example(family: BackboneFamily) -> nn.Module:
    """The family's example model, small: 3 classes, 32 px, random weights (nothing is downloaded)."""
    torch.manual_seed(0)
    return build_backbone(family.example, num_classes=3, image_size=32)


def module_paths(model: nn.Module) -> dict[int, str]:
    return {id(module): path for path, module in model.named_modules()}


# ----------------------------------------------------------------------------------------------
# The contract, as checks any family's description must pass on its example model
# ----------------------------------------------------------------------------------------------


def check_layer_groups(family: BackboneFamily, model: nn.Module) -> None:
    """Every parameter has one depth: the stem 0, each block one depth, rising along the blocks,
    the head on top; and the grouping is timm's own (``group_matcher(coarse=True)``)."""
    from timm.models import group_parameters

    model.requires_grad_(True)
    ids, top = engine.layer_ids(model, family.name)
    names = [name for name, _ in model.named_parameters()]
    assert sorted(ids) == sorted(names), "every parameter gets exactly one depth"
    assert set(ids.values()) <= set(range(top + 1))
    stem = [name for name in names if name.split(".")[0] in family.stem]
    assert stem and all(ids[name] == 0 for name in stem), "the stem is depth 0"
    paths = module_paths(model)
    block_depths = []
    for block in family.blocks(model):
        depths = {ids[f"{paths[id(block)]}.{name}"] for name, _ in block.named_parameters()}
        assert len(depths) == 1, f"{paths[id(block)]}: one block, one depth"
        block_depths.append(depths.pop())
    assert block_depths == sorted(block_depths) and 0 < block_depths[0] and block_depths[-1] < top
    # timm numbers its groups from 0 without gaps, over all parameters: the same partition, in the same order
    timm_ids = group_parameters(model, model.group_matcher(coarse=True), reverse=True)
    pairs = {(timm_ids[name], ids[name]) for name in names}
    assert len(pairs) == len({t for t, _ in pairs}) == len({d for _, d in pairs}), "the same groups as timm's"
    assert [d for _, d in sorted(pairs)] == sorted(d for _, d in pairs), "in timm's order"


def check_head(family: BackboneFamily, model: nn.Module) -> None:
    """The head modules exist, hold timm's classifier, and sit above the last block."""
    head = {id(p) for name in family.head for p in getattr(model, name).parameters()}
    classifier = model.get_classifier()
    classifiers = classifier if isinstance(classifier, tuple) else (classifier,)
    assert {id(p) for module in classifiers for p in module.parameters()} <= head
    assert all(family.depth_of(name) is None for name, p in model.named_parameters() if id(p) in head)


def check_blocks_and_targets(family: BackboneFamily, model: nn.Module) -> None:
    """Blocks match ``block_regex`` (by index where block sets apply); the attention, the MLP and
    every op resolve; each target regex selects exactly that target in the chosen blocks."""
    blocks = family.blocks(model)
    assert blocks, "the family finds its blocks"
    paths = module_paths(model)
    for index, block in enumerate(blocks):
        assert re.fullmatch(family.block_regex.replace(INDEX, str(index)), paths[id(block)])
        for part in ("attention", "mlp"):
            assert len(family.part_modules(block, part)) == len(family.part_paths(part))
    model_modules = {id(m) for m in model.modules()}
    if family.timm:  # per-channel feature methods (SSF) follow the ops of timm families only
        ops = family.ops(model, blocks)
        assert ops
        for op, channel_dim in ops:
            assert id(op) in model_modules and channel_dim in (1, -1)
            assert output_channels(op) > 0
    split_qkv(model)  # q, k and v targets exist once the fused qkv is split, as peft methods do
    chosen = [0, len(blocks) - 1] if family.block_sets else None
    chosen_blocks = [blocks[i] for i in chosen] if chosen is not None else blocks
    resolved = []
    for target in family.targets:
        # a target may be missing from some models (a ResNet-18's basic blocks have no conv3)
        found = {f"{paths[id(b)]}.{path}" for b in chosen_blocks for path in family.target_paths(target) if _has(b, path)}
        resolved += found
        regex = family.targets_regex([target], chosen)
        assert {name for name, _ in model.named_modules() if re.fullmatch(regex, name)} == found, target
    assert resolved, "the example has targets"


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Every registered family
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TIMM_FAMILIES)
def test_family_owns_its_names(name: str) -> None:
    import timm

    family = get_family(name)
    assert timm.is_model(family.example)
    assert family_of(family.example) is family and require_family(family.example) is family
    owned = [n for n in timm.list_models() if family.owns(n)]
    assert owned and all(family_of(n) is family for n in owned), "no timm name belongs to two families"
    assert family.label in unsupported_backbone("efficientnet_b0")


@pytest.mark.parametrize("name", TIMM_FAMILIES)
def test_layer_groups(name: str) -> None:
    check_layer_groups(get_family(name), example(get_family(name)))


@pytest.mark.parametrize("name", TIMM_FAMILIES)
def test_head_is_the_classifier(name: str) -> None:
    check_head(get_family(name), example(get_family(name)))


@pytest.mark.parametrize("name", FAMILIES)
def test_blocks_targets_and_ops_resolve(name: str) -> None:
    check_blocks_and_targets(get_family(name), example(get_family(name)))


@pytest.mark.parametrize("name", TIMM_FAMILIES)
def test_the_model_tells_its_family(name: str) -> None:
    family = get_family(name)
    model = example(family)
    assert family_of_model(model) is family
    assert engine.layer_ids(model) == engine.layer_ids(model, name)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_method_of_the_family_applies(name: str) -> None:
    family = get_family(name)
    assert list_methods(name), f"no method applies to {name} backbones"
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        backbone = build_backbone(family.example, 3, 32)
    for method in list_methods(name):
        model = prepare_model(copy.deepcopy(backbone), method, {}, name)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        head = {f"{module}.{n}" for module in family.head for n, _ in getattr(model, module).named_parameters()}
        assert head <= trainable, method
        ids, top = engine.layer_ids(model, name)
        assert set(ids) == trainable and max(ids.values()) == top, method


def test_the_unet_family_owns_only_its_built_in_names() -> None:
    import timm

    unet = get_family("unet")
    assert not unet.timm and unet.task == "generation"
    assert [n for n in timm.list_models() if unet.owns(n)] == []
    assert all(unet.owns(name) for name in ("unet_tiny", "unet_sd15")) and not unet.owns("unet_tiny2")
    assert "nor a diffusion U-Net (unet_tiny, unet_sd15)" in unsupported_backbone("efficientnet_b0")


# ----------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------


def test_registry_refuses_a_second_family_of_a_name_or_of_the_same_models() -> None:
    vit = get_family("vit")
    with pytest.raises(ValueError, match="'vit' is registered twice"):
        register_family(vit)
    with pytest.raises(ValueError, match="'vit_tiny_patch16_224' already belongs to 'vit'"):
        register_family(BackboneFamily(**{**vit.__dict__, "name": "vit2"}))
    with pytest.raises(ValueError, match="is not one of its names"):
        register_family(BackboneFamily(**{**vit.__dict__, "name": "vit3", "example": "resnet18"}))
    with pytest.raises(KeyError, match="unknown backbone family 'swin'; known: vit, resnet"):
        get_family("swin")
    assert family_of("efficientnet_b0") is None
    with pytest.raises(ValueError, match=re.escape(
            "'efficientnet_b0' is not a supported timm ViT (vit_*, deit_*) or ResNet (resnet*) name")):
        require_family("efficientnet_b0")
    with pytest.raises(ValueError, match="cannot tell the backbone family of a Linear"):
        family_of_model(nn.Linear(2, 2))


def _convnext() -> BackboneFamily:
    """A ConvNeXt family: a stem, four stages of blocks (depthwise conv, norm, MLP), ``head``."""

    def ops(model: nn.Module, blocks: list[nn.Module]) -> list[tuple[nn.Module, int]]:
        return [(model.stem[0], 1)] + [(block.conv_dw, 1) for block in blocks]

    return BackboneFamily(
        name="convnext", title="ConvNeXt", name_forms="convnext_*", model_names=r"convnext_", example="convnext_atto",
        create_options=lambda image_size: {}, head=("head",), stem=("stem",), depths=((r"^stages\.(\d+)\.", 1),),
        block_regex=r"stages\.\d+\.blocks\.\d+", targets={"fc1": "mlp.fc1", "fc2": "mlp.fc2"}, ops=ops, mlp="mlp",
    )


def test_a_new_family_is_one_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(families, "_FAMILIES", dict(families._FAMILIES))
    convnext = register_family(_convnext())
    assert family_of("convnext_tiny") is convnext and list_families() == [*FAMILIES, "convnext"]
    assert "or ResNet (resnet*) or ConvNeXt (convnext_*) name, nor a diffusion U-Net" in unsupported_backbone("x")
    model = example(convnext)
    assert family_of_model(model) is convnext
    check_layer_groups(convnext, model)
    check_head(convnext, model)
    check_blocks_and_targets(convnext, model)
    ids, top = engine.layer_ids(model)
    assert top == 5 and ids["stem.0.weight"] == 0 and ids["head.fc.weight"] == 5
    assert ids["stages.0.blocks.0.conv_dw.weight"] == 1 and ids["stages.3.blocks.1.mlp.fc2.weight"] == 4
