"""The worker loop outside Ray: DeepSpeed config, schedule, augmentation, training, resume, NaN."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medpeft_ray.config import TrainConfig
from medpeft_ray.errors import TrialFailed
from medpeft_ray.train import engine
from medpeft_ray.train.checkpoint import STATE_FILE, WEIGHTS_FILE
from medpeft_ray.train.engine import WorkerContext, augment, deepspeed_config, ensure_process_group, warmup_cosine
from medpeft_ray.train.recipes import run_training


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
    # DeepSpeed's own default, where the key is absent, is to clip at 1.0: off is written as 0
    from deepspeed.runtime.config import DeepSpeedConfig

    assert no_clip["gradient_clipping"] == 0 and DeepSpeedConfig(no_clip).gradient_clipping == 0
    assert DeepSpeedConfig({k: v for k, v in no_clip.items() if k != "gradient_clipping"}).gradient_clipping == 1.0


def test_zero_offload_sections() -> None:
    offload = TrainConfig(deepspeed={"zero_stage": 3, "offload_optimizer": "cpu", "offload_param": "cpu"})
    zero = deepspeed_config(offload, world_size=2, use_gpu=True)["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert deepspeed_config(offload, 2, True)["zero_force_ds_cpu_optimizer"] is False  # our torch optimizer is kept
    assert "offload_optimizer" not in deepspeed_config(TrainConfig(deepspeed={"zero_stage": 2}), 1, False)["zero_optimization"]


@pytest.mark.parametrize("deepspeed,message", [
    ({"offload_optimizer": "cpu"}, "offload_optimizer: needs zero_stage 1, 2 or 3"),
    ({"zero_stage": 2, "offload_param": "cpu"}, "offload_param: needs zero_stage 3"),
    ({"zero_stage": 1, "offload_optimizer": "nvme"}, "offload_optimizer: must be one of 'none' or 'cpu'"),
])
def test_offload_without_the_zero_stage_it_needs_is_a_config_error(deepspeed: dict, message: str) -> None:
    from conftest import tiny_search

    from medpeft_ray.config import validate_search_dict
    from medpeft_ray.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(f"tiny.yaml: train.deepspeed.{message}")):
        validate_search_dict(tiny_search(train={"deepspeed": deepspeed}), "tiny.yaml")


def test_layer_wise_lr_decay_scales_each_block() -> None:
    from medpeft_ray.models import build_backbone

    model = build_backbone("vit_tiny_patch16_224", 3, 32)  # 12 blocks: stem 0, blocks 1-12, head 13
    ids, top = engine.layer_ids(model)
    assert top == 13
    assert ids["cls_token"] == ids["patch_embed.proj.weight"] == 0
    assert ids["blocks.0.attn.qkv.weight"] == 1 and ids["blocks.11.mlp.fc2.bias"] == 12
    assert ids["head.weight"] == ids["fc_norm.weight"] == 13
    optimizer = engine.build_optimizer(model, TrainConfig(lr=1e-3, layer_decay=0.5, weight_decay=0.05))
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert lr_of[id(params["head.weight"])] == pytest.approx(1e-3)
    assert lr_of[id(params["blocks.11.attn.qkv.weight"])] == pytest.approx(5e-4)
    assert lr_of[id(params["blocks.0.attn.qkv.weight"])] == pytest.approx(1e-3 * 0.5**12)
    assert lr_of[id(params["pos_embed"])] == pytest.approx(1e-3 * 0.5**13)
    assert decay_of[id(params["blocks.0.attn.qkv.weight"])] == 0.05 and decay_of[id(params["blocks.0.attn.qkv.bias"])] == 0.0
    # without decay: one lr for all, still no weight decay on biases and norms
    flat = engine.build_optimizer(model, TrainConfig(lr=1e-3))
    assert {g["lr"] for g in flat.param_groups} == {1e-3} and len(flat.param_groups) == 2
    resnet_ids, resnet_top = engine.layer_ids(build_backbone("resnet18", 3, 32))
    assert resnet_top == 5 and resnet_ids["conv1.weight"] == 0 and resnet_ids["layer4.1.conv2.weight"] == 4
    assert resnet_ids["fc.weight"] == 5


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


def test_randaug_recipe_is_seeded_and_changes_images() -> None:
    images = (torch.rand(8, 24, 24) * 255).to(torch.uint8).numpy()
    labels = torch.zeros(8, 2).numpy()

    def draw(seed: int) -> torch.Tensor:
        batches = engine.Batches(images, labels, torch.device("cpu"), 0.5, 0.25, "randaug")
        batches.reseed(seed)
        return batches.get(torch.arange(8), torch.float32, torch.Generator().manual_seed(seed))[0]

    plain = engine.Batches(images, labels, torch.device("cpu"), 0.5, 0.25, "none").get(torch.arange(8), torch.float32, None)[0]
    a, b, c = draw(0), draw(0), draw(1)
    assert a.shape == plain.shape == (8, 3, 24, 24)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, plain)
    # evaluation batches are never augmented
    evaluation = engine.Batches(images, labels, torch.device("cpu"), 0.5, 0.25, "randaug").get(torch.arange(8), torch.float32, None)[0]
    assert torch.equal(evaluation, plain)


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_same_seed_same_numbers_with_the_determinism_switch(tiny_config: Any) -> None:
    trial = tiny_config.trial_config(1.0, {"lr": 3e-3})
    trial = trial.model_copy(update={"train": trial.train.model_copy(update={"deterministic": True, "augment": "randaug"})})
    try:
        first = [(m["train_loss"], m["val_loss"], m["val_auroc"]) for m, _, _ in _run(trial)]
        second = [(m["train_loss"], m["val_loss"], m["val_auroc"]) for m, _, _ in _run(trial)]
    finally:
        torch.use_deterministic_algorithms(False)
    assert first == second
    other_seed = trial.model_copy(update={"train": trial.train.model_copy(update={"seed": 1})})
    assert [(m["train_loss"], m["val_loss"], m["val_auroc"]) for m, _, _ in _run(other_seed)] != first


def test_a_deterministic_trial_leaves_nothing_behind_for_the_next_one_on_the_same_worker() -> None:
    from medpeft_ray.train.engine import set_determinism

    try:
        set_determinism(0, True)
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
        set_determinism(0, False)  # the next trial on a warm executor
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)


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


@pytest.mark.slow
@pytest.mark.parametrize("backbone,method", _registry_cases())
def test_every_method_trains_under_deepspeed_in_the_worker_loop(backbone: str, method: str) -> None:
    from conftest import tiny_search

    from medpeft_ray.config import validate_search_dict
    from medpeft_ray.methods import prepare_model
    from medpeft_ray.models import build_backbone

    config = validate_search_dict(
        tiny_search(model={"backbone": backbone}, method={"name": method, "options": {}}, train={"epochs": 1}),
        "tiny.yaml",
    )
    trial = config.trial_config(1.0, {"lr": 3e-3})
    torch.manual_seed(0)
    initial = {n: p.clone() for n, p in prepare_model(
        build_backbone(backbone, 3, 32), method, {}, trial.family).named_parameters() if p.requires_grad}
    (metrics, weights, _), = _run(trial)
    assert math.isfinite(metrics["train_loss"]) and 0.0 <= metrics["val_auroc"] <= 1.0
    # the checkpoint holds exactly the trainable tensors, and training moved them
    assert set(weights) == set(initial)
    assert metrics["trainable_params"] == sum(w.numel() for w in weights.values())
    method_weights = [n for n in weights if not n.startswith(("head.", "fc.", "fc_norm."))]
    assert method == "linear" or any(not torch.equal(weights[n], initial[n]) for n in method_weights)


FIRST_INITIALIZE = """
import os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import torch
from medpeft_ray.train.engine import ensure_process_group, load_deepspeed
deepspeed = load_deepspeed(on_gpu=False)
ensure_process_group("gloo")
model = torch.nn.Linear(4, 2)
deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                     config={"train_micro_batch_size_per_gpu": 2})
"""


@pytest.mark.slow  # a process of its own, with torch and DeepSpeed to import
def test_the_first_deepspeed_initialize_on_a_fresh_machine_compiles_nothing(tmp_path: Path) -> None:
    """On the CPU accelerator DeepSpeed's first initialize in a process would probe every op builder
    and JIT-compile a shared-memory comm op (about 20 s once per machine, in the first trial of a
    fresh machine): with an empty extensions folder, it builds nothing there."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    extensions = tmp_path / "torch_extensions"  # what a machine that never built an op has
    run = subprocess.run([sys.executable, "-c", FIRST_INITIALIZE, str(port)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert not extensions.exists() or not any(extensions.iterdir()), sorted(p.name for p in extensions.rglob("*"))
    assert "shm_comm" not in run.stdout + run.stderr


def test_batches_read_the_rows_they_serve_from_the_map_without_copying_the_split(tmp_path: Path) -> None:
    images = np.lib.format.open_memmap(tmp_path / "images.npy", mode="w+", dtype=np.uint8, shape=(40, 12, 12))
    images[:] = np.random.default_rng(0).integers(0, 256, size=images.shape, dtype=np.uint8)
    images.flush()
    shared = np.load(tmp_path / "images.npy", mmap_mode="r")  # read-only, as the cache hands it out
    labels = np.eye(4, dtype=np.float32)[np.arange(40) % 4]
    rows = np.array([3, 7, 11, 19, 23, 31])
    batches = engine.Batches(shared, labels, torch.device("cpu"), 0.5, 0.25, rows=rows)
    assert batches.images is shared and len(batches) == 6
    chunks = [torch.tensor([0, 2]), torch.tensor([5, 1, 4]), torch.tensor([3])]
    out = list(batches.iterate(chunks, torch.float32, None))
    for (x, y), chunk in zip(out, chunks):
        expected = (torch.from_numpy(np.asarray(shared[rows[chunk.numpy()]])).float() / 255 - 0.5) / 0.25
        assert torch.equal(x, expected.unsqueeze(1).expand(-1, 3, -1, -1))
        assert torch.equal(y, torch.from_numpy(labels[rows[chunk.numpy()]]))


def test_randaugment_in_a_pool_of_processes_gives_the_batches_of_the_training_thread() -> None:
    images = np.random.default_rng(1).integers(0, 256, size=(24, 16, 16, 3), dtype=np.uint8)
    labels = np.zeros((24, 2), dtype=np.float32)
    chunks = [torch.arange(start, start + 4) for start in range(0, 24, 4)]

    def epoch(processes: int) -> list[torch.Tensor]:
        batches = engine.Batches(images, labels, torch.device("cpu"), 0.5, 0.25, "randaug", augment_processes=processes)
        batches.reseed(7)
        return [x for x, _ in batches.iterate(chunks, torch.float32, torch.Generator().manual_seed(7))]

    try:
        inline, pooled = epoch(0), epoch(2)
    finally:
        if engine.AugmentPool._current is not None:
            engine.AugmentPool._current.close()
    assert all(torch.equal(a, b) for a, b in zip(inline, pooled)) and len(pooled) == 6
    plain = engine.Batches(images, labels, torch.device("cpu"), 0.5, 0.25).get(chunks[0], torch.float32, None)[0]
    assert not torch.equal(inline[0], plain)


def test_a_consumer_that_stops_early_ends_the_prefetch_thread() -> None:
    import threading

    images = np.zeros((64, 8, 8), dtype=np.uint8)
    batches = engine.Batches(images, np.zeros((64, 1), np.float32), torch.device("cpu"), 0.5, 0.25)
    chunks = [torch.arange(start, start + 4) for start in range(0, 64, 4)]
    iterator = batches.iterate(chunks, torch.float32, None)
    next(iterator)
    iterator.close()  # a trial stopped mid-epoch
    assert not [t for t in threading.enumerate() if t.name == "medpeft-prefetch"]


def test_augment_processes_come_from_the_environment_or_the_workers_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from medpeft_ray.errors import MedpeftError

    monkeypatch.delenv("MEDPEFT_AUGMENT_PROCESSES", raising=False)
    assert engine.augment_processes("randaug", True, 12) == 8
    assert engine.augment_processes("randaug", True, 2) == 1
    assert engine.augment_processes("randaug", False, 12) == 0  # CPU trials train on those CPUs
    assert engine.augment_processes("crop_flip", True, 12) == 0  # augmented on the device
    monkeypatch.setenv("MEDPEFT_AUGMENT_PROCESSES", "3")
    assert engine.augment_processes("randaug", False, 1) == 3
    monkeypatch.setenv("MEDPEFT_AUGMENT_PROCESSES", "two")
    with pytest.raises(MedpeftError, match=r"MEDPEFT_AUGMENT_PROCESSES='two': give a whole number"):
        engine.augment_processes_override()


def test_sgd_under_zero_is_a_config_error_before_any_trial() -> None:
    """DeepSpeed's ZeRO refuses torch's SGD when the engine starts, after the search has set up;
    the config says so first, in one line naming the keys."""
    from conftest import tiny_search

    from medpeft_ray.config import validate_search_dict
    from medpeft_ray.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape("tiny.yaml: train: optimizer sgd runs with deepspeed.zero_stage 0 "
                                                    "only (got 2)")):
        validate_search_dict(tiny_search(train={"optimizer": "sgd", "deepspeed": {"zero_stage": 2}}), "tiny.yaml")
    validate_search_dict(tiny_search(train={"optimizer": "sgd", "deepspeed": {"zero_stage": 0}}), "tiny.yaml")
