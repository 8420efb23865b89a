"""The Tune callback that sends a search's trials to MLflow and Weights & Biases as they run.

The YAML's ``tracking`` section names the destinations (resolved and checked by
:mod:`medpeft_ray.search.tracking`). One Tune callback per study (:class:`TrackingCallback`, and
one per study's confirmation) runs in the search driver beside
the leaderboard's and sends each trial there: its sampled hyperparameters as parameters, every
epoch's numeric metrics at step = epoch, and as tags its label ratio, method, backbone, dataset,
role, seed and the pre-trained checkpoint's SHA-256 (the leaderboard row's ``checkpoint_sha256``).

- MLflow (:class:`MlflowDestination`): one run per trial, nested (tag ``mlflow.parentRunId``)
  under one parent run per study, which holds the study's settings.
- W&B (:class:`WandbDestination`): one run per trial; a study is a W&B group, the role its job type.

Ray's own ``MLflowLoggerCallback`` and ``WandbLoggerCallback`` do not fit a search that resumes:
both keep their runs by Tune's trial objects and save no state, so a restored study starts new
MLflow runs and inits its W&B runs with ``resume=False``; neither nests a study's runs under a
parent run; and the W&B one starts a Ray actor per trial. This callback uses the libraries'
clients instead, in the driver process (W&B's several runs at once, ``reinit="create_new"``).

Resuming continues the same runs. They are found again by a key rather than by what Tune saved
(Tune saves its callbacks' state every few seconds: a run made after the last save must not be
made twice): an MLflow run carries the tag ``medpeft.run_key`` (study and trial), a W&B run's id
is made from the same key and inited with ``resume="allow"``. A trial restored from its checkpoint
reports its recorded epochs again; they are not logged twice: when this process first meets a run
that existed before, it reads back the last epoch the run holds (MLflow's history of ``epoch``;
the step of a resumed online W&B run; for an offline one, the offline files of earlier sessions,
read with ``wandb leet inspect``) and logs only later epochs.

A destination that fails mid-search (a server gone, a full disk) logs a warning and the search
goes on: the leaderboard is the record a search cannot do without.
"""

from __future__ import annotations

import logging
import math
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS

from medpeft_ray.config import SearchConfig
from medpeft_ray.leaderboard import LeaderboardStore
from medpeft_ray.metrics import better, get_metric
from medpeft_ray.search.callbacks import sampled_point
from medpeft_ray.search.tracking import TrackingTargets
from medpeft_ray.search.tracking_destinations import MlflowDestination, RunInfo, WandbDestination, short_reason
from medpeft_ray.train.export import export_adapter

log = logging.getLogger(__name__)

#: a result's values that are Tune's bookkeeping or the trial's, not metrics of an epoch
NOT_METRICS = frozenset(AUTO_RESULT_KEYS) | {"done", "trial_id", "resumed_from_epoch", "should_checkpoint"}
#: studies run in threads of the driver; one call at a time into the tracking clients
_CLIENTS = threading.RLock()


@dataclass
class TrackedTrial:
    """What the callback keeps of a trial: the epochs each destination holds, and its best epoch so far."""

    logged: dict[str, int] = field(default_factory=dict)  # destination -> the last epoch it holds
    best: float | None = None
    best_epoch: int | None = None
    epochs_run: int = 0


class TrackingCallback(Callback):
    """Sends one study's trials (``role="search"``) or its confirmation runs to the tracking destinations.

    Args:
        study_name: the study's Optuna name (experiment, label ratio, run stamp): the parent run and group.
        checkpoint_sha256: the pre-trained weights' SHA-256 from the pre-flight, or None.
        db_url: the leaderboard, where the best trial's row (its checkpoint) is found for ``log_adapter``.
    """

    def __init__(self, config: SearchConfig, label_ratio: float, study_name: str, targets: TrackingTargets,
                 db_url: str, checkpoint_sha256: str | None = None, role: str = "search") -> None:
        self.config, self.label_ratio, self.study_name, self.role = config, label_ratio, study_name, role
        self.db_url = db_url
        self.checkpoint_sha256 = checkpoint_sha256
        self.destinations: list[Any] = [
            *([MlflowDestination(targets.mlflow)] if targets.mlflow is not None else []),
            *([WandbDestination(targets.wandb)] if targets.wandb is not None else []),
        ]
        self.trials: dict[str, TrackedTrial] = {}
        self._met: set[tuple[str, str]] = set()  # (destination, trial) runs this process has opened

    # -- Tune hooks ---------------------------------------------------------------------------
    def setup(self, **info: Any) -> None:
        study = self._study_info()
        for destination in self.destinations:
            _quietly(f"{destination.name}: the study's run", destination.open_study, study)

    # A trial's runs are made at its first result, not at its start: a trial that waits for an
    # executor when the search is killed may be started afresh, under another id, by the resume.
    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        tracked = self._open(trial)
        epoch = int(result.get("epoch") or result.get("training_iteration") or tracked.epochs_run + 1)
        tracked.epochs_run = epoch
        value = result.get(self.config.search.metric)  # a confirmation reports best_<metric>: it keeps no best
        if isinstance(value, (int, float)) and better(value, tracked.best, self.config.search.resolved_mode):
            tracked.best, tracked.best_epoch = float(value), epoch
        metrics = epoch_metrics(result)
        for destination in self.destinations:
            if epoch > tracked.logged.get(destination.name, 0):
                if _quietly(f"{destination.name}: epoch {epoch} of trial {trial.trial_id}", destination.log_epoch,
                            trial.trial_id, epoch, metrics):
                    tracked.logged[destination.name] = epoch

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        tracked = self._open(trial)
        done = self.role == "confirmation" or tracked.epochs_run >= self.config.train.epochs_for(self.label_ratio)
        self._close(trial, tracked, "completed" if done else "stopped")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, self._open(trial), "failed")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.role == "search":
            self._log_best_adapter()
        for destination in self.destinations:
            _quietly(f"{destination.name}: the study's end", destination.end_study)

    # What Tune saves with the study: the trials' runs and best epochs. The runs are found again by
    # their keys all the same, so a run made after Tune's last save is not made twice.
    def get_state(self) -> dict[str, Any] | None:
        return {"trials": {trial_id: vars(t).copy() for trial_id, t in self.trials.items()},
                "destinations": [destination.state() for destination in self.destinations]}

    def set_state(self, state: dict[str, Any]) -> None:
        self.trials.update({trial_id: TrackedTrial(**values) for trial_id, values in state.get("trials", {}).items()})
        for destination, saved in zip(self.destinations, state.get("destinations") or []):
            destination.restore(saved)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_met": set()}  # runs opened by this process; a restored study opens its own

    # -- helpers ------------------------------------------------------------------------------
    def _open(self, trial: Any) -> TrackedTrial:
        """The trial's runs, opened once per process: found again by their keys, or made."""
        tracked = self.trials.get(trial.trial_id)
        waiting = [d for d in self.destinations if (d.name, trial.trial_id) not in self._met]
        if tracked is not None and not waiting:
            return tracked
        run = self._trial_info(trial)
        tracked = self.trials.setdefault(trial.trial_id, TrackedTrial())
        for destination in waiting:
            last = _quietly(f"{destination.name}: the run of trial {trial.trial_id}", destination.open_trial,
                            trial.trial_id, run)
            if last is None:
                continue  # tried again at the trial's next result
            self._met.add((destination.name, trial.trial_id))
            # what the destination holds, else (-1: it cannot say) what Tune saved
            tracked.logged[destination.name] = last if last >= 0 else tracked.logged.get(destination.name, 0)
        return tracked

    def _close(self, trial: Any, tracked: TrackedTrial, status: str) -> None:
        summary: dict[str, Any] = {"status": status, "epochs_run": tracked.epochs_run}
        if self.role == "search":  # a confirmation's result holds its best epoch's values already
            summary.update({"best_epoch": tracked.best_epoch, f"best_{self.config.search.metric}": tracked.best})
        for destination in self.destinations:
            _quietly(f"{destination.name}: the end of trial {trial.trial_id}", destination.close_trial,
                     trial.trial_id, summary)

    def _common_tags(self) -> dict[str, str]:
        config = self.config
        return {"experiment": config.experiment_name, "study": self.study_name, "label_ratio": f"{self.label_ratio:g}",
                "dataset": config.dataset.row_name, "backbone": config.model.backbone,
                **({"checkpoint_sha256": self.checkpoint_sha256} if self.checkpoint_sha256 else {})}

    def _study_info(self) -> RunInfo:
        config, settings = self.config, self.config.search
        params = {"num_samples": settings.num_samples, "sampler": settings.sampler, "metric": settings.metric,
                  "scheduler": settings.scheduler.type, "epochs": config.train.epochs_for(self.label_ratio),
                  "search_seed": settings.seed}
        tags = {**self._common_tags(), "role": "study", "method": ",".join(config.method.names)}
        return RunInfo(key=self.study_name, name=self.study_name, params=params, tags=tags)

    def _trial_info(self, trial: Any) -> RunInfo:
        """The run of a search trial (its sampled point) or of a confirmation (a point and a seed)."""
        params, seed, source = sampled_point(trial, self.role)
        trial_config = self.config.search_space.trial_config(self.label_ratio, params)
        seed = trial_config.train.seed if seed is None else seed
        tags = {**self._common_tags(), "trial_id": trial.trial_id, "role": self.role, "seed": str(seed),
                "method": trial_config.method.name, **({"source_trial": source} if source else {})}
        if source:  # a confirmation interrupted by a kill runs again under new Tune trial ids: the same runs
            return RunInfo(key=f"{self.study_name}/{source}/seed{seed}", name=f"{source}-seed{seed}", params=params,
                           tags=tags)
        return RunInfo(key=f"{self.study_name}/{trial.trial_id}", name=trial.trial_id, params=params, tags=tags)

    def _log_best_adapter(self) -> None:
        """The study's best trial's adapter, exported from its leaderboard row, to the destinations that ask."""
        wanted = [d for d in self.destinations if d.target.log_adapter]
        if not wanted:
            return
        metric = self.config.search.metric
        store = LeaderboardStore(self.db_url)
        try:
            rows = store.query(experiment=self.config.experiment_name, label_ratio=self.label_ratio, role="search",
                               metric=metric, ascending=get_metric(metric).ascending).to_dict(orient="records")
        finally:
            store.engine.dispose()
        best = next((r for r in rows if r["trial_id"] in self.trials and r.get("checkpoint")
                     and r["status"] != "failed"), None)
        if best is None:
            return
        with tempfile.TemporaryDirectory(prefix="medpeft-tracked-adapter-") as folder:
            if _quietly(f"the adapter of trial {best['trial_id']}", export_adapter, best, folder, metric) is None:
                return
            for destination in wanted:
                _quietly(f"{destination.name}: the adapter of trial {best['trial_id']}", destination.log_adapter,
                         best["trial_id"], f"{self.study_name}/{best['trial_id']}", Path(folder))


def epoch_metrics(result: dict[str, Any]) -> dict[str, float]:
    """A result's numeric, finite values less Tune's bookkeeping and the moments (``*_at``)."""
    return {name: float(value) for name, value in result.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and name not in NOT_METRICS and not name.endswith("_at")}


def _quietly(what: str, call: Callable[..., Any], *args: Any) -> Any:
    """``call(*args)``, one at a time across the driver's studies; a failure is a warning, not the search's end.

    Returns the call's result, or None where it failed (and True for a call that returns None).
    """
    try:
        with _CLIENTS:
            result = call(*args)
    except Exception as exc:  # noqa: BLE001  (a tracking server's or library's error must not end a search)
        log.warning("tracking: %s was not recorded: %s", what, short_reason(exc))
        return None
    return True if result is None else result


def tracking_callbacks(config: SearchConfig, label_ratio: float, study_name: str, targets: TrackingTargets | None,
                       db_url: str, facts: dict[str, Any], role: str = "search") -> list[Callback]:
    """The study's tracking callback, or none without tracking."""
    if targets is None:
        return []
    checkpoint = facts.get("checkpoint") or {}
    return [TrackingCallback(config, label_ratio, study_name, targets, db_url, checkpoint.get("sha256"), role)]
