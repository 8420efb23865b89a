"""Real searches through the CLI (in this process; the killed one as its own process): Ray Tune + Optuna + ASHA, Ray Train + DeepSpeed trials, leaderboard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import checkpointed_epochs, cli_in_process, leaderboard_rows, tiny_search
from safetensors.torch import load_file

from medpeft_ray.evaluation.predictions import read_predictions
from medpeft_ray.metrics import metric_values

pytestmark = pytest.mark.ray

CLI = [sys.executable, "-m", "medpeft_ray.cli"]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def cli(ray_session: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Any:
    """``medpeft-ray`` run in this process, in ``tmp_path``, on the test run's Ray."""
    return lambda *args: cli_in_process(list(args), monkeypatch, capsys, cwd=tmp_path)


def test_two_methods_two_ratios_conditional_spaces_two_objectives_budget_and_confirmation(tmp_path: Path, cli: Any) -> None:
    """One real search through the CLI exercising what a search does: LoRA and SSF searched together
    over two label ratios (each method's parameters only when it is chosen), accuracy against
    trainable parameters, asynchronous HyperBand, a trial budget, warm-start points, and the best
    configuration of each study confirmed with two seeds and scored on the test split. It ranks by
    macro F1 (thresholds chosen on validation), so a metric other than AUROC drives everything."""
    config = tiny_search(
        dataset={"label_ratios": [0.5, 1.0]},
        method={"name": ["lora", "ssf"], "options": {"lora": {"rank": 2}}},
        search={"num_samples": 3, "max_trials": 4, "seed": 1, "also_minimize": ["trainable_params"], "metric": "val_f1",
                "scheduler": {"type": "hyperband", "grace_period": 1, "reduction_factor": 2, "brackets": 2},
                # each study tries both methods first, so both run whatever TPE does next
                "points_to_evaluate": [{"method": "ssf"}, {"method": "lora"}],
                "confirm": {"top_k": 1, "seeds": 2}},
    )
    del config["space"]  # every method's own default ranges, searched only when it is chosen
    space = tmp_path / "two.yaml"
    space.write_text(yaml.safe_dump(config))
    results = tmp_path / "results"

    search = cli("search", "--space", space, "--results", results)
    out = search.stdout
    assert search.returncode == 0, out[-3000:] + search.stderr[-3000:]
    assert "[ratio 0.5] trial 1/3 started" in out  # progress is visible while it runs
    assert "tiny: 4 trials" in out
    assert out.count("Pareto front of val_f1 vs trainable_params") == 2, out[-3000:]
    assert out.count("top 1 confirmed with 2 seeds") == 2 and out.count("(recorded, never used to choose)") == 2, out[-3000:]

    board = cli("leaderboard", "--results", results, "--format", "json")
    assert board.returncode == 0, board.stderr
    every_row = json.loads(board.stdout)
    rows = [r for r in every_row if r["role"] == "search"]
    # max_trials 4 over two label ratios: two trials each, though num_samples asks for three
    assert sorted(r["label_ratio"] for r in rows) == [0.5, 0.5, 1.0, 1.0]
    for ratio in (0.5, 1.0):
        assert {r["method"] for r in rows if r["label_ratio"] == ratio} == {"lora", "ssf"}
    for row in rows:
        assert row["experiment"] == "tiny" and row["dataset"] == "synthetic"
        assert row["status"] in ("completed", "stopped"), row["error"]
        method, other = row["method"], {"lora": "ssf", "ssf": "lora"}[row["method"]]
        assert row["params"]["method"] == method and row["config"]["method"]["name"] == method
        assert not any(k.startswith(other + ".") for k in row["params"]), row["params"]
        assert row["config"]["train"]["lr"] == pytest.approx(row["params"][f"{method}.lr"])
        assert row["config"]["label_ratio"] == row["label_ratio"]
        assert 0.0 <= row["val_auroc"] <= 1.0 and 0 < row["trainable_params"] < row["total_params"]
        # multi-label: accuracy per label at 0.5 (MedMNIST's ACC); no balanced accuracy
        assert 0.0 <= row["val_f1"] <= 1.0 and 0.0 <= row["val_accuracy"] <= 1.0 and row["val_balanced_accuracy"] is None
        assert set(row["details"]["thresholds"]) == set(row["details"]["per_class"]["val_f1"])
        assert row["startup_s"] > 0 and row["train_time_s"] > 0 and row["wall_time_s"] >= row["startup_s"]
        # the best epoch's adapter-only checkpoint: exactly the trainable tensors
        weights = load_file(str(Path(row["checkpoint"]) / "trainable.safetensors"))
        assert sum(t.numel() for t in weights.values()) == row["trainable_params"]
        if method == "lora":
            assert row["config"]["method"]["options"]["rank"] == 2
        # the best epoch's per-image validation predictions are kept and give the row's values
        kept = read_predictions(row["predictions"], "val")
        assert kept.epoch == row["best_epoch"]
        assert metric_values(kept.metric_input())["val_f1"] == pytest.approx(row["val_f1"], abs=1e-6)

    # each label ratio's Optuna study sits in the leaderboard's database, for optuna-dashboard: two
    # objectives, and the confirmation of its best configuration beside them
    import optuna

    storage = optuna.storages.RDBStorage(f"sqlite:///{results / 'leaderboard.db'}")
    studies = optuna.get_all_study_summaries(storage)
    assert sorted(s.study_name.rsplit("-", 2)[0] for s in studies) == ["tiny-ratio0.5", "tiny-ratio1"]
    assert all(s.n_trials == 2 for s in studies)
    for summary in studies:
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
        assert 1 <= len(study.best_trials) <= 2
        chosen = study.user_attrs["confirmation"]["chosen"]
        assert chosen["seeds"] == [0, 1] and len(chosen["val"]) == 2 and len(chosen["test"]) == 2
        assert chosen["val_mean"] == pytest.approx(sum(chosen["val"]) / 2)
        assert 0.0 <= chosen["test_mean"] <= 1.0 and chosen["test_std"] >= 0.0
        ratio = float(summary.study_name.split("ratio")[1].split("-")[0])
        best_trial = max((r for r in rows if r["label_ratio"] == ratio), key=lambda r: r["val_f1"])
        assert chosen["trial_id"] == best_trial["trial_id"]
        # each confirmation seed is a leaderboard row of its own, with its test-split values
        seeds = [r for r in every_row if r["role"] == "confirmation" and r["label_ratio"] == ratio]
        assert sorted(r["seed"] for r in seeds) == [0, 1] and {r["source_trial"] for r in seeds} == {chosen["trial_id"]}
        assert sorted(r["test_f1"] for r in seeds) == pytest.approx(sorted(chosen["test"]))
        for r in seeds:
            assert r["params"] == best_trial["params"] and r["status"] == "completed"
            # each seed's test predictions give its test values (at validation's thresholds)
            test = read_predictions(r["predictions"], "test")
            scored = metric_values(test.metric_input(), "test")
            assert scored["test_f1"] == pytest.approx(r["test_f1"], abs=1e-6) and test.epoch == r["best_epoch"]
            assert 0.0 <= r["test_auroc"] <= 1.0 and r["best_epoch"] >= 1
            # the synthetic data's subgroup attribute: each row's test values per group, and the gap
            groups = r["details"]["test"]["subgroups"]["sex"]
            assert set(groups) == {"F", "M"} and sum(g["n"] for g in groups.values()) > 0
            assert r["details"]["test"]["worst_group_gap"]["sex"]["test_auroc"] >= 0.0

    top = cli("leaderboard", "--results", results, "--label-ratio", "1.0", "--top", "1", "--role", "search",
              "--sort", "val_f1", "--format", "json")
    best = json.loads(top.stdout)
    assert len(best) == 1 and best[0]["val_f1"] == max(r["val_f1"] for r in rows if r["label_ratio"] == 1.0)


def test_nan_loss_fails_the_trial_once_and_the_search_goes_on(tmp_path: Path, cli: Any) -> None:
    """A pre-trained checkpoint with a NaN in a frozen weight: every step's loss is NaN.

    The trial ends as failed with the reason, without Ray Train restarting it (its retries are for
    lost workers, not for a loss that would be NaN again); the next trial still runs, and both rows
    are in the leaderboard.
    """
    import torch

    from medpeft_ray.models import build_backbone

    weights = tmp_path / "nan_mae.pth"
    # a whole backbone, so that the pre-flight check lets it through
    state = build_backbone("vit_tiny_patch16_224", 1000, 32).state_dict()
    state["patch_embed.proj.weight"] = torch.full_like(state["patch_embed.proj.weight"], float("nan"))
    torch.save({"model": state}, weights)
    space = tmp_path / "nan.yaml"
    config = tiny_search(model={"checkpoint": str(weights)}, resources={"max_failures": 2})
    space.write_text(yaml.safe_dump(config))
    results = tmp_path / "results"

    search = cli("search", "--space", space, "--results", results)
    # both trials ran to their failure; with no trial left standing the search says so in its exit code
    assert search.returncode == 1, search.stdout[-3000:] + search.stderr[-3000:]
    assert "2 trials" in search.stdout and "2 failed" in search.stdout, search.stdout[-3000:]

    rows = json.loads(cli("leaderboard", "--results", results, "--format", "json").stdout)
    assert len(rows) == 2
    for row in rows:
        assert row["status"] == "failed" and row["val_auroc"] is None
        assert row["error"].startswith("training loss is nan in epoch 1"), row["error"]
    # one attempt per trial: a restarted worker group would have reported epoch 1 again
    for result in (results / "tune").glob("*/*/result.json"):
        reported = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        assert [r["epoch"] for r in reported] == [1], reported


def test_a_killed_search_resumes_to_the_rows_of_an_uninterrupted_one(tmp_path: Path) -> None:
    import signal
    import time

    epochs = 5
    config = tiny_search(dataset={"label_ratios": [0.5, 1.0]}, train={"epochs": epochs},
                         search={"num_samples": 1, "max_concurrent": 1, "seed": 0})
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(config))
    results = tmp_path / "results"
    # Tune writes its experiment state every second instead of every ten or so
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    driver = subprocess.Popen([*CLI, "search", "--space", str(space), "--results", str(results)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        # wait until the first study is done and the second one's trial has checkpointed an epoch
        deadline = time.time() + 400
        while not (len(leaderboard_rows(results)) == 1 and checkpointed_epochs(results / "train", "ratio1-")):
            assert driver.poll() is None, driver.stdout.read()[-3000:] if driver.stdout else ""
            assert time.time() < deadline, "the second study checkpointed no epoch within 400 s"
            time.sleep(0.2)
        at_kill, killed_at = max(checkpointed_epochs(results / "train", "ratio1-")), time.time()
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started, without warning
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    before = {r["trial_id"]: r["created_at"] for r in leaderboard_rows(results)}
    assert len(before) == 1

    resumed = subprocess.run([*CLI, "search", "--resume", "tiny", "--results", str(results)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming the interrupted study" in resumed.stdout
    assert "tiny: 2 trials" in resumed.stdout

    rows = leaderboard_rows(results)
    assert sorted(r["label_ratio"] for r in rows) == [0.5, 1.0]  # as many rows as without the kill
    assert all(r["status"] == "completed" and r["epochs_run"] == epochs for r in rows), [(r["status"], r["epochs_run"], r["error"]) for r in rows]
    # the trial that had finished was not run again
    assert all(r["created_at"] == before[r["trial_id"]] for r in rows if r["trial_id"] in before)
    # the interrupted trial's results span the whole trial, each epoch once, counted in epochs
    (interrupted,) = [r for r in rows if r["trial_id"] not in before]
    (result_file,) = (results / "tune").glob(f"*/*{interrupted['trial_id']}*/result.json")
    reported = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
    assert [(r["epoch"], r["training_iteration"]) for r in reported] == [(e, e) for e in range(1, epochs + 1)]
    assert interrupted["details"]["curve"]["epoch"] == list(range(1, epochs + 1))
    # it went on from its checkpoint instead of starting over: the epochs checkpointed before the
    # kill were trained once, by the first run's worker (the killed driver's workers may have
    # trained a little further before they noticed; the resumed run took over from there)
    (record,) = (results / "train").glob(f"*{interrupted['trial_id']}*/trial_record.json")
    recorded = json.loads(record.read_text())["epochs"]
    assert [m["epoch"] for m in recorded] == list(range(1, epochs + 1))
    assert all(m["worker_started_at"] < killed_at for m in recorded[:at_kill]), (at_kill, killed_at, recorded)
    # each label ratio's Optuna study went on with its history: one trial each, none twice
    import optuna

    studies = optuna.get_all_study_summaries(optuna.storages.RDBStorage(f"sqlite:///{results / 'leaderboard.db'}"))
    assert sorted(s.n_trials for s in studies) == [1, 1]
    # a finished search has nothing left to resume
    again = run_cli("search", "--resume", "tiny", "--results", str(results), cwd=tmp_path)
    assert again.returncode == 1 and "finished" in again.stderr
