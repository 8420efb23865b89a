"""Warm trial executors, and their dispatcher: Tune's trials in, executors out (a Ray actor, one per search).

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
- A trial the scheduler stops is ended by :class:`~medpeft_ray.search.tune_side.ExecutorCallback` (in the search driver); its
  executor notices before its next training step, frees the trial and takes the next one.
- A worker lost mid-trial: Ray Train restarts the executor's worker group, which asks the
  dispatcher for its trial again and resumes it from the trial's last checkpoint (up to
  ``resources.max_failures`` times per trial); trials queued behind it wait their turn.
- An executor lost whole (the node its host and Ray Train controller live on, where the slot
  nodes declare :data:`~medpeft_ray.search.cluster.EXECUTOR_RESOURCE`): the dispatcher puts its
  trial first in the queue and starts a new executor; the trial resumes the same way.
- A NaN loss fails that trial once; the executor goes on with the next.

The other process roles have modules of their own: the executor's workers
(:mod:`~medpeft_ray.search.executor_worker`), their host actor (:mod:`~medpeft_ray.search.executor_host`),
the trial's checkpoints (:mod:`~medpeft_ray.search.trial_checkpoints`) and the Tune side
(:mod:`~medpeft_ray.search.tune_side`); a driver keeps its executors for its next search
(:mod:`~medpeft_ray.search.pools`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray

from medpeft_ray.fault_points import fault_point
from medpeft_ray.search.executor_host import ExecutorHost, host_name, host_options
from medpeft_ray.search.executor_spec import EXIT, NAMESPACE, ExecutorSpec
from medpeft_ray.train.assignment import TrialAssignment

log = logging.getLogger(__name__)

#: trials that may wait at the dispatcher for each executor, handed to it the moment it finishes
#: its trial (Tune needs seconds to start a trial's driver; the executor would idle meanwhile)
WAITING_PER_EXECUTOR = 1
#: a resumed search's restored trials submit again as their drivers start, in no set order: its
#: executors take none until no trial has submitted for this long (at most RESUME_HOLD_MAX_S), so
#: that they train in the order Tune created them, the order its scheduler saw them in
RESUME_SETTLE_S = 3.0
RESUME_HOLD_MAX_S = 30.0
#: a restarted dispatcher hands out no queued trial for this long, so that every executor first
#: claims the trial it is training (its watcher asks every few seconds; idle ones poll every 10 s)
ADOPT_GRACE_S = 12.0


@dataclass
class _Trial:
    key: str
    #: what its driver submitted; None while a restarted dispatcher knows the trial by its events only
    assignment: TrialAssignment | None
    events: asyncio.Queue[tuple[str, Any]]
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
        #: every hand-out of a trial to an executor, (key, when), oldest first: the search driver reads
        #: them (:meth:`handouts_since`) to say when a trial stops waiting for an executor and starts
        self.handouts: list[tuple[str, float]] = []
        self._handed_out = asyncio.Event()  # set, and replaced, at each hand-out: wakes the driver's long polls
        #: orders this instance's deliveries after a dead one's: the middle of a trial's fence
        self.generation = time.time_ns()
        if restarted is None:
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

    async def handouts_since(self, cursor: int, timeout_s: float = 10.0) -> tuple[int, list[tuple[str, float]]]:
        """The hand-outs of trials to executors after the first ``cursor`` ones, (key, when) each, and the
        cursor to ask with next; waits up to ``timeout_s`` for one. A restarted dispatcher lists its own
        hand-outs only: a cursor past their end reads them from the start."""
        if cursor > len(self.handouts):
            cursor = 0
        if cursor == len(self.handouts):
            try:
                await asyncio.wait_for(self._handed_out.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        return len(self.handouts), self.handouts[cursor:]

    # -- trial drivers -----------------------------------------------------------------------
    async def submit(self, key: str, assignment: TrialAssignment) -> None:
        """Queues a trial (a restarted trial driver submits again: the trial keeps its executor)."""
        self.last_submit = time.time()
        existing = self.trials.get(key)
        if existing is not None and not existing.ended.is_set():
            existing.assignment = assignment
            if existing.executor is None and key not in self.queue:  # known to a restarted dispatcher by its events only
                self._enqueue(key)
                self._notify()
            return
        self.trials[key] = _Trial(key, assignment, asyncio.Queue(), asyncio.Event())
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
            if trial is not None and not trial.ended.is_set() and trial.assignment is None:
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
                if trial.assignment is None:  # only its events are known yet: wait for its driver's submission
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
            trial = self.trials[key] = _Trial(key, None, asyncio.Queue(), asyncio.Event())  # its driver submits it again
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
    def _assignment(self, trial: _Trial) -> TrialAssignment:
        """The trial's assignment, stamped with this delivery (its number, this dispatcher's generation,
        the time), which :meth:`handouts_since` lists."""
        assert trial.assignment is not None  # only a submitted trial is handed out
        assignment = trial.assignment.delivered(trial.key, trial.deliveries, self.generation)
        self.handouts.append((trial.key, assignment.dispatched_at or time.time()))
        self._handed_out.set()
        self._handed_out = asyncio.Event()
        return assignment

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
        number = trial.assignment.number if trial is not None and trial.assignment is not None else 0
        return key.rpartition("/")[0], number

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
            trial = self.trials[key] = _Trial(key, None, asyncio.Queue(), asyncio.Event())
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
        if not ray.is_initialized():  # a dispatcher tested outside Ray
            return
        prefix = host_name(self.spec, "")
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
        max_failures = trial.assignment.max_failures if trial.assignment is not None else 0
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
        if self._alive() >= self.spec.max_executors:
            return
        executor_id = f"executor{self.started}"
        self.started += 1
        handle = ray.get_runtime_context().current_actor
        # Detached, so that it outlives a dispatcher that dies (Ray restarts the dispatcher, which
        # finds it by name); it ends by itself when its executor exits.
        host = ray.remote(ExecutorHost).options(name=host_name(self.spec, executor_id), namespace=NAMESPACE,
                                               lifetime="detached", **host_options(self.spec.host_resources))
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

