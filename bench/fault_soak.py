"""Rows that survive faults: a 24-trial ASHA search run clean, then again with workers killed at
random and its driver killed once and resumed; prints the rows lost, duplicated and different.

The search is the same both times: a 24-point grid (6 learning rates x 4 LoRA ranks) on the
synthetic data, ASHA (grace 1, reduction 2) over 4 epochs, one trial at a time, so that which trial
runs what and which ASHA stops does not depend on timing. The faulted run kills a training
worker (an executor's ``RayTrainWorker`` process) every ``--kill-every`` seconds or so, at random,
and once, half way through the grid, kills the search's driver and every process of its Ray, then
continues it with ``--resume``. Rows are matched by grid point; "different" compares status,
epochs run, best epoch, best value and the learning curve (6 significant digits). Goal: 0, 0, 0.

    python bench/fault_soak.py                    # one clean and one faulted run (about 10 minutes on 2 cores)
    python bench/fault_soak.py --repeats 3 --json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "medpeft_ray.cli"]
LRS = [5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]
RANKS = [2, 4, 8, 16]


def search_file(folder: Path) -> Path:
    config = {
        "experiment": "soak",
        "dataset": {"name": "synthetic", "label_ratios": [1.0], "image_size": 32,
                    "options": {"num_patients": 60, "num_classes": 3}},
        "model": {"backbone": "vit_tiny_patch16_224"},
        "method": {"name": "lora", "options": {"alpha": 16}},
        "space": {"lr": {"type": "categorical", "choices": LRS}, "rank": {"type": "categorical", "choices": RANKS}},
        "train": {"epochs": 4, "batch_size": 16, "augment": "flip"},
        "search": {"num_samples": len(LRS) * len(RANKS), "sampler": "grid", "seed": 0, "max_concurrent": 1,
                   "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2}},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "gpus_per_worker": 0, "max_failures": -1},
    }
    path = folder / "soak.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def rows(results: Path) -> list[dict[str, Any]]:
    from medpeft_ray.leaderboard import LeaderboardStore

    store = LeaderboardStore(f"sqlite:///{results / 'leaderboard.db'}", create=False)
    try:
        return store.query().to_dict(orient="records")
    finally:
        store.engine.dispose()


def compared(row: dict[str, Any]) -> list[Any]:
    curve = (row["details"] or {}).get("curve", {})

    def exact(value: Any) -> Any:
        if isinstance(value, list):
            return [exact(v) for v in value]
        return float(f"{value:.6g}") if isinstance(value, float) else value

    return exact([row["status"], row["epochs_run"], row["best_epoch"], row["val_auroc"],
                  curve.get("epoch"), curve.get("val_auroc")])


def train_workers() -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"]) if any("RayTrainWorker" in part for part in p.info["cmdline"] or [])]


def run(folder: Path, env: dict[str, str], faults: bool, kill_every_s: float, rng: random.Random) -> dict[str, Any]:
    """One search in ``folder``; with ``faults``, random worker kills and one driver kill + resume."""
    results = folder / "results"
    started = time.time()
    command = [*CLI, "search", "--space", str(search_file(folder)), "--results", str(results)]
    worker_kills, driver_kills = 0, 0
    while True:
        driver = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        next_kill = time.time() + rng.uniform(0.5, 1.5) * kill_every_s
        while driver.poll() is None:
            time.sleep(0.2)
            if not faults or time.time() < next_kill:
                continue
            done = len(rows(results)) if (results / "leaderboard.db").is_file() else 0
            if driver_kills == 0 and done >= len(LRS) * len(RANKS) // 2:
                processes = psutil.Process(driver.pid).children(recursive=True)
                for process in [psutil.Process(driver.pid), *processes]:
                    try:
                        process.send_signal(signal.SIGKILL)
                    except psutil.NoSuchProcess:
                        pass
                driver_kills += 1
                break
            workers = train_workers()
            if workers:
                os.kill(rng.choice(workers), signal.SIGKILL)
                worker_kills += 1
            next_kill = time.time() + rng.uniform(0.5, 1.5) * kill_every_s
        driver.wait()
        if driver.returncode in (0, 1):  # 1: the search ended with a failed trial (counted below)
            break
        command = [*CLI, "search", "--resume", "soak", "--results", str(results)]
    return {"rows": rows(results), "wall_s": time.time() - started, "worker_kills": worker_kills,
            "driver_kills": driver_kills}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="faulted runs, each against the one clean run")
    parser.add_argument("--kill-every", type=float, default=20.0, help="mean seconds between worker kills")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="medpeft-soak-") as tmp:
        (Path(tmp) / "clean").mkdir()
        clean = run(Path(tmp) / "clean", env, False, args.kill_every, rng)
        expected = {(r["params"]["lr"], r["params"]["rank"]): compared(r) for r in clean["rows"]}
        reports = []
        for repeat in range(args.repeats):
            folder = Path(tmp) / f"faulted{repeat}"
            folder.mkdir()
            faulted = run(folder, env, True, args.kill_every, rng)
            got: dict[tuple[float, int], list[Any]] = {}
            duplicated = 0
            for row in faulted["rows"]:
                point = (row["params"]["lr"], row["params"]["rank"])
                duplicated += point in got
                got[point] = compared(row)
            different = sorted(p for p in set(expected) & set(got) if expected[p] != got[p])
            reports.append({
                "repeat": repeat, "worker_kills": faulted["worker_kills"], "driver_kills": faulted["driver_kills"],
                "rows_lost": len(set(expected) - set(got)), "rows_duplicated": duplicated,
                "rows_different": len(different), "wall_s": round(faulted["wall_s"], 1),
                # (lr, rank): [status, epochs, best epoch, best value, curve epochs, curve values] clean vs faulted
                "differences": {f"lr={lr:g} rank={rank}": {"clean": expected[(lr, rank)], "faulted": got[(lr, rank)]}
                                for lr, rank in different},
            })
    summary = {"trials": len(expected), "clean_wall_s": round(clean["wall_s"], 1), "faulted": reports}
    if args.json:
        print(json.dumps(summary, indent=1))
        return
    print(f"clean run: {summary['trials']} rows in {summary['clean_wall_s']:.0f} s")
    print("repeat  worker kills  driver kills  lost  duplicated  different  wall s")
    for r in reports:
        print(f"{r['repeat']:>6}  {r['worker_kills']:>12}  {r['driver_kills']:>12}  {r['rows_lost']:>4}  "
              f"{r['rows_duplicated']:>10}  {r['rows_different']:>9}  {r['wall_s']:>6.0f}")
    for r in reports:
        for point, rows in r["differences"].items():
            print(f"repeat {r['repeat']} {point}:\n  clean   {rows['clean']}\n  faulted {rows['faulted']}")


if __name__ == "__main__":
    main()
