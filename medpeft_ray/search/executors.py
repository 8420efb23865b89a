"""Warm trial executors: Ray Train worker groups that live for a whole search and train trial after trial.

A cold trial starts a whole Ray Train run: a controller, worker processes, imports, the dataset,
the backbone read from disk, a process group. Most of a short PEFT trial goes there. An
*executor* is one long-lived ``TorchTrainer`` run, holding one trial slot's resources (its GPUs or
CPUs), whose workers set up once (imports, process group, the decode-once dataset, the pristine
pre-trained backbone) and then run :class:`medpeft_ray.train.recipe.TrialRecipe` (or its generation kind) for each trial
handed to them. Tune trials stay Tune trials: each is still a small function trainable that
Optuna samples and ASHA stops, but it hands its configuration to the :class:`TrialDispatcher`
(one per search) instead of starting its own Ray Train run, and relays the epochs the executor
reports back to Tune.

Lifecycle:

- The search starts as many executors as trials run at a time; an executor that finds no trial
  for ``idle_exit_s`` exits, giving its resources (and, on an autoscaling cluster, its node)
  back; a trial that finds no free executor starts a new one, up to that number.
- A trial the scheduler stops is ended by :class:`ExecutorCallback` (in the search driver); its
  executor notices before its next training step, frees the trial and takes the next one.
- A worker or node lost mid-trial: Ray Train restarts the executor's worker group, which asks the
  dispatcher for its trial again and resumes it from the trial's last checkpoint (up to
  ``resources.max_failures`` times per trial); trials queued behind it wait their turn.
- A NaN loss fails that trial once; the executor goes on with the next.

Checkpoints are written per epoch by every rank straight to the trial's folder in the results
storage (local, ``s3://``, ``gs://``, through ``pyarrow.fs`` as Ray's own storage is), with an
index that rank 0 writes last; ``train.checkpoints_to_keep`` best epochs (by ``search.metric``)
and the latest one are kept.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import tempfile
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune import Callback
from ray.tune.search import Searcher

from medpeft_ray.metrics import best_first_key, nan_metrics
from medpeft_ray.search.budget import ForwardingSearcher

if TYPE_CHECKING:
    from medpeft_ray.config import TrialConfig

log = logging.getLogger(__name__)

#: what ``TrialDispatcher.next_trial`` answers an executor that should exit
EXIT = "exit"
#: trials that may wait at the dispatcher for each executor, handed to it the moment it finishes
#: its trial (Tune needs seconds to start a trial's driver; the executor would idle meanwhile)
WAITING_PER_EXECUTOR = 1
#: the Ray namespace of the dispatchers: a search's dispatcher is found by name from any driver
NAMESPACE = "medpeft"
#: the index of a trial's checkpoints, in its folder (written last, by rank 0)
CHECKPOINT_INDEX = "checkpoints.json"


@dataclass(frozen=True)
class ExecutorSpec:
    """What an executor holds: its workers and their resources (a trial fits one with the same)."""

    num_workers: int
    use_gpu: bool
    resources_per_worker: dict[str, float]
    storage_path: str  # where the executors' own Ray Train runs keep their (tiny) state
    experiment: str
    max_executors: int
    threads: int = 1
    worker_start_timeout_s: float = 1800.0
    idle_exit_s: float = 60.0
    #: a trial configuration of the search that executors build once while they set up, so that
    #: the first trial, too, finds the data, the pristine backbone and the method's imports ready
    warm_up: "TrialConfig | None" = None

    def fits(self, num_workers: int, use_gpu: bool, resources_per_worker: dict[str, float]) -> bool:
        return (num_workers, use_gpu, dict(resources_per_worker)) == (self.num_workers, self.use_gpu,
                                                                      dict(self.resources_per_worker))


# ----------------------------------------------------------------------------------------------
# Trial checkpoints in the results storage
# ----------------------------------------------------------------------------------------------


class TrialCheckpoints:
    """One trial's checkpoint folder in the results storage: upload, index, retention, resume.

    ``uri`` is a local path or a ``scheme://`` URI that ``pyarrow.fs`` opens (as Ray opens its
    storage). Every rank uploads its part of an epoch into the same ``checkpoint_<epoch>`` folder;
    rank 0 then records it in :data:`CHECKPOINT_INDEX`, which lists complete checkpoints only.
    """

    def __init__(self, uri: str, keep: int, metric: str, mode: str) -> None:
        from medpeft_ray.storage import filesystem, is_uri

        self.fs, self.root = filesystem(uri)
        # the URI the leaderboard keeps (pyarrow's path of a bucket has no scheme)
        self.display_root = f"{uri.split('://', 1)[0]}://{self.root}" if is_uri(uri) else self.root
        self.keep, self.metric, self.mode = max(1, keep), metric, mode

    def path(self, epoch: int) -> str:
        return f"{self.root}/checkpoint_{epoch:06d}"

    def uri(self, epoch: int) -> str:
        return f"{self.display_root}/checkpoint_{epoch:06d}"

    def upload(self, local: Path, epoch: int) -> None:
        """Copies this rank's part of epoch ``epoch`` (the files under ``local``) into the storage."""
        import pyarrow.fs

        self.fs.create_dir(self.path(epoch), recursive=True)
        pyarrow.fs.copy_files(str(local), self.path(epoch), source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=self.fs)

    def index(self) -> list[dict[str, Any]]:
        """The complete checkpoints, oldest first: ``{"epoch", "value"}`` each."""
        import pyarrow.fs

        target = f"{self.root}/{CHECKPOINT_INDEX}"
        if self.fs.get_file_info(target).type != pyarrow.fs.FileType.File:
            return []
        with self.fs.open_input_stream(target) as stream:
            return list(json.loads(stream.read().decode()))

    def record(self, epoch: int, value: float | None) -> None:
        """Adds epoch ``epoch`` to the index (rank 0, after every rank uploaded), then drops the
        checkpoints that are neither among the ``keep`` best (ties: the earlier) nor the latest."""
        entries = sorted([e for e in self.index() if e["epoch"] != epoch] + [{"epoch": epoch, "value": value}],
                         key=lambda e: e["epoch"])
        best = sorted(entries, key=lambda e: (best_first_key(e["value"], self.mode), e["epoch"]))[: self.keep]
        kept = {e["epoch"] for e in best} | {entries[-1]["epoch"]}
        self._write_index([e for e in entries if e["epoch"] in kept])
        for entry in entries:
            if entry["epoch"] not in kept:
                try:
                    self.fs.delete_dir(self.path(entry["epoch"]))
                except OSError:  # already gone
                    pass

    def _write_index(self, entries: list[dict[str, Any]]) -> None:
        """Replaces the index whole. An object store's PUT is already all or nothing; a local file
        is written beside it and moved over it, since a worker killed mid-write (a killed driver
        takes its Ray with it) would leave a truncated index that the resumed trial cannot read."""
        import pyarrow.fs

        target = f"{self.root}/{CHECKPOINT_INDEX}"
        local = isinstance(self.fs, pyarrow.fs.LocalFileSystem)
        written = f"{self.root}/.{CHECKPOINT_INDEX}.partial" if local else target
        with self.fs.open_output_stream(written) as stream:
            stream.write(json.dumps(entries).encode())
        if local:
            self.fs.move(written, target)

    def download_latest(self, into: Path) -> Path | None:
        """The latest complete checkpoint copied into ``into`` (to resume from), or None."""
        import pyarrow.fs

        entries = self.index()
        if not entries:
            return None
        epoch = max(e["epoch"] for e in entries)
        target = into / f"checkpoint_{epoch:06d}"
        target.mkdir(parents=True, exist_ok=True)
        pyarrow.fs.copy_files(self.path(epoch), str(target), source_filesystem=self.fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
        return target


# ----------------------------------------------------------------------------------------------
# The dispatcher: trials in, executors out
# ----------------------------------------------------------------------------------------------


@dataclass
class _Trial:
    key: str
    payload: dict[str, Any]
    events: "asyncio.Queue[tuple[str, Any]]"
    ended: asyncio.Event
    executor: str | None = None
    deliveries: int = 0
    submitted_at: float = field(default_factory=time.time)
    outcome_posted: bool = False  # "done" or "failed" reached its driver's queue


@dataclass
class _Executor:
    id: str
    trial: str | None = None
    idle_since: float = field(default_factory=time.time)
    alive: bool = True
    trials_run: int = 0
    busy_s: float = 0.0
    busy_since: float | None = None


class TrialDispatcher:
    """Hands Tune's trials to warm executors and their epochs back (a Ray actor, one per search).

    Everything is asynchronous: trial drivers and executors long-poll it, so it answers within
    milliseconds and never busy-waits.
    """

    def __init__(self, spec: ExecutorSpec, dataset_key: dict[str, Any] | None = None) -> None:
        self.spec = spec
        self.dataset_key = dataset_key
        self.queue: deque[str] = deque()
        self.trials: dict[str, _Trial] = {}
        self.executors: dict[str, _Executor] = {}
        self.hosts: dict[str, Any] = {}
        self.wakeup = asyncio.Event()
        self.closing = False
        self.started = 0
        self.setup_failures: dict[str, str] = {}  # executor -> why it could not set up

    # -- the search driver -------------------------------------------------------------------
    async def start(self, count: int) -> None:
        """Starts ``count`` executors (at most ``max_executors`` alive)."""
        for _ in range(count):
            self._launch()

    async def shutdown(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Tells every executor to exit and waits for their runs to end; returns :meth:`stats`."""
        self.closing = True
        self._notify()
        hosts = list(self.hosts.values())
        if hosts:
            done, pending = await asyncio.wait([asyncio.ensure_future(_await_ref(h)) for h in hosts], timeout=timeout_s)
            for ref in hosts:
                if pending:
                    import ray

                    ray.cancel(ref, force=True)
        return await self.stats()

    async def wait_ready(self, count: int, settle_s: float = 30.0) -> int:
        """Waits until ``count`` executors have set up, or ``settle_s`` after the first one did (the rest
        join as they come, e.g. as an autoscaler adds their nodes); returns how many are ready.

        Raises:
            RuntimeError: every executor failed to set up (the first reason is given).
        """
        first_ready: float | None = None
        while True:
            ready = sum(e.alive for e in self.executors.values())
            if ready and first_ready is None:
                first_ready = time.time()
            if ready >= count or (first_ready is not None and time.time() - first_ready > settle_s):
                return ready
            if self.setup_failures and len(self.setup_failures) >= len(self.hosts):
                raise RuntimeError(next(iter(self.setup_failures.values())))
            await asyncio.sleep(0.1)

    async def setup_failed(self, executor_id: str, reason: str) -> None:
        """An executor could not set up (it then exits): the search is told rather than left waiting."""
        self.setup_failures[executor_id] = reason
        self.hosts.pop(executor_id, None)

    async def free_slots(self) -> int:
        """How many more trials could be handed out or wait for an executor: each executor (running,
        booting, or to be started again after an idle exit) takes one trial and holds
        :data:`WAITING_PER_EXECUTOR` more, less the trials it has."""
        executors = max(self._alive(), self.spec.max_executors)
        running = sum(1 for e in self.executors.values() if e.alive and e.trial is not None)
        return executors * (1 + WAITING_PER_EXECUTOR) - running - len(self.queue)

    async def stats(self) -> dict[str, Any]:
        now = time.time()
        return {
            "executors_started": self.started,
            "executors": {e.id: {"trials_run": e.trials_run,
                                 "busy_s": e.busy_s + (now - e.busy_since if e.busy_since else 0.0),
                                 "alive": e.alive} for e in self.executors.values()},
            "queued": len(self.queue),
        }

    # -- trial drivers -----------------------------------------------------------------------
    async def submit(self, key: str, payload: dict[str, Any]) -> None:
        """Queues a trial (a restarted trial driver submits again: the trial keeps its executor)."""
        existing = self.trials.get(key)
        if existing is not None and not existing.ended.is_set():
            existing.payload = payload
            return
        self.trials[key] = _Trial(key, payload, asyncio.Queue(), asyncio.Event())
        self.queue.append(key)
        if not self._idle_executors() and self._alive() < self.spec.max_executors:
            self._launch()  # an executor exited while idle: the search needs it again
        self._notify()

    async def next_event(self, key: str, timeout_s: float = 30.0) -> tuple[str, Any] | None:
        """The trial's next event, ``("epoch", metrics)``, ``("done", metrics)`` or ``("failed", reason)``;
        None when nothing came within ``timeout_s``."""
        trial = self.trials.get(key)
        if trial is None:
            return ("failed", f"trial {key} is not known to the dispatcher")
        try:
            return await asyncio.wait_for(trial.events.get(), timeout_s)
        except asyncio.TimeoutError:
            return None

    async def end_trial(self, key: str) -> None:
        """The trial is over for Tune (finished, stopped by the scheduler, or failed): stop training it."""
        trial = self.trials.get(key)
        if trial is None:
            return
        trial.ended.set()
        if key in self.queue:
            self.queue.remove(key)
        if trial.executor is None:
            self.trials.pop(key, None)

    # -- executors ---------------------------------------------------------------------------
    async def next_trial(self, executor_id: str, timeout_s: float = 10.0) -> dict[str, Any] | str | None:
        """The executor's next trial (its unfinished one first, after a restart), :data:`EXIT`, or None."""
        executor = self.executors.setdefault(executor_id, _Executor(executor_id))
        executor.alive = True
        if executor.trial is not None:  # the worker group was restarted mid-trial: resume it
            trial = self.trials.get(executor.trial)
            if trial is not None and not trial.ended.is_set():
                max_failures = int(trial.payload.get("max_failures", 0))
                if 0 <= max_failures < trial.deliveries:
                    reason = f"the trial's workers were lost {trial.deliveries} time(s) (resources.max_failures: {max_failures})"
                    trial.events.put_nowait(("failed", reason))
                    self._free(executor)
                else:
                    trial.deliveries += 1
                    return self._assignment(trial)
            else:
                self._free(executor)
        deadline = time.time() + timeout_s
        while True:
            if self.closing:
                executor.alive = False
                return EXIT
            while self.queue:
                trial = self.trials.get(self.queue.popleft())
                if trial is None or trial.ended.is_set():
                    continue
                trial.executor, trial.deliveries = executor_id, trial.deliveries + 1
                executor.trial, executor.busy_since = trial.key, time.time()
                return self._assignment(trial)
            if time.time() - executor.idle_since > self.spec.idle_exit_s:
                executor.alive = False  # nothing to do for a while: give the slot (and its node) back
                return EXIT
            remaining = deadline - time.time()
            if remaining <= 0:
                return None
            self.wakeup.clear()
            try:
                await asyncio.wait_for(self.wakeup.wait(), min(remaining, 1.0))
            except asyncio.TimeoutError:
                pass

    async def wait_end(self, key: str, timeout_s: float = 30.0) -> bool:
        """Whether the trial was ended (waits up to ``timeout_s``); executors watch this to stop."""
        trial = self.trials.get(key)
        if trial is None:
            return True
        try:
            await asyncio.wait_for(trial.ended.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def post(self, key: str, kind: str, data: Any) -> None:
        """An executor's ``("epoch" | "done" | "failed", data)`` for the trial's driver."""
        trial = self.trials.get(key)
        if trial is not None and not trial.ended.is_set():
            trial.events.put_nowait((kind, data))
            trial.outcome_posted = trial.outcome_posted or kind in ("done", "failed")

    async def release(self, executor_id: str, key: str) -> None:
        """The executor is done with the trial (finished, failed or stopped) and takes the next."""
        executor = self.executors.get(executor_id)
        if executor is not None and executor.trial == key:
            executor.trials_run += 1
            self._free(executor)
        trial = self.trials.get(key)
        if trial is not None:
            trial.executor = None
            if trial.ended.is_set():
                self.trials.pop(key, None)
            elif not trial.outcome_posted:  # never leave a driver waiting for an outcome that cannot come
                trial.events.put_nowait(("failed", f"{executor_id} ended the trial without a result"))
                trial.outcome_posted = True

    # -- internals ---------------------------------------------------------------------------
    def _assignment(self, trial: _Trial) -> dict[str, Any]:
        return {**trial.payload, "key": trial.key, "delivery": trial.deliveries, "dispatched_at": time.time()}

    def _free(self, executor: _Executor) -> None:
        if executor.busy_since is not None:
            executor.busy_s += time.time() - executor.busy_since
        executor.trial, executor.busy_since, executor.idle_since = None, None, time.time()
        self._notify()

    def _idle_executors(self) -> list[_Executor]:
        return [e for e in self.executors.values() if e.alive and e.trial is None]

    def _alive(self) -> int:
        registered = sum(e.alive for e in self.executors.values())
        booting = sum(1 for eid in self.hosts if eid not in self.executors)
        return registered + booting

    def _notify(self) -> None:
        self.wakeup.set()

    def _launch(self) -> None:
        import ray

        if self._alive() >= self.spec.max_executors:
            return
        executor_id = f"executor{self.started}"
        self.started += 1
        handle = ray.get_runtime_context().current_actor
        host = ray.remote(_host).options(**_host_options())
        self.hosts[executor_id] = host.remote(executor_id, self.spec, handle, self.dataset_key)


async def _await_ref(ref: Any) -> Any:
    try:
        return await ref
    except Exception as exc:  # noqa: BLE001  (an executor that failed has nothing left to give back)
        log.debug("executor ended with %s", exc)
        return None


def _host_options() -> dict[str, Any]:
    """A host task holds no resources of its own (its executor's workers hold them); on the head
    when the cluster has the driver resource."""
    from medpeft_ray.search.cluster import DRIVER_RESOURCE

    import ray

    options: dict[str, Any] = {"num_cpus": 0, "max_retries": 0}
    if ray.cluster_resources().get(DRIVER_RESOURCE):
        options["resources"] = {DRIVER_RESOURCE: 0.001}
    return options


def _host(executor_id: str, spec: ExecutorSpec, dispatcher: Any, dataset_key: dict[str, Any] | None) -> None:
    """Runs one executor: a Ray Train run whose workers loop over trials until told to exit."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from medpeft_ray.search.ray_train import prepare_fit

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


def start_dispatcher(spec: ExecutorSpec, dataset_key: dict[str, Any] | None) -> tuple[Any, str]:
    """The search's dispatcher actor and its name (on the head when the cluster has the driver resource).

    Raises:
        MedpeftError: a search of the same experiment is running on this cluster.
    """
    import ray

    from medpeft_ray.errors import MedpeftError

    name = f"medpeft-dispatcher-{spec.experiment}"
    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        pass
    else:
        raise MedpeftError(f"a search named {spec.experiment!r} is already running on this Ray cluster; "
                           "give this one another experiment name (--experiment)")
    options = _host_options()
    options.pop("max_retries")
    options["max_concurrency"] = 1000  # long polls from every trial driver and executor
    return ray.remote(TrialDispatcher).options(name=name, namespace=NAMESPACE, **options).remote(spec, dataset_key), name


# ----------------------------------------------------------------------------------------------
# The executor's workers
# ----------------------------------------------------------------------------------------------


def executor_loop(loop_config: dict[str, Any]) -> None:
    """Every worker of an executor: set up once, then train the trials the dispatcher hands out."""
    started_at = time.time()
    if not os.environ.get("CUDA_VISIBLE_DEVICES"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from medpeft_ray.train.engine import WorkerContext
    from medpeft_ray.train.recipes import make_recipe

    executor_id, dispatcher = loop_config["executor_id"], loop_config["dispatcher"]
    torch.set_num_threads(max(1, int(loop_config.get("threads", 1))))
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    # The ranks agree on what to do next and when to stop on a CPU group, so a GPU trial's
    # control messages never wait for the GPU.
    control = dist.new_group(backend="gloo") if world_size > 1 else None
    ctx = WorkerContext(rank=rank, world_size=world_size, device=ray.train.torch.get_device())
    # the recipe of the search's trials (classification or generation), from the trial it warms up with
    recipe = make_recipe(loop_config["warm_up"], ctx, control) if loop_config.get("warm_up") is not None else None
    setup_marks = {"executor_start": started_at, "executor_setup": time.time()}
    if loop_config.get("warm_up") is not None:
        try:
            recipe.warm_up(loop_config["warm_up"], loop_config.get("dataset_key"))
        except Exception as exc:  # noqa: BLE001  (a set-up that fails would fail again: exit, and say why)
            if rank == 0:
                ray.get(dispatcher.setup_failed.remote(executor_id, f"{type(exc).__name__}: {exc}"))
            log.error("executor %s could not set up:\n%s", executor_id, traceback.format_exc())
            return
        setup_marks["executor_warm_up"] = time.time()
    while True:
        assignment = ray.get(dispatcher.next_trial.remote(executor_id)) if rank == 0 else None
        if world_size > 1:
            box = [assignment]
            dist.broadcast_object_list(box, src=0, group=control)
            assignment = box[0]
        if assignment is None:
            continue
        if assignment == EXIT:
            return
        # each trial its own stop signal: a finished trial's watcher may still answer late
        stop = threading.Event()
        if recipe is None:
            recipe = make_recipe(assignment["trial"], ctx, control)
        recipe.ctx = dataclasses.replace(ctx, should_stop=stop.is_set)
        _run_assignment(recipe, assignment, dispatcher, executor_id, stop, control, setup_marks)
        setup_marks = {}  # only the executor's first trial paid for its set-up


def _run_assignment(recipe: Any, assignment: dict[str, Any], dispatcher: Any, executor_id: str,
                    stop: threading.Event, control: Any, setup_marks: dict[str, float]) -> None:
    """One trial on this worker: resume point, per-epoch uploads and reports, the final event."""
    import ray

    from medpeft_ray.errors import TrialFailed
    from medpeft_ray.train.recipe import TrialStopped

    ctx = recipe.ctx
    key = assignment["key"]
    trial = assignment["trial"]  # a TrialConfig, validated once where it was sampled
    checkpoints = TrialCheckpoints(assignment["checkpoint_uri"], trial.train.checkpoints_to_keep, trial.metric, trial.mode)
    watcher = None
    if ctx.rank == 0:
        watcher = threading.Thread(target=_watch_end, args=(dispatcher, key, stop), daemon=True)
        watcher.start()
    started = {**assignment.get("started", {}), **setup_marks, "dispatch": assignment["dispatched_at"]}
    evaluate_test = bool(assignment.get("evaluate_test"))

    reached = [0]  # the last epoch reported

    def report(metrics: dict[str, Any], directory: Path | None) -> None:
        epoch = reached[0] = int(metrics["epoch"])
        if directory is not None:
            checkpoints.upload(directory, epoch)
        if ctx.world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=control)  # every rank's part is in storage before the index names it
        if ctx.rank == 0:
            # reported before it is indexed: a worker lost in between makes the resumed trial report
            # this epoch again, rather than never
            if not evaluate_test:
                ray.get(dispatcher.post.remote(key, "epoch", {**metrics, "checkpoint_path": checkpoints.uri(epoch)}))
            if directory is not None:
                checkpoints.record(epoch, metrics.get(trial.metric))

    outcome: tuple[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="medpeft-resume-") as tmp:
        try:
            resume_from = checkpoints.download_latest(Path(tmp))
            final = recipe.run(trial, report, evaluate_test=evaluate_test, resume_from=resume_from,
                               dataset_key=assignment.get("dataset_key"), started=started)
            outcome = ("done", {k: v for k, v in final.items() if not isinstance(v, dict)})
        except TrialStopped:
            outcome = None
        except TrialFailed as exc:
            outcome = ("failed", str(exc))
            if ctx.rank == 0 and not evaluate_test:
                # the failed epoch reaches Tune too, as a cold trial reports it (its metrics are NaN)
                ray.get(dispatcher.post.remote(key, "epoch", {"epoch": reached[0] + 1, **nan_metrics(),
                                                              "train_loss": float("nan"), "failure": str(exc)}))
        except Exception as exc:  # noqa: BLE001  (the executor survives a trial's own error)
            outcome = ("failed", f"{type(exc).__name__}: {exc}")
            log.error("trial %s failed on %s:\n%s", key, executor_id, traceback.format_exc())
            if ctx.world_size > 1 or "CUDA error" in str(exc):
                # the other ranks may wait in a collective, or the GPU context is unusable: restart
                # the worker group (the dispatcher fails the trial, and hands out the next one)
                if ctx.rank == 0:
                    ray.get(dispatcher.post.remote(key, *outcome))
                raise
        if ctx.rank == 0:
            if outcome is not None:
                ray.get(dispatcher.post.remote(key, *outcome))
            ray.get(dispatcher.release.remote(executor_id, key))
    stop.set()  # ends this trial's watcher


def _watch_end(dispatcher: Any, key: str, stop: threading.Event) -> None:
    """Sets ``stop`` once the trial was ended from outside (or once it finished here)."""
    import ray

    while not stop.is_set():
        try:
            if ray.get(dispatcher.wait_end.remote(key, 5.0)):
                stop.set()
        except Exception:  # noqa: BLE001  (the dispatcher is gone: the search is ending)
            stop.set()


# ----------------------------------------------------------------------------------------------
# The Tune side
# ----------------------------------------------------------------------------------------------


def run_on_executor(dispatcher: Any, key: str, payload: dict[str, Any], report_epochs: bool) -> dict[str, Any]:
    """Inside a Tune trial: hands the trial to an executor, relays its epochs to Tune, returns its final metrics.

    Raises:
        TrialFailed: the trial failed on the executor (a NaN loss, too many lost workers, an error).
    """
    import ray
    from ray import tune

    from medpeft_ray.errors import TrialFailed

    ray.get(dispatcher.submit.remote(key, payload))
    while True:
        event = ray.get(dispatcher.next_event.remote(key, 30.0))
        if event is None:
            continue
        kind, data = event
        if kind == "epoch":
            if report_epochs:
                tune.report(data)
        elif kind == "done":
            return data
        else:
            raise TrialFailed(data)


class ExecutorGate(ForwardingSearcher):
    """Wraps a Tune searcher: a new trial only while an executor can take it or hold it as its next
    (Tune asks again shortly). Tune may run more trials at a time than there are executors (the
    waiting ones), and studies overlap: without the gate, trials would pile up in the queue.
    """

    def __init__(self, searcher: Searcher, dispatcher_name: str, recheck_s: float = 0.2) -> None:
        super().__init__(searcher)
        self.dispatcher_name = dispatcher_name
        self.recheck_s = recheck_s
        self._checked: tuple[float, bool] = (0.0, True)
        self.live = 0  # this study's trials suggested and not yet complete

    def suggest(self, trial_id: str) -> dict | None:
        # A study with no trial of its own running is never held back: Tune may not ask again
        # before something happens in this study, and nothing would.
        if self.live and not self._free():
            return None  # not now: Tune calls again
        suggestion = self.searcher.suggest(trial_id)
        if isinstance(suggestion, dict):
            self.live += 1
        return suggestion

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.live = max(0, self.live - 1)
        super().on_trial_complete(trial_id, result=result, error=error)

    def _free(self) -> bool:
        import ray

        checked_at, free = self._checked
        if time.time() - checked_at > self.recheck_s:
            try:
                free = ray.get(ray.get_actor(self.dispatcher_name, namespace=NAMESPACE).free_slots.remote(), timeout=10) > 0
            except Exception:  # noqa: BLE001  (no dispatcher: nothing to gate on)
                free = True
            self._checked = (time.time(), free)
        if free:
            self._checked = (0.0, True)  # a suggestion takes a slot: ask again next time
        return free


class ExecutorCallback(Callback):
    """Tells the dispatcher when Tune ends a trial (finished, stopped by the scheduler, failed),
    so that its executor frees it at once and takes the next trial.

    It finds the dispatcher by name, so a study restored from Tune's state (which pickles its
    callbacks) reaches the dispatcher of the search that restored it.
    """

    def __init__(self, dispatcher_name: str, experiment: str) -> None:
        self.dispatcher_name = dispatcher_name
        self.experiment = experiment

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial)

    def _end(self, trial: Any) -> None:
        import ray

        try:
            ray.get_actor(self.dispatcher_name, namespace=NAMESPACE).end_trial.remote(trial_key(self.experiment, trial.trial_id))
        except ValueError:  # no dispatcher: the search is ending
            pass


def trial_key(experiment: str, trial_id: str) -> str:
    """A trial's name at the dispatcher, unique over the studies of a search."""
    return f"{experiment}/{trial_id}"

