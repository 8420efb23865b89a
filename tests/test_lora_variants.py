"""LoRA's variants as options of ``lora`` and ``dora``: rslora, init (PiSSA, OLoRA), LoRA+'s lr_ratio.

Each option reaches peft's config. PiSSA and OLoRA keep the output at initialisation though they
change the trial's base weights; their saved adapter applies to the pristine pre-trained backbone
(peft's conversion to a plain LoRA of rank 2r), their merge computes what the trained model did,
and a warm executor's backbone stays pristine after them. LoRA+'s B matrices train at lr_ratio x lr
through the real DeepSpeed engine (ZeRO stages included), and the schedule keeps the ratio.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import tiny_search
from safetensors.torch import load_file, save_file

from medpeft_ray.config import validate_search_dict
from medpeft_ray.errors import ConfigError
from medpeft_ray.methods import merge_method, method_lr_scales, prepare_model
from medpeft_ray.methods.export import INITIAL_A, INITIAL_B
from medpeft_ray.methods.peft_family import split_qkv
from medpeft_ray.models import build_backbone
from medpeft_ray.train.checkpoint import trainable_state
from medpeft_ray.train.engine import WorkerContext, ensure_process_group, warmup_cosine
from medpeft_ray.train.recipe import TrialRecipe
from medpeft_ray.train.recipes import run_training

BACKBONE = "vit_tiny_patch16_224"
SPACES = Path(__file__).resolve().parent.parent / "search_spaces"
CPU = WorkerContext(0, 1, torch.device("cpu"))


@functools.lru_cache(maxsize=1)
def _seeded_backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone(BACKBONE, num_classes=3, image_size=32).eval()


def backbone() -> torch.nn.Module:
    """The same seeded backbone every time (a copy: what a test changes stays in its copy)."""
    return copy.deepcopy(_seeded_backbone())


def adapted(method: str = "lora", **options: Any) -> torch.nn.Module:
    """``method`` on Q and V of three blocks (fewer factorisations than all twelve: a faster test)."""
    return prepare_model(backbone(), method, {"rank": 4, "blocks": "0,5,11", **options}, "vit").eval()


def inputs() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def lora_layers(model: torch.nn.Module) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


# ----------------------------------------------------------------------------------------------
# The options reach peft
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,options,init,rslora", [
    ("lora", {}, True, False),
    ("lora", {"init": "gaussian"}, "gaussian", False),
    ("lora", {"init": "pissa", "rslora": True}, "pissa", True),
    ("lora", {"init": "olora"}, "olora", False),
    ("dora", {"init": "pissa", "rslora": True}, "pissa", True),
    ("dora", {"init": "olora"}, "olora", False),
])
def test_each_option_reaches_peft_config(method: str, options: dict, init: Any, rslora: bool) -> None:
    model = adapted(method, **options)
    config = model.peft_config["default"]
    assert config.init_lora_weights == init and config.use_rslora is rslora and config.use_dora is (method == "dora")
    layers = lora_layers(model)
    assert len(layers) == 6  # Q and V of 3 blocks
    assert all(layer.use_rslora["default"] is rslora for layer in layers.values())
    # only PiSSA and OLoRA keep their first factors (their base weights are residuals)
    assert all(hasattr(layer, INITIAL_A) is (init in ("pissa", "olora")) for layer in layers.values())


def test_default_and_gaussian_init_are_peft_s() -> None:
    """default is peft's True (the reference LoRA: A Kaiming-uniform, B zero); gaussian draws A ~ N(0, 1/r)."""
    default = lora_layers(adapted(rank=8))["blocks.0.attn.qkv.q"]
    a = default.lora_A["default"].weight
    assert a.abs().max() <= 1 / 192**0.5 and a.std() > 0.5 / 192**0.5  # uniform(+-1/sqrt(fan_in)): kaiming, a=sqrt(5)
    gaussian = lora_layers(adapted(rank=8, init="gaussian"))["blocks.0.attn.qkv.q"]
    assert gaussian.lora_A["default"].weight.std().item() == pytest.approx(1 / 8, rel=0.1)
    for layer in (default, gaussian):
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


def test_rslora_scales_updates_by_alpha_over_sqrt_rank() -> None:
    plain = lora_layers(adapted(rank=16, alpha=32))["blocks.5.attn.qkv.v"]
    stabilised = lora_layers(adapted(rank=16, alpha=32, rslora=True))["blocks.5.attn.qkv.v"]
    assert plain.scaling["default"] == pytest.approx(32 / 16)
    assert stabilised.scaling["default"] == pytest.approx(32 / 16**0.5)


def test_lr_ratio_asks_the_optimizer_for_the_b_matrices_only() -> None:
    assert method_lr_scales("lora", {"lr_ratio": 16}, "vit") == {r"\.lora_B\.": 16.0}
    assert method_lr_scales("dora", {"lr_ratio": 4}, "vit") == {r"\.lora_B\.": 4.0}
    assert method_lr_scales("lora", {}, "resnet") == {} and method_lr_scales("bitfit", {}, "vit") == {}
    names = [n for n, p in adapted("dora").named_parameters() if p.requires_grad]
    matched = [n for n in names if re.search(r"\.lora_B\.", n)]
    assert len(matched) == 6 and not any("magnitude" in n or n.startswith("head") for n in matched)


# ----------------------------------------------------------------------------------------------
# PiSSA and OLoRA: the residual plus the adapter is the original model
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_start_from_the_pristine_models_output(method: str, init: str) -> None:
    pristine = split_qkv(backbone())
    weights = {n: p.detach().clone() for n, p in pristine.named_parameters()}
    model = adapted(method, init=init, rank=8)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs()), pristine(inputs()), atol=2e-6, rtol=1e-5)
    for name, layer in lora_layers(model).items():
        original = weights[f"{name}.weight"]
        a, b, scaling = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
        # the base weight is the residual W - s B0 A0, and B0, A0 are kept as they started
        torch.testing.assert_close(layer.get_base_layer().weight, original - scaling * b @ a, atol=1e-5, rtol=1e-5)
        assert torch.equal(getattr(layer, INITIAL_A), a) and torch.equal(getattr(layer, INITIAL_B), b)
        assert not torch.allclose(layer.get_base_layer().weight, original, atol=1e-3)
        if init == "pissa":  # s B0 A0 is W's best rank-8 approximation: its top singular values
            top = torch.linalg.svdvals(original)[:8]
            torch.testing.assert_close(torch.linalg.svdvals(scaling * b @ a)[:8], top, atol=1e-4, rtol=1e-4)
        else:  # OLoRA: B0 is the first r columns of W's QR factorisation: orthonormal
            torch.testing.assert_close(b.T @ b, torch.eye(8), atol=1e-5, rtol=0)


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


@pytest.mark.parametrize("method,options", [
    ("lora", {"init": "pissa"}), ("lora", {"init": "olora", "rslora": True}), ("dora", {"init": "pissa"}),
])
def test_the_saved_adapter_applies_to_the_pristine_backbone_and_the_merge_equals_the_model(
        method: str, options: dict, tmp_path: Path) -> None:
    from peft import PeftModel

    from medpeft_ray.train.checkpoint import PEFT_DIR, save_checkpoint

    model = _perturbed(adapted(method, **options))
    with torch.no_grad():
        expected = model(inputs())
    save_checkpoint(tmp_path, model, {"epoch": 1})
    config = json.loads((tmp_path / PEFT_DIR / "adapter_config.json").read_text())
    # peft's conversion: a plain LoRA of rank 2r at the same scaling, nothing to re-initialise on load
    assert config["r"] == 8 and config["init_lora_weights"] is True
    assert config["lora_alpha"] == pytest.approx(32 * (2**0.5 if options.get("rslora") else 2))
    loaded = PeftModel.from_pretrained(split_qkv(backbone()), str(tmp_path / PEFT_DIR)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs()), expected, atol=1e-5, rtol=1e-4)
        merged = merge_method(model, method).eval()
        torch.testing.assert_close(merged(inputs()), expected, atol=1e-5, rtol=1e-4)
    plain = backbone()
    plain.load_state_dict(merged.state_dict(), strict=True)  # timm's own module tree again


# ----------------------------------------------------------------------------------------------
# Refused combinations: one line naming the key
# ----------------------------------------------------------------------------------------------


def _refusal(**sections: Any) -> str:
    with pytest.raises(ConfigError) as info:
        validate_search_dict(tiny_search(**sections), "tiny.yaml")
    message = str(info.value)
    assert "\n" not in message
    return message


def test_combinations_peft_refuses_are_refused_at_validation_in_one_line() -> None:
    resnet = _refusal(model={"backbone": "resnet18"}, method={"name": "lora", "options": {"init": "pissa"}})
    assert resnet.startswith("tiny.yaml: method.options.init: pissa applies to ViT backbones only (peft has no PiSSA")
    searched = _refusal(model={"backbone": "resnet18"}, method={"name": "lora", "options": {}},
                        space={"init": {"type": "categorical", "choices": ["default", "olora"]}})
    assert searched.startswith("tiny.yaml: space.init.choices.1: olora applies to ViT backbones only")
    assert _refusal(method={"name": "lora", "options": {"init": "loftq"}}).startswith(
        "tiny.yaml: method.options.init: ")
    assert "loftq" in _refusal(method={"name": "lora", "options": {"init": "loftq"}})
    assert _refusal(method={"name": "lora", "options": {"lr_ratio": 0.5}}).startswith(
        "tiny.yaml: method.options.lr_ratio: ")
    with pytest.raises(ConfigError) as info:
        validate_search_dict({"task": "generation", "model": {"backbone": "unet_tiny"}, "train": {"augment": "none"},
                              "method": {"name": "lora", "options": {"init": "pissa"}}}, "unet.yaml")
    assert str(info.value).startswith("unet.yaml: method.options.init: pissa applies to ViT backbones only")
    assert "\n" not in str(info.value)
    # what only the backbone's layers tell: a rank past a layer's width (pre-flight builds the model on meta)
    with torch.device("meta"), pytest.raises(ValueError) as too_wide:
        prepare_model(build_backbone(BACKBONE, 3, 32), "lora", {"init": "olora", "rank": 256}, "vit")
    assert str(too_wide.value) == ("rank: 256 is more than the 192 features of blocks.0.attn.qkv.q, which init olora "
                                   "factorises into at most 192 components")


# ----------------------------------------------------------------------------------------------
# LoRA+ through the real DeepSpeed engine
# ----------------------------------------------------------------------------------------------


def _trial(options: dict[str, Any], lr: float = 3e-3, **train: Any) -> Any:
    config = validate_search_dict(
        tiny_search(method={"name": "lora", "options": {"rank": 2, **options}}, train={"epochs": 2, **train}),
        "tiny.yaml")
    return config.trial_config(1.0, {"lr": lr})


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_lora_plus_trains_b_at_lr_ratio_times_lr_through_deepspeed_and_the_schedule_keeps_it(zero_stage: int) -> None:
    """The first AdamW step through the trial's own engine (ZeRO's partitioned groups included) moves
    each parameter by lr x g / (|g| + eps), the B matrices by lr_ratio x lr x that; the warm-up and
    cosine schedule then scales every group alike. (OLoRA: B starts non-zero, so that A has a
    gradient at the first step too. DeepSpeed clips at norm 1 unless told a bound: a bound no
    gradient reaches leaves the step unclipped.)"""
    ensure_process_group("gloo")
    trial = _trial({"lr_ratio": 16, "dropout": 0.0, "init": "olora"}, lr=1e-3, weight_decay=0.0, warmup_epochs=1,
                   deepspeed={"zero_stage": zero_stage, "gradient_clipping": 1e9})
    recipe = TrialRecipe(CPU)
    model = recipe.build_model(trial, 3).eval()
    reference = copy.deepcopy(model)
    engine, micro_batch, shard = recipe.engine(trial, model, 40)
    factor = warmup_cosine(trial.train, math.ceil(shard / micro_batch))
    x = torch.randn(micro_batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference(x).sum().backward()
    gradients = {n: p.grad.clone() for n, p in reference.named_parameters() if p.requires_grad}
    assert all(gradients[n].abs().max() > 0 for n in gradients if ".lora_" in n)
    before = trainable_state(engine.module)
    lr = 1e-3 * factor(0)
    assert sorted(set(engine.get_lr())) == pytest.approx([lr, 16 * lr])
    engine.eval()
    engine.backward(engine(x).sum())
    engine.step()
    after = trainable_state(engine.module)
    assert set(after) == set(gradients) and sum(".lora_B." in n for n in after) == 24
    for name, gradient in gradients.items():
        step = lr * (16 if ".lora_B." in name else 1)  # Adam's first step: m / sqrt(v) = g / (|g| + eps)
        # where |g| is well above eps (near it, the ratio follows the last digits ZeRO-3's reduction changes)
        clear = gradient.abs() > 1e-6
        assert clear.float().mean() > 0.5, name
        torch.testing.assert_close((before[name] - after[name])[clear], (step * gradient / (gradient.abs() + 1e-8))[clear],
                                   atol=5e-7, rtol=1e-4, msg=name)  # atol: fp32's rounding of weights near 1
    for step in range(1, 4):
        assert sorted(set(engine.get_lr())) == pytest.approx([1e-3 * factor(step), 16e-3 * factor(step)]), step
        engine.backward(engine(x).sum())
        engine.step()


# ----------------------------------------------------------------------------------------------
# Trained trials: export, merge, warm == cold
# ----------------------------------------------------------------------------------------------


def _pretrained(tmp_path: Path) -> Path:
    path = tmp_path / "pretrained.safetensors"
    torch.manual_seed(42)
    save_file(build_backbone(BACKBONE, 1000, 32).state_dict(), str(path))
    return path


def _row(trial: Any, checkpoint: Path) -> dict[str, Any]:
    """The leaderboard row an export reads (the fields it uses)."""
    return {"experiment": trial.experiment, "trial_id": "t1", "dataset": "synthetic", "label_ratio": trial.label_ratio,
            "method": trial.method.name, "status": "completed", "config": trial.model_dump(mode="json"),
            "val_auroc": 0.5, "best_epoch": 1, "epochs_run": 1, "checkpoint": str(checkpoint)}


@pytest.mark.slow
@pytest.mark.parametrize("method,options", [
    ("lora", {"init": "pissa"}), ("lora", {"init": "olora"}), ("lora", {"rslora": True}), ("lora", {"lr_ratio": 16}),
    ("dora", {"init": "pissa", "rslora": True, "lr_ratio": 16}),
])
def test_a_trained_trials_export_reproduces_it_on_the_pristine_backbone(method: str, options: dict, tmp_path: Path) -> None:
    """An epoch through the trial's recipe and engine, its checkpoint, and ``export_adapter``: the
    peft folder on the user's pre-trained backbone and the merged timm weights compute what the
    trained model computes."""
    from peft import PeftModel

    from medpeft_ray.train.export import export_adapter

    ensure_process_group("gloo")
    pretrained = _pretrained(tmp_path)
    config = validate_search_dict(tiny_search(
        model={"checkpoint": str(pretrained)}, method={"name": method, "options": {"rank": 2, **options}},
        train={"epochs": 1}), "tiny.yaml")
    trial = config.trial_config(1.0, {"lr": 1e-2})
    recipe = TrialRecipe(CPU)
    state = recipe.build(trial, None, None)
    start = trainable_state(state.engine.module)
    recipe.train_epoch(trial, state, 0, [])
    model = state.engine.module.eval()
    trained = trainable_state(model)
    assert all(not torch.equal(trained[n], start[n]) for n in trained if ".lora_B." in n)  # it trained
    with torch.no_grad():
        expected = model(inputs())
    checkpoint = recipe.save(trial, state, tmp_path / "checkpoint", {"epoch": 1}, [0.5, 0.5, 0.5])
    exported = export_adapter(_row(trial, checkpoint), tmp_path / "export")
    assert exported.peft and exported.merged

    user_backbone = split_qkv(build_backbone(BACKBONE, 3, 32, checkpoint=pretrained))
    loaded = PeftModel.from_pretrained(user_backbone, str(tmp_path / "export" / "peft")).eval()
    plain = build_backbone(BACKBONE, 3, 32)
    plain.load_state_dict(load_file(str(tmp_path / "export" / "model.safetensors")), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs()), expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(plain.eval()(inputs()), expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(merge_method(model, method)(inputs()), expected, atol=1e-5, rtol=1e-4)


def _epochs(recipe: TrialRecipe | None, trial: Any) -> list[tuple[float, float, float]]:
    seen: list[tuple[float, float, float]] = []

    def report(metrics: dict[str, Any], directory: Path | None) -> None:
        seen.append((metrics["train_loss"], metrics["val_loss"], metrics["val_auroc"]))

    if recipe is None:
        run_training(trial, CPU, report)
    else:
        recipe.run(trial, report)
    return seen


def _checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.slow
def test_a_warm_pissa_trial_equals_a_cold_one_and_the_executors_backbone_stays_pristine() -> None:
    """PiSSA and OLoRA trials on a warm recipe: the backbone it keeps is bit for bit what it was,
    the PiSSA trial trains exactly as on a fresh recipe, and the next trial sees the original weights."""
    ensure_process_group("gloo")
    recipe = TrialRecipe(CPU)
    lora, pissa, olora = _trial({}), _trial({"init": "pissa"}), _trial({"init": "olora", "rslora": True})
    first = _epochs(recipe, lora)
    (key,) = recipe._pristine
    before = _checksum(recipe._pristine[key])
    warm_pissa = _epochs(recipe, pissa)
    _epochs(recipe, olora)
    assert _checksum(recipe._pristine[key]) == before
    assert _epochs(recipe, lora) == first  # exactly: the next trial trains on the original weights
    assert warm_pissa == _epochs(None, pissa)  # and exactly what a cold run gives
    assert warm_pissa != first  # PiSSA is not plain LoRA
    assert recipe.trials_run == 4 and len(recipe._pristine) == 1


# ----------------------------------------------------------------------------------------------
# A real search over the variants
# ----------------------------------------------------------------------------------------------


@pytest.mark.ray
def test_a_search_over_init_rslora_and_lr_ratio_records_the_sampled_values(tmp_path: Path, ray_session: None) -> None:
    """search_spaces/lora_variants.yaml, shrunk: three trials, whose first points name PiSSA, OLoRA and
    the default init; each row records what was sampled, and a PiSSA trial's checkpoint holds
    peft's converted adapter."""
    from conftest import leaderboard_rows

    from medpeft_ray.search.runner import run_search

    raw = yaml.safe_load((SPACES / "lora_variants.yaml").read_text())
    raw["dataset"].update(label_ratios=[1.0], image_size=32, options={"num_classes": 3, "num_patients": 40})
    raw["space"]["rank"] = {"type": "categorical", "choices": [2, 4]}
    raw["train"].update(epochs=1, batch_size=8)
    raw["resources"].update(gpus_per_worker=0, executor_idle_s=300)
    raw["search"].update(num_samples=3, scheduler={"type": "none"}, points_to_evaluate=[
        {"init": "pissa", "rslora": True, "lr_ratio": 16.0}, {"init": "olora", "rslora": False, "lr_ratio": 1.0},
        {"init": "default", "rslora": True, "lr_ratio": 16.0}])
    config = validate_search_dict(raw, "lora_variants.yaml")
    run_search(config, results=tmp_path / "results")
    rows = leaderboard_rows(tmp_path / "results")
    assert len(rows) == 3
    assert sorted(row["params"]["init"] for row in rows) == ["default", "olora", "pissa"]
    for row in rows:
        assert row["status"] == "completed", row["error"]
        options = row["config"]["method"]["options"]
        assert {k: options[k] for k in ("init", "rslora", "lr_ratio", "rank")} == {
            k: row["params"][k] for k in ("init", "rslora", "lr_ratio", "rank")}
        assert 0.0 <= row["val_auroc"] <= 1.0
        if options["init"] == "pissa":
            adapter = json.loads((Path(row["checkpoint"]) / "peft" / "adapter_config.json").read_text())
            assert adapter["r"] == 2 * options["rank"] and adapter["init_lora_weights"] is True
