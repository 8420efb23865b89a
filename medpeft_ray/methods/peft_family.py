"""The LoRA family through peft: LoRA, DoRA, LoHa, LoKr, IA3, OFT, BOFT, VeRA (ViT), and LoRA on ResNet convolutions.

Targets are named by the backbone family (:attr:`BackboneFamily.targets`: q, k, v, proj, fc1, fc2
in a ViT block; conv1-3 and downsample in a ResNet block) and chosen over a block set where the
family has them. timm fuses Q, K and V into one ``attn.qkv`` Linear, and peft on it adapts all
three together. MED-PEFT adapts Q and V only, each with its own rank-r update, so before peft
runs every fused qkv layer is split into ``attn.qkv.{q,k,v}`` Linears (:func:`split_qkv`; same
outputs, merged back by :func:`fuse_qkv`). peft's ``layers_to_transform`` does not understand
timm's root-level ``blocks.N`` names, so blocks are selected in the ``target_modules`` regex instead.
"""

from __future__ import annotations

import re
import warnings
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from medpeft_ray.methods.export import keep_initial_factors
from medpeft_ray.methods.layers import BlockOptions, chosen_blocks, parse_name_set
from medpeft_ray.methods.registry import register_method
from medpeft_ray.models.families import get_family

if TYPE_CHECKING:
    from torch import nn

#: searched when a YAML has no space: the tuned-layer set is first-class, next to lr and rank
_TARGET_CHOICES = {
    "vit": {"targets": {"type": "categorical", "choices": ["q,v", "q,k,v", "q,k,v,proj,fc1,fc2"]}},
    "resnet": {"targets": {"type": "categorical", "choices": ["conv2", "conv1,conv2,conv3"]}},
    "unet": {"targets": {"type": "categorical", "choices": ["to_k,to_v", "to_q,to_k,to_v,to_out"]}},
}


class PeftOptions(BlockOptions):
    """Options every peft method shares: which projections of which blocks it adapts."""

    #: the targets when the YAML names none, per backbone family
    #: (a U-Net's: diffusers' own text-to-image LoRA recipe, both attentions' projections)
    default_targets: ClassVar[dict[str, list[str]]] = {"vit": ["q", "v"], "resnet": ["conv1", "conv2", "conv3"],
                                                       "unet": ["to_q", "to_k", "to_v", "to_out"]}

    targets: list[str] | None = Field(
        None, description="ViT: among q, k, v, proj, fc1, fc2 [q, v]; ResNet: among conv1, conv2, conv3, downsample "
                          "[conv1-3]; diffusion U-Net: among to_q, to_k, to_v, to_out, ff [to_q, to_k, to_v, to_out]"
    )

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, value: Any) -> list[str] | None:
        return None if value is None else parse_name_set(value)

    def check_family(self, family: str) -> None:
        super().check_family(family)
        try:
            self.target_names(family)
        except ValueError as exc:
            raise ValueError(f"targets: {exc}") from None

    def target_names(self, family: str) -> list[str]:
        """The chosen targets, in canonical order; raises ValueError for names the family lacks."""
        known = tuple(get_family(family).targets)
        return parse_name_set(self.targets or self.default_targets[family], known)


#: ``init`` -> peft's ``init_lora_weights`` (``default`` is peft's ``True``: the reference LoRA's init)
LORA_INITS: dict[str, bool | str] = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}
#: initialisations that move a part of each adapted weight into the adapter: the base weight
#: becomes the residual W - s B0 A0 (peft changes the trial's copy of the backbone, never the pristine one)
RESIDUAL_INITS = ("pissa", "olora")
#: a LoRA B matrix's parameter name (LoRA+ trains these at lr_ratio x lr)
LORA_B_PARAMETER = r"\.lora_B\."


class LoraOptions(PeftOptions):
    rank: int = Field(8, ge=1, le=1024, description="rank r of each update")
    alpha: float = Field(32.0, gt=0, description="scaling alpha (update scaled by alpha / r)")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the adapter input")
    rslora: bool = Field(False, description="rank-stabilised LoRA (Kalajdzievski 2023): update scaled by alpha / sqrt(r) "
                                            "instead of alpha / r (peft's use_rslora)")
    init: Literal["default", "gaussian", "pissa", "olora"] = Field(
        "default", description="initialisation, peft's init_lora_weights: default (peft's True: A Kaiming-uniform, "
                               "B zero), gaussian (A ~ N(0, 1/r), B zero), pissa (A, B from the top r singular values "
                               "and vectors of W, full SVD; the base weight becomes the residual), olora (A, B from "
                               "W's QR factorisation; the same residual); ViT only for pissa and olora")
    lr_ratio: float = Field(1.0, ge=1, description="LoRA+ (Hayou et al. 2024): the B matrices' lr over the A matrices' "
                                                   "(1: plain LoRA; the paper recommends 16)")

    def check_family(self, family: str) -> None:
        super().check_family(family)
        if self.init in RESIDUAL_INITS and family == "resnet":
            raise ValueError(f"init: {self.init} applies to ViT backbones only (peft has no PiSSA or OLoRA for "
                             "convolutions); use default or gaussian")
        if self.init in RESIDUAL_INITS and family == "unet":
            raise ValueError(f"init: {self.init} applies to ViT backbones only (a U-Net's LoRA is exported in "
                             "diffusers' format for the pipeline's own U-Net, not for its residual weights); use "
                             "default or gaussian")

    def lr_scales(self) -> dict[str, float]:
        return {LORA_B_PARAMETER: self.lr_ratio} if self.lr_ratio != 1 else {}


class LohaOptions(PeftOptions):
    rank: int = Field(8, ge=1, le=1024, description="rank of each Hadamard factor")
    alpha: float = Field(8.0, gt=0, description="scaling alpha (update scaled by alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="rank dropout")


class LokrOptions(PeftOptions):
    rank: int = Field(8, ge=1, le=1024, description="rank of the low-rank Kronecker factor")
    alpha: float = Field(8.0, gt=0, description="scaling alpha (update scaled by alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="rank dropout")


class Ia3Options(PeftOptions):
    default_targets: ClassVar[dict[str, list[str]]] = {"vit": ["k", "v", "fc2"]}

    targets: list[str] | None = Field(None, description="among q, k, v, proj, fc1, fc2 [k, v, fc2]; fc2's input is scaled")


class OftOptions(PeftOptions):
    block_size: int = Field(32, ge=2, le=1024, description="size of the orthogonal blocks (divides the layer width)")
    dropout: float = Field(0.0, ge=0, lt=1, description="module dropout")
    # OFT's rotations are the exact Cayley transform (I - Q)(I + Q)^-1 of a skew matrix Q, as in
    # the OFT paper; peft defaults to a truncated Neumann series of the inverse, which is faster
    # but only approximately orthogonal once Q has grown
    cayley: Literal["exact", "neumann"] = Field("exact", description="exact Cayley transform or peft's Neumann approximation")
    neumann_terms: int = Field(5, ge=1, le=32, description="terms of the Neumann series (cayley: neumann)")


class BoftOptions(PeftOptions):
    """BOFT: OFT's block-diagonal rotation composed with ``butterfly_factor - 1`` butterfly permutations."""

    block_size: int = Field(4, ge=0, le=1024, description="size of each orthogonal block (0: set by block_num)")
    block_num: int = Field(0, ge=0, le=4096, description="blocks per layer (0: set by block_size); give one of the two")
    butterfly_factor: int = Field(1, ge=1, le=12, description="butterfly factors (1: plain block-diagonal OFT)")
    dropout: float = Field(0.0, ge=0, lt=1, description="multiplicative dropout: whole blocks set to identity")

    @model_validator(mode="after")
    def _one_of_size_and_num(self) -> "BoftOptions":
        if (self.block_size == 0) == (self.block_num == 0):
            raise ValueError("give exactly one of block_size and block_num (the other 0): size x num is the layer width")
        return self


class VeraOptions(PeftOptions):
    rank: int = Field(256, ge=1, le=4096, description="rank of the shared frozen random projections")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")
    d_initial: float = Field(0.1, gt=0, description="initial value of the trainable d scaling vector")


# ----------------------------------------------------------------------------------------------
# ViT qkv split
# ----------------------------------------------------------------------------------------------


def split_qkv(model: "nn.Module") -> "nn.Module":
    """Replaces every fused ``qkv`` Linear (a ViT block's ``attn.qkv``) by :class:`SplitQKV` (same outputs).

    A model without one (a ResNet) is returned as it is. A peft adapter saved by medpeft_ray loads
    onto ``split_qkv(backbone)``.
    """
    from torch import nn

    from medpeft_ray.methods.modules import SplitQKV

    for module in list(model.modules()):
        fused = module._modules.get("qkv")
        if isinstance(fused, nn.Linear):
            module.qkv = SplitQKV.from_fused(fused)
    return model


def fuse_qkv(model: "nn.Module") -> "nn.Module":
    """Undoes :func:`split_qkv`: timm's fused ``qkv`` Linears again, with the (merged) weights."""
    from medpeft_ray.methods.modules import SplitQKV

    for module in list(model.modules()):
        split = module._modules.get("qkv")
        if isinstance(split, SplitQKV):
            module.qkv = split.fused()
    return model


# ----------------------------------------------------------------------------------------------
# Applying a peft config
# ----------------------------------------------------------------------------------------------


def target_regex(model: "nn.Module", options: PeftOptions, family: str, names: list[str] | None = None) -> str:
    """A full-match regex over module names selecting the chosen targets of the chosen blocks."""
    names = names if names is not None else options.target_names(family)
    described = get_family(family)
    indices = [i for i, _ in chosen_blocks(model, options, family)] if described.block_sets else None
    return described.targets_regex(names, indices)


def inject(model: "nn.Module", config: Any, family: str) -> "nn.Module":
    """Injects a peft adapter into ``model`` in place, keeping timm's module tree and names."""
    from peft import PeftType, inject_adapter_in_model

    split_qkv(model)  # q, k and v become targets of their own
    if config.peft_type == PeftType.VERA:
        # VeRA's frozen random projections are shared state that only its tuner class sets up;
        # the layers keep references to them, so the model works on its own afterwards.
        from peft.tuners.vera import VeraModel

        VeraModel(model, config, "default")
        model.peft_config = {"default": config}  # type: ignore[assignment]
        return model
    # inject_adapter_in_model leaves only the adapter trainable; no PeftModel wrapper sits
    # between the trainer and timm's forward.
    return inject_adapter_in_model(config, model)


def merge_peft(model: "nn.Module") -> "nn.Module":
    """Folds every peft adapter into its base layer and returns timm's plain module tree."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    replaced: list[str] = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, BaseTunerLayer) or any(name.startswith(r + ".") for r in replaced):
            continue
        module.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
        replaced.append(name)
    model.__dict__.pop("peft_config", None)
    return fuse_qkv(model)


def _peft(name: str, options: type[PeftOptions], description: str, space: dict[str, dict], families=("vit",),  # noqa: ANN001, ANN202
          layer_choices: bool = True, lr: str = "peft", compute_dtype_buffers: str = ""):
    return register_method(
        name, options=options, families=families, default_space=space, description=description, lr=lr,
        identity_at_init=True, merge=merge_peft, peft_native=True, family_space=_TARGET_CHOICES if layer_choices else None,
        compute_dtype_buffers=compute_dtype_buffers,
    )


_RANKS = {"type": "categorical", "choices": [2, 4, 8, 16, 32]}


def inject_lora(model: "nn.Module", options: LoraOptions, family: str, use_dora: bool = False) -> "nn.Module":
    """LoRA (or DoRA) through peft's ``LoraConfig``, with the options' scaling and initialisation.

    PiSSA and OLoRA replace each adapted weight of ``model`` (the trial's own copy) by its residual
    and keep the first A and B beside the layer, so that the saved adapter can apply to the
    original weights (:func:`~medpeft_ray.methods.export.save_peft_adapter`).
    """
    from peft import LoraConfig

    config = LoraConfig(r=options.rank, lora_alpha=options.alpha, lora_dropout=options.dropout, use_dora=use_dora,
                        use_rslora=options.rslora, init_lora_weights=LORA_INITS[options.init],
                        target_modules=target_regex(model, options, family))
    if options.init not in RESIDUAL_INITS:
        return inject(model, config, family)
    check_rank_fits(split_qkv(model), config.target_modules, options)
    return keep_initial_factors(inject(model, config, family))


def check_rank_fits(model: "nn.Module", targets: str, options: LoraOptions) -> None:
    """PiSSA and OLoRA factorise each adapted weight into r components: r cannot exceed its smaller side."""
    from torch import nn

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and re.fullmatch(targets, name):
            sides = min(module.in_features, module.out_features)
            if options.rank > sides:
                raise ValueError(f"rank: {options.rank} is more than the {sides} features of {name}, which init "
                                 f"{options.init} factorises into at most {sides} components")


_VARIANTS = "; variants as options: rslora, init (gaussian, pissa, olora), lr_ratio (LoRA+)"


@_peft("lora", LoraOptions, "LoRA: low-rank updates (ViT: MED-PEFT's Q and V of every block, rank r, alpha 32; "
       "U-Net: both attentions' projections)" + _VARIANTS,
       # LoRA+'s ratio: plain LoRA and the paper's recommended 2^4
       {"rank": _RANKS, "lr_ratio": {"type": "categorical", "choices": [1.0, 16.0]}}, families=("vit", "resnet", "unet"))
def apply_lora(model: "nn.Module", options: LoraOptions, family: str) -> "nn.Module":
    return inject_lora(model, options, family)


@_peft("dora", LoraOptions, "DoRA: LoRA on the direction plus a trained magnitude per output" + _VARIANTS,
       {"rank": _RANKS})
def apply_dora(model: "nn.Module", options: LoraOptions, family: str) -> "nn.Module":
    return inject_lora(model, options, family, use_dora=True)


@_peft("loha", LohaOptions, "LoHa: low-rank Hadamard-product updates", {"rank": _RANKS})
def apply_loha(model: "nn.Module", options: LohaOptions, family: str) -> "nn.Module":
    from peft import LoHaConfig

    return inject(model, LoHaConfig(r=options.rank, alpha=options.alpha, rank_dropout=options.dropout,
                                    target_modules=target_regex(model, options, family)), family)


@_peft("lokr", LokrOptions, "LoKr: Kronecker-product updates with a low-rank factor", {"rank": _RANKS})
def apply_lokr(model: "nn.Module", options: LokrOptions, family: str) -> "nn.Module":
    from peft import LoKrConfig

    return inject(model, LoKrConfig(r=options.rank, alpha=options.alpha, rank_dropout=options.dropout,
                                    target_modules=target_regex(model, options, family)), family)


@_peft("ia3", Ia3Options, "IA3: learned scaling of keys, values and the MLP's hidden activations",
       {}, layer_choices=False, lr="scaling")
def apply_ia3(model: "nn.Module", options: Ia3Options, family: str) -> "nn.Module":
    from peft import IA3Config

    names = options.target_names(family)
    feedforward = [n for n in names if n == "fc2"]  # IA3 scales fc2's input (the MLP's hidden units)
    config = IA3Config(target_modules=target_regex(model, options, family, names),
                       feedforward_modules=target_regex(model, options, family, feedforward) if feedforward else [])
    return inject(model, config, family)


@_peft("oft", OftOptions, "OFT: block-diagonal orthogonal rotations of the frozen weights",
       {"block_size": {"type": "categorical", "choices": [8, 16, 32, 64]}}, layer_choices=False)
def apply_oft(model: "nn.Module", options: OftOptions, family: str) -> "nn.Module":
    from peft import OFTConfig

    return inject(model, OFTConfig(r=0, oft_block_size=options.block_size, module_dropout=options.dropout,
                                   use_cayley_neumann=options.cayley == "neumann",
                                   num_cayley_neumann_terms=options.neumann_terms,
                                   target_modules=target_regex(model, options, family)), family)


@_peft("boft", BoftOptions, "BOFT: OFT's orthogonal blocks composed with butterfly permutations (dense rotations, few parameters)",
       {"block_size": {"type": "categorical", "choices": [4, 8, 16]},
        "butterfly_factor": {"type": "categorical", "choices": [1, 2, 4]}}, layer_choices=False)
def apply_boft(model: "nn.Module", options: BoftOptions, family: str) -> "nn.Module":
    from peft import BOFTConfig

    from medpeft_ray.methods.butterfly import use_torch_block_diagonal

    import torch

    use_torch_block_diagonal()
    config = BOFTConfig(boft_block_size=options.block_size, boft_block_num=options.block_num,
                        boft_n_butterfly_factor=options.butterfly_factor, boft_dropout=options.dropout,
                        target_modules=target_regex(model, options, family))
    # peft fills BOFT's permutation matrices element by element, which the meta device (parameter
    # counts) cannot do; they are made on the CPU and follow the input's device in forward
    with torch.device("cpu"):
        return inject(model, config, family)


@_peft("vera", VeraOptions, "VeRA: shared frozen random projections with trained scaling vectors",
       {"rank": {"type": "categorical", "choices": [64, 128, 256]}}, layer_choices=False, lr="scaling",
       # the shared random projections multiply the layer's input: they run in its dtype
       compute_dtype_buffers=r"(^|\.)vera_[AB]\.")
def apply_vera(model: "nn.Module", options: VeraOptions, family: str) -> "nn.Module":
    from peft import VeraConfig

    # save_projection=False: the projections are re-drawn from the saved PRNG key when loaded
    # (seeded torch.Generator draws on the CPU, which are the same on every machine)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*vera_A and vera_B.*")
        config = VeraConfig(r=options.rank, vera_dropout=options.dropout, d_initial=options.d_initial,
                            save_projection=False, target_modules=target_regex(model, options, family))
    return inject(model, config, family)
