"""Ray Tune's Optuna searcher, telling Optuna what happened to each trial as the leaderboard records it.

Tune's own ``OptunaSearch`` tells every trial that reported a value as COMPLETE with its last
result's value, and reports intermediate values at Tune's ``training_iteration``. Here a study's
trials read in optuna-dashboard as they do in the leaderboard:

- each epoch's ``search.metric`` is an intermediate value at ``step=epoch`` (the learning curve),
  the epoch that made the scheduler stop the trial included (Tune passes that result only to
  ``on_trial_complete``);
- a trial that ran fewer epochs than the study's budget was stopped (by the scheduler or the
  search's budget) and is PRUNED, the leaderboard's "stopped" (same rule as
  :class:`medpeft_ray.search.callbacks.LeaderboardCallback`);
- a trial that ran every epoch is COMPLETE with its best epoch's value, the value its leaderboard
  row keeps and the checkpoint it keeps;
- a trial that raised is FAIL.

Multi-objective studies (``also_minimize``): Optuna refuses intermediate values there
(``Trial.report`` raises ``NotImplementedError``), so those trials carry none; a stopped trial is
still PRUNED. A completed one is told its best epoch's metric and the row's cost columns
(``trainable_params``, ``train_time_s`` of the whole trial), so that Optuna's Pareto front
(``best_trials``) is the front of the leaderboard's rows.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import optuna
from ray.tune.result import TRAINING_ITERATION
from ray.tune.search.optuna import OptunaSearch

from medpeft_ray.metrics import better

logger = logging.getLogger(__name__)


@dataclass
class _Seen:
    """What the searcher keeps of a running trial (pickled with the searcher when Tune saves it)."""

    best: float | None = None  # the best epoch's value of the first objective
    last: list[Any] | None = None  # every objective's value in the last result
    epochs_run: int = 0
    reported: set[int] = field(default_factory=set)  # epochs already told to Optuna as intermediate values


class EpochStatesSearch(OptunaSearch):
    """``OptunaSearch`` that tells Optuna PRUNED, COMPLETE (best epoch) or FAIL, with per-epoch values.

    Args:
        epochs: the study's epoch budget (``train.epochs_for(label_ratio)``): a trial that ran
            fewer was stopped.
        *args, **kwargs: those of ``OptunaSearch``.
    """

    def __init__(self, *args: Any, epochs: int, **kwargs: Any) -> None:
        self.epochs = epochs
        self._seen: dict[str, _Seen] = {}
        super().__init__(*args, **kwargs)

    @property
    def _objectives(self) -> list[str]:
        return list(self.metric) if isinstance(self.metric, list) else [self.metric]

    @property
    def _first_mode(self) -> str:
        return self.mode[0] if isinstance(self.mode, list) else self.mode

    def suggest(self, trial_id: str) -> dict | None:
        # A study resumed after its driver was killed: trials Optuna handed out after Tune last
        # saved its state are running in the study but unknown to Tune. They are handed out again,
        # lowest number first, as the trials that were asked for next: a sampler counts running
        # trials (the grid skips their points), so asking anew would skip or repeat a point.
        if trial_id not in self._ot_trials:
            known = {t.number for t in self._ot_trials.values()}
            orphans = [t for t in self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                       if t.number not in known]
            if orphans:
                orphan = min(orphans, key=lambda t: t.number)
                self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, orphan._trial_id)
        return super().suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials:
            return
        self._note(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        if result and not error:
            self._note(trial_id, result)  # the result that ended the trial reached no on_trial_result
        seen = self._seen.pop(trial_id, _Seen())
        values: list[Any] | None = None
        if error:
            state = optuna.trial.TrialState.FAIL
        elif seen.epochs_run < self.epochs:
            state = optuna.trial.TrialState.PRUNED  # Optuna gives it its last intermediate value
        else:
            values = [seen.best, *(seen.last or [None])[1:]]
            state = optuna.trial.TrialState.COMPLETE
            if None in values:  # no finite value to tell (every epoch NaN, say): Optuna refuses COMPLETE
                state, values = optuna.trial.TrialState.FAIL, None
        try:
            # skip: Optuna was told before the search was killed and resumed (Tune's state predates it)
            self._ot_study.tell(self._ot_trials[trial_id], values, state=state, skip_if_finished=True)
        except Exception as exc:  # noqa: BLE001  (a restored searcher may tell a trial the study has finished)
            logger.warning("trial %s: Optuna was not told its end: %s", trial_id, exc)
        self._completed_trials.add(trial_id)

    def _note(self, trial_id: str, result: dict) -> None:
        """Keeps the trial's best value and last result; reports the epoch's value to Optuna once."""
        seen = self._seen.setdefault(trial_id, _Seen())
        epoch = int(result.get("epoch", result.get(TRAINING_ITERATION, seen.epochs_run + 1)))
        seen.epochs_run = epoch
        seen.last = [result.get(name) for name in self._objectives]
        value = seen.last[0]
        if value is None or not math.isfinite(value):  # FID is NaN on epochs it was not computed at
            return
        if better(value, seen.best, self._first_mode):
            seen.best = value
        # an interrupted trial restarts from its last checkpoint and reports its epochs again
        if len(self._objectives) == 1 and epoch not in seen.reported:
            try:
                self._ot_trials[trial_id].report(float(value), step=epoch)
            except optuna.exceptions.UpdateFinishedTrialError:
                # Optuna was told the trial's end just before the search was killed (Tune's saved
                # state predates it): the restored trial reports its epochs again to no effect
                pass
            seen.reported.add(epoch)
