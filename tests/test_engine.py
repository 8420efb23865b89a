"""The worker loop outside Ray: DeepSpeed config, schedule, augmentation, training, resume, NaN."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from medpeft_ray.config import TrainConfig
from medpeft_ray.errors import TrialFailed
from medpeft_ray.train import engine
from medpeft_ray.train.checkpoint import STATE_FILE, WEIGHTS_FILE
from medpeft_ray.train.engine import WorkerContext, augment, deepspeed_config, ensure_process_group, run_training, warmup_cosine


def test_deepspeed_config_from_train_section() -> None:
    train = TrainConfig(batch_size=64, precision="auto", deepspeed={"zero_stage": 2, "gradient_accumulation_steps": 2})
    cpu = deepspeed_config(train, world_size=4, use_gpu=False)
    assert cpu["train_micro_batch_size_per_gpu"] == 8
    assert cpu["train_batch_size"] == 64
    assert cpu["zero_optimization"] == {"stage": 2}
    assert "bf16" not in cpu and "fp16" not in cpu  # fp32 on CPU
    gpu = deepspeed_config(train, world_size=4, use_gpu=True)
    assert gpu["bf16"] == {"enabled": True}
    no_clip = deepspeed_config(TrainConfig(deepspeed={"gradient_clipping": 0}), 1, False)
    assert "gradient_clipping" not in no_clip


def test_warmup_then_cosine_to_min_lr() -> None:
    train = TrainConfig(epochs=10, lr=1e-2, min_lr=1e-4, warmup_epochs=2)
    factor = warmup_cosine(train, steps_per_epoch=10)
    assert factor(0) == pytest.approx(0.05)
    assert factor(19) == pytest.approx(1.0)
    assert factor(20) == pytest.approx(1.0)
    assert factor(60) < factor(40) < factor(20)
    assert factor(100) == pytest.approx(1e-2)  # min_lr / lr


def test_augment_kinds() -> None:
    x = torch.rand(16, 1, 8, 8)
    assert torch.equal(augment(x, torch.Generator().manual_seed(0), "none"), x)
    flipped = augment(x, torch.Generator().manual_seed(0), "flip")
    per_image = [torch.equal(f, i) or torch.equal(f, i.flip(-1)) for f, i in zip(flipped, x)]
    assert all(per_image) and not torch.equal(flipped, x)
    a = augment(x, torch.Generator().manual_seed(1), "crop_flip")
    b = augment(x, torch.Generator().manual_seed(1), "crop_flip")
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)


def _run(trial: Any, resume_from: Path | None = None, keep: Path | None = None) -> list[tuple[dict[str, Any], dict, dict]]:
    """Runs one worker in-process; returns (metrics, weights, state) per epoch and copies checkpoints to ``keep``."""
    import json
    import shutil

    torch.set_num_threads(1)
    ensure_process_group("gloo")
    reports: list = []

    def report(metrics: dict[str, Any], directory: Path | None) -> None:
        assert directory is not None  # rank 0 always checkpoints
        state = json.loads((directory / STATE_FILE).read_text())
        reports.append((metrics, load_file(str(directory / WEIGHTS_FILE)), state))
        if keep is not None:
            shutil.copytree(directory, keep / f"epoch{metrics['epoch']}")

    run_training(trial, WorkerContext(0, 1, torch.device("cpu"), resume_from), report)
    return reports


def test_training_reports_each_epoch_with_adapter_only_checkpoint(tiny_config: Any, tmp_path: Path) -> None:
    trial = tiny_config.trial_config(1.0, {"lr": 3e-3})
    reports = _run(trial, keep=tmp_path)
    assert [m["epoch"] for m, _, _ in reports] == [1, 2]
    metrics, weights, state = reports[-1]
    assert 0.0 <= metrics["val_auroc"] <= 1.0 and math.isfinite(metrics["val_loss"])
    assert metrics["first_step_at"] >= metrics["worker_started_at"]
    assert metrics["trainable_params"] == sum(w.numel() for w in weights.values())
    assert metrics["trainable_params"] < metrics["total_params"] / 10
    assert all(".lora_" in k or k.startswith(("head.", "fc_norm.")) for k in weights)
    assert state["epoch"] == 2 and state["trial"]["method"]["name"] == "lora"
    # the second epoch changed the adapter
    first = reports[0][1]
    assert any(not torch.equal(first[k], weights[k]) for k in weights)

    # a restarted worker resumes after the last checkpointed epoch and runs only what is left
    resumed = _run(trial, resume_from=tmp_path / "epoch1")
    assert [m["epoch"] for m, _, _ in resumed] == [2]


def test_nan_loss_fails_the_trial_with_a_reason(tiny_config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine.F, "binary_cross_entropy_with_logits", lambda logits, target: logits.mean() * float("nan"))
    trial = tiny_config.trial_config(1.0, {"lr": 3e-3})
    with pytest.raises(TrialFailed, match="training loss is nan in epoch 1"):
        _run(trial)


def _registry_cases() -> list[tuple[str, str]]:
    from medpeft_ray.methods import list_methods

    # every ViT method on a tiny ViT; the ResNet-only ones on a small ResNet
    return [("vit_tiny_patch16_224", m) for m in list_methods("vit")] + [
        ("resnet18", m) for m in list_methods("resnet") if m not in list_methods("vit")
    ]


@pytest.mark.parametrize("backbone,method", _registry_cases())
def test_every_method_trains_under_deepspeed_in_the_worker_loop(backbone: str, method: str) -> None:
    from conftest import tiny_search

    from medpeft_ray.config import validate_search_dict

    config = validate_search_dict(
        tiny_search(model={"backbone": backbone}, method={"name": method, "options": {}}, train={"epochs": 1}),
        "tiny.yaml",
    )
    trial = config.trial_config(1.0, {"lr": 3e-3})
    torch.manual_seed(0)
    initial = {n: p.clone() for n, p in engine.prepare_model(
        engine.build_backbone(backbone, 3, 32), method, {}, trial.family).named_parameters() if p.requires_grad}
    (metrics, weights, _), = _run(trial)
    assert math.isfinite(metrics["train_loss"]) and 0.0 <= metrics["val_auroc"] <= 1.0
    # the checkpoint holds exactly the trainable tensors, and training moved them
    assert set(weights) == set(initial)
    assert metrics["trainable_params"] == sum(w.numel() for w in weights.values())
    method_weights = [n for n in weights if not n.startswith(("head.", "fc.", "fc_norm."))]
    assert method == "linear" or any(not torch.equal(weights[n], initial[n]) for n in method_weights)
