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
- A worker lost mid-trial: Ray Train restarts the executor's worker group, which asks the
  dispatcher for its trial again and resumes it from the trial's last checkpoint (up to
  ``resources.max_failures`` times per trial); trials queued behind it wait their turn.
- An executor lost whole (the node its host and Ray Train controller live on, where the slot
  nodes declare :data:`~medpeft_ray.search.cluster.EXECUTOR_RESOURCE`): the dispatcher puts its
  trial first in the queue and starts a new executor; the trial resumes the same way.
- A NaN loss fails that trial once; the executor goes on with the next.

Checkpoints are written per epoch by every rank (on a thread, while the next epoch trains)
straight to the trial's folder in the results storage (local, ``s3://``, ``gs://``, through
``pyarrow.fs`` as Ray's own storage is), with an index that rank 0 writes last;
``train.checkpoints_to_keep`` best epochs (by ``search.metric``) and the latest one are kept
while the trial runs (:class:`~medpeft_ray.search.callbacks.CheckpointRetention` trims them once it ends).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune import Callback
from ray.tune.result import TRAINING_ITERATION
from ray.tune.search import Searcher

from medpeft_ray.fault_points import fault_point
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
#: a resumed search's restored trials submit again as their drivers start, in no set order: its
#: executors take none until no trial has submitted for this long (at most RESUME_HOLD_MAX_S), so
#: that they train in the order Tune created them, the order its scheduler saw them in
RESUME_SETTLE_S = 3.0
RESUME_HOLD_MAX_S = 30.0
#: a restarted dispatcher hands out no queued trial for this long, so that every executor first
#: claims the trial it is training (its watcher asks every few seconds; idle ones poll every 10 s)
ADOPT_GRACE_S = 12.0


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
    #: names this set of executors (their detached host actors), apart from another search's of the same experiment
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    #: the resources each executor's host asks for (:attr:`medpeft_ray.search.cluster.ResourcePlan.executor_host`):
    #: where the host, its Ray Train controller and their helpers live
    host_resources: dict[str, float] = field(default_factory=dict)

    def fits(self, num_workers: int, use_gpu: bool, resources_per_worker: dict[str, float]) -> bool:
        return (num_workers, use_gpu, dict(resources_per_worker)) == (self.num_workers, self.use_gpu,
                                                                      dict(self.resources_per_worker))


# ----------------------------------------------------------------------------------------------
# Trial checkpoints and records in the results storage
# ----------------------------------------------------------------------------------------------

#: a trial's record, in its folder: its kept checkpoints, every epoch's metrics, and which run of
#: the search may write there (rank 0 replaces it whole, after every rank uploaded the epoch)
TRIAL_RECORD = "trial_record.json"


class FencedOut(Exception):
    """A newer run of the search (or a newer delivery of the trial) owns the trial's folder: this
    writer, left over from an older one, stops without writing anything more there."""


@dataclass
class RecordedTrial:
    """What :data:`TRIAL_RECORD` holds."""

    #: (attempt, generation, delivery) of the writer that owns the folder: the search's run (1, then
    #: +1 per resume), its dispatcher's start (a restarted one's is later) and the trial's delivery
    fence: tuple[int, ...] = (0, 0, 0)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)  # kept ones: {"epoch", "value"}, oldest first
    epochs: list[dict[str, Any]] = field(default_factory=list)  # every epoch's metrics, as reported, oldest first


class TrialCheckpoints:
    """One trial's folder in the results storage: checkpoints, the trial record, retention, resume.

    ``uri`` is a local path or a ``scheme://`` URI that ``pyarrow.fs`` opens (as Ray opens its
    storage). Every rank uploads its part of an epoch into the same ``checkpoint_<epoch>`` folder;
    rank 0 then records the epoch (its metrics and checkpoint) in :data:`TRIAL_RECORD`, which names
    complete checkpoints only. ``fence`` is this writer's (attempt, generation, delivery): a writer whose fence
    is older than the record's raises :class:`FencedOut` instead of writing.
    """

    def __init__(self, uri: str, keep: int, metric: str, mode: str, fence: tuple[int, ...] = (0, 0, 0)) -> None:
        from medpeft_ray.storage import filesystem, is_uri

        self.fs, self.root = filesystem(uri)
        # the URI the leaderboard keeps (pyarrow's path of a bucket has no scheme)
        self.display_root = f"{uri.split('://', 1)[0]}://{self.root}" if is_uri(uri) else self.root
        self.keep, self.metric, self.mode = max(1, keep), metric, mode
        self.fence = tuple(int(part) for part in fence)
        self.history: list[dict[str, Any]] = []  # the epochs this writer recorded or took over

    def path(self, epoch: int) -> str:
        return f"{self.root}/checkpoint_{epoch:06d}"

    def uri(self, epoch: int) -> str:
        return f"{self.display_root}/checkpoint_{epoch:06d}"

    def upload(self, local: Path, epoch: int) -> None:
        """Copies this rank's part of epoch ``epoch`` (the files under ``local``) into the storage.

        Raises:
            FencedOut: a newer writer owns the folder (nothing is copied).
        """
        import pyarrow.fs

        self.check()
        self.fs.create_dir(self.path(epoch), recursive=True)
        pyarrow.fs.copy_files(str(local), self.path(epoch), source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=self.fs)

    def read(self) -> RecordedTrial:
        """The trial record as stored (empty when the trial never recorded an epoch)."""
        import pyarrow.fs

        target = f"{self.root}/{TRIAL_RECORD}"
        if self.fs.get_file_info(target).type != pyarrow.fs.FileType.File:
            return RecordedTrial()
        with self.fs.open_input_stream(target) as stream:
            raw = json.loads(stream.read().decode())
        return RecordedTrial(tuple(raw["fence"]), list(raw["checkpoints"]), list(raw["epochs"]))  # type: ignore[arg-type]

    def index(self) -> list[dict[str, Any]]:
        """The complete checkpoints, oldest first: ``{"epoch", "value"}`` each."""
        return self.read().checkpoints

    def claim(self) -> list[dict[str, Any]]:
        """Takes the folder for this writer; returns the epochs recorded so far (to report again).

        Raises:
            FencedOut: a newer writer owns the folder already.
        """
        record = self.read()
        self._check(record)
        self.history = record.epochs
        self._write(RecordedTrial(self.fence, record.checkpoints, record.epochs))
        return list(record.epochs)

    def check(self) -> None:
        """Raises :class:`FencedOut` when a newer writer owns the folder."""
        self._check(self.read())

    def _check(self, record: RecordedTrial) -> None:
        if tuple(record.fence) > self.fence:
            raise FencedOut(f"{self.display_root} belongs to a newer writer (run, dispatcher, delivery "
                            f"{tuple(record.fence)}; this one: {self.fence})")

    def record(self, epoch: int, value: float | None, metrics: dict[str, Any] | None = None) -> None:
        """Adds epoch ``epoch`` and its ``metrics`` to the record (rank 0, after every rank uploaded),
        then drops the checkpoints that are neither among the ``keep`` best (ties: the earlier) nor
        the latest.

        Raises:
            FencedOut: a newer writer owns the folder (nothing is written).
        """
        record = self.read()
        self._check(record)
        entries = sorted([e for e in record.checkpoints if e["epoch"] < epoch] + [{"epoch": epoch, "value": value}],
                         key=lambda e: e["epoch"])
        best = sorted(entries, key=lambda e: (best_first_key(e["value"], self.mode), e["epoch"]))[: self.keep]
        kept = {e["epoch"] for e in best} | {entries[-1]["epoch"]}
        # this writer's own view of the epochs, not the file's: a stale writer's write in between is replaced
        self.history = [m for m in self.history if int(m["epoch"]) < epoch] + [{**(metrics or {}), "epoch": epoch}]
        self._write(RecordedTrial(self.fence, [e for e in entries if e["epoch"] in kept], self.history))
        for entry in entries:
            if entry["epoch"] not in kept:
                try:
                    self.fs.delete_dir(self.path(entry["epoch"]))
                except OSError:  # already gone
                    pass

    def stored_epochs(self) -> list[int]:
        """The epochs whose checkpoint folders are in the storage (complete or not)."""
        import pyarrow.fs

        try:
            infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self.root, allow_not_found=True))
        except OSError:
            return []
        names = (info.base_name for info in infos if info.type == pyarrow.fs.FileType.Directory)
        return sorted(int(name[len("checkpoint_"):]) for name in names
                      if name.startswith("checkpoint_") and name[len("checkpoint_"):].isdigit())

    def retain(self, epochs: set[int]) -> list[int]:
        """Deletes the checkpoints of an ended trial but those of ``epochs``; returns the epochs deleted.

        The record (its epochs' metrics and its writer's fence stay) stops naming them first, so
        nothing ever names a folder that is gone.
        """
        record = self.read()
        if any(entry["epoch"] not in epochs for entry in record.checkpoints):
            self._write(RecordedTrial(tuple(record.fence), [e for e in record.checkpoints if e["epoch"] in epochs],
                                      record.epochs))
        gone = [epoch for epoch in self.stored_epochs() if epoch not in epochs]
        for epoch in gone:
            try:
                self.fs.delete_dir(self.path(epoch))
            except OSError:  # already gone
                pass
        return gone

    def _write(self, record: RecordedTrial) -> None:
        """Replaces the record whole. An object store's PUT is already all or nothing; a local file
        is written beside it and moved over it, since a worker killed mid-write (a killed driver
        takes its Ray with it) would leave a truncated record that the resumed trial cannot read."""
        import pyarrow.fs

        target = f"{self.root}/{TRIAL_RECORD}"
        local = isinstance(self.fs, pyarrow.fs.LocalFileSystem)
        written = f"{self.root}/.{TRIAL_RECORD}.{os.getpid()}.partial" if local else target
        self.fs.create_dir(self.root, recursive=True)
        with self.fs.open_output_stream(written) as stream:
            stream.write(json.dumps(dataclasses.asdict(record), default=str).encode())
        if local:
            self.fs.move(written, target)

    def download(self, epoch: int, into: Path) -> Path:
        """Epoch ``epoch``'s checkpoint (a kept one) copied into ``into``."""
        import pyarrow.fs

        target = into / f"checkpoint_{epoch:06d}"
        target.mkdir(parents=True, exist_ok=True)
        pyarrow.fs.copy_files(self.path(epoch), str(target), source_filesystem=self.fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
        return target

    def download_latest(self, into: Path) -> Path | None:
        """The latest complete checkpoint copied into ``into`` (to resume from), or None."""
        entries = self.index()
        if not entries:
            return None
        return self.download(max(e["epoch"] for e in entries), into)


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

    def __init__(self, spec: ExecutorSpec, dataset_key: dict[str, Any] | None = None, restarted: bool | None = None) -> None:
        self.spec = spec
        self.dataset_key = dataset_key
        self.queue: deque[str] = deque()
        self.trials: dict[str, _Trial] = {}
        self.executors: dict[str, _Executor] = {}
        self.hosts: dict[str, Any] = {}  # executor id -> its ExecutorHost actor
        self.runs: dict[str, Any] = {}  # executor id -> the host's run (a reference), for those this instance started
        self.wakeup = asyncio.Event()
        self.closing = False
        self.started = 0
        # a driver keeps its executors for its next search that fits (medpeft_ray.search.pools):
        # each search sets how many executors it wants, how long they may idle and where new ones keep their state
        self.searches: dict[str, dict[str, Any]] = {}  # running search -> where its statistics start
        self.resumed_at: float | None = None  # a resumed search began: its restored trials are settling
        self.last_submit = 0.0
        self.setup_failures: dict[str, str] = {}  # executor -> why it could not set up
        self.released: set[str] = set()  # trials an executor finished with (never taken back after a restart)
        #: orders this instance's deliveries after a dead one's: the middle of a trial's fence
        self.generation = time.time_ns()
        if restarted is None:
            import ray

            # only an actor can have been restarted (a dispatcher made outside one is a test's)
            context = ray.get_runtime_context() if ray.is_initialized() else None
            restarted = bool(context is not None and context.get_actor_id() is not None
                             and context.was_current_actor_reconstructed)
        # A dispatcher that Ray restarted after it died lost its state: the executors (detached
        # actors) are alive and re-register as they call; the trial drivers submit again.
        self.restarted_at = time.time() if restarted else None
        if restarted:
            self._find_hosts()

    # -- the search driver -------------------------------------------------------------------
    async def shutdown(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Tells every executor to exit and waits for their runs to end; returns :meth:`stats`."""
        import ray

        self.closing = True
        self._notify()
        runs = list(self.runs.values())
        if runs:
            await asyncio.wait([asyncio.ensure_future(_await_ref(r)) for r in runs], timeout=timeout_s)
        for host in self.hosts.values():  # detached: whatever did not end by itself goes now
            try:
                ray.kill(host)
            except Exception:  # noqa: BLE001  (already gone)
                pass
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
        """Since the dispatcher started: executors started, and each one's trials, busy seconds and state."""
        now = time.time()
        return {
            "executors_started": self.started,
            "executors": {e.id: {"trials_run": e.trials_run,
                                 "busy_s": e.busy_s + (now - e.busy_since if e.busy_since else 0.0),
                                 "alive": e.alive} for e in self.executors.values()},
            "queued": len(self.queue),
        }

    async def begin_search(self, experiment: str, max_executors: int, idle_exit_s: float, storage_path: str,
                           resumed: bool = False) -> int:
        """A search starts on these executors (the first, or a later one of the same driver): it
        wants up to ``max_executors`` of them, idle ones exiting after ``idle_exit_s``; executors
        started from now on keep their Ray Train state under ``storage_path`` (its results); a
        ``resumed`` search's restored trials settle first (:data:`RESUME_SETTLE_S`). Starts the
        missing executors; returns how many were alive (warm) already."""
        self.closing = False
        self.resumed_at = time.time() if resumed else None
        self.spec = dataclasses.replace(self.spec, max_executors=max_executors, idle_exit_s=idle_exit_s,
                                        storage_path=storage_path)
        warm = self._alive()
        self.searches[experiment] = await self.stats()
        for _ in range(max(0, max_executors - warm)):
            self._launch()
        return warm

    async def end_search(self, experiment: str) -> dict[str, Any]:
        """The search is over; returns its share of :meth:`stats`: the executors it started, the ones
        it found warm, and each one's trials and busy seconds during the search."""
        # Tune has ended every trial; an executor frees its last one a moment later (after its
        # outcome reached the driver, or at its next step when it was stopped): count it
        deadline = time.time() + 10.0
        while any(e.alive and e.trial is not None for e in self.executors.values()) and time.time() < deadline:
            await asyncio.sleep(0.05)
        now, before = await self.stats(), self.searches.pop(experiment, None) or {"executors_started": 0, "executors": {}}
        started = now["executors_started"] - before["executors_started"]
        was = before["executors"]
        return {
            "executors_started": started,
            "executors_warm": sum(1 for e in was.values() if e["alive"]),
            "executors": {eid: {"trials_run": e["trials_run"] - was.get(eid, {}).get("trials_run", 0),
                                "busy_s": e["busy_s"] - was.get(eid, {}).get("busy_s", 0.0),
                                "alive": e["alive"]}
                          for eid, e in now["executors"].items() if eid not in was or was[eid]["alive"]},
            "queued": now["queued"],
        }

    async def running_searches(self) -> list[str]:
        return sorted(self.searches)

    # -- trial drivers -----------------------------------------------------------------------
    async def submit(self, key: str, payload: dict[str, Any]) -> None:
        """Queues a trial (a restarted trial driver submits again: the trial keeps its executor)."""
        self.last_submit = time.time()
        existing = self.trials.get(key)
        if existing is not None and not existing.ended.is_set():
            existing.payload = payload
            if existing.executor is None and key not in self.queue:  # known to a restarted dispatcher by its events only
                self._enqueue(key)
                self._notify()
            return
        self.trials[key] = _Trial(key, payload, asyncio.Queue(), asyncio.Event())
        self._enqueue(key)
        if not self._idle_executors() and self._alive() < self.spec.max_executors:
            self._launch()  # an executor exited while idle: the search needs it again
        self._notify()

    async def next_event(self, key: str, timeout_s: float = 30.0) -> tuple[str, Any] | None:
        """The trial's next event, ``("epoch", metrics)``, ``("done", metrics)`` or ``("failed", reason)``;
        ``("unknown", None)`` from a restarted dispatcher that has not seen the trial (its driver
        submits it again); None when nothing came within ``timeout_s``."""
        trial = self.trials.get(key)
        if trial is None:
            if self.restarted_at is not None:
                return ("unknown", None)
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
            if trial is not None and not trial.ended.is_set() and not trial.payload:
                # adopted by a restarted dispatcher, its driver has not submitted it again yet
                trial.executor = None
                self.queue.append(trial.key)
                self._free(executor)
            elif trial is not None and not trial.ended.is_set():
                if self._out_of_deliveries(trial, "workers were"):
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
            for _ in range(0 if self._adopting() or self._settling() else len(self.queue)):
                trial = self.trials.get(self.queue.popleft())
                if trial is None or trial.ended.is_set():
                    continue
                if not trial.payload:  # only its events are known yet: wait for its driver's submission
                    self.queue.append(trial.key)
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

    async def wait_end(self, key: str, timeout_s: float = 30.0, executor_id: str | None = None) -> bool:
        """Whether the trial was ended (waits up to ``timeout_s``); executors watch this to stop.

        A restarted dispatcher takes the trial back as ``executor_id``'s (it is training it).
        """
        trial = self.trials.get(key)
        if executor_id is not None and self._adopting():
            trial = self._adopt(key, executor_id)
        if trial is None:
            return True
        try:
            await asyncio.wait_for(trial.ended.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def post(self, key: str, kind: str, data: Any) -> None:
        """An executor's ``("epoch" | "done" | "failed", data)`` for the trial's driver."""
        if kind == "epoch":
            fault_point("dispatcher_post", int(data.get("epoch") or 0))
        trial = self.trials.get(key)
        if trial is None and self.restarted_at is not None:
            trial = self.trials[key] = _Trial(key, {}, asyncio.Queue(), asyncio.Event())  # its driver submits it again
        if trial is not None and not trial.ended.is_set():
            trial.events.put_nowait((kind, data))
            trial.outcome_posted = trial.outcome_posted or kind in ("done", "failed")

    async def release(self, executor_id: str, key: str) -> None:
        """The executor is done with the trial (finished, failed or stopped) and takes the next."""
        self.released.add(key)
        executor = self.executors.setdefault(executor_id, _Executor(executor_id))
        if executor.trial == key:
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
        return {**trial.payload, "key": trial.key, "delivery": trial.deliveries, "generation": self.generation,
                "dispatched_at": time.time()}

    def _enqueue(self, key: str) -> None:
        """Queues a trial after the trials of its study that Tune created before it: a resumed study's
        restored trials submit again in any order, and the scheduler's decisions depend on which of
        them reports first, so they train in the order they had."""
        study, number = self._study_and_number(key)
        for position, queued in enumerate(self.queue):
            other_study, other_number = self._study_and_number(queued)
            if other_study == study and other_number > number:
                self.queue.insert(position, key)
                return
        self.queue.append(key)

    def _study_and_number(self, key: str) -> tuple[str, int]:
        """A trial's study and its number in it (Tune's creation order, sent by its driver; 0 while
        only its events are known)."""
        trial = self.trials.get(key)
        return key.rpartition("/")[0], int(trial.payload.get("number", 0)) if trial is not None else 0

    def _settling(self) -> bool:
        """Whether a resumed search's restored trials may still be submitting (see :data:`RESUME_SETTLE_S`)."""
        if self.resumed_at is None:
            return False
        now = time.time()
        if now - self.resumed_at > RESUME_HOLD_MAX_S or (self.queue and now - self.last_submit > RESUME_SETTLE_S):
            self.resumed_at = None
            return False
        return True

    def _adopting(self) -> bool:
        """Whether this is a restarted dispatcher still taking running trials back from their executors."""
        return self.restarted_at is not None and time.time() - self.restarted_at < ADOPT_GRACE_S

    def _adopt(self, key: str, executor_id: str) -> _Trial | None:
        """A restarted dispatcher learns that ``executor_id`` trains trial ``key`` (unless the trial
        ended, was released, or was handed to another executor meanwhile)."""
        if key in self.released:
            return self.trials.get(key)
        trial = self.trials.get(key)
        if trial is None:
            trial = self.trials[key] = _Trial(key, {}, asyncio.Queue(), asyncio.Event())
        busy_with = self.executors[executor_id].trial if executor_id in self.executors else None
        if trial.ended.is_set() or trial.outcome_posted or trial.executor not in (None, executor_id) \
                or busy_with not in (None, key):
            return trial
        if key in self.queue:
            self.queue.remove(key)
        executor = self.executors.setdefault(executor_id, _Executor(executor_id))
        trial.executor, trial.deliveries = executor_id, max(trial.deliveries, 1)
        executor.trial = key
        executor.busy_since = executor.busy_since or time.time()
        return trial

    def _find_hosts(self) -> None:
        """The executors a dead instance started (detached actors named after the search)."""
        import ray

        if not ray.is_initialized():  # a dispatcher tested outside Ray
            return
        prefix = _host_name(self.spec, "")
        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry["namespace"] == NAMESPACE and entry["name"].startswith(prefix):
                executor_id = entry["name"][len(prefix):]
                try:
                    self.hosts[executor_id] = ray.get_actor(entry["name"], namespace=NAMESPACE)
                except ValueError:  # it ended meanwhile
                    continue
                self.started = max(self.started, int(executor_id.removeprefix("executor")) + 1)

    def _free(self, executor: _Executor) -> None:
        if executor.busy_since is not None:
            executor.busy_s += time.time() - executor.busy_since
        executor.trial, executor.busy_since, executor.idle_since = None, None, time.time()
        self._notify()

    def _out_of_deliveries(self, trial: _Trial, lost: str) -> bool:
        """Whether the trial, whose workers or executor were ``lost`` ("workers were", "executor was"),
        has been delivered more often than ``resources.max_failures`` allows; if so its driver is told
        it failed."""
        max_failures = int(trial.payload.get("max_failures", 0))
        if not 0 <= max_failures < trial.deliveries:
            return False
        trial.events.put_nowait(("failed", f"the trial's {lost} lost {trial.deliveries} time(s) "
                                           f"(resources.max_failures: {max_failures})"))
        trial.outcome_posted = True
        return True

    def _idle_executors(self) -> list[_Executor]:
        return [e for e in self.executors.values() if e.alive and e.trial is None]

    def _alive(self) -> int:
        registered = sum(e.alive for e in self.executors.values())
        booting = sum(1 for eid in self.hosts if eid not in self.executors and eid not in self.setup_failures)
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
        # Detached, so that it outlives a dispatcher that dies (Ray restarts the dispatcher, which
        # finds it by name); it ends by itself when its executor exits.
        host = ray.remote(ExecutorHost).options(name=_host_name(self.spec, executor_id), namespace=NAMESPACE,
                                               lifetime="detached", **_host_options(self.spec.host_resources))
        self.hosts[executor_id] = host.remote()
        self.runs[executor_id] = self.hosts[executor_id].run.remote(executor_id, self.spec, handle, self.dataset_key)
        asyncio.ensure_future(self._watch_run(executor_id, self.runs[executor_id]))

    async def _watch_run(self, executor_id: str, run: Any) -> None:
        """When an executor's run ends: an executor that exited had nothing; one that died (its host's
        node was lost, taking the Ray Train controller and workers with it) had perhaps a trial,
        which goes back to the head of the queue and resumes from its checkpoint on another
        executor (counted against ``resources.max_failures``), and a new executor takes its place."""
        await _await_ref(run)
        self.runs.pop(executor_id, None)
        self.hosts.pop(executor_id, None)
        if self.closing or executor_id in self.setup_failures:  # a set-up that failed would fail again
            return
        executor = self.executors.get(executor_id)
        if executor is not None:
            executor.alive = False
            trial = self.trials.get(executor.trial) if executor.trial is not None else None
            self._free(executor)
            if trial is not None and trial.executor == executor_id and not trial.ended.is_set() \
                    and not trial.outcome_posted:
                trial.executor = None
                if not self._out_of_deliveries(trial, "executor was"):
                    log.warning("executor %s was lost with trial %s: the trial resumes on another executor",
                                executor_id, trial.key)
                    self.queue.appendleft(trial.key)
        if self.queue and not self._idle_executors() and self._alive() < self.spec.max_executors:
            self._launch()
        self._notify()


async def _await_ref(ref: Any) -> Any:
    try:
        return await ref
    except Exception as exc:  # noqa: BLE001  (an executor that failed has nothing left to give back)
        log.debug("executor ended with %s", exc)
        return None


def _host_options(resources: dict[str, float] | None = None) -> dict[str, Any]:
    """An actor that holds no CPU of its own (an executor's workers hold them): on the nodes that
    ``resources`` names (an executor's host: see :attr:`ExecutorSpec.host_resources`), else on the
    head when the cluster has the driver resource (the dispatcher)."""
    from medpeft_ray.search.cluster import DRIVER_RESOURCE

    import ray

    options: dict[str, Any] = {"num_cpus": 0}
    if resources:
        options["resources"] = dict(resources)
        # hosts spread over the slot nodes: a lost node takes few executors with it
        options["scheduling_strategy"] = "SPREAD"
    elif ray.cluster_resources().get(DRIVER_RESOURCE):
        options["resources"] = {DRIVER_RESOURCE: 0.001}
    return options


def _host_name(spec: ExecutorSpec, executor_id: str) -> str:
    return f"medpeft-executor-{spec.experiment}-{spec.run_id}-{executor_id}"


class ExecutorHost:
    """Holds one executor's Ray Train run (its controller's owner), as a detached actor."""

    def run(self, executor_id: str, spec: ExecutorSpec, dispatcher: Any, dataset_key: dict[str, Any] | None) -> None:
        import ray

        try:
            _host(executor_id, spec, dispatcher, dataset_key)
        finally:
            ray.actor.exit_actor()  # detached: nothing else would end it


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


DISPATCHER_PREFIX = "medpeft-dispatcher-"


def start_dispatcher(spec: ExecutorSpec, dataset_key: dict[str, Any] | None) -> tuple[Any, str]:
    """A dispatcher actor for a new set of executors, and its name (on the head when the cluster
    has the driver resource). It starts no executor: :meth:`TrialDispatcher.begin_search` does."""
    import ray

    name = f"{DISPATCHER_PREFIX}{spec.experiment}-{spec.run_id}"
    options = _host_options()
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
    import ray

    from medpeft_ray.errors import MedpeftError

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


# ----------------------------------------------------------------------------------------------
# The executor's workers
# ----------------------------------------------------------------------------------------------


def executor_loop(loop_config: dict[str, Any]) -> None:
    """Every worker of an executor: set up once, then train the trials the dispatcher hands out."""
    started_at = time.time()
    from medpeft_ray.train.engine import load_deepspeed

    # DeepSpeed picks its accelerator at import: decide before anything imports it
    load_deepspeed(on_gpu=bool(os.environ.get("CUDA_VISIBLE_DEVICES")))
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
    # the ranks' checkpoint uploads meet on a group of their own: they run beside training, whose
    # stop checks use ``control`` (two threads must never share one group's sequence of collectives)
    uploads = dist.new_group(backend="gloo") if world_size > 1 else None
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
    try:
        _serve_trials(recipe, ctx, dispatcher, executor_id, (control, uploads), setup_marks)
    except ray.exceptions.RayActorError:
        # the search's dispatcher died for good (its search ended, or its driver died): so does
        # this executor, rather than have Ray Train restart it over and over
        log.warning("executor %s: its search's dispatcher is gone; exiting", executor_id)


def _serve_trials(recipe: Any, ctx: Any, dispatcher: Any, executor_id: str, groups: tuple[Any, Any],
                  setup_marks: dict[str, float]) -> None:
    """An executor's trials, one after another, until the dispatcher says to exit. ``groups``: the
    ranks' CPU process groups for control (what to do next, when to stop) and for uploads.

    Raises:
        ray.exceptions.RayActorError: the dispatcher died for good (the other ranks exit).
    """
    import ray
    import torch.distributed as dist

    from medpeft_ray.train.recipes import make_recipe

    rank, world_size = ctx.rank, ctx.world_size
    control = groups[0]
    while True:
        gone: Exception | None = None
        assignment = None
        if rank == 0:
            try:
                assignment = ray.get(dispatcher.next_trial.remote(executor_id))
            except ray.exceptions.RayActorError as exc:
                assignment, gone = EXIT, exc
        if world_size > 1:
            box = [assignment]
            dist.broadcast_object_list(box, src=0, group=control)
            assignment = box[0]
        if assignment is None:
            continue
        if assignment == EXIT:
            if gone is not None:
                raise gone
            return
        # each trial its own stop signal: a finished trial's watcher may still answer late
        stop = threading.Event()
        if recipe is None:
            recipe = make_recipe(assignment["trial"], ctx, control)
        recipe.ctx = dataclasses.replace(ctx, should_stop=stop.is_set)
        _run_assignment(recipe, assignment, dispatcher, executor_id, stop, groups, setup_marks)
        setup_marks = {}  # only the executor's first trial paid for its set-up


def _run_assignment(recipe: Any, assignment: dict[str, Any], dispatcher: Any, executor_id: str,
                    stop: threading.Event, groups: tuple[Any, Any], setup_marks: dict[str, float]) -> None:
    """One trial on this worker: the recorded epochs reported again, then training from the latest
    checkpoint with per-epoch uploads, records and reports, then the final event.

    Every delivery of a trial (its first, a restart after a lost worker, a resumed search) reports
    the epochs its record holds before it trains on, so its driver (which drops the epochs it has
    seen) always has the whole trial; an epoch is recorded before it is reported, so none is
    reported that a later delivery would not find.
    """
    import ray

    from medpeft_ray.errors import TrialFailed
    from medpeft_ray.train.recipe import TrialStopped

    ctx = recipe.ctx
    key = assignment["key"]
    trial = assignment["trial"]  # a TrialConfig, validated once where it was sampled
    # later runs of the search, later dispatchers (one restarted after it died), later deliveries win
    fence = (int(assignment.get("attempt", 1)), int(assignment.get("generation", 0)), int(assignment["delivery"]))
    checkpoints = TrialCheckpoints(assignment["checkpoint_uri"], trial.train.checkpoints_to_keep, trial.metric,
                                   trial.mode, fence)
    watcher = None
    if ctx.rank == 0:
        watcher = threading.Thread(target=_watch_end, args=(dispatcher, key, stop, executor_id), daemon=True)
        watcher.start()
    started = {**assignment.get("started", {}), **setup_marks, "dispatch": assignment["dispatched_at"]}
    evaluate_test = bool(assignment.get("evaluate_test"))

    def post(kind: str, data: Any) -> None:
        if ctx.rank == 0:
            ray.get(dispatcher.post.remote(key, kind, data))

    def publish(metrics: dict[str, Any], directory: Path | None) -> None:
        """Uploads this rank's part of an epoch, then (rank 0, once every rank's part is in storage)
        records the epoch and reports it: on the publisher's thread, while the next epoch trains."""
        epoch = int(metrics["epoch"])
        fault_point("before_checkpoint", epoch)
        if directory is not None:
            checkpoints.upload(directory, epoch)
        if ctx.world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=groups[1])  # every rank's part is in storage before the record names it
        metrics = {**metrics, "checkpoint_path": checkpoints.uri(epoch)}
        if ctx.rank == 0:
            checkpoints.record(epoch, metrics.get(trial.metric) if directory is not None else None, metrics)
            fault_point("after_record", epoch)
            if not evaluate_test:
                post("epoch", metrics)

    publisher = EpochPublisher(publish)

    outcome: tuple[str, Any] | None = None
    history: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="medpeft-resume-") as tmp:
        try:
            history = _claim(checkpoints, ctx, groups[0])
            if not evaluate_test:
                for metrics in history:  # the driver drops those it has reported already
                    post("epoch", metrics)
            resume_from = checkpoints.download_latest(Path(tmp))
            try:
                final = recipe.run(trial, publisher.submit, evaluate_test=evaluate_test, resume_from=resume_from,
                                   dataset_key=assignment.get("dataset_key"), started=started, history=history,
                                   checkpoint_of=lambda epoch: checkpoints.download(epoch, Path(tmp) / "best"))
            except BaseException:
                publisher.close(failed=True)
                raise
            publisher.close()  # the last epoch is recorded and reported before the trial's end
            outcome = ("done", {k: v for k, v in final.items() if not isinstance(v, dict)})
        except (TrialStopped, FencedOut) as exc:
            outcome = None  # stopped by its driver, or a newer run of the search owns the trial now
            if isinstance(exc, FencedOut):
                log.warning("trial %s left to a newer run: %s", key, exc)
        except TrialFailed as exc:
            outcome = ("failed", str(exc))
            if not evaluate_test:
                # the failed epoch reaches Tune too, as a cold trial reports it (its metrics are NaN)
                last = max([int(m["epoch"]) for m in checkpoints.history] or [0])
                post("epoch", {"epoch": last + 1, **nan_metrics(), "train_loss": float("nan"), "failure": str(exc)})
        except ray.exceptions.RayActorError:
            raise  # the dispatcher died for good: nobody is left to tell
        except Exception as exc:  # noqa: BLE001  (the executor survives a trial's own error)
            outcome = ("failed", f"{type(exc).__name__}: {exc}")
            log.error("trial %s failed on %s:\n%s", key, executor_id, traceback.format_exc())
            if ctx.world_size > 1 or "CUDA error" in str(exc):
                # the other ranks may wait in a collective, or the GPU context is unusable: restart
                # the worker group (the dispatcher fails the trial, and hands out the next one)
                post(*outcome)
                raise
        if outcome is not None:
            if outcome[0] == "done":
                fault_point("before_done", int(outcome[1].get("epoch") or 0))
            post(*outcome)
        if ctx.rank == 0:
            ray.get(dispatcher.release.remote(executor_id, key))
    stop.set()  # ends this trial's watcher


class EpochPublisher:
    """Publishes a trial's epochs (checkpoint upload, record, report) on a thread of its own, one
    epoch at a time and in order, so that training goes on while an epoch's checkpoint uploads
    (a fully fine-tuned ViT-B's 1.4 GB to a bucket takes seconds to minutes).

    An epoch's files are moved out of the recipe's temporary folder before the recipe deletes it. The next epoch's :meth:`submit` and :meth:`close` wait for the epoch in
    flight and raise its error, if it had one, on the training thread. A worker lost meanwhile
    loses at most that epoch too: the trial resumes from the last recorded one, as it always does.
    """

    def __init__(self, publish: Any) -> None:
        self.publish = publish
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def submit(self, metrics: dict[str, Any], directory: Path | None) -> None:
        self.wait()
        staged = None
        if directory is not None:
            staged = Path(tempfile.mkdtemp(prefix="medpeft-upload-"))
            for part in directory.iterdir():
                shutil.move(part, staged / part.name)  # a rename where both are on one disk
        self.thread = threading.Thread(target=self._run, args=(dict(metrics), staged), name="medpeft-publish",
                                       daemon=True)
        self.thread.start()

    def _run(self, metrics: dict[str, Any], staged: Path | None) -> None:
        try:
            self.publish(metrics, staged)
        except BaseException as exc:  # noqa: BLE001  (raised on the training thread)
            self.error = exc
        finally:
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)

    def wait(self) -> None:
        """Waits for the epoch in flight; raises its error."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def close(self, failed: bool = False) -> None:
        """The trial's training ended: the epoch in flight is published and its error raised; or
        training ``failed`` (its own error goes on): the epoch in flight is left to finish."""
        if not failed:
            self.wait()
            return
        if self.thread is not None:
            self.thread.join(timeout=300)  # a rank lost in its barrier: let the other error go on
            self.thread, self.error = None, None


def _claim(checkpoints: TrialCheckpoints, ctx: Any, control: Any) -> list[dict[str, Any]]:
    """Rank 0 takes the trial's folder for this delivery; every rank gets the recorded epochs.

    Raises:
        FencedOut: on every rank, when a newer run of the search owns the folder.
    """
    box: list[Any] = [None]
    if ctx.rank == 0:
        try:
            box[0] = checkpoints.claim()
        except FencedOut as exc:
            box[0] = exc
    if ctx.world_size > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(box, src=0, group=control)
    if isinstance(box[0], FencedOut):
        raise box[0]
    checkpoints.history = list(box[0])
    return list(box[0])


def _watch_end(dispatcher: Any, key: str, stop: threading.Event, executor_id: str) -> None:
    """Sets ``stop`` once the trial was ended from outside (or once it finished here)."""
    import ray

    while not stop.is_set():
        try:
            if ray.get(dispatcher.wait_end.remote(key, 5.0, executor_id)):
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
    reported = 0  # the last epoch this run of the trial told Tune
    while True:
        event = ray.get(dispatcher.next_event.remote(key, 30.0))
        if event is None:
            continue
        kind, data = event
        if kind == "epoch":
            epoch = int(data["epoch"])
            if epoch <= reported:
                continue  # a later delivery reports the trial's recorded epochs again
            reported = epoch
            if report_epochs:
                # Tune's own count restarts with a restored trial; schedulers must read the epoch
                tune.report({**data, TRAINING_ITERATION: epoch})
        elif kind == "done":
            return data
        elif kind == "unknown":  # the dispatcher died and was restarted: it learns of the trial again
            ray.get(dispatcher.submit.remote(key, payload))
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
