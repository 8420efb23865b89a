"""Confirming a study's best configurations: each re-trained with several seeds, scored on test.

A study ranks configurations by one seed each, and with early stopping by trials cut short.
``search.confirm: {top_k, seeds}`` re-trains the study's ``top_k`` configurations for the full
epochs with ``seeds`` seeds each (``train.seed``, ``train.seed + 1``, ...) and ranks them by the
mean of their best-epoch validation metric; the configuration chosen that way is the study's
answer. Each run also scores its best validation epoch on the test split: the chosen
configuration's test score (mean and std over its seeds) is recorded beside the choice and never
takes part in it.

The confirmation is recorded in the study's Optuna user attributes (``confirmation``, shown by
optuna-dashboard) and in the search's manifest, and printed.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import optuna
from ray import tune

from medpeft_ray.config import SearchConfig
from medpeft_ray.leaderboard import optuna_storage
from medpeft_ray.metrics import best_of, get_metric


@dataclass
class ConfirmedConfig:
    """One of a study's top configurations and its scores over the confirmation seeds."""

    trial_id: str  # the study's trial that proposed it
    method: str
    params: dict[str, Any]
    seeds: list[int] = field(default_factory=list)
    val: list[float] = field(default_factory=list)  # search.metric at each seed's best validation epoch
    test: list[float] = field(default_factory=list)  # search.metric at that epoch on the test split
    errors: list[str] = field(default_factory=list)

    @property
    def val_mean(self) -> float:
        return statistics.fmean(self.val) if self.val else math.nan

    @property
    def val_std(self) -> float:
        return statistics.stdev(self.val) if len(self.val) > 1 else 0.0

    def summary(self) -> dict[str, Any]:
        test = self.test
        return {**asdict(self), "val_mean": self.val_mean, "val_std": self.val_std,
                "test_mean": statistics.fmean(test) if test else None,
                "test_std": statistics.stdev(test) if len(test) > 1 else (0.0 if test else None)}


def choose(confirmed: list[ConfirmedConfig], mode: str) -> ConfirmedConfig | None:
    """The configuration with the best mean validation metric over its seeds (test scores play no part)."""
    scored = [c for c in confirmed if c.val]
    if not scored:
        return None
    return best_of(scored, lambda c: c.val_mean, mode)


def confirm_study(
    config: SearchConfig, label_ratio: float, top: list[Any], trainable: Any, concurrency: int, storage: str,
    callbacks: list[Any] | None = None,
) -> list[ConfirmedConfig]:
    """Re-trains ``top`` (leaderboard records, best first) with the confirmation seeds through Tune.

    ``trainable`` is :func:`medpeft_ray.search.trial.confirm_trial` with its plan and resources.
    """
    settings = config.search.confirm
    assert settings is not None
    confirmed = {r.trial_id: ConfirmedConfig(r.trial_id, r.method, dict(r.params)) for r in top}
    points = [{"trial_id": r.trial_id, "params": dict(r.params), "seed": config.train.seed + s}
              for r in top for s in range(settings.seeds)]
    tuner = tune.Tuner(
        trainable,
        param_space={"point": tune.grid_search(points)},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(name=config.run_name(label_ratio, confirmation=True),
                                  storage_path=f"{storage}/tune", callbacks=callbacks or [], verbose=0),
    )
    for result in tuner.fit():
        point = result.config["point"]
        entry = confirmed[point["trial_id"]]
        metrics = result.metrics or {}
        value = metrics.get(f"best_{config.search.metric}")
        if result.error is not None or value is None or not math.isfinite(value):
            entry.errors.append(str(result.error or "no result").strip().splitlines()[-1][:300])
            continue
        entry.seeds.append(point["seed"])
        entry.val.append(float(value))
        test = metrics.get(get_metric(config.search.metric).on_split("test"))
        if test is not None and math.isfinite(test):
            entry.test.append(float(test))
    return list(confirmed.values())


def record_confirmation(
    study_name: str, db_url: str, confirmed: list[ConfirmedConfig], chosen: ConfirmedConfig | None
) -> dict[str, Any]:
    """Stores the confirmation with the study (Optuna user attribute ``confirmation``); returns it."""
    record = {"configs": [c.summary() for c in confirmed], "chosen": chosen.summary() if chosen else None}
    study = optuna.load_study(study_name=study_name, storage=optuna_storage(db_url))
    study.set_user_attr("confirmation", record)
    return record


def describe(confirmed: list[ConfirmedConfig], chosen: ConfirmedConfig | None, metric: str) -> list[str]:
    """Lines for the console: each configuration's mean and std, then the choice and its test score."""
    shown = get_metric(metric)
    lines = []
    for c in confirmed:
        params = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in c.params.items())
        failed = f", {len(c.errors)} failed" if c.errors else ""
        mark = "*" if c is chosen else " "
        lines.append(f" {mark} {metric} {shown.format(c.val_mean)} +- {shown.format(c.val_std)} over {len(c.val)} "
                     f"seed(s){failed}  "
                     f"({c.method}: {params})")
    if chosen is not None:
        s = chosen.summary()
        test = (f"{shown.on_split('test')} {shown.format(s['test_mean'])} +- {shown.format(s['test_std'])}"
                if s["test_mean"] is not None else "no test split")
        lines.append(f"   chosen: trial {chosen.trial_id}; {test} (recorded, never used to choose)")
    return lines
