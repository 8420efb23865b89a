"""Exports of a tuned model: peft's own adapter format for peft-native methods.

The adapter folder loads with ``peft.PeftModel.from_pretrained(split_qkv(backbone), folder)``
onto the same backbone (built with the same name, classes and image size): the adapter weights
plus the classifier head, saved as peft's ``modules_to_save``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

ADAPTER_NAME = "default"
#: key prefix of peft's saved state dicts (a PeftModel wraps a tuner that wraps the model)
_PEFT_PREFIX = "base_model.model."


def is_peft_model(model: "nn.Module") -> bool:
    return isinstance(getattr(model, "peft_config", None), dict) and ADAPTER_NAME in model.peft_config


def save_peft_adapter(model: "nn.Module", directory: Path) -> Path:
    """Writes ``adapter_config.json`` and ``adapter_model.safetensors`` in peft's format to ``directory``."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = copy.deepcopy(model.peft_config[ADAPTER_NAME])
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    # trainable parameters outside the adapter (the head, ViT's fc_norm) travel as modules_to_save
    others = {n: p for n, p in model.named_parameters() if p.requires_grad and ADAPTER_NAME not in n.split(".")}
    config.modules_to_save = sorted({name.split(".")[0] for name in others}) or None
    state.update(others)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({_PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in state.items()},
              str(directory / "adapter_model.safetensors"))
    config.save_pretrained(str(directory))
    return directory
