"""Warm executors that outlive a search: a driver keeps each set it started for its next search.

A search's executors (:mod:`medpeft_ray.search.dispatcher`) cost most of a short search to start:
worker processes, imports, the dataset, the pristine backbone. When the search ends, the driver
keeps them, idle, for its next search that fits them (a grid's next cell, a notebook's next
``run_search``, a test suite's next test): same Ray cluster, same task (classification or
generation), same workers and resources per worker. That search finds them warm: its first trial
starts on a loaded backbone, and what differs (method, data, checkpoint) is built by that trial.

An idle executor still holds its slot's resources. It exits by itself after
``resources.executor_idle_s`` (60 s unless set); :func:`release_executors` ends them all at once,
and so does the end of the driver's process. A search that finds no fitting executors releases
the driver's idle ones before it starts its own, so that they never hold the resources it needs.
"""

from __future__ import annotations

import atexit
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray

from medpeft_ray.errors import MedpeftError
from medpeft_ray.search.cluster import EXECUTOR_RESOURCE
from medpeft_ray.search.dispatcher import TrialDispatcher
from medpeft_ray.search.executor_host import host_options
from medpeft_ray.search.executor_spec import NAMESPACE, ExecutorSpec

if TYPE_CHECKING:
    from ray.actor import ActorHandle

#: the start of every dispatcher's actor name (in :data:`NAMESPACE`): a search finds the running ones by it
DISPATCHER_PREFIX = "medpeft-dispatcher-"


@dataclass(frozen=True)
class PoolKey:
    """What a search's trials need of an executor; a set of executors serves any search with the same."""

    cluster: str  # the Ray cluster's GCS address
    task: str  # classification or generation: the recipe the workers hold
    num_workers: int
    use_gpu: bool
    resources_per_worker: tuple[tuple[str, float], ...]
    threads: int

    @classmethod
    def of(cls, spec: ExecutorSpec) -> PoolKey:
        task = "generation" if spec.warm_up is not None and spec.warm_up.generation else "classification"
        return cls(ray.get_runtime_context().gcs_address, task, spec.num_workers, spec.use_gpu,
                   tuple(sorted(spec.resources_per_worker.items())), spec.threads)


@dataclass
class ExecutorPool:
    key: PoolKey
    dispatcher: ActorHandle  # the TrialDispatcher actor
    name: str  # its name in the NAMESPACE namespace (trial drivers find it by name)
    in_use: bool = True
    searches: int = 0
    last_used: float = field(default_factory=time.time)


def start_dispatcher(spec: ExecutorSpec, dataset_key: dict[str, Any] | None) -> tuple[Any, str]:
    """A dispatcher actor for a new set of executors, and its name (on the head when the cluster
    has the driver resource). It starts no executor: :meth:`TrialDispatcher.begin_search` does."""
    name = f"{DISPATCHER_PREFIX}{spec.experiment}-{spec.run_id}"
    options = host_options()
    options["max_concurrency"] = 1000  # long polls from every trial driver and executor
    # A dispatcher that dies is started again (calls in flight are retried on the new one), which
    # rebuilds its state from the executors and the trial drivers; it dies for good with its driver.
    options.update(max_restarts=-1, max_task_retries=-1)
    return ray.remote(TrialDispatcher).options(name=name, namespace=NAMESPACE, **options).remote(spec, dataset_key), name


def check_not_running(experiment: str) -> None:
    """Fails when a search named ``experiment`` runs on this Ray cluster (from any driver): the two
    would write the same results.

    Raises:
        MedpeftError: such a search is running.
    """
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] != NAMESPACE or not entry["name"].startswith(DISPATCHER_PREFIX):
            continue
        try:
            running = ray.get(ray.get_actor(entry["name"], namespace=NAMESPACE).running_searches.remote(), timeout=30)
        except Exception:  # noqa: BLE001  (a dispatcher ending meanwhile runs no search)
            continue
        if experiment in running:
            raise MedpeftError(f"a search named {experiment!r} is already running on this Ray cluster; "
                               "give this one another experiment name (--experiment)")


_pools: list[ExecutorPool] = []
_lock = threading.Lock()
_exit_hook_registered = False


def take_executors(spec: ExecutorSpec, dataset_key: dict[str, Any] | None,
                   resumed: bool = False) -> tuple[ExecutorPool, int]:
    """Executors for the search ``spec.experiment``: this driver's idle ones that fit, else new ones
    (this driver's idle executors that do not fit are released first). Starts the missing ones;
    a ``resumed`` search's restored trials settle before any is handed out. Returns the pool and
    how many of its executors were warm already.

    Raises:
        MedpeftError: a search of the same name is running on the cluster.
    """
    global _exit_hook_registered
    check_not_running(spec.experiment)
    key = PoolKey.of(spec)
    with _lock:
        # executors of a Ray cluster this process left (ray.shutdown) ended with it
        _pools[:] = [p for p in _pools if p.key.cluster == key.cluster]
        pool = next((p for p in _pools if p.key == key and not p.in_use), None)
        if pool is not None:
            pool.in_use = True
        unfit = [p for p in _pools if p.key != key and not p.in_use] if pool is None else []
    for idle in unfit:
        _stop(idle)
    if pool is not None:
        try:
            warm = _begin(pool, spec, resumed)
            return pool, warm
        except Exception:  # noqa: BLE001  (its dispatcher died with its node: start a new set)
            _stop(pool)
    if EXECUTOR_RESOURCE in spec.host_resources:
        _keep_train_coordinator_here()
    dispatcher, name = start_dispatcher(spec, dataset_key)
    pool = ExecutorPool(key, dispatcher, name)
    with _lock:
        _pools.append(pool)
        if not _exit_hook_registered:
            atexit.register(_release_at_exit)  # before Ray's own exit handler runs (atexit is LIFO)
            _exit_hook_registered = True
    try:
        warm = _begin(pool, spec, resumed)
    except ray.exceptions.RayError as exc:
        _stop(pool)
        raise MedpeftError(f"the trial executors could not start: {exc}") from None
    return pool, warm


def _keep_train_coordinator_here() -> None:
    """Starts Ray Train's cluster-wide autoscaling coordinator on this (the driver's) node.

    The first Ray Train controller to need it starts it, detached, on its own node. With the
    executors' controllers on the slot nodes, that would be a GPU node, which it would then keep
    from ever scaling down; started here first, every controller finds it on the head.
    """
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError:  # a Ray without it: its controllers start none either
        return
    get_or_create_autoscaling_coordinator()


def _begin(pool: ExecutorPool, spec: ExecutorSpec, resumed: bool) -> int:
    warm = ray.get(pool.dispatcher.begin_search.remote(spec.experiment, spec.max_executors, spec.idle_exit_s,
                                                       spec.storage_path, resumed), timeout=60)
    pool.searches += 1
    return int(warm)


def return_executors(pool: ExecutorPool, experiment: str, keep: bool = True) -> dict[str, Any] | None:
    """The search ``experiment`` is done with ``pool``: its executors stay warm for this driver's next
    search (``keep``), or end now. Returns the search's executor statistics."""
    try:
        stats = ray.get(pool.dispatcher.end_search.remote(experiment), timeout=60)
    except Exception:  # noqa: BLE001  (the statistics are a nicety; a dispatcher that cannot answer is ended)
        stats, keep = None, False
    if keep:
        with _lock:
            pool.in_use, pool.last_used = False, time.time()
    else:
        _stop(pool)
    return stats


def release_executors() -> int:
    """Ends every idle executor this driver kept (their resources go back to the cluster); returns
    how many sets of executors were ended. A search running meanwhile keeps its own."""
    with _lock:
        idle = [p for p in _pools if not p.in_use]
    for pool in idle:
        _stop(pool)
    return len(idle)


def _release_at_exit() -> None:
    """The driver's process ends: on a cluster it joined, its executors give their resources back
    now (their dispatcher's death would reach them only at their next call). A local Ray that this
    process started ends with it, and everything on it, so there is nothing to wait for."""
    node = getattr(ray._private.worker, "_global_node", None)
    if node is not None and node.is_head():
        return
    release_executors()


def kept_executors() -> list[ExecutorPool]:
    """This driver's executor sets, idle or in use."""
    with _lock:
        return list(_pools)


def _stop(pool: ExecutorPool) -> None:
    """Ends the pool's executors (their resources go back to the cluster) and its dispatcher."""
    with _lock:
        if pool in _pools:
            _pools.remove(pool)
    if not ray.is_initialized():
        return  # the cluster went first, and everything on it
    try:
        ray.get(pool.dispatcher.shutdown.remote(), timeout=120)
    except Exception:  # noqa: BLE001  (the executors end with the dispatcher anyway)
        pass
    ray.kill(pool.dispatcher)
    # the name is free once the actor is gone
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            ray.get_actor(pool.name, namespace=NAMESPACE)
        except ValueError:
            break
        time.sleep(0.1)
