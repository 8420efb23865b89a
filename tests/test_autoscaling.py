"""Real searches on a simulated autoscaling cluster: Ray's fake multi-node provider, configured by
``clusters/local-fake.yaml``, starts each worker "node" as a local raylet; a custom resource
(``fake_gpu``) stands in for GPUs.

The cluster starts with a head that runs no trial and no worker node. The tests check that the
autoscaler adds nodes while trials wait, that the trials run on those nodes and finish, that idle
nodes go away after the search, and that a trial whose node dies resumes on a new node from its
last checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from conftest import checkpointed_epochs, tiny_search

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
LOCAL_FAKE = ROOT / "clusters" / "local-fake.yaml"
CLI = [sys.executable, "-m", "medpeft_ray.cli"]
#: the shipped 30 s idle timeout, shortened so the scale-down check costs less test time
IDLE_TIMEOUT_MINUTES = 0.25


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class FakeCluster:
    address: str
    config_path: Path
    temp_dir: Path
    env: dict[str, str]
    head: subprocess.Popen

    def worker_nodes(self) -> list[dict[str, Any]]:
        """Alive nodes that offer the stand-in GPU (every node but the head)."""
        import ray

        return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("fake_gpu")]

    def wait_for_no_workers(self, timeout: float) -> float:
        started = time.time()
        while self.worker_nodes():
            assert time.time() - started < timeout, (f"worker nodes still up after {timeout:.0f} s, holding "
                                                     f"{self.what_runs_on_worker_nodes()}")
            time.sleep(0.5)
        return time.time() - started

    def what_runs_on_worker_nodes(self) -> list[tuple[str, str]]:
        """(class, state) of every actor not dead on a worker node, and the nodes' resources in use."""
        import ray
        from ray.util.state import list_actors

        nodes = {n["NodeID"] for n in self.worker_nodes()}
        actors = list_actors(address=self.address, filters=[("state", "!=", "DEAD")], detail=True, limit=1000)
        return [(a.class_name, a.state) for a in actors if a.node_id in nodes or a.node_id is None] + [
            ("available", str(ray.available_resources()))]


@dataclass
class NodeWatch:
    """Polls the cluster in the background: when each worker node was first and last seen alive,
    and when a placement group (a trial's workers) or an actor (an executor's host, which lives on
    a worker node) first waited for resources."""

    cluster: FakeCluster
    first_pending: float | None = None
    first_seen: dict[str, float] = field(default_factory=dict)
    last_seen: dict[str, float] = field(default_factory=dict)
    most_alive: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> "NodeWatch":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(10)

    def _run(self) -> None:
        from ray.util import placement_group_table
        from ray.util.state import list_actors

        while not self._stop.is_set():
            now = time.time()
            if self.first_pending is None and (
                    any(pg["state"] == "PENDING" for pg in placement_group_table().values())
                    or list_actors(address=self.cluster.address, filters=[("state", "=", "PENDING_CREATION")], limit=1)):
                self.first_pending = now
            alive = [n["NodeID"] for n in self.cluster.worker_nodes()]
            for node in alive:
                self.first_seen.setdefault(node, now)
                self.last_seen[node] = now
            self.most_alive = max(self.most_alive, len(alive))
            self._stop.wait(0.5)


@pytest.fixture(scope="module")
def fake_cluster() -> Iterator[FakeCluster]:
    """A head with no CPU for trials, plus the autoscaler of clusters/local-fake.yaml; no worker node."""
    pytest.importorskip("ray.autoscaler._private.fake_multi_node.node_provider", reason="this Ray has no fake multi-node provider")
    if not sys.platform.startswith("linux"):
        pytest.skip("the fake multi-node cluster is tested on Linux")
    import ray

    if ray.is_initialized():  # the test run's own Ray (the next test that needs it starts it again)
        from medpeft_ray.search.pools import release_executors

        release_executors()
        ray.shutdown()

    # A short folder of our own: Ray's socket paths must stay under 108 characters, and other
    # Ray instances on this machine (found through /tmp/ray) must neither see nor join this one.
    temp_dir = Path(tempfile.mkdtemp(prefix="mpr-", dir="/tmp"))
    port = _free_port()
    config = yaml.safe_load(LOCAL_FAKE.read_text())
    config["provider"]["gcs_address"] = f"127.0.0.1:{port}"
    config["idle_timeout_minutes"] = IDLE_TIMEOUT_MINUTES
    config_path = temp_dir / "local-fake.yaml"
    config_path.write_text(yaml.safe_dump(config))

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        # token auth would need the user's ~/.ray token in every process; this cluster lives on loopback only
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "MEDPEFT_CACHE": str(temp_dir / "cache"),
    })
    head_resources = config["available_node_types"]["ray.head.default"]["resources"]
    ray_cli = Path(sys.executable).with_name("ray")
    ray_cli = str(ray_cli) if ray_cli.exists() else shutil.which("ray")
    if ray_cli is None:
        pytest.skip("the `ray` command is not installed next to this Python or on PATH")
    command = [
        ray_cli, "start", "--head", "--block",
        f"--port={port}", f"--temp-dir={temp_dir}", f"--autoscaling-config={config_path}",
        f"--num-cpus={head_resources['CPU']}",
        "--resources=" + json.dumps({k: v for k, v in head_resources.items() if k != "CPU"}),
        f"--dashboard-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
        "--dashboard-agent-listen-port=0", "--disable-usage-stats",
    ]
    log = (temp_dir / "head.log").open("w")
    # its own process group: the teardown ends exactly this cluster's processes
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    monkeypatch = pytest.MonkeyPatch()
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in (temp_dir / "head.log").read_text():
            assert head.poll() is None, (temp_dir / "head.log").read_text()[-3000:]
            assert time.time() < deadline, "the fake cluster's head did not start in 120 s"
            time.sleep(0.5)
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
        ray.init(address=address, log_to_driver=False)
        yield FakeCluster(address, config_path, temp_dir, env, head)
    finally:
        ray.shutdown()
        monkeypatch.undo()
        _end_process_group(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _end_process_group(head: subprocess.Popen) -> None:
    """Ends the head's process group, then any process of this cluster that left it (workers)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):  # the second for whatever the first left running
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            break
        try:
            head.wait(5)
        except subprocess.TimeoutExpired:
            pass
    try:
        import psutil
    except ImportError:
        return
    temp_dir = next((a.split("=", 1)[1] for a in head.args if str(a).startswith("--temp-dir=")), None)
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if temp_dir and any(temp_dir in part for part in (proc.info["cmdline"] or [])):
            try:
                proc.kill()
            except psutil.Error:
                pass


def _fake_gpu_search(tmp_path: Path, **sections: Any) -> Path:
    """A tiny search whose every worker needs one stand-in GPU (so only a worker node can run it)."""
    config = tiny_search(
        resources={"workers_per_trial": 1, "cpus_per_worker": 1, "gpus_per_worker": 0,
                   "custom_per_worker": {"fake_gpu": 1}, "worker_start_timeout_s": 300},
        **sections,
    )
    path = tmp_path / "fake_gpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _search(cluster: FakeCluster, space: Path, results: Path, **popen: Any) -> subprocess.Popen:
    env = {**cluster.env, "MEDPEFT_CLUSTER_CONFIG": str(cluster.config_path)}
    args = [*CLI, "search", "--space", str(space), "--address", cluster.address, "--results", str(results)]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _actors(cluster: FakeCluster, class_name: str) -> list[Any]:
    """Every actor of ``class_name`` this cluster has run, dead or alive, with its node."""
    from ray.util.state import list_actors

    return list_actors(address=cluster.address, filters=[("class_name", "=", class_name)], detail=True, limit=1000)


def _train_workers(cluster: FakeCluster) -> list[Any]:
    return _actors(cluster, "RayTrainWorker")


def _leaderboard(results: Path) -> list[dict[str, Any]]:
    from medpeft_ray.leaderboard import LeaderboardStore

    return LeaderboardStore(f"sqlite:///{results / 'leaderboard.db'}", create=False).query().to_dict(orient="records")


def _tune_results(results: Path) -> list[dict[str, Any]]:
    lines = [ln for f in sorted((results / "tune").glob("*/*/result.json")) for ln in f.read_text().splitlines()]
    return [json.loads(ln) for ln in lines if ln.strip()]


def test_search_grows_the_cluster_from_zero_and_it_shrinks_back(
    fake_cluster: FakeCluster, tmp_path: Path, record_property: Any
) -> None:
    assert fake_cluster.worker_nodes() == [], "the cluster must start with no worker node"
    space = _fake_gpu_search(tmp_path, search={"num_samples": 2, "seed": 0, "scheduler": {"type": "none"}})
    results = tmp_path / "results"

    with NodeWatch(fake_cluster) as watch:
        started = time.time()
        search = _search(fake_cluster, space, results)
        output, _ = search.communicate(timeout=600)
        ended = time.time()
        scale_down_s = fake_cluster.wait_for_no_workers(timeout=180)
    assert search.returncode == 0, output[-4000:]

    # The search planned for the cluster's maximum size (2 nodes of 1 stand-in GPU), not its current one.
    assert "2 trial(s) at a time" in output, output[-4000:]
    assert "autoscaling up to" in output, output[-4000:]

    # Nodes were added while the trials waited for them: two at once, one per concurrent trial.
    assert len(watch.first_seen) >= 2 and watch.most_alive == 2, (watch.first_seen, output[-3000:])

    # Every trial finished, and its workers ran on the added nodes (never on the head).
    rows = _leaderboard(results)
    assert len(rows) == 2 and all(r["status"] == "completed" and r["epochs_run"] == 2 for r in rows), rows
    worker_nodes = {a.node_id for a in _train_workers(fake_cluster)}
    assert len(worker_nodes) == 2 and worker_nodes <= set(watch.first_seen), (worker_nodes, watch.first_seen)
    # Each trial's Ray Train controller waited for workers with the search's timeout, not Ray's 60 s.
    controllers = _actors(fake_cluster, "TrainController")
    assert len(controllers) == 2
    for controller in controllers:
        env = json.loads(controller.serialized_runtime_env or "{}").get("env_vars", {})
        assert env.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S") == "300", controller.serialized_runtime_env
        # and it (with the helper that frees a stopped trial's workers) knows which cluster it is on
        assert env.get("RAY_ADDRESS", "").endswith(":" + fake_cluster.address.rsplit(":", 1)[1]), env

    # Idle nodes were removed after the search.
    assert fake_cluster.worker_nodes() == []
    assert watch.first_pending is not None and watch.first_pending <= min(watch.first_seen.values())
    scale_up_s = max(watch.first_seen.values()) - watch.first_pending
    record_property("scale_up_s", round(scale_up_s, 1))
    record_property("scale_down_s", round(scale_down_s, 1))
    print(
        f"\nsimulated cluster: trials waiting -> both worker nodes up {scale_up_s:.1f} s; "
        f"search end -> all worker nodes removed {scale_down_s:.1f} s (idle timeout {IDLE_TIMEOUT_MINUTES * 60:.0f} s); "
        f"search {ended - started:.0f} s"
    )


def test_trial_resumes_from_checkpoint_on_a_new_node_when_its_node_dies(
    fake_cluster: FakeCluster, tmp_path: Path, record_property: Any
) -> None:
    psutil = pytest.importorskip("psutil")
    fake_cluster.wait_for_no_workers(timeout=180)
    epochs = 4
    space = _fake_gpu_search(
        tmp_path,
        dataset={"image_size": 48, "options": {"num_patients": 300, "num_classes": 3}},
        train={"epochs": epochs, "batch_size": 8, "augment": "flip"},
        search={"num_samples": 1, "seed": 0, "scheduler": {"type": "none"}},
    )
    results = tmp_path / "results"
    earlier = {a.actor_id for a in _train_workers(fake_cluster)}
    search = _search(fake_cluster, space, results)
    killed_node = None
    try:
        # Wait until Ray Train has registered a checkpoint (its snapshot lists it): a restart finds it.
        deadline = time.time() + 300
        while not checkpointed_epochs(results / "train"):
            assert search.poll() is None, search.stdout.read()[-4000:] if search.stdout else ""
            assert time.time() < deadline, "the trial registered no checkpoint within 300 s"
            time.sleep(0.2)
        alive = [a for a in _train_workers(fake_cluster) if a.state == "ALIVE" and a.actor_id not in earlier]
        assert len(alive) == 1, alive
        killed_node = alive[0].node_id
        # The node's raylet is the worker's parent: killing both is a node lost without warning.
        worker = psutil.Process(alive[0].pid)
        raylet = worker.parent()
        assert raylet is not None and "raylet" in raylet.name(), raylet
        raylet.kill()
        worker.kill()
        killed_at = time.time()
        output, _ = search.communicate(timeout=600)
    finally:
        if search.poll() is None:
            search.kill()
    assert search.returncode == 0, output[-4000:]

    rows = _leaderboard(results)
    assert len(rows) == 1 and rows[0]["status"] == "completed" and rows[0]["epochs_run"] == epochs, rows
    reported = _tune_results(results)
    epochs_reported = [r["epoch"] for r in reported]
    # Resumed, not restarted: every epoch reported once, in order; a restart from scratch would repeat epoch 1.
    assert epochs_reported == list(range(1, epochs + 1)), epochs_reported
    attempts = sorted({r["worker_started_at"] for r in reported})
    assert len(attempts) == 2, "expected a first run and one resumed run"
    resumed = [r["epoch"] for r in reported if r["worker_started_at"] == attempts[1]]
    assert resumed[0] > 1, f"the resumed run started at epoch {resumed[0]}, not after its checkpoint"

    # The resumed run ran on a node the autoscaler added after the loss (a worker that never got a
    # node, such as one asked for by the lost executor's controller as it went, ran nowhere).
    nodes = {a.node_id for a in _train_workers(fake_cluster) if a.actor_id not in earlier and a.node_id}
    assert killed_node in nodes and len(nodes) == 2, nodes
    record_property("resumed_at_epoch", resumed[0])
    print(f"\nnode lost after epoch {resumed[0] - 1}; trial resumed at epoch {resumed[0]} on a new node, "
          f"finished {time.time() - killed_at:.0f} s after the loss")
