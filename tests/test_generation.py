"""Generation searches: text-to-image fine-tuning of a diffusion U-Net, scored by a fixed validation loss and FID.

Config and pipeline checks are fast; the recipe tests train the built-in tiny pipeline for an epoch
or two on CPU and export what they trained into diffusers' own formats; one real search runs
through Ray (marked ``ray``).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import cli_in_process, leaderboard_rows

from medpeft_ray.config import validate_search_dict
from medpeft_ray.errors import CheckpointError, ConfigError, DataError


def generation_search(**sections: Any) -> dict[str, Any]:
    """A generation search small enough for a CPU test: the tiny pipeline, 32 px, few images, 2 epochs."""
    config: dict[str, Any] = {
        "experiment": "gen",
        "task": "generation",
        "dataset": {"name": "synthetic", "label_ratios": [1.0], "image_size": 32,
                    "options": {"num_patients": 20, "num_classes": 3}},
        "model": {"backbone": "unet_tiny"},
        "method": {"name": "lora", "options": {"rank": 2, "dropout": 0.0}},
        "train": {"epochs": 2, "batch_size": 8, "augment": "none", "lr": 1e-3},
        "search": {"num_samples": 2, "seed": 0, "scheduler": {"type": "none"}, "fid": {"images": 4, "steps": 2}},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "gpus_per_worker": 0},
    }
    for name, value in sections.items():
        config[name] = {**config[name], **value} if isinstance(value, dict) else value
    return config


def error_of(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        validate_search_dict(raw, "gen.yaml")
    return str(info.value)


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def test_a_generation_search_ranks_by_fid_and_stops_on_the_fixed_validation_loss() -> None:
    config = validate_search_dict(generation_search(), "gen.yaml")
    assert config.search.metric == "val_fid" and config.search.resolved_mode == "min"
    assert config.search.stopping_metric == "val_loss"
    named = validate_search_dict(generation_search(search={"metric": "fid"}), "gen.yaml")
    assert named.search.metric == "val_fid"  # val_ may be left out
    trial = config.trial_config(1.0, config.search_space.first_point("lora"))
    assert trial.generation and trial.metric == "val_fid" and trial.fid is not None
    assert trial.fid.epochs == [2] and trial.fid.images == 4  # no scheduler: FID at the last epoch only
    classifier = validate_search_dict({"experiment": "c"}, "c.yaml")
    assert classifier.search.metric == "val_auroc" and classifier.search.stopping_metric == "val_auroc"


@pytest.mark.parametrize("scheduler,at,epochs,expected", [
    ({"type": "asha", "grace_period": 1, "reduction_factor": 2}, "rungs", 8, [1, 2, 4, 8]),
    ({"type": "asha", "grace_period": 2, "reduction_factor": 3}, "rungs", 10, [2, 6, 10]),
    ({"type": "hyperband", "grace_period": 1, "reduction_factor": 2, "brackets": 2}, "rungs", 5, [1, 2, 4, 5]),
    ({"type": "asha", "grace_period": 1, "reduction_factor": 1.5}, "rungs", 4, [1, 2, 3, 4]),
    ({"type": "median", "grace_period": 2}, "rungs", 4, [2, 3, 4]),
    ({"type": "none"}, "rungs", 3, [3]),
    ({"type": "none"}, "every_epoch", 3, [1, 2, 3]),
])
def test_fid_is_computed_where_the_scheduler_can_stop_a_trial(scheduler: dict, at: str, epochs: int,
                                                               expected: list[int]) -> None:
    config = validate_search_dict(generation_search(search={"scheduler": scheduler, "fid": {"at": at}},
                                                    train={"epochs": epochs}), "gen.yaml")
    assert config.search.fid_epochs(epochs) == expected


@pytest.mark.parametrize("change,message", [
    ({"task": "classification"}, "gen.yaml: model.backbone: 'unet_tiny' is a generation backbone; task classification "
                                 "needs a timm classifier (or set task: generation)"),
    ({"model": {"backbone": "vit_tiny_patch16_224"}},
     "gen.yaml: model.backbone: 'vit_tiny_patch16_224' is a classification backbone; task generation needs a "
     "diffusion U-Net (unet_tiny, unet_sd15)"),
    ({"search": {"metric": "val_auroc"}}, "gen.yaml: search.metric: val_auroc is not a generation metric (these are: "
                                          "val_loss, val_fid)"),
    ({"train": {"augment": "crop_flip"}}, "gen.yaml: train.augment: a generation search trains on the images as they "
                                          "are: set none (got 'crop_flip')"),
    ({"method": {"name": "ssf"}}, "gen.yaml: method.name: 'ssf' does not apply to unet backbones like 'unet_tiny'"),
    ({"model": {"backbone": "unet_tiny", "checkpoint": "/nonexistent/sd15"}},
     "gen.yaml: model.checkpoint: pipeline folder not found: /nonexistent/sd15"),
    ({"search": {"fid_weights": "/nonexistent/pt_inception.pth"}},
     "gen.yaml: search.fid_weights: file not found: /nonexistent/pt_inception.pth"),
])
def test_a_bad_generation_config_is_one_line_naming_the_key(change: dict, message: str) -> None:
    assert error_of(generation_search(**change)).startswith(message)


def test_fid_is_refused_for_a_classification_search() -> None:
    assert error_of({"experiment": "c", "search": {"metric": "fid"}}).startswith(
        "gen.yaml: search.metric: val_fid is not a classification metric")


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------


def test_the_built_in_pipeline_is_one_deterministic_diffusers_folder(tmp_path: Path, monkeypatch) -> None:
    from diffusers import StableDiffusionPipeline

    from medpeft_ray.models.unet import built_pipeline_folder, check_pipeline_folder

    first = built_pipeline_folder("unet_tiny", 32)
    assert check_pipeline_folder(first)["_class_name"] == "UNet2DConditionModel"
    monkeypatch.setenv("MEDPEFT_CACHE", str(tmp_path / "other"))
    second = built_pipeline_folder("unet_tiny", 32)
    assert second != first
    a = StableDiffusionPipeline.from_pretrained(first, local_files_only=True)
    b = StableDiffusionPipeline.from_pretrained(second, local_files_only=True)
    for part in ("unet", "vae", "text_encoder"):
        for (name, x), (_, y) in zip(getattr(a, part).state_dict().items(), getattr(b, part).state_dict().items()):
            assert torch.equal(x, y), f"{part}.{name}"
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
    # report words are one token each; any other word is spelled out, never unknown
    tokens = a.tokenizer.tokenize("No acute cardiopulmonary process. Pleural effusion. Xylophone")
    assert tokens[:4] == ["no</w>", "acute</w>", "cardiopulmonary</w>", "process</w>"]
    assert a.tokenizer.unk_token not in tokens


def test_a_pipeline_folder_missing_a_part_is_one_line(tmp_path: Path) -> None:
    from medpeft_ray.models.unet import built_pipeline_folder, check_pipeline_folder

    folder = tmp_path / "sd"
    shutil.copytree(built_pipeline_folder("unet_tiny", 32), folder)
    shutil.rmtree(folder / "vae")
    with pytest.raises(CheckpointError, match=rf"^{folder}: no vae/ folder \(a diffusers pipeline folder has "):
        check_pipeline_folder(folder)
    shutil.copytree(built_pipeline_folder("unet_tiny", 32) / "vae", folder / "vae")
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(CheckpointError, match=r"unet: no weights \(\.safetensors or \.bin\)$"):
        check_pipeline_folder(folder)


def test_preflight_refuses_data_without_captions(monkeypatch) -> None:
    import dataclasses

    import medpeft_ray.data as data
    from medpeft_ray.search.preflight import preflight

    real = data.load_splits

    def without_captions(*args: Any, **kwargs: Any) -> Any:
        splits = real(*args, **kwargs)
        return dataclasses.replace(splits, val=dataclasses.replace(splits.val, captions=None))

    monkeypatch.setattr(data, "load_splits", without_captions)
    config = validate_search_dict(generation_search(), "gen.yaml")
    with pytest.raises(DataError, match="dataset 'synthetic' has no captions; a generation search needs images"):
        preflight(config)


def test_preflight_counts_each_methods_trainable_parameters() -> None:
    from medpeft_ray.search.preflight import preflight

    config = validate_search_dict(generation_search(method={"name": ["bitfit", "lora", "full"], "options": {}}),
                                  "gen.yaml")
    facts = preflight(config)
    counts = facts["trainable_params_by_method"]
    assert counts["full"] == 792_964  # the whole tiny U-Net; VAE and text encoder stay frozen
    assert 0 < counts["bitfit"] < counts["full"] and 0 < counts["lora"] < counts["full"]


# ----------------------------------------------------------------------------------------------
# Training, sampling and export (no Ray: the recipe on this process)
# ----------------------------------------------------------------------------------------------


def _trained(tmp_path: Path, method: str, options: dict[str, Any] | None = None, **train: Any) -> tuple[Any, list, Path]:
    """Trains one trial of ``method`` here; returns its config, its epochs' metrics and its last checkpoint."""
    from medpeft_ray.train.engine import WorkerContext, ensure_process_group
    from medpeft_ray.train.recipes import run_training

    ensure_process_group("gloo")
    config = validate_search_dict(generation_search(method={"name": method, "options": options or {}},
                                                    train={"batch_size": 8, "augment": "none", "lr": 1e-2, **train}),
                                  "gen.yaml")
    trial = config.trial_config(1.0, config.search_space.first_point(method))
    epochs: list[dict[str, Any]] = []
    saved = tmp_path / f"{method}-checkpoint"

    def report(metrics: dict[str, Any], directory: Path | None) -> None:
        epochs.append(metrics)
        if directory is not None:
            shutil.rmtree(saved, ignore_errors=True)
            shutil.copytree(directory, saved)

    run_training(trial, WorkerContext(0, 1, torch.device("cpu")), report)
    return trial, epochs, saved


def _row(trial: Any, checkpoint: Path, fid: float) -> dict[str, Any]:
    return {"experiment": "gen", "trial_id": "t1", "status": "completed", "checkpoint": str(checkpoint),
            "dataset": "synthetic", "label_ratio": 1.0,
            "config": trial.model_dump(mode="json"), "val_fid": fid, "method": trial.method.name}


@pytest.mark.slow
def test_lora_trains_reports_fid_at_its_epochs_and_exports_a_lora_diffusers_loads(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    from medpeft_ray.train.export import export_adapter
    from medpeft_ray.samples import SAMPLES_FILE
    from medpeft_ray.train.generation import generate

    trial, epochs, checkpoint = _trained(tmp_path, "lora", {"rank": 4, "dropout": 0.0})
    assert [m["epoch"] for m in epochs] == [1, 2]
    assert math.isnan(epochs[0]["val_fid"]) and math.isfinite(epochs[1]["val_fid"])  # FID at the last epoch only
    assert all(math.isfinite(m["val_loss"]) and math.isfinite(m["train_loss"]) for m in epochs)
    details = json.loads(epochs[1]["details"])
    assert details["fid_stand_in"] is True and "stand-in" in details["fid_features"]
    assert len(details["prompts"]) == 4 and all(isinstance(p, str) and p for p in details["prompts"])
    samples = np.load(checkpoint / SAMPLES_FILE)
    assert samples.shape == (4, 32, 32) and samples.dtype == np.uint8

    out = tmp_path / "export"
    exported = export_adapter(_row(trial, checkpoint, epochs[1]["val_fid"]), out, "val_fid")
    assert "lora/" in exported.files and "unet/" in exported.files and exported.merged
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["prompts"] == details["prompts"]
    # diffusers' own adapter loading on the trial's pipeline folder reproduces the trial's samples
    pipeline = StableDiffusionPipeline.from_pretrained(manifest["pipeline"], local_files_only=True)
    pipeline.load_lora_weights(out / "lora")
    from diffusers import DDIMScheduler

    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    again = generate(pipeline, manifest["prompts"], trial.fid, 32, 8)
    assert np.abs(again.astype(int) - samples.astype(int)).max() <= 1
    # and the adapter is loaded, not ignored: the U-Net's noise prediction differs from the untuned one's
    bare = StableDiffusionPipeline.from_pretrained(manifest["pipeline"], local_files_only=True)
    gen = torch.Generator().manual_seed(3)
    latents, text = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 7, 32, generator=gen)
    with torch.no_grad():
        tuned_eps = pipeline.unet(latents, torch.tensor([500]), encoder_hidden_states=text).sample
        bare_eps = bare.unet(latents, torch.tensor([500]), encoder_hidden_states=text).sample
    assert (tuned_eps - bare_eps).abs().max() > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("rslora", [False, True])
def test_the_exported_lora_loads_in_diffusers_at_the_trials_scaling(tmp_path: Path, rslora: bool) -> None:
    """alpha 32 at rank 4 scales the update by 8 (16 under rslora): diffusers reads that from the
    file's metadata, and the loaded U-Net predicts the trained U-Net's noise, not the bare one's."""
    from diffusers import StableDiffusionPipeline

    from medpeft_ray.methods import prepare_model
    from medpeft_ray.models import build_backbone
    from medpeft_ray.train.checkpoint import load_checkpoint_into
    from medpeft_ray.train.export import export_adapter

    trial, epochs, checkpoint = _trained(tmp_path, "lora", {"rank": 4, "alpha": 32.0, "dropout": 0.0,
                                                            "rslora": rslora}, epochs=1)
    out = tmp_path / "export"
    export_adapter(_row(trial, checkpoint, epochs[-1]["val_fid"]), out, "val_fid")
    pipeline_dir = json.loads((out / "export.json").read_text())["pipeline"]
    # the trained U-Net, as the recipe builds it: the pipeline's U-Net, the LoRA, the checkpoint
    trained = prepare_model(build_backbone("unet_tiny", 0, 32), "lora", trial.method.options, "unet")
    load_checkpoint_into(checkpoint, trained)
    loaded = StableDiffusionPipeline.from_pretrained(pipeline_dir, local_files_only=True)
    loaded.load_lora_weights(out / "lora")
    bare = StableDiffusionPipeline.from_pretrained(pipeline_dir, local_files_only=True).unet
    gen = torch.Generator().manual_seed(3)
    latents, text = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 7, 32, generator=gen)
    with torch.no_grad():
        eps = {name: unet.eval()(latents, torch.tensor([500, 50]), encoder_hidden_states=text).sample
               for name, unet in (("trained", trained), ("loaded", loaded.unet), ("bare", bare))}
    assert (eps["trained"] - eps["bare"]).abs().max() > 1e-3  # the LoRA moved the U-Net: a lost scaling shows
    torch.testing.assert_close(eps["loaded"], eps["trained"], atol=1e-6, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["difffit", "sv_diff"])
def test_a_mergeable_method_exports_a_merged_unet_that_reproduces_its_samples(tmp_path: Path, method: str) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from medpeft_ray.train.export import export_adapter
    from medpeft_ray.samples import SAMPLES_FILE
    from medpeft_ray.train.generation import generate

    trial, epochs, checkpoint = _trained(tmp_path, method, epochs=1)
    out = tmp_path / "export"
    export_adapter(_row(trial, checkpoint, epochs[-1]["val_fid"]), out, "val_fid")
    manifest = json.loads((out / "export.json").read_text())
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")  # a plain U-Net: nothing of the method left
    pipeline = StableDiffusionPipeline.from_pretrained(manifest["pipeline"], unet=unet, local_files_only=True)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    again = generate(pipeline, manifest["prompts"], trial.fid, 32, 8)
    assert np.abs(again.astype(int) - np.load(checkpoint / SAMPLES_FILE).astype(int)).max() <= 1


@pytest.mark.slow
def test_the_fixed_validation_loss_is_the_same_for_every_method_before_training() -> None:
    """Fixed noise and timesteps: methods that leave the U-Net unchanged at first score the same."""
    from medpeft_ray.train.engine import WorkerContext, ensure_process_group
    from medpeft_ray.train.generation import GenerationRecipe

    ensure_process_group("gloo")
    recipe = GenerationRecipe(WorkerContext(0, 1, torch.device("cpu")))
    losses = {}
    for method in ("bitfit", "lora", "difffit"):
        config = validate_search_dict(generation_search(method={"name": method, "options": {}}), "gen.yaml")
        trial = config.trial_config(1.0, config.search_space.first_point(method))
        state = recipe.build(trial, None, None)
        try:
            losses[method] = recipe.fixed_loss(trial, state, state.val, "val")
        finally:
            recipe.release(state)
    assert losses["bitfit"] == pytest.approx(losses["lora"], rel=1e-6) == pytest.approx(losses["difffit"], rel=1e-6)


# ----------------------------------------------------------------------------------------------
# A real search through Ray
# ----------------------------------------------------------------------------------------------


@pytest.mark.ray
def test_a_generation_search_fills_the_leaderboard_with_fid(tmp_path: Path, ray_session: None,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    config = generation_search(
        method={"name": ["bitfit", "lora"], "options": {"lora": {"rank": 2, "dropout": 0.0}}},
        search={"num_samples": 2, "points_to_evaluate": [{"method": "bitfit"}, {"method": "lora"}],
                "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2}},
    )
    space = tmp_path / "gen.yaml"
    space.write_text(yaml.safe_dump(config))
    results = tmp_path / "results"
    search = cli_in_process(["search", "--space", space, "--results", results], monkeypatch, capsys, cwd=tmp_path)
    assert search.returncode == 0, search.stdout[-3000:] + search.stderr[-3000:]
    rows = leaderboard_rows(results)
    assert sorted(r["method"] for r in rows) == ["bitfit", "lora"], rows
    for row in rows:
        assert row["status"] in ("completed", "stopped") and math.isfinite(row["val_fid"]), row
        assert row["backbone"] == "unet_tiny" and (row["val_auroc"] is None or math.isnan(row["val_auroc"]))
        assert row["details"]["fid_stand_in"] is True  # the store parses details into a dict
        assert Path(row["checkpoint"], "samples.npy").is_file()
    board = cli_in_process(["leaderboard", "--results", results, "--format", "json"], monkeypatch, capsys)
    ranked = [r["val_fid"] for r in json.loads(board.stdout)]
    assert ranked == sorted(ranked)  # best (lowest) FID first: the default metric of generation rows
