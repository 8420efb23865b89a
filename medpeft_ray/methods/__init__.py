"""PEFT methods: ``prepare_model`` applies a registered method to a backbone.

Adding a method means writing one module that calls ``register_method`` and importing it below.
The registry is read without torch (the config validates method options, the CLI lists methods):
torch, timm and peft are imported inside the functions that build or change a model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from medpeft_ray.methods import additive, peft_family, prompts, reparam, selective  # noqa: F401  (registers the methods)
from medpeft_ray.methods.registry import MethodOptions, MethodSpec, get_method, list_methods, register_method
from medpeft_ray.models.backbones import build_backbone, check_backbone_name, head_parameters
from medpeft_ray.models.families import require_family

if TYPE_CHECKING:
    from torch import nn

__all__ = ["MethodOptions", "MethodSpec", "get_method", "list_methods", "register_method", "prepare_model",
           "count_parameters", "validate_options", "merge_method", "method_summaries", "method_lr_scales"]


def validate_options(method: str, options: dict[str, Any], family: str) -> MethodOptions:
    """``options`` parsed by the method's schema and checked against the backbone family.

    Raises:
        KeyError: an unknown method (listing the known ones).
        ValueError: the method does not apply to ``family``, or an option does not fit it.
    """
    spec = get_method(method)
    if family not in spec.families:
        raise ValueError(f"method {method!r} does not apply to {family} backbones (it applies to {sorted(spec.families)})")
    parsed = spec.options.model_validate(options)
    parsed.check_family(family)
    return parsed


def method_lr_scales(method: str, options: dict[str, Any], family: str) -> dict[str, float]:
    """The lr multipliers ``method`` with ``options`` asks of the optimizer (:meth:`MethodOptions.lr_scales`)."""
    return validate_options(method, options, family).lr_scales()


def prepare_model(model: "nn.Module", method: str, options: dict[str, Any], family: str) -> "nn.Module":
    """Freezes ``model``, applies ``method`` with ``options``, and makes the classifier head trainable.

    The head (the family's ``head`` modules: the classifier, and ViT's ``fc_norm``) trains under
    every method: a new task needs a new head.
    A BatchNorm layer left with no trainable parameter is frozen entirely: it normalises with
    its pre-trained running statistics in training too, and never updates them. Dropout and
    drop-path stay active in training under every method.
    """
    spec = get_method(method)
    parsed = validate_options(method, options, family)
    model.requires_grad_(False)
    model = spec.apply(model, parsed, family)
    for param in head_parameters(model, family):
        param.requires_grad_(True)
    _freeze_frozen_batchnorm(model)
    return model


def _keep_eval(module: "nn.Module", args: Any) -> None:
    module.training = False


def _freeze_frozen_batchnorm(model: "nn.Module") -> None:
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in module.parameters()):
            # engine.train() sets every module to training mode; this hook sets frozen ones back
            module.register_forward_pre_hook(_keep_eval)
            module.eval()


def merge_method(model: "nn.Module", method: str) -> "nn.Module":
    """The tuned model with the method folded into the backbone's weights: timm's own module tree.

    Raises:
        ValueError: the method adds computation that cannot be folded (adapters, prompts).
    """
    spec = get_method(method)
    if spec.merge is None:
        raise ValueError(f"method {method!r} cannot be merged into the backbone (mergeable: "
                         f"{', '.join(n for n in list_methods() if get_method(n).merge is not None)})")
    return spec.merge(model)


def count_parameters(model: "nn.Module") -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def method_summaries(backbone: str, num_classes: int = 14, image_size: int = 224,
                     methods: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every method that applies to ``backbone`` (or those of ``methods``, name -> options), with its
    trainable parameters under default options (or under those options).

    Models are built on the meta device: no memory, no weights, a second or two even for ViT-H.

    Raises:
        ConfigError: timm does not know ``backbone``, or no backbone family covers it.
    """
    import torch

    check_backbone_name(backbone)
    family = require_family(backbone).name
    rows = []
    chosen = methods if methods is not None else {name: {} for name in list_methods(family)}
    for name, options in chosen.items():
        spec = get_method(name)
        with torch.device("meta"):
            model = prepare_model(build_backbone(backbone, num_classes, image_size), name, dict(options), family)
        trainable, total = count_parameters(model)
        rows.append({
            "method": name, "backbone": backbone, "family": family, "task": require_family(backbone).task,
            "trainable_params": trainable, "total_params": total, "trainable_percent": 100.0 * trainable / total,
            "identity_at_init": spec.identity_at_init, "mergeable": spec.merge is not None, "peft_native": spec.peft_native,
            "options": dict(options), "searched": sorted(spec.space_for(family)), "description": spec.description,
        })
    return rows
