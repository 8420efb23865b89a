"""Warm trial executors on a real Ray: same numbers as a cold run, ASHA, several workers with ZeRO, lost workers."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import checkpointed_epochs, leaderboard_rows, tiny_search
from test_ray_output import RAY_LOG_LINE

from medpeft_ray.evaluation.predictions import read_predictions

pytestmark = pytest.mark.ray

CLI = [sys.executable, "-m", "medpeft_ray.cli"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", **extra}


def _cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=600)


def _epochs_reported(results: Path) -> dict[str, list[dict[str, Any]]]:
    """Each trial's epochs as Tune recorded them (``result.json``), by trial id, in the order the trials started."""
    # Tune names trial folders run_trial-<study>_<trial id>_<number>_...
    files = sorted((results / "tune").glob("*/run_trial*/result.json"), key=lambda p: int(p.parent.name.split("_")[3]))
    return {p.parent.name.split("_")[2]: [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
            for p in files}


def test_the_fifth_trial_on_a_warm_executor_gives_the_numbers_of_a_cold_trial_and_of_train_config(tmp_path: Path) -> None:
    """Five identical trials on one executor, one after another: the fifth trains exactly as the
    same configuration does cold (its own Ray Train run) and through ``medpeft-ray train --config``."""
    config = tiny_search(train={"epochs": 2, "lr": 3e-3, "augment": "crop_flip"},
                         search={"num_samples": 5, "max_concurrent": 1, "scheduler": {"type": "none"}})
    config["space"] = {}  # nothing searched: five trials of one configuration
    space = tmp_path / "same.yaml"
    space.write_text(yaml.safe_dump(config))
    # a short folder of Ray's own (its socket paths must stay under the OS limit), to find its session log
    ray_tmp = Path(tempfile.mkdtemp(prefix="rq", dir="/tmp"))
    try:
        warm = subprocess.run([*CLI, "search", "--space", str(space), "--results", str(tmp_path / "warm")], cwd=tmp_path,
                              env={k: v for k, v in _env(RAY_TMPDIR=str(ray_tmp)).items()
                                   if k not in ("MEDPEFT_WORKER_LOGS", "RAY_AUTH_MODE")},
                              capture_output=True, text=True, timeout=600)
        assert warm.returncode == 0, warm.stdout[-3000:] + warm.stderr[-3000:]
        assert "warm_executors is off" not in warm.stdout
        # only the search's own lines reach the terminal; Ray's notices went to the session's log
        output = warm.stdout + warm.stderr
        assert not RAY_LOG_LINE.search(output), output
        for ray_text in ("Token authentication", "(raylet)", "PYTHON worker processes", "Deprecat", "RAY_"):
            assert ray_text not in output, output
        log = ray_tmp / "ray" / "session_latest" / "logs" / "medpeft-driver.log"
        assert "Token authentication is enabled" in log.read_text()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    cold_config = {**config, "search": {**config["search"], "num_samples": 1},
                   "resources": {**config["resources"], "warm_executors": False}}
    space.write_text(yaml.safe_dump(cold_config))
    cold = _cli("search", "--space", str(space), "--results", str(tmp_path / "cold"), cwd=tmp_path)
    assert cold.returncode == 0, cold.stdout[-3000:] + cold.stderr[-3000:]
    assert "resources.warm_executors is off: every trial starts its own Ray Train run (cold)" in cold.stdout

    best = _cli("best", "--dataset", "synthetic", "--label-ratio", "1.0", "--results", str(tmp_path / "warm"),
                "--out", str(tmp_path / "best.yaml"), cwd=tmp_path)
    assert best.returncode == 0, best.stderr
    single = _cli("train", "--config", str(tmp_path / "best.yaml"), "--results", str(tmp_path / "single"), cwd=tmp_path,
                  OMP_NUM_THREADS="1")  # the executors' workers train with one thread (cpus_per_worker 1)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    (result_file,) = (tmp_path / "single" / "train").glob("*/result.json")

    def numbers(epochs: list[dict[str, Any]]) -> list[tuple[float, float, float]]:
        return [(e["train_loss"], e["val_loss"], e["val_auroc"]) for e in epochs]

    rows = sorted(leaderboard_rows(tmp_path / "warm"), key=lambda r: r["created_at"])
    assert len(rows) == 5 and all(r["status"] == "completed" for r in rows)
    warm_epochs = _epochs_reported(tmp_path / "warm")
    fifth = list(warm_epochs.values())[-1]
    (cold_epochs,) = _epochs_reported(tmp_path / "cold").values()
    assert numbers(fifth) == numbers(cold_epochs)  # exactly: nothing of the four trials before it leaked
    assert numbers(fifth) == numbers(json.loads(result_file.read_text())["epochs"])
    assert len({tuple(numbers(e)) for e in warm_epochs.values()}) == 1  # all five trials alike
    # the later trials started on the loaded backbone: one executor set-up, reported with the first trial
    assert sum("executor_setup_s" in e[0]["startup"] for e in warm_epochs.values()) == 1
    # warm, cold and single trials keep the same per-image predictions of the same best epoch
    (cold_row,) = leaderboard_rows(tmp_path / "cold")
    kept = [read_predictions(row["predictions"], "val") for row in (rows[-1], cold_row)]
    kept.append(read_predictions(json.loads(result_file.read_text())["predictions"], "val"))
    assert all(k.epoch == kept[0].epoch and np.array_equal(k.scores, kept[0].scores) for k in kept), kept


def test_stopped_trials_free_their_executors_and_two_workers_train_under_zero3_offload(ray_session: None,
                                                                                         tmp_path: Path) -> None:
    """ASHA stops trials at its rungs; each stopped trial's executor takes the next trial. Then a
    search of two-worker trials under ZeRO-3 with CPU offload runs on one two-worker executor."""
    from medpeft_ray.config import validate_search_dict
    from medpeft_ray.search.runner import run_search

    raw = tiny_search(experiment="asha", train={"epochs": 3},
                      search={"num_samples": 5, "seed": 3, "scheduler": {"type": "asha", "grace_period": 1,
                                                                         "reduction_factor": 3}})
    result = run_search(validate_search_dict(raw, "asha.yaml"), results=tmp_path / "asha")
    statuses = sorted(s.record.status for s in result.trials)
    assert len(statuses) == 5 and "stopped" in statuses and "failed" not in statuses, statuses
    assert all(s.record.epochs_run < 3 for s in result.trials if s.record.status == "stopped")
    # Optuna's study says the same: stopped trials PRUNED, completed ones their best epoch's value,
    # every epoch an intermediate value
    import optuna

    from medpeft_ray.leaderboard import optuna_storage

    storage = optuna_storage(result.db_url)
    (study_name,) = optuna.get_all_study_names(storage)
    told = {t.params["lr"]: t for t in optuna.load_study(study_name=study_name, storage=storage).trials}
    for summary in result.trials:
        trial = told[summary.record.params["lr"]]
        assert trial.state.name == {"stopped": "PRUNED", "completed": "COMPLETE"}[summary.record.status]
        assert sorted(trial.intermediate_values) == list(range(1, summary.record.epochs_run + 1))
        if summary.record.status == "completed":
            assert trial.value == pytest.approx(summary.record.val_auroc)
    stats = result.executors
    # the search's two executors (started by it, or kept warm from an earlier search of this
    # process) ran every trial: none was lost or replaced
    assert stats["executors_started"] + stats["executors_warm"] == 2, stats
    assert sum(e["trials_run"] for e in stats["executors"].values()) == 5, stats
    assert result.slot_utilisation is not None and 0 < result.slot_utilisation <= 1

    raw = tiny_search(experiment="zero3", train={"epochs": 1, "deepspeed": {"zero_stage": 3, "offload_optimizer": "cpu",
                                                                            "offload_param": "cpu"}},
                      search={"num_samples": 2, "scheduler": {"type": "none"}},
                      resources={"workers_per_trial": 2, "cpus_per_worker": 1})
    result = run_search(validate_search_dict(raw, "zero3.yaml"), results=tmp_path / "zero3")
    assert [s.record.status for s in result.trials] == ["completed", "completed"], [s.record.error for s in result.trials]
    # two-worker trials do not fit the one-worker executors kept from the search before: new ones
    assert result.executors["executors_started"] == 1 and result.executors["executors_warm"] == 0
    assert result.slots == 1
    (executor,) = result.executors["executors"].values()
    assert executor["trials_run"] == 2
    # every rank's DeepSpeed shard landed in the trial's checkpoint
    for summary in result.trials:
        shards = list(Path(summary.record.checkpoint).glob("deepspeed/epoch/*optim_states.pt"))
        assert len(shards) == 2, shards


def test_a_search_on_executors_kept_from_another_search_gives_the_numbers_of_fresh_ones(ray_session: None,
                                                                                       tmp_path: Path) -> None:
    """Executors outlive a search in its process: the next search that fits finds them warm. One
    that ran another method on other data and seeds in between changes no value of the next."""
    from medpeft_ray.config import validate_search_dict
    from medpeft_ray.search.pools import kept_executors, release_executors
    from medpeft_ray.search.runner import run_search

    def search(experiment: str, **sections: Any) -> Any:
        raw = tiny_search(experiment=experiment, **{
            "space": {"lr": {"type": "categorical", "choices": [0.002, 0.02]}},
            "search": {"num_samples": 2, "sampler": "grid", "seed": 0, "scheduler": {"type": "none"}},
            **sections})
        return run_search(validate_search_dict(raw, f"{experiment}.yaml"), results=tmp_path / experiment)

    def values(result: Any) -> dict[float, Any]:
        return {s.record.params["lr"]: (s.record.status, s.record.best_epoch, s.record.val_auroc, s.record.val_loss,
                                        s.record.details["curve"]) for s in result.trials}

    release_executors()  # fresh executors, whatever earlier tests kept
    fresh = search("fresh")
    assert fresh.executors["executors_started"] == 2 and fresh.executors["executors_warm"] == 0, fresh.executors
    (pool,) = kept_executors()
    assert not pool.in_use
    # another method, dataset size, seed and augmentation on the same executors
    other = search("other", method={"name": "vera", "options": {"rank": 4}},
                   dataset={"options": {"num_patients": 30, "num_classes": 2}, "seed": 5},
                   train={"seed": 7, "augment": "crop_flip"})
    assert other.executors["executors_started"] == 0 and other.executors["executors_warm"] == 2, other.executors
    again = search("again")
    assert again.executors["executors_started"] == 0 and again.executors["executors_warm"] == 2, again.executors
    assert sum(e["trials_run"] for e in again.executors["executors"].values()) == 2
    assert kept_executors() == [pool] and pool.searches == 3
    assert values(again) == values(fresh)  # exactly: nothing the other search left in them leaked
    assert values(other) != values(fresh)
    # released, they end: a next search starts its own
    assert release_executors() == 1 and kept_executors() == []


def _train_workers(driver: int) -> list[int]:
    """The Ray Train workers of the search whose process is ``driver`` (of its own Ray: not the test run's)."""
    import psutil

    found = []
    for process in psutil.Process(driver).children(recursive=True):
        try:
            if any("RayTrainWorker" in part for part in process.cmdline()):
                found.append(process.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def test_a_worker_killed_mid_trial_resumes_its_trial_on_the_restored_executor(tmp_path: Path) -> None:
    """The executor's worker is killed after the first trial checkpointed an epoch: Ray Train restores
    the executor, the trial resumes from its last checkpoint (one leaderboard row, no epoch trained
    twice beyond the one in flight), and the trial queued behind it still runs."""
    epochs = 4
    config = tiny_search(train={"epochs": epochs},
                         search={"num_samples": 2, "max_concurrent": 1, "scheduler": {"type": "none"}})
    space = tmp_path / "kill.yaml"
    space.write_text(yaml.safe_dump(config))
    results = tmp_path / "results"
    driver = subprocess.Popen([*CLI, "search", "--space", str(space), "--results", str(results)], cwd=tmp_path,
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        deadline = time.time() + 400
        while True:
            # a trial's record exists from its delivery on; its checkpoints only once an epoch is complete
            if checkpointed_epochs(results / "train") and _train_workers(driver.pid):
                break
            assert driver.poll() is None, driver.stdout.read()[-3000:] if driver.stdout else ""
            assert time.time() < deadline, "no trial checkpointed an epoch within 400 s"
            time.sleep(0.2)
        for pid in _train_workers(driver.pid):
            os.kill(pid, signal.SIGKILL)
        out, _ = driver.communicate(timeout=500)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 0, out[-4000:]
    rows = leaderboard_rows(results)
    assert len(rows) == 2 and all(r["status"] == "completed" and r["epochs_run"] == epochs for r in rows), rows
    reported = _epochs_reported(results)
    resumed = [e for trial in reported.values() for e in trial if e.get("resumed_from_epoch")]
    assert resumed, reported  # the killed trial went on from its checkpoint rather than from scratch
    for trial in reported.values():
        numbers = [e["epoch"] for e in trial]
        assert numbers[-1] == epochs and sorted(set(numbers)) == list(range(1, epochs + 1)), numbers
        assert len(numbers) - len(set(numbers)) <= 1, numbers  # at most the epoch in flight again
