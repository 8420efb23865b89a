"""One configuration, trained outside a search: ``medpeft-ray train --config FILE``.

The trial runs in this process through the same worker loop as a search's trials (the DeepSpeed
engine, the same data, metrics and checkpoints), on the GPU when there is one, and ends with the
test-split score of its best validation epoch.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from medpeft_ray.config import TrialConfig
from medpeft_ray.evaluation.predictions import PREDICTIONS_FOLDER
from medpeft_ray.metrics import METRICS, better
from medpeft_ray.train.engine import WorkerContext, ensure_process_group
from medpeft_ray.train.recipes import run_training

#: ``on_epoch(metrics)``: called after every epoch (progress display)
EpochFn = Callable[[dict[str, Any]], None]


def train_single(trial: TrialConfig, out_dir: Path, on_epoch: EpochFn | None = None) -> dict[str, Any]:
    """Trains ``trial``; keeps the best epoch's checkpoint in ``out_dir/checkpoint``; returns the final metrics.

    ``out_dir/result.json`` gets the metrics of every epoch and the test-split score;
    ``out_dir/predictions`` the best epoch's per-image validation and test predictions.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    use_gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    ensure_process_group("nccl" if use_gpu else "gloo")
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {}  # the best epoch by the trial's metric

    def report(metrics: dict[str, Any], directory: Path | None) -> None:
        history.append(dict(metrics))
        if directory is not None and better(metrics[trial.metric], best.get(trial.metric), trial.mode):
            best.update(metrics)
            target = out_dir / "checkpoint"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(directory, target)  # the checkpoint folder only lives until report returns
        if on_epoch is not None:
            on_epoch(metrics)

    started = time.time()
    final = run_training(trial, WorkerContext(0, 1, device), report, evaluate_test=True,
                         predictions_to=str(out_dir / PREDICTIONS_FOLDER))
    result = {"trial": trial.model_dump(mode="json"), "epochs": history, "wall_time_s": time.time() - started,
              "metric": trial.metric, "best_epoch": best.get("epoch"),
              **{f"best_{name}": best.get(name) for name in METRICS},
              **{k: v for k, v in final.items() if k.startswith("test_")}, "predictions": final.get("predictions")}
    (out_dir / "result.json").write_text(json.dumps(result, indent=1, default=str))
    return result
