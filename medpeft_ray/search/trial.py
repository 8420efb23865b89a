"""One Tune trial: a small driver function that trains one sampled configuration.

The Tune trainable holds a sliver of CPU; it builds the trial's configuration from the sampled
values and hands it, as a :class:`~medpeft_ray.train.assignment.TrialAssignment`, to a warm
executor of the search (:mod:`medpeft_ray.search.dispatcher`), whose
workers hold the real resources and report each epoch back; the driver passes them on to Tune,
where the scheduler (ASHA) and the searcher (Optuna) see them. Without executors
(``resources.warm_executors: false``) the trial is a cold Ray Train run of its own: a
``TorchTrainer`` whose ``TuneReportCallback`` forwards rank 0's per-epoch metrics to Tune.

On a cluster, a trial's workers may wait for nodes the autoscaler is adding (up to
``worker_start_timeout_s`` each time they start), and a trial whose worker or node is lost
restarts from its last checkpoint, which it finds in storage every node reaches, up to
``max_failures`` times.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psutil  # a Ray dependency
from ray import tune
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.result import TRAINING_ITERATION

from medpeft_ray.config import SearchConfig
from medpeft_ray.errors import TrialFailed
from medpeft_ray.evaluation.predictions import PREDICTIONS_FOLDER
from medpeft_ray.search.ray_train import WORKER_GROUP_START_TIMEOUT_ENV, prepare_fit  # noqa: F401  (its name is this module's too)
from medpeft_ray.search.tune_side import run_on_executor, trial_key
from medpeft_ray.train.assignment import ASSIGNMENT_KEY, TrialAssignment
from medpeft_ray.train.worker import FAILURE_KEY, train_loop_per_worker

if TYPE_CHECKING:
    from ray.actor import ActorHandle

    from medpeft_ray.config import TrialConfig


@dataclass(frozen=True)
class TrialPlan:
    """What every trial of one label ratio shares (passed to the trainable by ``with_parameters``)."""

    search: SearchConfig  # validated once, by the driver
    label_ratio: float
    num_workers: int
    use_gpu: bool
    resources_per_worker: dict[str, float]
    storage_path: str
    dataset_key: dict[str, Any] | None = None  # the decode-once cache key, computed once by the driver
    max_failures: int = 0  # restarts from the last checkpoint after a lost worker or node (-1: no limit)
    worker_start_timeout_s: float = 1800.0  # per start of the workers: covers nodes being added
    dispatcher: ActorHandle | None = None  # the search's warm executors (a TrialDispatcher actor), or None: cold trials
    attempt: int = 1  # the run of the search (SearchManifest.attempt): fences the trial folders


class EpochReportCallback(TuneReportCallback):
    """Forwards a cold trial's rank-0 reports to Tune once per epoch, the epoch as ``training_iteration``.

    A restarted run reports its checkpointed epochs again; Tune has seen some of them (a lost
    worker) or none (a restored search): those it has seen are dropped.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reported = 0  # the last epoch Tune was told

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        epoch = int(metrics[0].get("epoch", self.reported + 1))
        if epoch <= self.reported:
            return
        self.reported = epoch
        super().after_report(run_context, [{**metrics[0], TRAINING_ITERATION: epoch}, *metrics[1:]], checkpoint)


def run_trial(sampled: dict[str, Any], plan: TrialPlan) -> None:
    """Tune function trainable: trains one sampled configuration through Ray Train.

    Rank 0's metrics reach Tune every epoch (:class:`EpochReportCallback`), where the scheduler and
    the searcher see them.
    """
    started = _start_marks()
    trial = plan.search.search_space.trial_config(plan.label_ratio, sampled)
    if plan.dispatcher is not None:
        _run_warm(trial, plan, started, evaluate_test=False)
        return
    _fit(plan.search, trial, plan, started, [EpochReportCallback()], evaluate_test=False)


def confirm_trial(config: dict[str, Any], plan: TrialPlan) -> None:
    """Tune function trainable of a confirmation run: one configuration, one seed, full length.

    ``config["point"]`` holds the study's sampled ``params`` and the ``seed``; the run reports
    once, at its end, its best validation epoch's metrics and that epoch's test-split score.
    """
    started = _start_marks()
    point = config["point"]
    trial = plan.search.search_space.trial_config(plan.label_ratio, point["params"])
    trial = trial.model_copy(update={"train": trial.train.model_copy(update={"seed": int(point["seed"])})})
    if plan.dispatcher is not None:
        metrics = _run_warm(trial, plan, started, evaluate_test=True)
    else:
        metrics = _fit(plan.search, trial, plan, started, [], evaluate_test=True)
    tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})


def _start_marks() -> dict[str, float]:
    """The start of the trial's start-up breakdown: its process's start, then its function's."""
    return {"trial_process": psutil.Process().create_time(), "trial_function": time.time()}


def _run_warm(trial: TrialConfig, plan: TrialPlan, started: dict[str, float], evaluate_test: bool) -> dict[str, Any]:
    """Trains ``trial`` on one of the search's warm executors; returns its final metrics."""
    context = tune.get_context()
    experiment, trial_id = context.get_experiment_name(), context.get_trial_id()
    assignment = TrialAssignment(
        trial=trial,
        evaluate_test=evaluate_test,
        dataset_key=plan.dataset_key,
        started=started,
        # the same folder a cold trial's Ray Train run uses, so a resumed trial finds its checkpoints
        checkpoint_uri=trial_folder(plan.storage_path, experiment, trial_id),
        predictions_uri=predictions_folder(plan.storage_path, experiment, trial_id),
        # Tune's creation order in the study (its folder is <trainable>_<id>_<number>_<params>)
        number=_trial_number(context.get_trial_dir(), trial_id),
        max_failures=plan.max_failures,
        attempt=plan.attempt,
    )
    return run_on_executor(plan.dispatcher, trial_key(experiment, trial_id), assignment, report_epochs=not evaluate_test)


def trial_folder(storage_path: str, experiment: str, trial_id: str) -> str:
    """A trial's folder in the results storage (its checkpoints and record)."""
    return f"{storage_path}/{experiment}-{trial_id}"


def predictions_folder(storage_path: str, experiment: str, trial_id: str) -> str:
    """Where a trial keeps its per-image predictions: ``predictions/`` in its folder."""
    return f"{trial_folder(storage_path, experiment, trial_id)}/{PREDICTIONS_FOLDER}"


def _trial_number(trial_dir: str, trial_id: str) -> int:
    """The trial's number in its study, from its Tune folder's name (0 if it has none)."""
    found = re.search(rf"{re.escape(trial_id)}_(\d+)", os.path.basename(str(trial_dir).rstrip("/")))
    return int(found.group(1)) if found else 0


def _fit(
    search: SearchConfig, trial: TrialConfig, plan: TrialPlan, started: dict[str, float], callbacks: list[Any],
    evaluate_test: bool,
) -> dict[str, Any]:
    """Runs ``trial`` on a TorchTrainer; returns the metrics of its last checkpointed report.

    Raises:
        TrialFailed: the workers reported a failure that a restart would repeat (a NaN loss).
    """
    # ray.train.torch imports torch: only a cold trial's driver needs it, not a warm one's
    from ray.train.torch import TorchTrainer

    context = tune.get_context()
    prepare_fit(plan.worker_start_timeout_s)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={ASSIGNMENT_KEY: TrialAssignment(
            trial=trial, evaluate_test=evaluate_test, dataset_key=plan.dataset_key, started=started,
            threads=max(1, int(plan.resources_per_worker.get("CPU", 1))),
            predictions_uri=predictions_folder(plan.storage_path, context.get_experiment_name(),
                                               context.get_trial_id()),
        )},
        scaling_config=ScalingConfig(
            num_workers=plan.num_workers, use_gpu=plan.use_gpu, resources_per_worker=plan.resources_per_worker
        ),
        run_config=RunConfig(
            # deterministic per trial, so a re-run of the same trial finds its own checkpoints
            name=f"{context.get_experiment_name()}-{context.get_trial_id()}",
            storage_path=plan.storage_path,
            callbacks=callbacks,
            checkpoint_config=CheckpointConfig(
                num_to_keep=trial.train.checkpoints_to_keep,
                checkpoint_score_attribute=search.search.metric,
                checkpoint_score_order=search.search.resolved_mode,
            ),
            # Lost workers and nodes restart the run from its latest checkpoint; so do workers that
            # could not start within the timeout (no node came), with the same budget.
            failure_config=FailureConfig(max_failures=plan.max_failures, controller_failure_limit=plan.max_failures),
        ),
    )
    metrics = trainer.fit().metrics or {}
    if metrics.get(FAILURE_KEY):
        raise TrialFailed(metrics[FAILURE_KEY])  # Tune records the trial as failed with this reason and does not retry it
    return metrics
