"""The ready cluster configs under clusters/, and how a search plans its trials on a cluster.

Launcher configs go through Ray's own preparation and schema validation (what ``ray up`` does
before it touches a cloud); the KubeRay manifest is checked for what the operator requires and
through Ray's own translation of a RayCluster into the autoscaler's config. Resource planning is
checked on described clusters, without starting Ray.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from conftest import tiny_search

from medpeft_ray.config import validate_search_dict
from medpeft_ray.errors import MedpeftError, UsageError
from medpeft_ray.search.cluster import (
    CLUSTER_CONFIG_ENV,
    DRIVER_RESOURCE,
    EXECUTOR_RESOURCE,
    ClusterCapacity,
    _cluster_config_path,
    load_cluster_config,
    max_resources,
    plan_resources,
)
from medpeft_ray.search.runner import run_search
from medpeft_ray.storage import results_location

CLUSTERS = Path(__file__).resolve().parents[1] / "clusters"
LAUNCHER_CONFIGS = ["aws-gpu.yaml", "gcp-gpu.yaml", "local-fake.yaml"]
CLOUD_CONFIGS = ["aws-gpu.yaml", "gcp-gpu.yaml"]


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTERS / name).read_text())


def _prepared(name: str) -> dict[str, Any]:
    """What `ray up` hands the autoscaler: the config merged with the provider's defaults, validated."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(_load(name)))
    validate_config(prepared)
    return prepared


def _worker_types(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


# ----------------------------------------------------------------------------------------------
# Launcher configs (ray up)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_rays_validation(name: str) -> None:
    config = _prepared(name)
    head = config["available_node_types"][config["head_node_type"]]
    # The head runs no trial worker and holds the slots that keep trial drivers on it.
    assert head["resources"]["CPU"] == 0 and head["resources"][DRIVER_RESOURCE] > 0
    assert head["max_workers"] == 0
    workers = _worker_types(config)
    assert workers
    for node_type in workers.values():
        assert node_type["min_workers"] == 0, "GPU nodes scale from zero"
        assert 0 < node_type["max_workers"] <= config["max_workers"]
        # the executors' hosts and controllers live on the slot nodes, never on the head
        assert node_type["resources"][EXECUTOR_RESOURCE] > 0
    assert EXECUTOR_RESOURCE not in head["resources"]
    assert 0 < config["idle_timeout_minutes"] <= 30


@pytest.mark.parametrize("name", CLOUD_CONFIGS)
def test_cloud_configs_offer_one_and_eight_gpu_spot_nodes_and_install_medpeft(name: str) -> None:
    config = _prepared(name)
    workers = _worker_types(config)
    assert sorted(t["resources"]["GPU"] for t in workers.values()) == [1, 8]
    for node_type in workers.values():
        node = node_type["node_config"]
        spot = node.get("InstanceMarketOptions", {}).get("MarketType") == "spot" or (
            node.get("scheduling", {}).get("provisioningModel") == "SPOT"
        )
        assert spot, node
        if "scheduling" in node:  # GCE: GPU VMs cannot live-migrate
            assert node["scheduling"]["onHostMaintenance"] == "TERMINATE"
    # the repository reaches every node and is installed there, with the PostgreSQL client
    assert "." in config["file_mounts"].values()
    assert any("pip install" in c and "medpeft-ray[postgres]" in c for c in config["worker_setup_commands"])
    assert any("pip install" in c and "medpeft-ray[postgres]" in c for c in config["head_setup_commands"])
    assert any("--autoscaling-config=~/ray_bootstrap_config.yaml" in c for c in config["head_start_ray_commands"])


def test_every_launcher_config_line_is_explained() -> None:
    """Configs meant to be edited by people carry a comment for every setting they make."""
    for name in [*LAUNCHER_CONFIGS, "kuberay-autoscaling.yaml"]:
        lines = (CLUSTERS / name).read_text().splitlines()
        top_level = [i for i, ln in enumerate(lines) if ln and not ln.startswith((" ", "#", "-"))]
        for i in top_level:
            before = lines[i - 1] if i else ""
            same_line = "#" in lines[i]
            # a key right after another key belongs to the same commented group (apiVersion, kind)
            grouped = bool(before) and not before.startswith((" ", "-")) and ":" in before
            assert before.startswith("#") or same_line or grouped, f"{name}: line {i + 1} ({lines[i]!r}) has no comment"


# ----------------------------------------------------------------------------------------------
# KubeRay
# ----------------------------------------------------------------------------------------------


def test_kuberay_manifest_has_what_the_operator_requires() -> None:
    manifest = _load("kuberay-autoscaling.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    assert manifest["metadata"]["name"]
    spec = manifest["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"]
    head = spec["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams values are strings"
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["template"]["spec"]["containers"][0]["image"]
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    gpus = []
    for group in groups:
        assert group["replicas"] == 0 and group["minReplicas"] == 0 and group["maxReplicas"] >= 1
        assert isinstance(group["rayStartParams"], dict)
        container = group["template"]["spec"]["containers"][0]
        assert container["image"]
        limits = container["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
        gpus.append(int(limits["nvidia.com/gpu"]))
    assert sorted(gpus) == [1, 8]


def test_kuberay_manifest_translates_to_a_valid_autoscaler_config() -> None:
    """Ray's own RayCluster -> autoscaler translation (what the in-tree autoscaler runs) accepts it."""
    config = load_cluster_config(CLUSTERS / "kuberay-autoscaling.yaml")
    types = config["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0
    assert types["headgroup"]["resources"][DRIVER_RESOURCE] == 10000
    assert {name: t["resources"]["GPU"] for name, t in types.items() if name != "headgroup"} == {"gpu-1x": 1, "gpu-8x": 8}
    assert {name: t["resources"].get(EXECUTOR_RESOURCE) for name, t in types.items()} == {
        "headgroup": None, "gpu-1x": 1000, "gpu-8x": 1000}
    assert all(t["min_workers"] == 0 for t in types.values())


# ----------------------------------------------------------------------------------------------
# The cluster's maximum size
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "resource", "most"),
    [("aws-gpu.yaml", "GPU", 15), ("gcp-gpu.yaml", "GPU", 15), ("kuberay-autoscaling.yaml", "GPU", 16),
     ("local-fake.yaml", "fake_gpu", 2)],
)
def test_max_resources_of_the_shipped_configs(name: str, resource: str, most: int) -> None:
    # aws/gcp: 8 nodes at most, the richest first: one 8-GPU node and seven 1-GPU nodes
    assert max_resources(load_cluster_config(CLUSTERS / name))[resource] == most


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "kuberay-autoscaling.yaml", "local-fake.yaml"])
def test_executors_are_hosted_on_the_slot_nodes_of_a_cluster_that_declares_them(name: str) -> None:
    from medpeft_ray.config import validate_search_dict

    config = validate_search_dict(tiny_search(resources={"gpus_per_worker": 0}), "tiny.yaml")
    head_only = ClusterCapacity({"CPU": 0.0, DRIVER_RESOURCE: 10000.0}, None, autoscaling=True)
    # no GPU node runs yet: the cluster's config says where hosts may go once they do
    grown = ClusterCapacity(head_only.now, max_resources(load_cluster_config(CLUSTERS / name)), autoscaling=True)
    assert plan_resources(config, grown).executor_host == {EXECUTOR_RESOURCE: 0.001}
    assert plan_resources(config, ClusterCapacity({"CPU": 4.0, DRIVER_RESOURCE: 10000.0})).executor_host == {
        DRIVER_RESOURCE: 0.001}  # a machine, or a cluster whose nodes do not declare it: the head, as the dispatcher


def test_max_resources_respects_the_global_limit_and_uses_the_live_head() -> None:
    config = {
        "max_workers": 3,
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {}},
            "small": {"resources": {"CPU": 4, "GPU": 1}, "max_workers": 10},
            "big": {"resources": {"CPU": 32, "GPU": 4}, "max_workers": 1},
        },
    }
    most = max_resources(config, head_now={"CPU": 2.0})
    assert most == {"CPU": 2 + 32 + 2 * 4, "GPU": 4 + 2 * 1}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [(None, "cannot read the cluster config"), ("a: [", "not valid YAML"), ("a: 1", "not a Ray cluster config")],
)
def test_unusable_cluster_config_is_one_line_naming_the_file(tmp_path: Path, text: str | None, fragment: str) -> None:
    path = tmp_path / "cluster.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(MedpeftError) as info:
        load_cluster_config(path)
    assert str(info.value).startswith(f"{path}: ") and fragment in str(info.value) and "\n" not in str(info.value)


def test_cluster_config_env_must_name_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CLUSTER_CONFIG_ENV, str(tmp_path / "missing.yaml"))
    with pytest.raises(MedpeftError, match=f"^{CLUSTER_CONFIG_ENV}: file not found: "):
        _cluster_config_path()
    monkeypatch.setenv(CLUSTER_CONFIG_ENV, str(CLUSTERS / "aws-gpu.yaml"))
    assert _cluster_config_path() == CLUSTERS / "aws-gpu.yaml"


# ----------------------------------------------------------------------------------------------
# The cluster keys of a search YAML
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        ({"custom_per_worker": {"GPU": 1}}, "tiny.yaml: resources.custom_per_worker.GPU: set it with resources.gpus_per_worker"),
        ({"custom_per_worker": {"fake_gpu": 0}}, "tiny.yaml: resources.custom_per_worker.fake_gpu: must be > 0.0 (got 0)"),
        ({"custom_per_worker": ["fake_gpu"]}, "tiny.yaml: resources.custom_per_worker: must be a mapping (got list)"),
        ({"max_failures": -2}, "tiny.yaml: resources.max_failures: must be >= -1 (got -2)"),
        ({"worker_start_timeout_s": 0}, "tiny.yaml: resources.worker_start_timeout_s: must be > 0.0 (got 0)"),
        ({"max_nodes": 3}, "tiny.yaml: resources.max_nodes: unknown key"),
    ],
)
def test_bad_cluster_keys_are_one_line_naming_the_key(resources: dict[str, Any], message: str) -> None:
    from medpeft_ray.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        validate_search_dict(tiny_search(resources=resources), "tiny.yaml")
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_cluster_keys_have_defaults_that_retry_and_wait() -> None:
    resources = validate_search_dict(tiny_search(), "tiny.yaml").resources
    assert resources.max_failures == 2 and resources.worker_start_timeout_s == 1800 and resources.custom_per_worker == {}


# ----------------------------------------------------------------------------------------------
# Planning trials on a cluster
# ----------------------------------------------------------------------------------------------


def _config(**resources: Any) -> Any:
    return validate_search_dict(tiny_search(resources=resources, search={"num_samples": 8}), "tiny.yaml")


def test_fixed_cluster_too_small_for_one_trial_is_refused() -> None:
    capacity = ClusterCapacity(now={"CPU": 2.0, DRIVER_RESOURCE: 100.0})
    with pytest.raises(MedpeftError) as info:
        plan_resources(_config(gpus_per_worker=1), capacity)
    assert str(info.value).startswith(
        "resources: a trial needs 1 GPU (1 workers x 1), but the cluster has 0; lower resources.workers_per_trial"
    )
    with pytest.raises(MedpeftError, match="a trial needs 4 CPU .* but the cluster has 2;"):
        plan_resources(_config(workers_per_trial=4, cpus_per_worker=1), capacity)


def test_fixed_cluster_runs_as_many_trials_as_fit() -> None:
    plan = plan_resources(_config(cpus_per_worker=1), ClusterCapacity(now={"CPU": 3.0, DRIVER_RESOURCE: 100.0}))
    assert plan.concurrency == 3 and plan.driver == {"CPU": 0.0, DRIVER_RESOURCE: 1.0}
    assert plan.per_worker == {"CPU": 1.0} and not plan.use_gpu and not plan.note
    # without the driver resource each trial driver takes a sliver of CPU
    plan = plan_resources(_config(cpus_per_worker=1), ClusterCapacity(now={"CPU": 3.0}))
    assert plan.driver == {"CPU": 0.01} and plan.concurrency == 2


def test_autoscaling_cluster_with_no_gpu_node_yet_plans_for_its_maximum() -> None:
    capacity = ClusterCapacity(
        now={"CPU": 0.0, DRIVER_RESOURCE: 10000.0}, most={"CPU": 152.0, "GPU": 15.0, DRIVER_RESOURCE: 10000.0},
        autoscaling=True, source="aws-gpu.yaml",
    )
    plan = plan_resources(_config(gpus_per_worker="auto", cpus_per_worker=4), capacity)
    # auto means GPUs: the cluster can have them, though it has none now
    assert plan.use_gpu and plan.per_worker == {"CPU": 4.0, "GPU": 1.0}
    assert plan.concurrency == 8  # 15 GPUs could hold 15 trials; the search has 8
    plan = plan_resources(_config(gpus_per_worker=1, workers_per_trial=2), capacity)
    assert plan.concurrency == 7  # 15 GPUs / 2 per trial
    with pytest.raises(MedpeftError) as info:
        plan_resources(
            validate_search_dict(tiny_search(resources={"gpus_per_worker": 1, "workers_per_trial": 16},
                                             train={"batch_size": 32}), "tiny.yaml"),
            capacity,
        )
    assert "a trial needs 16 GPU (16 workers x 1), but the cluster can grow to at most 15 (from aws-gpu.yaml)" in str(info.value)


def test_custom_resources_are_asked_for_and_planned_like_gpus() -> None:
    capacity = ClusterCapacity(
        now={"CPU": 0.0, DRIVER_RESOURCE: 10000.0}, most={"CPU": 2.0, "fake_gpu": 2.0}, autoscaling=True, source="x",
    )
    plan = plan_resources(_config(gpus_per_worker=0, custom_per_worker={"fake_gpu": 1}), capacity)
    assert plan.per_worker == {"CPU": 1.0, "fake_gpu": 1.0} and plan.concurrency == 2
    with pytest.raises(MedpeftError, match=r"needs 4 fake_gpu \(2 workers x 2\), .* at most 2 .*; lower .* / custom_per_worker or add nodes"):
        plan_resources(_config(gpus_per_worker=0, custom_per_worker={"fake_gpu": 2}, workers_per_trial=2), capacity)


def test_autoscaling_cluster_of_unknown_size_is_not_refused_and_says_so() -> None:
    capacity = ClusterCapacity(now={"CPU": 0.0, DRIVER_RESOURCE: 10000.0}, autoscaling=True)
    plan = plan_resources(_config(gpus_per_worker=1), capacity)
    assert plan.use_gpu and plan.concurrency == 1
    assert "search.max_concurrent" in plan.note and CLUSTER_CONFIG_ENV in plan.note
    config = validate_search_dict(
        tiny_search(resources={"gpus_per_worker": 1}, search={"num_samples": 8, "max_concurrent": 6}), "tiny.yaml"
    )
    plan = plan_resources(config, capacity)
    assert plan.concurrency == 6 and not plan.note


# ----------------------------------------------------------------------------------------------
# Results on cloud storage
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "location"),
    [("s3://bucket/medpeft", "s3://bucket/medpeft"), (Path("s3://bucket/medpeft/"), "s3://bucket/medpeft"),
     ("gs://bucket", "gs://bucket"), ("GS://bucket/a/b", "gs://bucket/a/b")],
)
def test_cloud_results_are_kept_as_uris(given: Any, location: str) -> None:
    assert results_location(given) == (location, None)


def test_local_results_stay_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert results_location(tmp_path / "r") == (str((tmp_path / "r").resolve()), (tmp_path / "r").resolve())
    assert results_location(f"file://{tmp_path}/r")[1] == (tmp_path / "r").resolve()
    monkeypatch.setenv("MEDPEFT_RESULTS", "s3://env-bucket/x")
    assert results_location() == ("s3://env-bucket/x", None)


@pytest.mark.parametrize("given", ["s3://bucket/medpeft?endpoint_override=http://127.0.0.1:9000&scheme=http",
                                   Path("s3://bucket/medpeft?region=eu-west-1")])
def test_cloud_results_with_query_parameters_are_refused_naming_the_environment(given: Any) -> None:
    # the search appends folders to the location, which a query string would swallow
    with pytest.raises(UsageError, match="takes no query parameters.*AWS_ENDPOINT_URL"):
        results_location(given)


def test_cloud_results_without_a_database_stop_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDPEFT_DB", raising=False)
    config = validate_search_dict(tiny_search(), "tiny.yaml")
    with pytest.raises(MedpeftError) as info:
        run_search(config, results="s3://bucket/medpeft")
    assert str(info.value).startswith("s3://bucket/medpeft: with results on cloud storage, give a leaderboard database")


def test_cli_cloud_results_without_a_database_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from medpeft_ray.cli import app

    monkeypatch.delenv("MEDPEFT_DB", raising=False)
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(tiny_search()))
    result = CliRunner().invoke(app, ["search", "--space", str(space), "--results", "s3://bucket/medpeft"])
    assert result.exit_code == 1
    assert "s3://bucket/medpeft: with results on cloud storage" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", [["leaderboard"], ["best", "--dataset", "synthetic", "--label-ratio", "1"]])
def test_reading_the_leaderboard_of_cloud_results_asks_for_the_database(
        command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from medpeft_ray.cli import app

    monkeypatch.delenv("MEDPEFT_DB", raising=False)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*command, "--results", "s3://bucket/medpeft"])
    assert result.exit_code == 2
    assert "s3://bucket/medpeft: results on cloud storage keep no leaderboard; give the search's database: --db" in (
        " ".join(result.output.split()))
    assert list(tmp_path.iterdir()) == []  # no ./s3:/bucket folder looked for or made


# ----------------------------------------------------------------------------------------------
# What a trial hands Ray Train
# ----------------------------------------------------------------------------------------------


def test_trial_waits_for_new_nodes_and_restarts_from_checkpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray.train.torch
    from ray import tune

    from medpeft_ray.search.trial import WORKER_GROUP_START_TIMEOUT_ENV, TrialPlan, run_trial

    seen: dict[str, Any] = {}

    class FakeTrainer:
        def __init__(self, fn: Any, **kwargs: Any) -> None:
            seen.update(kwargs)

        def fit(self) -> Any:
            seen["timeout_env"] = os.environ.get(WORKER_GROUP_START_TIMEOUT_ENV)
            return SimpleNamespace(metrics={"val_auroc": 0.5})

    class FakeContext:
        def get_experiment_name(self) -> str:
            return "tiny-ratio1"

        def get_trial_id(self) -> str:
            return "abc"

    import medpeft_ray.search.trial

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", FakeTrainer)
    from ray.train import UserCallback

    # the real one (a TuneReportCallback) needs a running Tune session
    monkeypatch.setattr(medpeft_ray.search.trial, "EpochReportCallback", UserCallback)
    monkeypatch.setattr(tune, "get_context", lambda: FakeContext())
    monkeypatch.delenv(WORKER_GROUP_START_TIMEOUT_ENV, raising=False)
    config = validate_search_dict(tiny_search(), "tiny.yaml")
    plan = TrialPlan(
        search=config, label_ratio=1.0, num_workers=2, use_gpu=False,
        resources_per_worker={"CPU": 1.0, "fake_gpu": 1.0}, storage_path="s3://bucket/train",
        max_failures=3, worker_start_timeout_s=900,
    )
    run_trial({"lr": 1e-3}, plan)
    assert seen["timeout_env"] == "900"
    assert seen["scaling_config"].resources_per_worker == {"CPU": 1.0, "fake_gpu": 1.0}
    assert seen["scaling_config"].num_workers == 2
    run_config = seen["run_config"]
    assert run_config.storage_path == "s3://bucket/train" and run_config.name == "tiny-ratio1-abc"
    assert run_config.failure_config.max_failures == 3
    assert run_config.failure_config.controller_failure_limit == 3


def test_address_where_nothing_listens_is_one_line_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    import ray

    from medpeft_ray.search.ray_session import connect

    # as in a fresh process (the test run's own Ray may be up): Ray must not even be asked
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init was called"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    with pytest.raises(MedpeftError) as info:
        connect(f"127.0.0.1:{port}")
    assert str(info.value).startswith(f"--address 127.0.0.1:{port}: no Ray cluster answers there")
