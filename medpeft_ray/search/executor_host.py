"""The detached actor that hosts one warm executor's Ray Train run, and where such actors are placed.

Each executor is a ``TorchTrainer`` run whose workers loop over trials
(:func:`medpeft_ray.search.executor_worker.executor_loop`); its host is a detached actor, so that
the run outlives a dispatcher that dies (Ray restarts the dispatcher, which finds its hosts by name).
"""

from __future__ import annotations

import time
from typing import Any

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig

from medpeft_ray.search.cluster import DRIVER_RESOURCE
from medpeft_ray.search.executor_spec import ExecutorSpec
from medpeft_ray.search.executor_worker import executor_loop
from medpeft_ray.search.ray_train import prepare_fit


def host_options(resources: dict[str, float] | None = None) -> dict[str, Any]:
    """An actor that holds no CPU of its own (an executor's workers hold them): on the nodes that
    ``resources`` names (an executor's host: see :attr:`ExecutorSpec.host_resources`), else on the
    head when the cluster has the driver resource (the dispatcher)."""
    options: dict[str, Any] = {"num_cpus": 0}
    if resources:
        options["resources"] = dict(resources)
        # hosts spread over the slot nodes: a lost node takes few executors with it
        options["scheduling_strategy"] = "SPREAD"
    elif ray.cluster_resources().get(DRIVER_RESOURCE):
        options["resources"] = {DRIVER_RESOURCE: 0.001}
    return options


def host_name(spec: ExecutorSpec, executor_id: str) -> str:
    """The name of an executor's host actor (in the dispatchers' namespace); a restarted dispatcher finds its hosts by it."""
    return f"medpeft-executor-{spec.experiment}-{spec.run_id}-{executor_id}"


class ExecutorHost:
    """Holds one executor's Ray Train run (its controller's owner), as a detached actor."""

    def run(self, executor_id: str, spec: ExecutorSpec, dispatcher: Any, dataset_key: dict[str, Any] | None) -> None:
        try:
            _host(executor_id, spec, dispatcher, dataset_key)
        finally:
            ray.actor.exit_actor()  # detached: nothing else would end it


def _host(executor_id: str, spec: ExecutorSpec, dispatcher: Any, dataset_key: dict[str, Any] | None) -> None:
    """Runs one executor: a Ray Train run whose workers loop over trials until told to exit."""
    # ray.train.torch imports torch: only the host's process needs it, not the dispatcher's that imports this module
    from ray.train.torch import TorchTrainer

    prepare_fit(spec.worker_start_timeout_s)
    trainer = TorchTrainer(
        executor_loop,
        train_loop_config={"executor_id": executor_id, "dispatcher": dispatcher, "threads": spec.threads,
                           "dataset_key": dataset_key, "warm_up": spec.warm_up},
        scaling_config=ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.use_gpu,
                                     resources_per_worker=spec.resources_per_worker),
        run_config=RunConfig(
            name=f"{spec.experiment}-{executor_id}-{int(time.time())}",
            storage_path=spec.storage_path,
            # A lost worker or node restarts the worker group, which resumes its trial; each trial
            # counts its own restarts against resources.max_failures (in the dispatcher).
            failure_config=FailureConfig(max_failures=-1),
        ),
    )
    trainer.fit()
