"""Exports of the best trial: the re-runnable YAML and the trained adapter (checkpoint, peft
folder, merged timm weights that compute what the tuned model computes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import tiny_search
from safetensors.torch import load_file, save_file

from medpeft_ray.config import TrialConfig, validate_search_dict
from medpeft_ray.errors import MedpeftError
from medpeft_ray.leaderboard import LeaderboardStore, TrialRecord
from medpeft_ray.train.export import best_config_yaml, export_adapter, write_best_yaml
from medpeft_ray.methods import prepare_model
from medpeft_ray.models import build_backbone
from medpeft_ray.train.checkpoint import save_checkpoint
from medpeft_ray.train.recipe import BACKBONE_INIT_SEED

CLASSES = ["Atelectasis", "Effusion", "Nodule"]
IMAGE_SIZE = 32


def make_trial_config(
    method: str,
    backbone: str = "vit_tiny_patch16_224",
    options: dict[str, Any] | None = None,
    pretrained: Path | None = None,
    seed: int = 0,
) -> TrialConfig:
    search = tiny_search(
        model={"backbone": backbone, **({"checkpoint": str(pretrained)} if pretrained else {})},
        method={"name": method, "options": options or {}},
        train={"seed": seed},
    )
    return validate_search_dict(search, "tiny.yaml").trial_config(0.5, {"lr": 0.003})


def tuned_model(config: TrialConfig) -> torch.nn.Module:
    """What a trial trains: the recipe's backbone (random weights drawn at its fixed seed, not the
    trial's), method applied, trainable weights moved off their init."""
    torch.manual_seed(BACKBONE_INIT_SEED)
    model = build_backbone(config.model.backbone, len(CLASSES), IMAGE_SIZE, checkpoint=config.model.checkpoint)
    model = prepare_model(model, config.method.name, config.method.options, config.family)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


def record_trial(tmp_path: Path, config: TrialConfig, model: torch.nn.Module, **overrides: Any) -> dict[str, Any]:
    """Saves the model as the trial's checkpoint, records the trial, returns its leaderboard row."""
    checkpoint = save_checkpoint(
        tmp_path / "ckpt" / config.method.name,
        model,
        {
            "epoch": 2,
            "metrics": {"val_auroc": 0.81},
            "val_auroc_per_class": dict(zip(CLASSES, [0.8, 0.7, 0.93])),
            "trial": config.model_dump(mode="json"),
        },
    )
    values: dict[str, Any] = dict(
        experiment="exp",
        trial_id=f"{config.method.name}-1",
        dataset="synthetic",
        label_ratio=0.5,
        method=config.method.name,
        backbone=config.model.backbone,
        status="completed",
        config=config.model_dump(mode="json"),
        params={"lr": 0.003},
        val_auroc=0.81,
        best_epoch=2,
        epochs_run=2,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        checkpoint=str(checkpoint),
    )
    values.update(overrides)
    store = LeaderboardStore(f"sqlite:///{tmp_path / 'leaderboard.db'}")
    store.record(TrialRecord(**values))
    row = store.best(dataset="synthetic", label_ratio=0.5, method=config.method.name).iloc[0].to_dict()
    store.engine.dispose()
    return row


def images(seed: int = 3) -> torch.Tensor:
    return torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def merged_outputs(directory: Path, backbone: str) -> torch.Tensor:
    plain = build_backbone(backbone, len(CLASSES), IMAGE_SIZE)
    plain.load_state_dict(load_file(str(directory / "model.safetensors")), strict=True)  # timm's own module tree
    with torch.no_grad():
        return plain.eval()(images())


# ----------------------------------------------------------------------------------------------
# best.yaml
# ----------------------------------------------------------------------------------------------


def test_best_yaml_round_trips_through_trial_config(tmp_path: Path) -> None:
    config = make_trial_config("lora", options={"rank": 4, "targets": ["q", "k", "v"]})
    row = {
        "experiment": "exp",
        "trial_id": "abc_00001",
        "dataset": "synthetic",
        "label_ratio": 0.5,
        "method": "lora",
        "status": "completed",
        "config": json.loads(json.dumps(config.model_dump(mode="json"))),
        "val_auroc": 0.8123,
        "best_epoch": 2,
        "epochs_run": 3,
        "trainable_params": 12345,
        "checkpoint": "/results/train/x/checkpoint_000001",
    }
    path = write_best_yaml(row, tmp_path / "deep" / "best.yaml")
    text = path.read_text()
    assert TrialConfig.model_validate(yaml.safe_load(text)) == config
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert header == [
        "# medpeft-ray: best lora on synthetic at label ratio 0.5",
        "# experiment exp, trial abc_00001, status completed",
        "# val_auroc 0.8123 (epoch 2 of 3 run), 12,345 trainable parameters",
        "# checkpoint: /results/train/x/checkpoint_000001",
        "# run it again: medpeft-ray train --config <this file>",
    ]
    assert not text.splitlines()[len(header)].startswith("#")  # comments only at the top
    assert yaml.safe_load(text)["train"]["lr"] == 0.003 and yaml.safe_load(text)["label_ratio"] == 0.5


def test_best_yaml_refuses_a_config_that_no_longer_validates() -> None:
    row = {
        "experiment": "exp",
        "trial_id": "t1",
        "dataset": "synthetic",
        "label_ratio": 0.5,
        "method": "lora",
        "status": "completed",
        "config": {
            "experiment": "exp",
            "label_ratio": 0.5,
            "dataset": {},
            "model": {},
            "method": {},
            "train": {"lr": -1},
        },
    }
    with pytest.raises(MedpeftError) as info:
        best_config_yaml(row)
    assert str(info.value).startswith(
        "trial t1 of experiment 'exp': its stored config does not validate here (train.lr:"
    )


# ----------------------------------------------------------------------------------------------
# The adapter
# ----------------------------------------------------------------------------------------------


def test_export_lora_with_pretrained_weights(tmp_path: Path) -> None:
    from peft import PeftModel

    from medpeft_ray.methods.peft_family import split_qkv

    pretrained = tmp_path / "pretrained.safetensors"
    torch.manual_seed(42)
    save_file(build_backbone("vit_tiny_patch16_224", 1000, IMAGE_SIZE).state_dict(), str(pretrained))
    config = make_trial_config("lora", options={"rank": 4}, pretrained=pretrained, seed=5)
    model = tuned_model(config)
    with torch.no_grad():
        expected = model(images())
    row = record_trial(tmp_path, config, model)

    out = tmp_path / "export"
    result = export_adapter(row, out)
    assert result.peft and result.merged and result.num_classes == 3 and result.class_names == CLASSES
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["trainable.safetensors", "state.json", "peft", "config.yaml", "model.safetensors", "export.json"]
    )
    assert (out / "peft" / "adapter_config.json").is_file() and (out / "peft" / "adapter_model.safetensors").is_file()
    assert TrialConfig.model_validate(yaml.safe_load((out / "config.yaml").read_text())) == config
    manifest = json.loads((out / "export.json").read_text())
    assert (
        manifest["num_classes"] == 3
        and manifest["merged"]
        and manifest["peft"]
        and manifest["backbone"] == "vit_tiny_patch16_224"
    )
    # the merged plain timm model computes what the tuned model computed
    torch.testing.assert_close(merged_outputs(out, "vit_tiny_patch16_224"), expected, atol=1e-5, rtol=1e-4)
    # and the peft folder loads onto the pre-trained backbone with the same outputs
    base = build_backbone("vit_tiny_patch16_224", 3, IMAGE_SIZE, checkpoint=pretrained)
    peft_model = PeftModel.from_pretrained(split_qkv(base), str(out / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(images()), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method,backbone", [("bitfit", "vit_tiny_patch16_224"), ("ssf", "resnet18")])
def test_export_mergeable_method_without_pretrained_weights(tmp_path: Path, method: str, backbone: str) -> None:
    config = make_trial_config(method, backbone=backbone, seed=7)
    model = tuned_model(config)  # random frozen weights at the recipe's seed, not the trial's 7: the export draws them
    with torch.no_grad():
        expected = model(images())
    result = export_adapter(record_trial(tmp_path, config, model), tmp_path / "export")
    assert result.merged and not result.peft and result.note == ""
    assert not (tmp_path / "export" / "peft").exists()
    torch.testing.assert_close(merged_outputs(tmp_path / "export", backbone), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_a_trained_trial_without_pretrained_weights_exports_the_model_it_trained(tmp_path: Path) -> None:
    """Seed 3, no checkpoint: the recipe's frozen backbone is drawn at BACKBONE_INIT_SEED, whatever
    the trial's seed; the merged export is that backbone with the trained LoRA and head folded in."""
    import shutil

    from medpeft_ray.train.checkpoint import load_checkpoint_into
    from medpeft_ray.train.engine import WorkerContext, ensure_process_group
    from medpeft_ray.train.recipes import make_recipe, run_training

    torch.set_num_threads(1)
    ensure_process_group("gloo")
    trial = validate_search_dict(tiny_search(train={"seed": 3, "epochs": 1, "augment": "none"}),
                                 "tiny.yaml").trial_config(1.0, {"lr": 1e-2})
    checkpoint = tmp_path / "checkpoint"
    run_training(trial, WorkerContext(0, 1, torch.device("cpu")),
                 lambda metrics, directory: shutil.copytree(directory, checkpoint, dirs_exist_ok=True))
    row = {"experiment": "tiny", "trial_id": "t1", "status": "completed", "checkpoint": str(checkpoint),
           "method": "lora", "dataset": "synthetic", "label_ratio": 1.0, "config": trial.model_dump(mode="json")}
    result = export_adapter(row, tmp_path / "export")
    assert result.merged and result.peft
    # the trial's model as its recipe builds it (pristine backbone, new head, LoRA), then its trained weights
    trained = make_recipe(trial, WorkerContext(0, 1, torch.device("cpu"))).build_model(trial, len(CLASSES))
    load_checkpoint_into(checkpoint, trained)
    with torch.no_grad():
        expected = trained.eval()(images())
    torch.testing.assert_close(merged_outputs(tmp_path / "export", trial.model.backbone), expected,
                               atol=1e-5, rtol=1e-4)


def test_export_unmergeable_method_copies_the_checkpoint_only(tmp_path: Path) -> None:
    config = make_trial_config("adaptformer", options={"bottleneck": 8})
    model = tuned_model(config)
    row = record_trial(tmp_path, config, model)
    result = export_adapter(row, tmp_path / "export")
    assert not result.merged and "cannot be folded" in result.note
    assert sorted(result.files) == sorted(["trainable.safetensors", "state.json", "config.yaml", "export.json"])
    saved = load_file(str(tmp_path / "export" / "trainable.safetensors"))
    assert saved.keys() == {n for n, p in model.named_parameters() if p.requires_grad}


def test_export_errors_name_the_problem(tmp_path: Path) -> None:
    config = make_trial_config("bitfit")
    row = record_trial(tmp_path, config, tuned_model(config))
    with pytest.raises(MedpeftError, match="no checkpoint recorded \\(status failed\\)"):
        export_adapter({**row, "checkpoint": None, "status": "failed"}, tmp_path / "a")
    with pytest.raises(MedpeftError, match="missing or has no trainable.safetensors"):
        export_adapter({**row, "checkpoint": str(tmp_path / "gone")}, tmp_path / "b")
    # a checkpoint in cloud storage is read from there (tests/test_cloud_results.py); pyarrow's
    # in-memory mock:// storage holds nothing, and storage pyarrow cannot open is named as such
    with pytest.raises(MedpeftError, match="mock://bucket/train/ckpt: the trial's checkpoint folder is missing"):
        export_adapter({**row, "checkpoint": "mock://bucket/train/ckpt"}, tmp_path / "c")
    with pytest.raises(MedpeftError, match="nope://bucket/ckpt: cannot open this storage"):
        export_adapter({**row, "checkpoint": "nope://bucket/ckpt"}, tmp_path / "c")
    assert not (tmp_path / "c").exists()
    with pytest.raises(MedpeftError, match="is the checkpoint itself"):
        export_adapter(row, row["checkpoint"])
    gone = {
        **row,
        "config": {**row["config"], "model": {**row["config"]["model"], "checkpoint": str(tmp_path / "w.pth")}},
    }
    with pytest.raises(MedpeftError, match="w.pth: the trial's pre-trained weights"):
        export_adapter(gone, tmp_path / "d")
    other = make_trial_config("lora", options={"rank": 2})
    with pytest.raises(MedpeftError, match="does not fit the trial's model"):
        export_adapter({**row, "config": other.model_dump(mode="json"), "method": "lora"}, tmp_path / "e")
