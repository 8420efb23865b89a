"""A trial's buffers under bf16/fp16 (DeepSpeed's ``bf16``/``fp16`` cast parameters, not buffers).

- **BatchNorm** keeps its running statistics in fp32 and normalises in fp32, as autocast does:
  its module is swapped for a subclass whose forward casts the input and the (bf16) affine
  parameters up and the output back. Running statistics averaged in bf16 would lose the small
  updates a momentum of 0.1 makes.
- **A method's own buffers** stay in the dtype they were made in, except those its registration
  names (``compute_dtype_buffers``, e.g. VeRA's shared random projections, which multiply the
  layer's input); SV-Diff's singular values stay fp32 (in bf16, shifts below about s/256 vanish).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from medpeft_ray.config import TrainConfig
from medpeft_ray.methods import get_method
from medpeft_ray.train.engine import resolve_precision

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compute_dtype(train: TrainConfig, use_gpu: bool) -> torch.dtype:
    """The dtype a trial's parameters and activations run in (``train.precision``; ``auto``: bf16 on GPUs)."""
    return _DTYPES[resolve_precision(train, use_gpu)]


def _batch_norm_in_fp32(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``_BatchNorm.forward`` (PyTorch 2.x) computed in fp32 whatever the input's and weights' dtype."""
    self._check_input_dim(x)
    factor = 0.0 if self.momentum is None else self.momentum
    if self.training and self.track_running_stats and self.num_batches_tracked is not None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
    batch_stats = self.training or (self.running_mean is None and self.running_var is None)
    use_running = not self.training or self.track_running_stats
    out = F.batch_norm(
        x.float(),
        self.running_mean if use_running else None,
        self.running_var if use_running else None,
        None if self.weight is None else self.weight.float(),
        None if self.bias is None else self.bias.float(),
        batch_stats, factor, self.eps,
    )
    return out.to(x.dtype)


class BatchNorm1dFp32(nn.BatchNorm1d):
    forward = _batch_norm_in_fp32


class BatchNorm2dFp32(nn.BatchNorm2d):
    forward = _batch_norm_in_fp32


class BatchNorm3dFp32(nn.BatchNorm3d):
    forward = _batch_norm_in_fp32


_FP32_BATCH_NORM: dict[type, type] = {nn.BatchNorm1d: BatchNorm1dFp32, nn.BatchNorm2d: BatchNorm2dFp32,
                                      nn.BatchNorm3d: BatchNorm3dFp32}


def fit_buffers(model: nn.Module, dtype: torch.dtype, method: str) -> nn.Module:
    """Makes ``model`` (adapted by ``method``) run with its parameters in ``dtype``; returns it.

    Nothing changes in fp32. Call before ``deepspeed.initialize`` (which casts the parameters).

    Raises:
        TypeError: a batch-norm layer of a kind that cannot keep fp32 statistics beside bf16 weights.
    """
    if dtype == torch.float32:
        return model
    for name, module in model.named_modules():
        if type(module) in _FP32_BATCH_NORM:
            module.__class__ = _FP32_BATCH_NORM[type(module)]
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and type(module) not in _FP32_BATCH_NORM.values():
            raise TypeError(f"{name}: {type(module).__name__} cannot run in {dtype} with fp32 statistics; "
                            "train this backbone in fp32 (train.precision: fp32)")
    pattern = get_method(method).compute_dtype_buffers
    if pattern:
        for name, buffer in list(model.named_buffers()):
            if re.search(pattern, name) and buffer.is_floating_point():
                owner, _, leaf = name.rpartition(".")
                model.get_submodule(owner)._buffers[leaf] = buffer.to(dtype)
    return model
