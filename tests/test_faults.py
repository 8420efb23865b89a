"""Results that survive faults: a killed driver, every Ray process killed, a lost worker.

Each case runs the same seeded search (the grid sampler and no scheduler, so which trial runs
what does not depend on timing), holds one process at a named point of a trial
(:mod:`medpeft_ray.fault_points`), kills there, resumes where the search needs it, and compares
every leaderboard row, value for value, with the same search run without a fault. The killed
driver and the killed Ray are one chain of runs, each resumed from the kill before it, so the
eight kills cost nine runs rather than sixteen.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from conftest import leaderboard_rows, tiny_search

from medpeft_ray.evaluation.predictions import read_predictions

pytestmark = [pytest.mark.ray, pytest.mark.fault]

CLI = [sys.executable, "-m", "medpeft_ray.cli"]
EPOCHS = 3
LRS = [0.002, 0.02]


def _space(tmp_path: Path) -> Path:
    config = tiny_search(
        train={"epochs": EPOCHS},
        space={"lr": {"type": "categorical", "choices": LRS}},
        search={"num_samples": len(LRS), "sampler": "grid", "max_concurrent": 1, "seed": 0},
        resources={"max_failures": 2},
    )
    space = tmp_path / "faults.yaml"
    space.write_text(yaml.safe_dump(config))
    return space


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    # Tune writes its experiment state every second instead of every ten or so
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TUNE_GLOBAL_CHECKPOINT_S": "1", **extra}


def _rows(results: Path) -> dict[float, dict[str, Any]]:
    """The search's rows by their grid point (trial ids differ from run to run)."""
    rows = leaderboard_rows(results)
    by_lr = {row["params"]["lr"]: row for row in rows}
    assert len(by_lr) == len(rows), [r["params"] for r in rows]  # one row per grid point, none twice
    return by_lr


def _compared(row: dict[str, Any]) -> dict[str, Any]:
    """What must not change: a row's status, epochs, best epoch and value, and its whole curve
    (floats to 6 significant digits: a resumed epoch recomputes what the lost one computed)."""
    curve = (row["details"] or {}).get("curve", {})

    def exact(values: Any) -> Any:
        return [exact(v) for v in values] if isinstance(values, list) else (
            float(f"{values:.6g}") if isinstance(values, float) else values)

    # the kept per-image predictions: of the best epoch, with the uninterrupted run's scores
    kept = read_predictions(row["predictions"], "val") if isinstance(row.get("predictions"), str) else None
    predictions = None if kept is None else [kept.epoch, [float(f"{v:.5g}") for v in kept.scores.ravel()]]
    return exact([row["status"], row["epochs_run"], row["best_epoch"], row["val_auroc"], row["val_loss"], row["error"],
                  curve.get("epoch"), curve.get("val_auroc"), curve.get("val_loss"), predictions])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[float, dict[str, Any]]:
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    results = tmp_path / "results"
    run = subprocess.run([*CLI, "search", "--space", str(_space(tmp_path)), "--results", str(results)], cwd=tmp_path,
                         env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = _rows(results)
    assert sorted(rows) == LRS and all(r["status"] == "completed" and r["epochs_run"] == EPOCHS for r in rows.values())
    return {lr: _compared(row) for lr, row in rows.items()}


def _tune_state_saved_after(results: Path, moment: float, timeout_s: float = 60.0) -> None:
    """Waits until Tune has written its experiment state after ``moment`` (the state a resume restores)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        states = list((results / "tune").glob("*/experiment_state-*.json"))
        if states and max(p.stat().st_mtime for p in states) > moment:
            return
        time.sleep(0.1)
    raise AssertionError(f"Tune wrote no experiment state within {timeout_s} s of the held point")


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _runs(pid: int, names: tuple[str, ...]) -> bool:
    try:
        return any(name in part for part in psutil.Process(pid).cmdline() for name in names)
    except psutil.NoSuchProcess:
        return False


def _run_to_the_point_and_kill(tmp_path: Path, point: str, victim: str, resume: bool = False,
                               hold_s: float = 30.0) -> tuple[Path, list[int], dict[str, Any]]:
    """Starts the search (or resumes it) held at ``point``; kills ``victim`` there ("driver": the
    search's process alone; "ray": it and every process of its Ray; "worker" or "dispatcher": the
    held process, and the search goes on by itself). Returns the results folder, the processes
    that were alive then (to clean up) and the held process's marker."""
    results, marks = tmp_path / "results", tmp_path / f"marks-{point}-{victim}"
    env = _env(tmp_path, MEDPEFT_FAULT_POINT=point, MEDPEFT_FAULT_DIR=str(marks), MEDPEFT_FAULT_HOLD_S=str(hold_s))
    args = ["--resume", "tiny"] if resume else ["--space", str(_space(tmp_path))]
    driver = subprocess.Popen([*CLI, "search", *args, "--results", str(results)],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    marker = marks / f"{point.split('@')[0]}.reached"
    deadline = time.time() + 400
    while not marker.exists():
        if driver.poll() is not None:
            raise AssertionError(f"the search ended before reaching {point}:\n{driver.stdout.read()[-3000:]}")
        assert time.time() < deadline, f"the search did not reach {point} within 400 s"
        time.sleep(0.1)
    held = json.loads(marker.read_text())
    if victim in ("driver", "ray") and held["pid"] != driver.pid:
        # a held executor leaves the driver saving Tune's state: kill once it holds the held epoch.
        # A held driver saves nothing while held, and a save after it let go would race its next
        # trial; it is killed where it is held, with Tune's state from before the point.
        _tune_state_saved_after(results, marker.stat().st_mtime)
    processes = [p.pid for p in psutil.Process(driver.pid).children(recursive=True)]
    if victim == "driver":
        _kill([driver.pid])
    elif victim == "ray":
        _kill([driver.pid, *processes])
    else:
        # "executor": what a lost node takes when the executor's host lives there: the host, its
        # Ray Train controller and the worker
        hosts = [pid for pid in processes if victim == "executor" and _runs(pid, ("ExecutorHost", "TrainController"))]
        assert len(hosts) == (2 if victim == "executor" else 0), hosts
        _kill([*hosts, held["pid"]])
        out, _ = driver.communicate(timeout=500)  # the search goes on by itself
        assert driver.returncode == 0, out[-4000:]
    driver.wait(timeout=60)
    return results, processes, held


#: every point a trial passes, each killed in both ways: the first three in the first trial (each
#: resumed run trains on to the next point of that trial), then in the second; the row's point in
#: the last trial only (a driver held at the first trial's row leaves its executor free to train
#: the second trial meanwhile, so where that one would be killed next depends on timing)
CHAIN = [
    ("before_checkpoint@2", "driver"), ("after_record@2", "ray"), ("before_done", "driver"),
    ("before_checkpoint@2", "ray"), ("after_record@2", "driver"), ("before_done", "ray"),
    (f"before_row@{EPOCHS}", "driver"), (f"before_row@{EPOCHS}", "ray"),
]


def test_a_search_killed_at_every_point_in_turn_resumes_to_the_rows_of_an_uninterrupted_one(
    tmp_path: Path, uninterrupted: dict[float, dict[str, Any]]
) -> None:
    """The search is killed at the first point, resumed and killed at the next, and so on (each
    resume starts from what the kills before left); the last resume finishes it. Each kill holds
    its process at the point until it is killed (a driver's processes that outlive it stay held
    until the next run reached its own point, then they are killed)."""
    leftovers: list[int] = []
    try:
        for index, (point, victim) in enumerate(CHAIN):
            results, alive, _ = _run_to_the_point_and_kill(tmp_path, point, victim, resume=index > 0, hold_s=600)
            _kill(leftovers)  # the run before this one's survivors, held until now
            leftovers = alive
            # the rows written so far are final, each equal to its uninterrupted row: none while the
            # first trial is killed at its points, its own once the second one is (written while
            # the second trial trains towards its first point, so perhaps not yet at that point)
            done = {lr: _compared(row) for lr, row in _rows(results).items()}
            assert done == {lr: uninterrupted[lr] for lr in done}, (point, victim, done)
            assert len(done) in ((0,) if index < 3 else (0, 1) if index == 3 else (1,)), (point, victim, done)
        resumed = subprocess.run([*CLI, "search", "--resume", "tiny", "--results", str(results)], cwd=tmp_path,
                                 env=_env(tmp_path), capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert "resuming the interrupted study" in resumed.stdout, resumed.stdout[-3000:]
    finally:
        _kill(leftovers)  # whatever of the last run outlived its driver (fenced off from the trial folders)
    rows = _rows(results)
    assert {lr: _compared(row) for lr, row in rows.items()} == uninterrupted
    # every trial's Tune results count its epochs, once each, resumed or not (schedulers read this)
    for result in (results / "tune").glob("*/run_trial*/result.json"):
        reported = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        assert all(r["training_iteration"] == r["epoch"] for r in reported), [(r["training_iteration"], r["epoch"]) for r in reported]
    # the Optuna study holds each grid point once, with the row's value
    import optuna

    storage = optuna.storages.RDBStorage(f"sqlite:///{results / 'leaderboard.db'}")
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    told = {t.params["lr"]: (t.state.name, t.value) for t in study.trials}
    assert told == {lr: ("COMPLETE", pytest.approx(rows[lr]["val_auroc"])) for lr in LRS}
    assert all(row["train_time_s"] > 0 for row in rows.values())


@pytest.mark.parametrize(("point", "victim"), [("after_record@2", "worker"), ("dispatcher_post@2", "dispatcher"),
                                                ("after_record@2", "executor")],
                         ids=["worker", "dispatcher", "executor"])
def test_a_lost_worker_dispatcher_or_executor_costs_no_value_of_any_row(
    tmp_path: Path, point: str, victim: str, uninterrupted: dict[float, dict[str, Any]]
) -> None:
    """A worker killed between an epoch's record and its report: Ray Train restarts its executor,
    which resumes the trial from that epoch's checkpoint. The dispatcher killed as an epoch reaches
    it: Ray restarts it, and it takes the running trial back from its executor and the others from
    their drivers. The executor lost whole (its host and controller too, as with the node they live
    on): the dispatcher puts its trial back first in the queue, and a new executor resumes it. Each
    way the search finishes by itself, with the uninterrupted rows."""
    results, leftovers, held = _run_to_the_point_and_kill(tmp_path, point, victim)
    _kill(leftovers)
    rows = _rows(results)
    assert {lr: _compared(row) for lr, row in rows.items()} == uninterrupted
    assert held["epoch"] == 2
