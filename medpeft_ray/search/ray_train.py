"""What every Ray Train run of a search (a cold trial's, an executor's) needs before ``fit``."""

from __future__ import annotations

import os

import ray

#: Ray Train's (V2) limit on waiting for a worker group's resources. Its default (60 s) is far
#: shorter than a cloud GPU node takes to boot and install; the controller reads it from the
#: environment of the process that calls ``fit``, which passes it on.
WORKER_GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def pin_cluster_address() -> None:
    """Hands this cluster's address to the trial's Ray Train controller and its helpers.

    Ray Train frees the workers of a trial that Tune stopped (ASHA) through a helper that looks
    the cluster up by itself; with another Ray instance on the same machine that lookup fails and
    the stopped trial's CPUs and GPUs stay reserved, so later trials wait forever. ``RAY_ADDRESS`` names the
    cluster; Ray Train passes the variables on its list to the controller, which passes them on.
    """
    if not ray.is_initialized():
        return
    try:
        from ray.train.v2._internal import constants as train_constants

        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        train_constants.ENV_VARS_TO_PROPAGATE.add("RAY_ADDRESS")
    except (ImportError, AttributeError):  # another Ray Train layout: it finds the cluster its own way
        pass


def prepare_fit(worker_start_timeout_s: float) -> None:
    """Sets the worker group's start timeout and the cluster address for the Ray Train run about to start."""
    os.environ[WORKER_GROUP_START_TIMEOUT_ENV] = f"{worker_start_timeout_s:g}"
    pin_cluster_address()
