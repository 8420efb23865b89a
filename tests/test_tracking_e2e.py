"""A real search tracked in MLflow (an SQLite store in a folder) and W&B (offline), killed mid-trial
and resumed: read back with MLflow's client and W&B's own reader of its offline files, the same
runs go on (no second run of any trial), each epoch is there once, and the values are the
leaderboard's."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from conftest import cli_in_process, leaderboard_rows, tiny_search
from safetensors.torch import load_file

from medpeft_ray.search.tracking_destinations import RUN_KEY_TAG, read_wandb_file

pytestmark = pytest.mark.ray

CLI = [sys.executable, "-m", "medpeft_ray.cli"]
EPOCHS = 2
LRS = [0.002, 0.02]


def _env(**extra: str) -> dict[str, str]:
    # Tune writes its experiment state every second instead of every ten or so. WANDB_SERVICE, set by
    # an earlier W&B test in this process, would make the search a client of this process's W&B service.
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return {**env, "HF_HUB_OFFLINE": "1", "TUNE_GLOBAL_CHECKPOINT_S": "1", **extra}


def _search_file(tmp_path: Path) -> Path:
    import torch

    from medpeft_ray.models import build_backbone

    weights = tmp_path / "vit_tiny.pth"  # pre-trained weights, so that runs carry their SHA-256
    torch.save({"model": build_backbone("vit_tiny_patch16_224", 1000, 32).state_dict()}, weights)
    config = tiny_search(
        model={"checkpoint": str(weights)}, train={"epochs": EPOCHS},
        space={"lr": {"type": "categorical", "choices": LRS}},
        search={"num_samples": len(LRS), "sampler": "grid", "max_concurrent": 1, "seed": 0,
                "confirm": {"top_k": 1, "seeds": 2}},
    )
    config["tracking"] = {"mlflow": {"tracking_uri": str(tmp_path / "mlruns"), "log_adapter": True},
                          "wandb": {"mode": "offline", "dir": str(tmp_path / "wb"), "project": "medpeft-test",
                                    "log_adapter": True}}
    space = tmp_path / "tracked.yaml"
    space.write_text(yaml.safe_dump(config))
    return space


def _kill_at_the_second_epoch(tmp_path: Path, space: Path, results: Path) -> None:
    """The first trial's executor is held once it trained its second epoch (the first one told to the
    driver and tracked); once Tune saved its state after that, the driver and its Ray are killed."""
    marks = tmp_path / "marks"
    env = _env(MEDPEFT_FAULT_POINT="before_checkpoint@2", MEDPEFT_FAULT_DIR=str(marks), MEDPEFT_FAULT_HOLD_S="300")
    driver = subprocess.Popen([*CLI, "search", "--space", str(space), "--results", str(results)], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        marker, deadline = marks / "before_checkpoint.reached", time.time() + 400
        while not marker.exists():
            assert driver.poll() is None, driver.stdout.read()[-3000:] if driver.stdout else ""
            assert time.time() < deadline, "the search did not reach the held epoch within 400 s"
            time.sleep(0.1)
        held_at = marker.stat().st_mtime
        while not any(p.stat().st_mtime > held_at for p in (results / "tune").glob("*/experiment_state-*.json")):
            assert time.time() < deadline + 60, "Tune saved no state after the held epoch"
            time.sleep(0.1)
    finally:
        processes = [driver.pid, *(p.pid for p in psutil.Process(driver.pid).children(recursive=True))]
        for pid in processes:  # the driver, its Ray and W&B's service, without warning
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        driver.wait(timeout=60)


def _mlflow_runs(tmp_path: Path) -> tuple[Any, list[Any]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    return client, client.search_runs([experiment.experiment_id]) if experiment else []


def _history(client: Any, run: Any, metric: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric))


def _wandb_records(tmp_path: Path) -> dict[str, list[dict[str, Any]]]:
    """Every record of every offline session, by W&B run id, read with W&B's own reader."""
    records: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for path in sorted((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb")):
        read = read_wandb_file(path)
        assert read is not None, f"W&B's reader could not read {path}"
        records[path.stem.removeprefix("run-")] += read
    return records


def test_a_tracked_search_killed_mid_trial_resumes_into_the_same_runs(
    tmp_path: Path, ray_session: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The killed search runs as a process of its own; the resume runs in this one, on the test run's Ray."""
    space, results = _search_file(tmp_path), tmp_path / "results"
    _kill_at_the_second_epoch(tmp_path, space, results)
    client, before = _mlflow_runs(tmp_path)
    (interrupted,) = [r for r in before if r.data.tags.get("role") == "search"]  # runs start at a first result
    assert _history(client, interrupted, "epoch") == [(1, 1.0)]

    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "1")
    resumed = cli_in_process(["search", "--resume", "tiny", "--results", str(results)], monkeypatch, capsys,
                             cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming the interrupted study" in resumed.stdout and "tracking:" not in resumed.stdout + resumed.stderr

    rows = {r["trial_id"]: r for r in leaderboard_rows(results)}
    searched = {tid: r for tid, r in rows.items() if r["role"] == "search"}
    confirmed = [r for r in rows.values() if r["role"] == "confirmation"]
    assert len(searched) == 2 and len(confirmed) == 2 and interrupted.data.tags["trial_id"] in searched
    sha256 = hashlib.sha256((tmp_path / "vit_tiny.pth").read_bytes()).hexdigest()

    # MLflow: one parent run for the study, one run per trial and per confirmation seed, none twice
    client, runs = _mlflow_runs(tmp_path)
    keys = [r.data.tags[RUN_KEY_TAG] for r in runs]
    assert len(keys) == len(set(keys)) == 5, keys
    (parent,) = [r for r in runs if r.data.tags["role"] == "study"]
    assert parent.info.status == "FINISHED" and parent.data.params["num_samples"] == "2"
    by_trial = {r.data.tags["trial_id"]: r for r in runs if r.data.tags["role"] != "study"}
    assert by_trial[interrupted.data.tags["trial_id"]].info.run_id == interrupted.info.run_id  # the same run went on
    for trial_id, row in searched.items():
        run = by_trial[trial_id]
        assert run.info.status == "FINISHED" and run.data.params == {"lr": str(row["params"]["lr"])}
        assert {k: run.data.tags[k] for k in ("label_ratio", "method", "backbone", "dataset", "role", "seed",
                                              "checkpoint_sha256", "mlflow.parentRunId", "status")} == {
            "label_ratio": "1", "method": "lora", "backbone": "vit_tiny_patch16_224", "dataset": "synthetic",
            "role": "search", "seed": "0", "checkpoint_sha256": sha256, "mlflow.parentRunId": parent.info.run_id,
            "status": "completed"}
        assert row["checkpoint_sha256"] == sha256
        # every epoch once, with the leaderboard's values (the resumed trial told epoch 1 again)
        curve = row["details"]["curve"]
        assert _history(client, run, "epoch") == [(e, float(e)) for e in range(1, EPOCHS + 1)]
        assert _history(client, run, "val_auroc") == [(e, pytest.approx(v)) for e, v in zip(curve["epoch"],
                                                                                           curve["val_auroc"])]
    chosen = {r["source_trial"] for r in confirmed}
    for row in confirmed:
        run = by_trial[row["trial_id"]]
        assert run.data.tags["role"] == "confirmation" and run.data.tags["seed"] == str(row["seed"])
        assert run.data.tags["source_trial"] == row["source_trial"] and run.data.tags["mlflow.parentRunId"] == \
            parent.info.run_id
        assert run.data.params == {"lr": str(row["params"]["lr"])}
        assert run.data.metrics["test_auroc"] == pytest.approx(row["test_auroc"])
    # the study's best trial's adapter, as `best --export-adapter` writes it
    best = max(searched.values(), key=lambda r: r["val_auroc"])
    assert chosen == {best["trial_id"]}
    adapter = Path(client.download_artifacts(by_trial[best["trial_id"]].info.run_id, "adapter", str(tmp_path)))
    weights = load_file(str(adapter / "trainable.safetensors"))
    assert sum(t.numel() for t in weights.values()) == best["trainable_params"]
    assert json.loads((adapter / "export.json").read_text())["trial_id"] == best["trial_id"]

    # W&B, offline: the same four runs (a resumed one in several sessions' files), each epoch once. The
    # killed session's W&B service died with its buffer; what its file holds, the resumed one does not
    # log again (tests/test_tracking.py has a session ended by Ctrl-C, whose file holds every epoch)
    records = _wandb_records(tmp_path)
    assert len(records) == 4, sorted(records)
    for run_id, found in records.items():
        first = next(r["run"] for r in found if r["type"] == "run")
        row = rows[first["config"]["update"]["trial_id"]]
        trial_id = row["trial_id"]
        assert first["config"]["update"]["lr"] == pytest.approx(row["params"]["lr"])
        assert first["run_group"] == parent.info.run_name and first["project"] == "medpeft-test"
        assert first["job_type"] == row["role"]
        steps = [r["history"]["item"] for r in found if r["type"] == "history"]
        mlflow_values = _history(client, by_trial[trial_id], "val_auroc")
        assert [(s["_step"], pytest.approx(s["val_auroc"])) for s in steps] == mlflow_values, (trial_id, steps)
        artifacts = [r["artifact"] for r in found if r["type"] == "artifact"]
        assert [a["type"] for a in artifacts] == (["model"] if trial_id == best["trial_id"] else [])
    sessions = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(sessions) > 4  # the interrupted trial's run was resumed (and the best one's, for its adapter)
