"""The ready search spaces: one per method, the MED-PEFT preset, and real searches over four of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import cli_in_process, load_shipped_space, shipped_presets_in

from medpeft_ray.config import load_search_config, validate_search_dict
from medpeft_ray.config.grid import load_grid
from medpeft_ray.methods import get_method, list_methods
from medpeft_ray.models.families import require_family

SPACES = Path(__file__).resolve().parent.parent / "search_spaces"


@pytest.mark.parametrize("method", list_methods())
def test_every_method_has_a_ready_space_on_the_synthetic_default(method: str) -> None:
    config = load_search_config(SPACES / f"{method}.yaml")
    assert config.method.name == method
    assert config.dataset.name == "synthetic" and config.model.checkpoint is None
    # the file's space is the method's own default space, written out for editing
    family = require_family(config.model.backbone).name
    if method != "lora":  # the default search fixes lora's targets and narrows its ranges
        assert set(config.distributions()) == set(get_method(method).space_for(family))


def test_the_lora_variants_space_searches_init_rslora_and_lr_ratio_and_each_choice_builds() -> None:
    import torch

    from medpeft_ray.methods import prepare_model
    from medpeft_ray.models import build_backbone

    config = load_search_config(SPACES / "lora_variants.yaml")
    assert config.method.name == "lora" and config.dataset.name == "synthetic" and config.model.checkpoint is None
    dists = config.distributions()
    assert dists["init"].choices == ["default", "pissa", "olora"]  # type: ignore[union-attr]
    assert dists["rslora"].choices == [False, True]  # type: ignore[union-attr]
    assert dists["lr_ratio"].choices == [1.0, 16.0]  # type: ignore[union-attr]  # plain LoRA, LoRA+'s 2^4
    for init in dists["init"].choices:  # type: ignore[union-attr]
        trial = config.trial_config(1.0, {"lr": 1e-3, "rank": 16, "init": init, "rslora": True, "lr_ratio": 16.0})
        assert trial.method.options["init"] == init and trial.method.options["rslora"] is True
        with torch.device("meta"):  # as pre-flight builds it: the largest rank fits the backbone's layers
            backbone = build_backbone(config.model.backbone, 5, config.dataset.image_size)
            prepare_model(backbone, "lora", trial.method.options, trial.family)


def test_med_peft_preset_is_the_papers_recipe(tmp_path: Path) -> None:
    config = load_shipped_space(SPACES / "medpeft_lora_mrm_nih.yaml", tmp_path)
    assert config.dataset.name == "nih" and config.dataset.label_ratios == [0.01, 0.1, 1.0]
    assert config.model.backbone == "vit_base_patch16_224" and (config.model.mean, config.model.std) == (0.4978, 0.2449)
    assert config.method.name == "lora" and config.method.options == {"targets": ["q", "v"], "alpha": 32, "dropout": 0.1}
    assert config.train.optimizer == "sgd" and config.train.momentum == 0.9 and config.train.weight_decay == 0
    assert (config.train.batch_size, config.train.warmup_epochs, config.train.drop_path) == (64, 5, 0.1)
    ranks = config.distributions()["rank"].choices  # type: ignore[union-attr]
    assert {4, 8, 32} <= set(ranks)  # the paper's choices at 1% / 10% / 100%
    lr = config.distributions()["lr"]
    assert lr.low <= 0.05 and lr.high >= 0.2  # type: ignore[union-attr]



def test_medmnist_plus_preset_is_the_papers_recipe(tmp_path: Path) -> None:
    """MedMNIST+ (Doerrich et al.): timm ViT-B/16 at 224 px, AdamW lr 1e-4, cosine over 100 epochs
    without warm-up, batch 64, no augmentation, three seeds scored on the test split."""
    config = load_shipped_space(SPACES / "medmnist_plus.yaml", tmp_path)
    assert config.dataset.name == "medmnist" and config.dataset.options == {"flag": "dermamnist", "size": 224}
    assert config.dataset.image_size == 224 and config.dataset.label_ratios == [1.0]
    assert config.model.backbone.partition(".")[0] == "vit_base_patch16_224" and config.model.checkpoint is not None
    train = config.train
    assert (train.optimizer, train.weight_decay, train.epochs, train.batch_size) == ("adamw", 0.01, 100, 64)
    assert (train.warmup_epochs, train.min_lr, train.augment, train.precision) == (0, 0, "none", "fp32")
    assert train.deepspeed.gradient_clipping == 0 and train.eval_batch_size == 256
    assert config.trial_config(1.0, {"lr": 1e-4}).train.lr == 1e-4
    assert (config.search.sampler, config.search.num_samples, config.search.metric) == ("grid", 1, "val_auroc")
    assert config.search.confirm is not None and (config.search.confirm.top_k, config.search.confirm.seeds) == (1, 3)


def test_medmnist_plus_grid_is_every_2d_set_by_method(tmp_path: Path) -> None:
    from medpeft_ray.data.medmnist import SETS

    cells = load_grid(shipped_presets_in(tmp_path) / "medmnist_plus_grid.yaml")
    assert len(cells) == 12 * 6
    assert {cell.config.dataset.options["flag"] for cell in cells} == set(SETS)
    for cell in cells:
        flag, method = cell.entries
        config = cell.config
        assert config.experiment == f"medmnist-plus-{flag}-{method}" and config.method.names == [method]
        assert config.dataset.options == {"flag": flag, "size": 224} and config.train.epochs == 100
        lrs = config.distributions()["lr"].choices  # type: ignore[union-attr]
        assert lrs == ([1e-4] if method in ("linear", "full") else [1e-4, 1e-3])  # the paper's lr for its schemes
        assert config.search.num_samples == len(lrs) and config.search.confirm.seeds == 3  # type: ignore[union-attr]



@pytest.mark.slow  # 48 (classes, method) counts on the meta device: about 15 s
def test_methods_counts_the_medmnist_grid_with_each_sets_classes_before_the_data_is_there(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    counted = cli_in_process(["methods", "--space", SPACES / "medmnist_plus_grid.yaml", "--json"], monkeypatch, capsys)
    assert counted.returncode == 0, counted.stderr
    rows = json.loads(counted.stdout)
    # the heads of the sets' class counts: OCT 4, Pneumonia and Breast 2, Retina 5, Derma 7, Blood and Tissue 8,
    # Path 9, the three Organ sets 11, Chest 14
    assert sorted({row["num_classes"] for row in rows}) == [2, 4, 5, 7, 8, 9, 11, 14]
    chest = {row["method"]: row for row in rows if row["num_classes"] == 14}
    assert chest["lora"]["experiments"] == ["medmnist-plus-chestmnist-lora"]
    assert chest["linear"]["trainable_params"] == 768 * 14 + 14 + 2 * 768  # head and fc_norm


def _shrunk(method: str) -> dict[str, Any]:
    """The ready YAML of ``method`` as it is, on a smaller dataset with one short trial."""
    raw = yaml.safe_load((SPACES / f"{method}.yaml").read_text())
    raw["dataset"].update(label_ratios=[1.0], image_size=32, options={"num_classes": 3, "num_patients": 40})
    raw["train"].update(epochs=1, batch_size=8)
    raw["search"].update(num_samples=1, scheduler={"type": "none"})
    raw["resources"]["gpus_per_worker"] = 0
    return raw


@pytest.mark.ray
# lora and ssf run end to end in tests/test_search_e2e.py (one search over both)
@pytest.mark.parametrize("method", ["vpt_deep", "tsa"])
def test_ready_space_searches_end_to_end(method: str, tmp_path: Path, ray_session: None) -> None:
    from medpeft_ray.leaderboard import LeaderboardStore
    from medpeft_ray.search.runner import run_search

    config = validate_search_dict(_shrunk(method), f"{method}.yaml")
    result = run_search(config, results=tmp_path / "results")
    rows = LeaderboardStore(result.db_url).query().to_dict(orient="records")
    assert len(rows) == 1
    row = rows[0]
    assert row["status"] == "completed", row["error"]
    assert row["method"] == method and row["backbone"] == config.model.backbone
    assert 0.0 <= row["val_auroc"] <= 1.0
    assert 0 < row["trainable_params"] < row["total_params"]
    assert set(row["params"]) == set(config.distributions())
