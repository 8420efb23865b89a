"""Trial checkpoints: the trainable parameters in safetensors, a JSON of the trial, DeepSpeed's state.

A PEFT trial's checkpoint holds only what trained (LoRA weights, head, ...), so it is small and
applies onto the same backbone built from the same config. Methods applied through peft are also
saved in peft's adapter format, in the ``peft/`` sub-folder. The ``deepspeed/`` sub-folder is
DeepSpeed's own checkpoint of the same trainable parameters with the optimizer state and lr
schedule (one shard per rank under ZeRO), from which a restarted trial resumes exactly.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medpeft_ray.methods.export import is_peft_model, save_peft_adapter

# torch, safetensors and DeepSpeed are imported where a checkpoint is written or read: what reads
# only the file names below (the results' readers) stays free of torch; DeepSpeed is first imported
# by ``engine.load_deepspeed``, which chooses its accelerator
if TYPE_CHECKING:
    from torch import nn

WEIGHTS_FILE = "trainable.safetensors"
STATE_FILE = "state.json"
PEFT_DIR = "peft"
DEEPSPEED_DIR = "deepspeed"
_DEEPSPEED_TAG = "epoch"  # one tag: each checkpoint folder holds one epoch


def _partitioned(params: list[Any]) -> list[Any]:
    """The parameters ZeRO-3 has partitioned across ranks (each rank holds a slice)."""
    return [p for p in params if hasattr(p, "ds_id")]


def trainable_state(model: "nn.Module") -> dict[str, Any]:
    """The trainable parameters by name, detached, contiguous and on the CPU.

    Under ZeRO-3 the parameters are gathered first; that is a collective: every rank must call it.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    gather: Any = contextlib.nullcontext()
    partitioned = _partitioned([p for _, p in named])
    if partitioned:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
    with gather:
        return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in named}


def save_trial_checkpoint(directory: Path, engine: Any, state: dict[str, Any], rank: int) -> Path:
    """One rank's part of an epoch's checkpoint; every rank of the trial calls it.

    Every rank writes its DeepSpeed shard (optimizer state, lr schedule; frozen weights excluded);
    rank 0 also writes the trainable weights and ``state`` (:func:`save_checkpoint`).
    """
    directory.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(
        str(directory / DEEPSPEED_DIR), tag=_DEEPSPEED_TAG, client_state={"epoch": state["epoch"]},
        exclude_frozen_parameters=True,
    )
    weights = trainable_state(engine.module)  # a collective under ZeRO-3: every rank takes part
    if rank == 0:
        save_checkpoint(directory, engine.module, state, weights)
    return directory


def load_deepspeed_state(directory: Path, engine: Any) -> dict[str, Any]:
    """Restores trainable weights, optimizer state and lr schedule saved by :func:`save_trial_checkpoint`.

    Returns the client state (``epoch``). Raises ValueError for a checkpoint without DeepSpeed state.
    """
    if not (directory / DEEPSPEED_DIR / _DEEPSPEED_TAG).is_dir():
        raise ValueError(f"{directory}: no DeepSpeed state to resume from ({DEEPSPEED_DIR}/{_DEEPSPEED_TAG} is missing)")
    # not strict: the frozen backbone is not in the checkpoint; it was rebuilt from the same config
    path, client_state = engine.load_checkpoint(
        str(directory / DEEPSPEED_DIR), tag=_DEEPSPEED_TAG, load_module_strict=False,
        load_optimizer_states=True, load_lr_scheduler_states=True,
    )
    if path is None:
        raise ValueError(f"{directory}: DeepSpeed could not load its checkpoint")
    return client_state


def save_checkpoint(directory: Path, model: "nn.Module", state: dict[str, Any], weights: dict[str, Any] | None = None) -> Path:
    """Writes the trainable weights (``weights``, else the model's) and ``state`` (epoch, metrics, trial config)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(weights if weights is not None else trainable_state(model), str(directory / WEIGHTS_FILE))
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
    scatter: Any = contextlib.nullcontext()
    partitioned = _partitioned([params[name] for name in weights])
    if partitioned:  # ZeRO-3: gather, write on rank 0, and let DeepSpeed re-partition on exit
        import deepspeed

        scatter = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)
    with scatter, torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
