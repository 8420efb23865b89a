"""The one registry of PEFT methods.

A method is one function that makes a frozen backbone's chosen parameters trainable (or adds new
trainable modules), registered with its option schema, the backbone families it applies to, its
default search ranges and what it promises (output unchanged at initialisation, mergeable into
the backbone, saved in peft's adapter format). Importing this module touches no torch, so configs
validate fast; the ``apply`` functions import torch/peft when they run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from torch import nn


class MethodOptions(BaseModel):
    """Base of every method's options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    def check_family(self, family: str) -> None:
        """Raises ValueError naming the option when a value does not fit ``family`` backbones.

        Called at config validation, before any model is built.
        """

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers the method asks for, by a regex over trainable parameter names.

        The optimizer trains a matching parameter at ``lr x scale`` (LoRA+ trains the B matrices
        faster than the A matrices); the others at ``lr``. The first matching regex decides.
        """
        return {}


ApplyFn = Callable[["nn.Module", Any, str], "nn.Module"]
MergeFn = Callable[["nn.Module"], "nn.Module"]

#: Default learning-rate ranges, by optimizer and by the kind of parameters a method trains.
#: With AdamW, PEFT methods prefer ~10x higher learning rates than full fine-tuning (Dutt et al.),
#: linear probing higher still; a method that trains a large share of the backbone (attention
#: tuning: a third of ViT-B) behaves like full fine-tuning. Scaling vectors and prompts (IA3,
#: VeRA, VPT, prefixes) get a range of their own that reaches down to 1e-4 and stops at 3e-2,
#: where AdamW's normalised steps already move a unit-scale vector by several percent per step.
#: SGD's steps are not normalised by the gradient's size, so its useful rates sit 10-100x above
#: AdamW's: MED-PEFT's MRM recipe (SGD, momentum 0.9) trains LoRA at 0.05-0.2.
LR_RANGES: dict[str, dict[str, dict[str, Any]]] = {
    "adamw": {
        "full": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
        "peft": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "linear": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
        "scaling": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
    },
    "sgd": {
        "full": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
        "peft": {"type": "float", "low": 1e-3, "high": 5e-1, "log": True},
        "linear": {"type": "float", "low": 1e-2, "high": 1.0, "log": True},
        "scaling": {"type": "float", "low": 3e-3, "high": 1.0, "log": True},
    },
}
LR_KINDS = tuple(LR_RANGES["adamw"])


def lr_range(kind: str, optimizer: str = "adamw") -> dict[str, Any]:
    """The default ``lr`` distribution of a method whose parameters are of ``kind``, under ``optimizer``."""
    return dict(LR_RANGES[optimizer][kind])


@dataclass(frozen=True)
class MethodSpec:
    """What the registry knows about one method.

    Attributes:
        name: the name used in YAML (``method.name``).
        apply: ``apply(model, options, family) -> model``; called on a fully frozen backbone, it
            makes the method's parameters trainable. The classifier head is made trainable after
            it by :func:`medpeft_ray.methods.prepare_model`, for every method.
        options: pydantic model of the method's options, with defaults.
        families: names of the backbone families (``vit``, ``resnet``; see
            :mod:`medpeft_ray.models.families`) the method applies to; ``apply`` finds the blocks
            and the layers it attaches to in the family's description.
        default_space: search ranges used when a YAML has no ``space`` section
            (see :meth:`space_for`).
        description: one line for listings.
        identity_at_init: the adapted model computes exactly what the backbone did until the
            first update (zero-initialised updates, identity scales).
        merge: folds the trained method into the backbone's own weights and returns a model with
            timm's plain module tree (None: the method adds computation that cannot be folded).
        peft_native: applied through peft; checkpoints also hold peft's adapter format.
        family_space: ranges added to ``default_space`` for one family (the tuned-layer choices
            of a ViT differ from a ResNet's).
        lr: the kind of the default ``lr`` range (:data:`LR_RANGES`: ``full``, ``peft``, ``linear``,
            ``scaling``); its values depend on the optimizer (:meth:`space_for`).
        compute_dtype_buffers: a regex of the method's buffers that run in the trial's compute
            dtype under bf16/fp16 (DeepSpeed casts parameters only; the method's other buffers
            stay as they are, e.g. SV-Diff's singular values in fp32). See
            :func:`medpeft_ray.train.precision.fit_buffers`.
    """

    name: str
    apply: ApplyFn
    options: type[MethodOptions]
    families: frozenset[str]
    default_space: dict[str, dict[str, Any]] = field(default_factory=dict)
    description: str = ""
    identity_at_init: bool = False
    merge: MergeFn | None = None
    peft_native: bool = False
    family_space: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    lr: str = "peft"
    compute_dtype_buffers: str = ""

    def space_for(self, family: str, optimizer: str = "adamw") -> dict[str, dict[str, Any]]:
        """The default search ranges on a ``family`` backbone trained with ``optimizer`` (``adamw``, ``sgd``)."""
        return {"lr": lr_range(self.lr, optimizer), **self.default_space, **self.family_space.get(family, {})}


_METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    *,
    options: type[MethodOptions],
    families: tuple[str, ...],
    default_space: dict[str, dict[str, Any]] | None = None,
    description: str = "",
    identity_at_init: bool = False,
    merge: MergeFn | None = None,
    peft_native: bool = False,
    family_space: dict[str, dict[str, dict[str, Any]]] | None = None,
    lr: str = "peft",
    compute_dtype_buffers: str = "",
) -> Callable[[ApplyFn], ApplyFn]:
    """Decorator that registers ``apply`` under ``name`` (see :class:`MethodSpec` for the arguments)."""

    def decorate(apply: ApplyFn) -> ApplyFn:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        if lr not in LR_KINDS or "lr" in (default_space or {}):
            raise ValueError(f"method {name!r}: give its lr range as lr= one of {', '.join(LR_KINDS)}")
        _METHODS[name] = MethodSpec(
            name, apply, options, frozenset(families), dict(default_space or {}), description,
            identity_at_init, merge, peft_native, dict(family_space or {}), lr, compute_dtype_buffers,
        )
        return apply

    return decorate


def get_method(name: str) -> MethodSpec:
    """The spec of ``name``; an unknown name raises ``KeyError`` listing the known ones."""
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(_METHODS))}") from None


def list_methods(family: str | None = None) -> list[str]:
    """Registered method names, optionally only those applying to a backbone family."""
    return sorted(n for n, s in _METHODS.items() if family is None or family in s.families)
