"""The Ray Train worker function of a cold trial: Ray's rank, device and report around :func:`run_training`.

The trial comes as the :class:`~medpeft_ray.train.assignment.TrialAssignment` in ``train_loop_config``
(:data:`~medpeft_ray.train.assignment.ASSIGNMENT_KEY`). Ray, torch and the training modules are
imported inside the worker function: the Tune trial that imports this module to hand the function
to Ray Train never trains, and DeepSpeed, which picks its accelerator when it is imported, is
loaded first (:func:`~medpeft_ray.train.engine.load_deepspeed`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil  # a Ray dependency

from medpeft_ray.errors import TrialFailed
from medpeft_ray.metrics import nan_metrics
from medpeft_ray.train.assignment import ASSIGNMENT_KEY, TrialAssignment

#: metrics key of a trial that ended in a reported failure (a NaN loss); its value is the reason
FAILURE_KEY = "failure"
#: in a cold trial's checkpoint: every epoch's metrics up to it (a restarted run reports them again)
HISTORY_FILE = "history.json"


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker of a trial (``TorchTrainer(train_loop_per_worker)``)."""
    assignment: TrialAssignment = loop_config[ASSIGNMENT_KEY]
    started = {**assignment.started, "actor_start": time.time()}
    from medpeft_ray.train.engine import load_deepspeed

    # DeepSpeed picks its accelerator at import: decide before anything imports it
    load_deepspeed(on_gpu=bool(os.environ.get("CUDA_VISIBLE_DEVICES")))
    import ray.train
    import ray.train.torch
    import torch

    from medpeft_ray.train.engine import WorkerContext
    from medpeft_ray.train.recipes import run_training

    started["worker_process"] = psutil.Process().create_time()
    started["imports"] = time.time()
    trial = assignment.trial  # validated once where it was sampled
    torch.set_num_threads(max(1, assignment.threads))
    context = ray.train.get_context()
    checkpoint = ray.train.get_checkpoint()
    epochs_reported = 0
    history: list[dict[str, Any]] = []  # every epoch's metrics so far, kept in each checkpoint

    def report(metrics: dict[str, Any], directory: Path | None) -> None:
        nonlocal epochs_reported
        ckpt = None
        if directory is not None:
            history[:] = [m for m in history if int(m["epoch"]) < int(metrics["epoch"])] + [metrics]
            (directory / HISTORY_FILE).write_text(json.dumps(history, default=str))
            ckpt = ray.train.Checkpoint.from_directory(str(directory))
        ray.train.report(metrics, checkpoint=ckpt)
        epochs_reported = int(metrics["epoch"])

    def run(resume_from: Path | None) -> None:
        nonlocal epochs_reported
        if resume_from is not None and (resume_from / HISTORY_FILE).is_file():
            # A restarted run reports the epochs before its checkpoint again (the trainable's
            # EpochReportCallback drops those Tune has seen), so a restored trial's results span it all.
            history[:] = json.loads((resume_from / HISTORY_FILE).read_text())
            for metrics in history:
                ray.train.report(metrics)
            epochs_reported = max((int(m["epoch"]) for m in history), default=0)  # a failure's epoch follows them
        ctx = WorkerContext(
            rank=context.get_world_rank(),
            world_size=context.get_world_size(),
            device=ray.train.torch.get_device(),
            resume_from=resume_from,
            dataset_key=assignment.dataset_key,
            started=started,
        )
        evaluate_test = assignment.evaluate_test
        try:
            final = run_training(trial, ctx, report, evaluate_test=evaluate_test, history=list(history),
                                 predictions_to=assignment.predictions_uri)
        except TrialFailed as exc:
            # A trial that cannot succeed (NaN loss) must not be restarted by Ray Train's
            # FailureConfig, which retries any worker error: report the failure as this trial's
            # last result and end normally; the Tune trainable turns it into the trial's error.
            # Every rank gets here together (the loss is averaged over ranks), so reports match.
            report_final({"epoch": epochs_reported + 1, **nan_metrics(), "train_loss": math.nan,
                          FAILURE_KEY: str(exc)}, ctx.rank)
            return
        if evaluate_test:
            report_final({k: v for k, v in final.items() if not isinstance(v, dict)}, ctx.rank)

    def report_final(metrics: dict[str, Any], rank: int) -> None:
        # With a small checkpoint: Ray Train hands the trainable the metrics of its latest
        # checkpoint, not of its latest report.
        with tempfile.TemporaryDirectory(prefix="medpeft-final-") as tmp:
            (Path(tmp) / "final.json").write_text(json.dumps(metrics, default=str))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)

    if checkpoint is None:
        run(None)
    else:
        with checkpoint.as_directory() as directory:
            run(Path(directory))
