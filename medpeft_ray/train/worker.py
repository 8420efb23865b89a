"""The Ray Train worker function: Ray's rank, device and report around :func:`run_training`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

#: key of the trial config in ``train_loop_config``
TRIAL_KEY = "trial"


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker of a trial (``TorchTrainer(train_loop_per_worker)``)."""
    # DeepSpeed picks its accelerator at import: decide before anything imports it.
    if not os.environ.get("CUDA_VISIBLE_DEVICES"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray.train
    import ray.train.torch
    import torch

    from medpeft_ray.config import TrialConfig
    from medpeft_ray.train.engine import WorkerContext, run_training

    trial = TrialConfig.model_validate(loop_config[TRIAL_KEY])
    torch.set_num_threads(max(1, int(loop_config.get("threads", 1))))
    context = ray.train.get_context()
    checkpoint = ray.train.get_checkpoint()

    def report(metrics: dict[str, Any], directory: Path | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(str(directory)) if directory is not None else None
        ray.train.report(metrics, checkpoint=ckpt)

    def run(resume_from: Path | None) -> None:
        ctx = WorkerContext(
            rank=context.get_world_rank(),
            world_size=context.get_world_size(),
            device=ray.train.torch.get_device(),
            resume_from=resume_from,
            dataset_key=loop_config.get("dataset_key"),
        )
        run_training(trial, ctx, report)

    if checkpoint is None:
        run(None)
    else:
        with checkpoint.as_directory() as directory:
            run(Path(directory))
