"""A real search through the CLI: Ray Tune + Optuna + ASHA, Ray Train + DeepSpeed trials, leaderboard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_search
from safetensors.torch import load_file

pytestmark = pytest.mark.ray

CLI = [sys.executable, "-m", "medpeft_ray.cli"]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_search_two_ratios_lands_in_leaderboard(tmp_path: Path) -> None:
    space = tmp_path / "tiny.yaml"
    config = tiny_search(
        dataset={"label_ratios": [0.5, 1.0]},
        search={"num_samples": 2, "seed": 0, "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2}},
        space={"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
               "rank": {"type": "categorical", "choices": [2, 4]}},
    )
    config["method"]["options"] = {}
    space.write_text(yaml.safe_dump(config))
    results = tmp_path / "results"

    search = run_cli("search", "--space", str(space), "--results", str(results), cwd=tmp_path)
    assert search.returncode == 0, search.stdout[-3000:] + search.stderr[-3000:]
    assert "[ratio 0.5] trial 1/2 started" in search.stdout  # progress is visible while it runs
    assert "tiny: 4 trials" in search.stdout

    board = run_cli("leaderboard", "--results", str(results), "--format", "json", cwd=tmp_path)
    assert board.returncode == 0, board.stderr
    rows = json.loads(board.stdout)
    assert len(rows) == 4
    assert sorted(r["label_ratio"] for r in rows) == [0.5, 0.5, 1.0, 1.0]
    for row in rows:
        assert row["experiment"] == "tiny" and row["dataset"] == "synthetic" and row["method"] == "lora"
        assert row["status"] in ("completed", "stopped"), row["error"]
        assert 0.0 <= row["val_auroc"] <= 1.0
        assert row["config"]["label_ratio"] == row["label_ratio"]
        assert row["config"]["method"]["options"]["rank"] == row["params"]["rank"]
        assert row["config"]["train"]["lr"] == pytest.approx(row["params"]["lr"])
        assert 0 < row["trainable_params"] < row["total_params"]
        assert row["startup_s"] > 0 and row["train_time_s"] > 0 and row["wall_time_s"] >= row["startup_s"]
        # the best epoch's adapter-only checkpoint: exactly the trainable tensors
        weights = load_file(str(Path(row["checkpoint"]) / "trainable.safetensors"))
        assert sum(t.numel() for t in weights.values()) == row["trainable_params"]
    # the 100% study ran full length at least once (ASHA stops at most the weaker trial)
    assert any(r["epochs_run"] == 2 for r in rows if r["label_ratio"] == 1.0)

    # each label ratio's Optuna study sits in the leaderboard's database, for optuna-dashboard
    import optuna

    studies = optuna.get_all_study_summaries(optuna.storages.RDBStorage(f"sqlite:///{results / 'leaderboard.db'}"))
    assert sorted(s.study_name.rsplit("-", 2)[0] for s in studies) == ["tiny-ratio0.5", "tiny-ratio1"]
    assert all(s.n_trials == 2 for s in studies)

    top = run_cli("leaderboard", "--results", str(results), "--label-ratio", "1.0", "--top", "1", "--format", "json", cwd=tmp_path)
    best = json.loads(top.stdout)
    assert len(best) == 1 and best[0]["label_ratio"] == 1.0
    assert best[0]["val_auroc"] == max(r["val_auroc"] for r in rows if r["label_ratio"] == 1.0)
