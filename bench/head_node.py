"""What warm executors put on the head node: processes and memory per executor, 1 to 8 executors.

Starts a simulated multi-node cluster (``ray.cluster_utils.Cluster``: a head declaring no CPUs
and the trial-driver resource, as every config in ``clusters/`` does, and worker nodes with the
trial slots), then for 1, 2, 4 and 8 executors starts them as a search does
(:func:`medpeft_ray.search.pools.take_executors`) and measures the Ray worker processes on the
head: their count, private memory (USS) and proportional memory (PSS), and the seconds until
every executor was ready. Two layouts, in one run:

- ``head``: the slot nodes declare nothing, so each executor's host, its Ray Train controller
  and that run's helper actors live on the head (how every search ran before);
- ``nodes``: the slot nodes declare ``medpeft_executor``, as the configs in ``clusters/`` do now:
  they live there, and the head holds the search's dispatcher only.

The per-executor slope is scaled to 64 executors and compared with the 32 GiB head of the
configs. Each running trial adds its Tune trial driver on the head besides (not started here).

``--startup-concurrency N`` sets ``RAY_worker_maximum_startup_concurrency`` for the cluster's
raylets (a head with no CPUs otherwise starts its worker processes one at a time).

    python bench/head_node.py
    python bench/head_node.py --counts 1 2 4 --startup-concurrency 8
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

HEAD_GIB = 32


def head_processes(head_id: str) -> list[int]:
    from ray.util.state import list_workers

    workers = list_workers(filters=[("node_id", "=", head_id), ("is_alive", "=", True)], limit=10_000, raise_on_missing_output=False)
    return [int(w.pid) for w in workers if w.worker_type == "WORKER"]


def memory(pids: list[int]) -> tuple[float, float]:
    import psutil

    uss = pss = 0.0
    for pid in pids:
        try:
            info = psutil.Process(pid).memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        uss += info.uss
        pss += getattr(info, "pss", info.uss)
    return uss / 2**20, pss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--startup-concurrency", type=int, default=0, help="RAY_worker_maximum_startup_concurrency (0: Ray's)")
    parser.add_argument("--layouts", nargs="+", default=["head", "nodes"], choices=["head", "nodes"])
    args = parser.parse_args()
    if args.startup_concurrency:
        os.environ["RAY_worker_maximum_startup_concurrency"] = str(args.startup_concurrency)
    for layout in args.layouts:
        measure(layout, args.counts)


def measure(layout: str, counts: list[int]) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from medpeft_ray.search.cluster import DRIVER_RESOURCE, EXECUTOR_RESOURCE
    from medpeft_ray.search.executor_spec import ExecutorSpec
    from medpeft_ray.search.pools import release_executors, return_executors, take_executors

    work = Path(tempfile.mkdtemp(prefix="medpeft-bench-"))
    most = max(counts)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "resources": {DRIVER_RESOURCE: 10000}})
    slot_node = {"resources": {EXECUTOR_RESOURCE: 1000}} if layout == "nodes" else {}
    host = {EXECUTOR_RESOURCE: 0.001} if layout == "nodes" else {DRIVER_RESOURCE: 0.001}
    for _ in range(2):  # two worker nodes holding the slots
        cluster.add_node(num_cpus=(most + 1) // 2, **slot_node)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        head_id = ray.get_runtime_context().get_node_id()
        base_pids = set(head_processes(head_id))  # none yet: processes start as actors ask for them
        print(f"\nlayout {layout!r}: executors' hosts on the {'slot nodes' if layout == 'nodes' else 'head'}")
        rows = []
        for count in counts:
            spec = ExecutorSpec(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1.0},
                                storage_path=str(work / "executors"), experiment=f"bench{count}",
                                max_executors=count, idle_exit_s=600.0, host_resources=host)
            started = time.perf_counter()
            pool, _ = take_executors(spec, None)
            ready = ray.get(pool.dispatcher.wait_ready.remote(count, 600.0))
            seconds = time.perf_counter() - started
            time.sleep(2)  # controllers finish starting their worker groups
            pids = [pid for pid in head_processes(head_id) if pid not in base_pids]
            uss, pss = memory(pids)
            rows.append((count, ready, len(pids), uss, pss, seconds))
            return_executors(pool, spec.experiment, keep=False)
            release_executors()
            time.sleep(3)
        print(f"{'executors':>9} {'ready':>5} {'head procs':>10} {'USS MB':>8} {'PSS MB':>8} {'ready in s':>10}")
        for count, ready, procs, uss, pss, seconds in rows:
            print(f"{count:9d} {ready:5d} {procs:10d} {uss:8,.0f} {pss:8,.0f} {seconds:10.1f}")
        if len(rows) > 1:
            (c0, _, p0, _, m0, _), (c1, _, p1, _, m1, _) = rows[0], rows[-1]
            per_executor, per_procs = (m1 - m0) / (c1 - c0), (p1 - p0) / (c1 - c0)
            at_64 = m0 + per_executor * (64 - c0)
            print(f"per executor on the head: {per_procs:.1f} processes, {per_executor:,.0f} MB (PSS); "
                  f"64 executors: about {at_64 / 1024:,.1f} GiB of the {HEAD_GIB} GiB head "
                  f"(goal: within 16 GiB), before the 64 running trials' drivers")
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
