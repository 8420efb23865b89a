"""Adapter-only checkpoints: the trainable parameters in safetensors plus a JSON of the trial.

A PEFT trial's checkpoint holds only what trained (LoRA weights, head, ...), so it is small and
applies onto the same backbone built from the same config. Methods applied through peft are also
saved in peft's adapter format, in the ``peft/`` sub-folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

WEIGHTS_FILE = "trainable.safetensors"
STATE_FILE = "state.json"
PEFT_DIR = "peft"


def trainable_state(model: "nn.Module") -> dict[str, Any]:
    """The trainable parameters by name, detached, contiguous and on the CPU."""
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(directory: Path, model: "nn.Module", state: dict[str, Any]) -> Path:
    """Writes the trainable weights and ``state`` (epoch, metrics, trial config) to ``directory``."""
    from safetensors.torch import save_file

    from medpeft_ray.methods.export import is_peft_model, save_peft_adapter

    directory.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state(model), str(directory / WEIGHTS_FILE))
    if is_peft_model(model):
        save_peft_adapter(model, directory / PEFT_DIR)
    (directory / STATE_FILE).write_text(json.dumps(state, indent=1, default=str))
    return directory


def load_checkpoint_into(directory: Path, model: "nn.Module") -> dict[str, Any]:
    """Loads trainable weights saved by :func:`save_checkpoint` into ``model``; returns the state.

    Raises ValueError when a saved tensor has no trainable counterpart (a different method).
    """
    from safetensors.torch import load_file

    weights = load_file(str(directory / WEIGHTS_FILE))
    params = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise ValueError(f"{directory}: checkpoint tensors not in the model: {unknown[:3]}")
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise ValueError(f"{directory}: trainable parameters missing from the checkpoint: {missing[:3]}")
    load_trainable_state(model, weights)
    return json.loads((directory / STATE_FILE).read_text())


def load_trainable_state(model: "nn.Module", weights: dict[str, Any]) -> None:
    """Copies ``weights`` (from :func:`trainable_state`) into the model's parameters of those names."""
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
