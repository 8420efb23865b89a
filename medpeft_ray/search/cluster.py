"""How big the Ray cluster is, how big it may grow, and how a search's trials fit on it.

A fixed cluster is planned for the resources it has now. An autoscaling cluster is planned for
the largest size its autoscaler may reach, so that a search started on a cluster with no GPU node
yet runs as many trials at a time as the full cluster holds. That size is read from, in order:

1. the cluster config Ray itself publishes (autoscalers that report one);
2. the file named by ``$MEDPEFT_CLUSTER_CONFIG``: a cluster launcher YAML (``ray up``) or a
   KubeRay ``RayCluster`` manifest;
3. ``~/ray_bootstrap_config.yaml``, the launcher config ``ray up`` leaves on the head node, where
   ``ray job submit`` runs the search.

An autoscaler whose limits none of these give is still recognised; trials are then not refused
for resources the cluster does not have yet, and concurrency stays at what the cluster holds now
unless ``search.max_concurrent`` says otherwise.

Ray is imported inside the functions that ask the cluster: the planning arithmetic
(:func:`plan_resources`) serves ``search --dry-run`` too, which runs without Ray; the private Ray
APIs some of them read are each behind a guard of their own.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medpeft_ray.config import SearchConfig
from medpeft_ray.errors import MedpeftError

#: A custom resource that trial drivers (the small Tune trainables) ask for, so they never take
#: CPU from training workers. Ray started by medpeft-ray declares it; a cluster whose head
#: declares it too keeps every trial driver on the head. Elsewhere drivers take 0.01 CPU.
DRIVER_RESOURCE = "medpeft_driver"
DRIVER_SLOTS = 10_000
#: A custom resource that the nodes with trial slots (GPU nodes) declare: each executor's host, with
#: its Ray Train controller and that run's helper actors (about 1 GB in 5 processes), then lives on
#: those nodes instead of the head, so the head's memory does not grow with the executors.
EXECUTOR_RESOURCE = "medpeft_executor"

CLUSTER_CONFIG_ENV = "MEDPEFT_CLUSTER_CONFIG"
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")
#: Ray's default for a launcher config without a global ``max_workers``.
_RAY_DEFAULT_MAX_WORKERS = 2


@dataclass(frozen=True)
class ClusterCapacity:
    """The cluster's resources now and, for an autoscaling cluster, the most it may grow to."""

    now: dict[str, float]
    #: the largest size the autoscaler may reach; None for a fixed cluster or an unknown limit
    most: dict[str, float] | None = None
    autoscaling: bool = False
    #: where ``most`` was read from (for the progress line and error messages)
    source: str = ""


@dataclass(frozen=True)
class ResourcePlan:
    """What every trial of a search asks for, and how many trials run at a time."""

    driver: dict[str, float]
    per_worker: dict[str, float]
    use_gpu: bool
    concurrency: int
    #: a hint for the user when the plan rests on a guess (unknown autoscaler limits), else ""
    note: str = ""
    #: what each executor's host asks for: a sliver of :data:`EXECUTOR_RESOURCE` where the cluster's
    #: nodes declare it (now or in its config), else of :data:`DRIVER_RESOURCE` (the head), else nothing
    executor_host: dict[str, float] = field(default_factory=dict)


def plan_resources(config: SearchConfig, capacity: ClusterCapacity) -> ResourcePlan:
    """Per-trial resources and concurrency for ``config`` on a cluster of ``capacity``.

    Raises:
        MedpeftError: one trial can never fit: a fixed cluster has too little of a resource, or
            an autoscaling cluster cannot grow to hold it.
    """
    res = config.resources
    now = capacity.now
    known = capacity.most is not None or not capacity.autoscaling
    # The most the cluster can ever hold, as far as anyone knows.
    most = capacity.most
    limit = {k: max(most.get(k, 0.0), now.get(k, 0.0)) for k in {*most, *now}} if most is not None else now

    gpus = res.gpus_per_worker
    if gpus == "auto":
        gpus = 1.0 if limit.get("GPU", 0) > 0 else 0.0
    per_worker = {"CPU": float(res.cpus_per_worker)}
    if gpus > 0:
        per_worker["GPU"] = float(gpus)
    per_worker.update({name: float(amount) for name, amount in res.custom_per_worker.items()})
    need = {k: v * res.workers_per_trial for k, v in per_worker.items()}
    driver = {"CPU": 0.0, DRIVER_RESOURCE: 1.0} if now.get(DRIVER_RESOURCE) else {"CPU": 0.01}

    fits = []
    for name, amount in need.items():
        total = limit.get(name, 0.0)
        # With unknown limits, what the cluster has now is all there is to plan with; the
        # autoscaler may still add what a trial lacks, so nothing is refused.
        if known and amount > total - driver.get(name, 0.0):
            if capacity.most is not None:
                has = f"the cluster can grow to at most {total:g} (from {capacity.source})"
            else:
                has = f"the cluster has {total:g}"
            raise MedpeftError(
                f"resources: a trial needs {amount:g} {name} ({res.workers_per_trial} workers x "
                f"{per_worker[name]:g}), but {has}; lower "
                "resources.workers_per_trial / cpus_per_worker / gpus_per_worker"
                + (" / custom_per_worker" if name in res.custom_per_worker else "")
                + " or add nodes"
            )
        fits.append(math.floor((total + 1e-9) / (amount + driver.get(name, 0.0))))

    note = ""
    if config.search.max_concurrent:
        concurrency = config.search.max_concurrent
    else:
        concurrency = max(1, min([*fits, config.search.num_samples]))  # 0 fits now: one trial at a time
        if not known:
            note = (
                "autoscaling cluster of unknown maximum size: running as many trials as fit now; set "
                f"search.max_concurrent, or {CLUSTER_CONFIG_ENV} to the cluster's launcher YAML or RayCluster manifest"
            )
    host = ({EXECUTOR_RESOURCE: 0.001} if limit.get(EXECUTOR_RESOURCE) else
            {DRIVER_RESOURCE: 0.001} if now.get(DRIVER_RESOURCE) else {})
    return ResourcePlan(driver, per_worker, gpus > 0, concurrency, note, host)


# ----------------------------------------------------------------------------------------------
# Reading the cluster (needs a connected Ray)
# ----------------------------------------------------------------------------------------------


def cluster_capacity(existing_cluster: bool) -> ClusterCapacity:
    """The connected cluster's capacity.

    Args:
        existing_cluster: the search joined a running cluster (``--address``); a Ray that the
            search started itself is never autoscaling, whatever files this machine holds.
    """
    import ray

    now = {k: float(v) for k, v in ray.cluster_resources().items()}
    if not existing_cluster:
        return ClusterCapacity(now)
    most, source = _reported_max_resources(), "the cluster config Ray reports"
    if most is None:
        path = _cluster_config_path()
        if path is not None:
            most, source = max_resources(load_cluster_config(path), _head_resources()), str(path)
    if most is not None:
        return ClusterCapacity(now, most, True, source)
    return ClusterCapacity(now, None, _autoscaler_running())


def load_cluster_config(path: str | Path) -> dict[str, Any]:
    """A cluster launcher config from ``path``: a launcher YAML as is, a KubeRay manifest converted.

    Raises:
        MedpeftError: the file is missing, not YAML, or neither kind of cluster config.
    """
    path = Path(path).expanduser()
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise MedpeftError(f"{path}: cannot read the cluster config ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise MedpeftError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if isinstance(data, dict) and data.get("kind") == "RayCluster":
        return _launcher_config_from_raycluster(data, path)
    if not isinstance(data, dict) or not isinstance(data.get("available_node_types"), dict):
        raise MedpeftError(f"{path}: not a Ray cluster config (no available_node_types, and not a RayCluster manifest)")
    return data


def max_resources(config: dict[str, Any], head_now: dict[str, float] | None = None) -> dict[str, float]:
    """The most of each resource a launcher config's cluster can hold: the head plus, per
    resource, the worker types richest in it up to their ``max_workers`` and the global one.

    ``head_now`` stands in for the head's resources when its node type leaves them to Ray's
    detection (``resources: {}``).
    """
    types: dict[str, Any] = config.get("available_node_types") or {}
    head_type = config.get("head_node_type")
    global_max = config.get("max_workers", _RAY_DEFAULT_MAX_WORKERS)
    head = dict((types.get(head_type) or {}).get("resources") or {}) or dict(head_now or {})
    total = {name: float(amount) for name, amount in head.items()}
    workers = [t for name, t in types.items() if name != head_type and isinstance(t, dict)]
    names = {name for t in workers for name in (t.get("resources") or {})}
    for name in names:
        budget = global_max
        for node_type in sorted(workers, key=lambda t: -float((t.get("resources") or {}).get(name, 0))):
            per_node = float((node_type.get("resources") or {}).get(name, 0))
            if per_node <= 0 or budget <= 0:
                break
            count = min(int(node_type.get("max_workers", global_max)), budget)
            total[name] = total.get(name, 0.0) + per_node * count
            budget -= count
    return total


def release_resource_requests() -> None:
    """Withdraws the search's standing requests to the autoscaler, so idle nodes can go.

    Ray Train asks the autoscaler for each trial's workers; a trial that was stopped rather than
    finished leaves its request behind for minutes. Clearing the requests when the search ends
    lets the autoscaler remove idle nodes after its idle timeout.
    """
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[])
    except Exception:  # noqa: BLE001  a cluster that cannot take the request has none standing
        pass


def _reported_max_resources() -> dict[str, float] | None:
    try:
        from ray._private.state import state

        reported = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001  an older or newer Ray without this query
        return None
    return {k: float(v) for k, v in reported.items()} if reported else None


def _cluster_config_path() -> Path | None:
    named = os.environ.get(CLUSTER_CONFIG_ENV)
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise MedpeftError(f"{CLUSTER_CONFIG_ENV}: file not found: {path}")
        return path
    bootstrap = BOOTSTRAP_CONFIG.expanduser()
    return bootstrap if bootstrap.is_file() else None


def _head_resources() -> dict[str, float]:
    import ray

    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return {k: float(v) for k, v in node["Resources"].items() if not k.startswith("node:")}
    return {}


_READONLY_NODE_TYPE = re.compile(r"^node_[0-9a-f]+$")


def _autoscaler_running() -> bool:
    """Whether an autoscaler with node types of its own (not Ray's read-only stand-in) runs."""
    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        if is_autoscaler_v2(fetch_from_server=True):
            return True
    except Exception:  # noqa: BLE001
        pass
    try:
        import json

        import ray._private.ray_constants as ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        report = json.loads(raw).get("autoscaler_report") if raw else None
    except Exception:  # noqa: BLE001
        return False
    if not report:
        return False
    # A fixed cluster's monitor names each node after its id; an autoscaler uses its node types.
    names = [*report.get("active_nodes", {}), *report.get("pending_launches", {}), *(report.get("idle_nodes") or {})]
    return any(not _READONLY_NODE_TYPE.match(name) for name in names)


def _launcher_config_from_raycluster(manifest: dict[str, Any], path: Path) -> dict[str, Any]:
    """KubeRay's own translation of a RayCluster into the autoscaler's config."""
    try:
        from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
    except ImportError as exc:
        raise MedpeftError(f"{path}: this Ray cannot read RayCluster manifests ({exc})") from None
    manifest = {**manifest, "metadata": {"namespace": "default", **(manifest.get("metadata") or {})}}
    try:
        return _derive_autoscaling_config_from_ray_cr(manifest)
    except Exception as exc:  # noqa: BLE001  KeyError/ValueError/ValidationError from a malformed manifest
        raise MedpeftError(f"{path}: not a usable RayCluster manifest ({type(exc).__name__}: {exc})") from None
