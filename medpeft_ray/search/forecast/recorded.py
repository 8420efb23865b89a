"""The forecast's inputs from the leaderboard: earlier trials' start-up and epoch times.

A search stores :func:`recorded_forecast` in its manifest without timing anything; the dry run
takes :func:`startup_figures` from here and times the steps itself.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from medpeft_ray.errors import MedpeftError
from medpeft_ray.label_ratios import same_label_ratio
from medpeft_ray.leaderboard import LeaderboardStore
from medpeft_ray.search.forecast.estimate import StartupFigures, devices_per_trial, forecast

if TYPE_CHECKING:
    from medpeft_ray.config import SearchConfig
    from medpeft_ray.search.cluster import ResourcePlan


def startup_figures(config: SearchConfig, db_url: str | None) -> StartupFigures:
    """Start-up figures of earlier trials of the same backbone in the leaderboard, else the defaults.

    The median ``startup_s`` is a typical (warm) trial's; the first trial on an executor also pays
    the executor's set-up, so the largest one over the median stands for that set-up.
    """
    if db_url is None:
        return StartupFigures()
    try:
        rows = LeaderboardStore(db_url, create=False).query(backbone=config.model.backbone, role="search")
    except (MedpeftError, sa.exc.SQLAlchemyError, OSError):  # no leaderboard yet, or none readable
        return StartupFigures()
    startups = [float(s) for s in rows["startup_s"].dropna()] if "startup_s" in rows else []
    if len(startups) < 2:
        return StartupFigures()
    typical = statistics.median(startups)
    return StartupFigures(typical, max(0.0, max(startups) - typical),
                          f"{len(startups)} earlier {config.model.backbone} trials in the leaderboard")


def recorded_epoch_seconds(config: SearchConfig, db_url: str | None) -> dict[float, float]:
    """An epoch's seconds (training + evaluation) per label ratio, from earlier trials in the leaderboard.

    The trials counted ran this dataset, backbone, image size and batch size at that label ratio,
    with one of this search's methods (``train_time_s / epochs_run``: their median). Rows do not
    say which device they ran on; the dry run times this machine's instead.
    """
    if db_url is None:
        return {}
    try:
        rows = LeaderboardStore(db_url, create=False).query(backbone=config.model.backbone, dataset=config.dataset.row_name,
                                                            role="search")
    except (MedpeftError, sa.exc.SQLAlchemyError, OSError):  # no leaderboard yet, or none readable
        return {}
    per_epoch: dict[float, list[float]] = {}
    for row in rows.to_dict(orient="records"):
        trial = row.get("config") or {}
        epochs, seconds = _number(row.get("epochs_run")), _number(row.get("train_time_s"))
        if (row.get("method") not in config.search_space.methods or not epochs or seconds is None
                or trial.get("dataset", {}).get("image_size") != config.dataset.image_size
                or trial.get("train", {}).get("batch_size") != config.train.batch_size):
            continue
        for ratio in config.dataset.label_ratios:
            if same_label_ratio(float(row["label_ratio"]), ratio):
                per_epoch.setdefault(ratio, []).append(seconds / epochs)
    return {ratio: statistics.median(values) for ratio, values in per_epoch.items()}


def _number(value: Any) -> float | None:
    """A leaderboard cell as a number; None for a missing one (None or NaN)."""
    if value is None:
        return None
    number = float(value)
    return None if math.isnan(number) else number


def recorded_forecast(config: SearchConfig, facts: dict[str, Any], plan: ResourcePlan,
                      db_url: str | None) -> dict[str, Any] | None:
    """The forecast a search stores in its manifest, without timing anything: epoch times and
    start-up figures from the leaderboard; None when it holds no epoch time for some label ratio.

    A search does not time steps itself: that would put DeepSpeed and, on GPUs, a CUDA context
    into the driver process; ``search --dry-run`` is the timed forecast.
    """
    epoch_seconds = recorded_epoch_seconds(config, db_url)
    if any(ratio not in epoch_seconds for ratio in config.dataset.label_ratios):
        return None
    result = forecast(config, facts, [], startup_figures(config, db_url), plan.concurrency,
                      devices_per_trial(config, plan),
                      epoch_seconds=epoch_seconds, device="cuda" if plan.use_gpu else "cpu")
    result.source = "leaderboard"
    return result.to_dict()
