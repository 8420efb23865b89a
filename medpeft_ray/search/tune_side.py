"""The Tune side of the warm executors: what runs in the search driver and in each Tune trial.

A Tune trial hands its assignment to the search's dispatcher and relays the epochs its executor
reports (:func:`run_on_executor`); :class:`ExecutorGate` lets the searcher suggest a trial only
while an executor can take it; :class:`ExecutorCallback` tells the dispatcher when Tune ends a trial;
:class:`ExecutorHandouts` tells the driver when an executor took a trial (until then it waits).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import ray
from ray import tune
from ray.tune import Callback
from ray.tune.result import TRAINING_ITERATION
from ray.tune.search import Searcher

from medpeft_ray.errors import TrialFailed
from medpeft_ray.search.budget import ForwardingSearcher
from medpeft_ray.search.executor_spec import NAMESPACE

if TYPE_CHECKING:
    from ray.actor import ActorHandle

    from medpeft_ray.train.assignment import TrialAssignment


def run_on_executor(dispatcher: ActorHandle, key: str, assignment: TrialAssignment,
                    report_epochs: bool) -> dict[str, Any]:
    """Inside a Tune trial: hands the trial to an executor, relays its epochs to Tune, returns its final metrics.

    Raises:
        TrialFailed: the trial failed on the executor (a NaN loss, too many lost workers, an error).
    """
    ray.get(dispatcher.submit.remote(key, assignment))
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
            ray.get(dispatcher.submit.remote(key, assignment))
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
        try:
            ray.get_actor(self.dispatcher_name, namespace=NAMESPACE).end_trial.remote(trial_key(self.experiment, trial.trial_id))
        except ValueError:  # no dispatcher: the search is ending
            pass


def trial_key(experiment: str, trial_id: str) -> str:
    """A trial's name at the dispatcher, unique over the studies of a search."""
    return f"{experiment}/{trial_id}"


class ExecutorHandouts:
    """When the search's executors took a study's trials, learnt in the search driver without ever
    blocking Tune's loop: one long poll of the dispatcher (:meth:`TrialDispatcher.handouts_since`) is
    in flight at a time, and :meth:`poll` collects its answer once it has come.

    Found by name like :class:`ExecutorCallback`, so that a restored study's callbacks reach the
    dispatcher of the search that restored it.
    """

    def __init__(self, dispatcher_name: str, experiment: str, wait_s: float = 10.0) -> None:
        self.dispatcher_name = dispatcher_name
        self.experiment = experiment
        self.wait_s = wait_s
        self.since = time.time()  # a kept dispatcher lists the hand-outs of its earlier searches too
        self._cursor = 0
        self._pending: ray.ObjectRef | None = None

    def poll(self) -> dict[str, float]:
        """The study's trials that an executor took since the last call: trial id -> when."""
        taken: dict[str, float] = {}
        if self._pending is not None:
            ready, _ = ray.wait([self._pending], timeout=0)
            if not ready:
                return taken
            try:
                self._cursor, handouts = ray.get(self._pending)
            except Exception:  # noqa: BLE001  (a dispatcher that died and restarted: ask it again)
                handouts = []
            self._pending = None
            for key, at in handouts:
                experiment, _, trial_id = key.rpartition("/")
                if experiment == self.experiment and at >= self.since:
                    taken[trial_id] = at
        try:
            dispatcher = ray.get_actor(self.dispatcher_name, namespace=NAMESPACE)
        except ValueError:  # no dispatcher: the search is ending
            return taken
        self._pending = dispatcher.handouts_since.remote(self._cursor, self.wait_s)
        return taken

    def __getstate__(self) -> dict[str, Any]:
        # a reference of this process; a restored study asks its own dispatcher from the start
        return {**self.__dict__, "_pending": None, "_cursor": 0}
