"""``medpeft-ray train --config``: one trial's YAML, trained in-process, scored on the test split."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_search
from typer.testing import CliRunner

from medpeft_ray.cli import app
from medpeft_ray.config import load_trial_config, validate_search_dict
from medpeft_ray.errors import ConfigError
from medpeft_ray.evaluation.predictions import read_predictions
from medpeft_ray.metrics import metric_values


def _trial_yaml(tmp_path: Path, **changes: object) -> Path:
    """A trial config as a search produces it (and `best --out` writes it), as YAML."""
    search = validate_search_dict(tiny_search(method={"name": "lora", "options": {"rank": 2}}), "tiny.yaml")
    trial = search.trial_config(1.0, {"lr": 3e-3}).model_dump(mode="json")
    trial.update(changes)
    path = tmp_path / "best.yaml"
    path.write_text("# the best trial of tiny\n" + yaml.safe_dump(trial, sort_keys=False))
    return path


def test_trial_yaml_round_trips(tmp_path: Path) -> None:
    path = _trial_yaml(tmp_path)
    trial = load_trial_config(path)
    assert trial.model_dump(mode="json") == yaml.safe_load(path.read_text())
    assert trial.method.options["rank"] == 2 and trial.train.lr == 3e-3


@pytest.mark.parametrize("changes,message", [
    ({"label_ratio": 0}, "best.yaml: label_ratio: must be > 0"),
    ({"epochz": 2}, "best.yaml: epochz: unknown key"),
    ({"method": {"name": "lora", "options": {"rnak": 2}}}, "best.yaml: method.options.rnak: unknown key (did you mean 'rank'?)"),
    ({"dataset": {"name": "folder", "root": "/nonexistent/data"}}, "best.yaml: dataset.root: directory not found"),
])
def test_bad_trial_yaml_is_one_line(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_trial_config(_trial_yaml(tmp_path, **changes))


@pytest.mark.slow  # a whole training run in this process: seconds
def test_train_runs_and_scores_the_test_split(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", "--config", str(_trial_yaml(tmp_path)), "--results", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "epoch 2/2" in result.output and "test_auroc=" in result.output
    (run,) = (tmp_path / "r" / "train").iterdir()
    saved = json.loads((run / "result.json").read_text())
    assert [e["epoch"] for e in saved["epochs"]] == [1, 2]
    best = max(saved["epochs"], key=lambda e: e["val_auroc"])
    assert saved["best_val_auroc"] == best["val_auroc"] and saved["test_epoch"] == best["epoch"]
    assert 0.0 <= saved["test_auroc"] <= 1.0 and len(saved["test_auroc_per_class"]) == 3
    # the best epoch's checkpoint is kept, adapter-only, with peft's format beside it
    assert json.loads((run / "checkpoint" / "state.json").read_text())["epoch"] == best["epoch"]
    assert (run / "checkpoint" / "peft" / "adapter_config.json").is_file()
    # the best epoch's per-image predictions are kept, and give exactly the metrics recorded
    val, test = (read_predictions(saved["predictions"], split) for split in ("val", "test"))
    assert val.epoch == test.epoch == best["epoch"] and val.classes == test.classes and len(val.classes) == 3
    assert metric_values(val.metric_input())["val_auroc"] == pytest.approx(best["val_auroc"], abs=1e-6)
    scored = metric_values(test.metric_input(), "test")
    assert scored["test_auroc"] == pytest.approx(saved["test_auroc"], abs=1e-6)
    assert scored["test_f1"] == pytest.approx(saved["test_f1"], abs=1e-6)
    assert np.array_equal(test.thresholds, val.thresholds)  # the test split is scored at validation's thresholds


def test_train_with_bad_yaml_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2
    assert "missing.yaml: file not found" in result.output
