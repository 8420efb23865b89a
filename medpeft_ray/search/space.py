"""The YAML ``space`` as an Optuna define-by-run function, and the Optuna sampler.

Define-by-run (a function that calls ``trial.suggest_*``) rather than a static dict, so that a
parameter can depend on another one (conditional spaces: a method's options searched only when
that method is chosen).
"""

from __future__ import annotations

import pickle
import warnings
from typing import Any

import optuna
import pyarrow.fs
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, MedianStoppingRule, TrialScheduler

from medpeft_ray.config import Distribution, SearchSettings, SearchSpace, grid_points
from medpeft_ray.config.space import suggest
from medpeft_ray.metrics import metric_mode
from medpeft_ray.storage import filesystem


class SpaceSampler:
    """Callable ``(optuna.Trial) -> None`` that suggests every searched parameter (define-by-run).

    A class rather than a closure so Tune can pickle it into the searcher's checkpoint; the
    suggesting itself is :func:`medpeft_ray.config.space.suggest`. ``methods``: the methods a
    several-method search chooses among (their parameters are suggested only when chosen).
    """

    def __init__(self, distributions: dict[str, Distribution], methods: list[str] | None = None) -> None:
        self.distributions = dict(distributions)
        self.methods = list(methods or [])

    @classmethod
    def of(cls, space: SearchSpace) -> "SpaceSampler":
        return cls(space.distributions, space.methods)

    def __call__(self, trial: "optuna.Trial") -> dict[str, Any] | None:
        suggest(trial, self.distributions, self.methods)
        return None


def make_sampler(
    settings: SearchSettings, distributions: dict[str, Distribution], conditional: bool = False
) -> "optuna.samplers.BaseSampler":
    """The Optuna sampler named by ``search.sampler``, seeded.

    ``conditional``: parameters exist only in some trials (one method's options); TPE then models
    each group of parameters that occur together on its own.
    """
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=settings.seed)
    if settings.sampler == "grid":
        return AskTellGridSampler(grid_points(distributions), seed=settings.seed)
    # Model-based samplers learn the space from their own history after a few random trials; with
    # small budgets, waiting for Optuna's default 10 would make the whole search random.
    startup = max(2, min(10, settings.num_samples // 3))
    if settings.sampler == "cmaes":
        # CMA-ES adapts a Gaussian over the continuous parameters; categorical ones are drawn at random
        return optuna.samplers.CmaEsSampler(seed=settings.seed, n_startup_trials=startup, warn_independent_sampling=False)
    if settings.sampler == "gp":
        return optuna.samplers.GPSampler(seed=settings.seed, n_startup_trials=startup)
    # constant liar: a suggestion made while other trials run treats them as done with a poor value,
    # so parallel trials spread out instead of piling onto the same promising point
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=settings.seed, multivariate=True, group=conditional,
                                          n_startup_trials=startup, constant_liar=True)


class AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler for Tune's ask-and-tell use.

    Optuna's stops the study when the grid is done, which only works inside ``study.optimize``;
    under Tune that would raise as the last point is told. Here the grid's size is the study's
    ``num_samples`` (validation makes sure), so Tune stops at the right point by itself. A class of
    this module's, not of a function's: Tune pickles the searcher, sampler included, with its state.
    """

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        pass


class RestorableASHA(AsyncHyperBandScheduler):
    """Tune's asynchronous HyperBand (ASHA), whose rungs and decisions survive a killed driver.

    Tune restores a study's trials and searcher but builds its scheduler afresh from the study's
    first pickle: the rungs recorded before the kill are gone, and a trial the scheduler had
    stopped whose stop was not saved reports its rung again, which ASHA takes as decided
    ("continue"). Here every decision is saved (``state_uri``, beside Tune's state) and read back
    when the scheduler is unpickled; a trial stopped at epoch ``t`` is stopped again when it
    reports ``t`` again.
    """

    def __init__(self, *args: Any, state_uri: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.state_uri = state_uri
        self.stopped_at: dict[str, float] = {}  # trial id -> the epoch the scheduler stopped it at
        self.added: set[str] | None = None  # after a restore: the trials Tune added again

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        if self.added is not None:
            self.added.add(trial.trial_id)
        if trial.trial_id not in self._trial_info:  # a restored trial keeps its bracket
            super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if self.added is not None:
            self._forget_unknown(self.added)
            self.added = None
        action = super().on_trial_result(tune_controller, trial, result)
        epoch = result.get(self._time_attr)
        stopped_at = self.stopped_at.get(trial.trial_id)
        if action == TrialScheduler.STOP and stopped_at is None and epoch is not None:
            self.stopped_at[trial.trial_id] = epoch
        elif stopped_at is not None and epoch is not None and epoch >= stopped_at:
            action = TrialScheduler.STOP
        self._save()
        return action

    def _forget_unknown(self, known: set[str]) -> None:
        """Drops what the saved state holds of trials Tune does not know after its restore (created
        after Tune last saved: their points run again under new ids, which must not count twice)."""
        for trial_id in set(self._trial_info) - known:
            del self._trial_info[trial_id]
            self.stopped_at.pop(trial_id, None)
        for bracket in self._brackets:
            for _, recorded in bracket._rungs:
                for trial_id in set(recorded) - known:
                    del recorded[trial_id]

    def _save(self) -> None:
        if self.state_uri is None:
            return
        fs, path = filesystem(self.state_uri)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as stream:  # one small pickle; an object store's PUT is whole
            stream.write(pickle.dumps({k: v for k, v in self.__dict__.items() if k not in ("state_uri", "added")}))

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("stopped_at", {})
        if self.__dict__.get("state_uri") is None:
            return
        fs, path = filesystem(self.state_uri)
        if fs.get_file_info(path).type == pyarrow.fs.FileType.File:  # a resumed study: its decisions so far
            with fs.open_input_stream(path) as stream:
                self.__dict__.update(pickle.loads(stream.read()))
            self.added = set()


def make_scheduler(settings: SearchSettings, epochs: int, state_uri: str | None = None) -> Any:
    """The Tune trial scheduler named by ``search.scheduler``: early stopping on epochs.

    ``state_uri``: where ASHA keeps its decisions, so that a resumed study stops what it stopped.
    """
    scheduler = settings.scheduler
    grace = min(scheduler.grace_period, epochs)
    # schedulers stop trials on the search's metric alone, even when Optuna also minimises costs;
    # on val_loss where the metric is not there every epoch (FID)
    metric = {"metric": settings.stopping_metric, "mode": metric_mode(settings.stopping_metric)}
    if scheduler.type in ("asha", "hyperband"):
        # ASHA is asynchronous HyperBand with one bracket; more brackets hedge against a grace
        # period that stops good slow starters too early
        return RestorableASHA(
            time_attr="training_iteration", max_t=epochs, grace_period=grace, **metric, state_uri=state_uri,
            reduction_factor=scheduler.reduction_factor, brackets=scheduler.brackets if scheduler.type == "hyperband" else 1,
        )
    if scheduler.type == "median":
        return MedianStoppingRule(
            time_attr="training_iteration", grace_period=grace, min_samples_required=scheduler.min_samples, **metric
        )
    return FIFOScheduler()
