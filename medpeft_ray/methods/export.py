"""Exports of a tuned model: peft's own adapter format for peft-native methods.

The adapter folder loads with ``peft.PeftModel.from_pretrained(split_qkv(backbone), folder)``
onto the same backbone (built with the same name, classes and image size): the adapter weights
plus the classifier head, saved as peft's ``modules_to_save``.

PiSSA and OLoRA train on a changed backbone: each adapted weight W became the residual
W - s B0 A0 of its first adapter. Their adapter is saved as peft saves them with
``path_initial_model_for_weight_conversion``: a plain LoRA of rank 2r, [B | -B0] [A ; A0], whose
update W_res + s B A - W is taken relative to the original weights, so that it applies to the
pre-trained backbone a user has.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

ADAPTER_NAME = "default"
#: key prefix of peft's saved state dicts (a PeftModel wraps a tuner that wraps the model)
_PEFT_PREFIX = "base_model.model."
#: buffers of a LoRA layer whose base weight PiSSA or OLoRA replaced by a residual: its first A and B
INITIAL_A, INITIAL_B = "initial_lora_A", "initial_lora_B"


def is_peft_model(model: "nn.Module") -> bool:
    return isinstance(getattr(model, "peft_config", None), dict) and ADAPTER_NAME in model.peft_config


def keep_initial_factors(model: "nn.Module") -> "nn.Module":
    """Keeps each LoRA layer's A and B as they are now (right after PiSSA's or OLoRA's initialisation)
    as non-persistent fp32 buffers beside them; returns ``model``.

    They are not trained and not checkpointed: rebuilding the trial's model computes them again.
    """
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
            for buffer, layer in ((INITIAL_A, module.lora_A), (INITIAL_B, module.lora_B)):
                module.register_buffer(buffer, layer[ADAPTER_NAME].weight.detach().float().clone(), persistent=False)
    return model


def save_peft_adapter(model: "nn.Module", directory: Path) -> Path:
    """Writes ``adapter_config.json`` and ``adapter_model.safetensors`` in peft's format to ``directory``."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = copy.deepcopy(model.peft_config[ADAPTER_NAME])
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    relative_to_original_weights(model, config, state)
    # trainable parameters outside the adapter (the head, ViT's fc_norm) travel as modules_to_save
    others = {n: p for n, p in model.named_parameters() if p.requires_grad and ADAPTER_NAME not in n.split(".")}
    config.modules_to_save = sorted({name.split(".")[0] for name in others}) or None
    state.update(others)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({_PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in state.items()},
              str(directory / "adapter_model.safetensors"))
    config.save_pretrained(str(directory))
    return directory


def relative_to_original_weights(model: "nn.Module", config: Any, state: dict[str, Any]) -> None:
    """Turns a PiSSA or OLoRA adapter (``config`` and its ``state``) into peft's plain LoRA for the original weights.

    As peft's ``save_pretrained(path_initial_model_for_weight_conversion=...)``: W_res + s B A equals
    W + s [B | -B0] [A ; A0], a LoRA of rank 2r at the same scaling (alpha doubled, or times sqrt 2
    under rslora), initialised as plain LoRA when loaded. A DoRA magnitude is kept as it is: the
    weight it normalises, W + s [B | -B0] [A ; A0], is the one it was trained with. No change for a
    model without initial factors.
    """
    import torch

    layers = {name: module for name, module in model.named_modules() if hasattr(module, INITIAL_A)}
    if not layers:
        return
    for name, module in layers.items():
        # in fp32: B0 A0 carries the weight's largest components, which bf16 would round coarsely
        a_key, b_key = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        initial_a, initial_b = getattr(module, INITIAL_A).float(), getattr(module, INITIAL_B).float()
        state[a_key] = torch.cat([state[a_key].float(), initial_a.to(state[a_key].device)], dim=0)
        state[b_key] = torch.cat([state[b_key].float(), -initial_b.to(state[b_key].device)], dim=1)
    config.r *= 2
    config.lora_alpha *= math.sqrt(2) if config.use_rslora else 2
    config.init_lora_weights = True
