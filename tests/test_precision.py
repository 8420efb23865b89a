"""bf16 for every registered method on every family it applies to, through the recipe's DeepSpeed engine.

Table-driven over the method registry (:data:`test_methods.EXPECTED_TRAINABLE` must list every
registered method, so a new one is here the moment it is registered): on CPU, DeepSpeed's CPU
accelerator runs bf16 at ZeRO 0 and 3 exactly as a GPU node's engine does, casting parameters and
leaving buffers alone. Each case trains a few steps and checks a finite loss, the dtypes the
method promises (parameters bf16, batch-norm statistics and the method's own buffers fp32, the
buffers it names in ``compute_dtype_buffers`` bf16), and a first loss close to fp32's.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from conftest import tiny_search
from test_methods import CASES, adapted, inputs

from medpeft_ray.config import MethodConfig, validate_search_dict
from medpeft_ray.methods import get_method
from medpeft_ray.models import build_backbone
from medpeft_ray.train.engine import WorkerContext, ensure_process_group
from medpeft_ray.train.precision import BatchNorm2dFp32, fit_buffers
from medpeft_ray.train.recipe import TrialRecipe

pytestmark = pytest.mark.slow
STEPS = 3
_FP32: dict[tuple[str, str], float] = {}  # each case's untrained eval loss in fp32


@pytest.fixture(scope="module")
def recipe() -> TrialRecipe:
    ensure_process_group("gloo")
    return TrialRecipe(WorkerContext(0, 1, torch.device("cpu")))


def _trial(method: str, backbone: str, precision: str, zero: int) -> Any:
    base = validate_search_dict(tiny_search(), "precision.yaml").search_space.trial_config(1.0, {})
    train = base.train.model_copy(update={
        "precision": precision, "batch_size": 2, "lr": 1e-3,
        "deepspeed": base.train.deepspeed.model_copy(update={"zero_stage": zero}),
    })
    return base.model_copy(update={"model": base.model.model_copy(update={"backbone": backbone}),
                                   "method": MethodConfig(name=method), "train": train})


def _loss(family: str, engine: Any, dtype: torch.dtype) -> torch.Tensor:
    if family == "unet":
        gen = torch.Generator().manual_seed(1)
        latents, text = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 7, 32, generator=gen)
        out = engine(latents.to(dtype), torch.tensor([10, 700]), encoder_hidden_states=text.to(dtype), return_dict=False)[0]
    else:
        out = engine(inputs().to(dtype))
    return out.float().pow(2).mean()


def _train(recipe: TrialRecipe, family: str, method: str, precision: str, zero: int) -> tuple[float, list[float], Any]:
    """The untrained model's loss in eval mode, then each training step's loss, and the engine."""
    backbone = {"vit": "vit_tiny_patch16_224", "resnet": "resnet18", "unet": "unet_tiny"}[family]
    trial = _trial(method, backbone, precision, zero)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    engine, _, _ = recipe.engine(trial, adapted(family, method), train_images=2 * STEPS)
    # eval mode: batch statistics of two images through a random ResNet amplify any rounding
    engine.eval()
    with torch.no_grad():
        before = float(_loss(family, engine, dtype))
    engine.train()
    losses = []
    for _ in range(STEPS):
        loss = _loss(family, engine, dtype)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return before, losses, engine


@pytest.mark.parametrize("zero", [0, 3])
@pytest.mark.parametrize("family,method", CASES)
def test_every_method_trains_in_bf16_with_the_dtypes_it_promises(recipe: TrialRecipe, family: str, method: str,
                                                                 zero: int) -> None:
    before, losses, engine = _train(recipe, family, method, "bf16", zero)
    assert all(map(torch.isfinite, torch.tensor(losses))), losses
    model = engine.module
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.bfloat16 for p in trainable)
    in_compute_dtype = get_method(method).compute_dtype_buffers
    for name, buffer in model.named_buffers():
        if not buffer.is_floating_point():
            continue
        wanted = torch.bfloat16 if in_compute_dtype and re.search(in_compute_dtype, name) else torch.float32
        assert buffer.dtype == wanted, (name, buffer.dtype)
    # bf16 rounds, it does not derail: the model computes what it computes in fp32, within bf16's resolution
    if (family, method) not in _FP32:  # the same at either ZeRO stage: computed once
        _FP32[(family, method)] = _train(recipe, family, method, "fp32", 0)[0]
    assert before == pytest.approx(_FP32[(family, method)], rel=0.05, abs=1e-3)


def test_batch_norm_keeps_fp32_statistics_and_computes_what_fp32_computes() -> None:
    torch.manual_seed(0)
    plain = build_backbone("resnet18", num_classes=3, image_size=32).train()
    mixed = build_backbone("resnet18", num_classes=3, image_size=32).train()
    mixed.load_state_dict(plain.state_dict())
    fit_buffers(mixed, torch.bfloat16, "full")
    assert isinstance(mixed.bn1, BatchNorm2dFp32) and set(mixed.state_dict()) == set(plain.state_dict())
    for param in mixed.parameters():  # what DeepSpeed's bf16 does: parameters cast, buffers as they were
        param.data = param.data.to(torch.bfloat16)
    for name, buffer in mixed.named_buffers():
        assert buffer.dtype in (torch.float32, torch.int64), name
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out_mixed = mixed(x.bfloat16())
    plain(x)
    assert out_mixed.dtype == torch.bfloat16
    # the running statistics took the same fp32 update (only the bf16 weights and input differ)
    assert mixed.bn1.running_mean.dtype == torch.float32 and int(mixed.bn1.num_batches_tracked) == 1
    assert torch.allclose(mixed.bn1.running_mean, plain.bn1.running_mean, atol=2e-2)
    assert torch.allclose(mixed.bn1.running_var, plain.bn1.running_var, rtol=2e-2)
    plain.eval(), mixed.eval()
    assert torch.allclose(mixed(x.bfloat16()).float(), plain(x), atol=0.05, rtol=0.05)
    # nothing changes in fp32
    untouched = build_backbone("resnet18", num_classes=3, image_size=32)
    fit_buffers(untouched, torch.float32, "full")
    assert type(untouched.bn1) is torch.nn.BatchNorm2d
