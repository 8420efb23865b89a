"""One Tune trial = one Ray Train ``TorchTrainer`` run (the Train V2 pattern).

The Tune trainable is a small driver function holding a sliver of CPU; it builds the trial's
configuration from the sampled values and runs a TorchTrainer whose workers hold the real
resources. ``TuneReportCallback`` forwards rank 0's per-epoch metrics to Tune, where the
scheduler (ASHA) and the searcher (Optuna) see them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medpeft_ray.config import SearchConfig


@dataclass(frozen=True)
class TrialPlan:
    """What every trial of one label ratio shares (passed to the trainable by ``with_parameters``)."""

    search: dict[str, Any]  # SearchConfig as JSON
    label_ratio: float
    num_workers: int
    use_gpu: bool
    resources_per_worker: dict[str, float]
    storage_path: str
    dataset_key: dict[str, Any] | None = None  # the decode-once cache key, computed once by the driver
    max_failures: int = 0


def run_trial(sampled: dict[str, Any], plan: TrialPlan) -> None:
    """Tune function trainable: trains one sampled configuration through Ray Train."""
    from ray import tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from medpeft_ray.train.worker import TRIAL_KEY, train_loop_per_worker

    search = SearchConfig.model_validate(plan.search)
    trial = search.trial_config(plan.label_ratio, sampled)
    context = tune.get_context()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            TRIAL_KEY: trial.model_dump(mode="json"),
            "threads": plan.resources_per_worker.get("CPU", 1),
            "dataset_key": plan.dataset_key,
        },
        scaling_config=ScalingConfig(
            num_workers=plan.num_workers, use_gpu=plan.use_gpu, resources_per_worker=plan.resources_per_worker
        ),
        run_config=RunConfig(
            # deterministic per trial, so a re-run of the same trial finds its own checkpoints
            name=f"{context.get_experiment_name()}-{context.get_trial_id()}",
            storage_path=plan.storage_path,
            callbacks=[TuneReportCallback()],
            checkpoint_config=CheckpointConfig(
                num_to_keep=2,
                checkpoint_score_attribute=search.search.metric,
                checkpoint_score_order=search.search.resolved_mode,
            ),
            failure_config=FailureConfig(max_failures=plan.max_failures),
        ),
    )
    trainer.fit()
