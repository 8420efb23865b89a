"""The metric registry (medpeft_ray/metrics.py): every metric is complete, and its direction is the
one rule for "best" in the recipe, the search, the store, the views and the report."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from conftest import leaderboard_row

from medpeft_ray.errors import UsageError
from medpeft_ray.leaderboard import LeaderboardStore, TrialRecord, views
from medpeft_ray.leaderboard.store import lower_is_better, trials_table
from medpeft_ray.metrics import (
    METRICS,
    Metric,
    Predictions,
    best_first_key,
    best_of,
    better,
    get_metric,
    metric_values,
)

ALL = list(METRICS.values())


def tiny_predictions() -> Predictions:
    """Four images, two classes; class 1 has an unknown label."""
    labels = np.array([[1, 0], [0, 1], [1, np.nan], [0, 0]], dtype=np.float32)
    scores = np.array([[0.9, 0.2], [0.3, 0.8], [0.6, 0.5], [0.1, 0.4]], dtype=np.float32)
    return Predictions(labels, scores, loss_sum=2.0)


@pytest.mark.parametrize("metric", ALL, ids=lambda m: m.name)
def test_every_metric_has_a_direction_a_computation_and_a_display(metric: Metric) -> None:
    assert metric.direction in ("max", "min")
    assert metric.ascending == (metric.direction == "min")
    assert metric.name.startswith("val_") and metric.description
    value = metric.compute(tiny_predictions())
    assert isinstance(value, float) and math.isfinite(value)
    assert metric.title and metric.format(value) == f"{value:.{metric.digits}f}"
    assert metric.on_split("test") == "test_" + metric.name.removeprefix("val_")


def test_the_built_in_metrics_on_tiny_predictions() -> None:
    values = metric_values(tiny_predictions())
    assert list(values) == list(METRICS)  # every metric, in the registry's order
    # class 0: positives score 0.9, 0.6 above both negatives -> 1; class 1: 0.8 vs 0.2, 0.4 -> 1
    assert values["val_auroc"] == 1.0
    assert values["val_loss"] == 0.5  # 2.0 summed over 4 images
    assert list(metric_values(tiny_predictions(), "test")) == [m.on_split("test") for m in ALL]


def test_an_unknown_metric_is_one_line_naming_the_metrics() -> None:
    with pytest.raises(UsageError, match="cannot rank trials by 'accuracy'; metrics: val_auroc, val_loss"):
        get_metric("accuracy")


@pytest.mark.parametrize("metric", ALL, ids=lambda m: m.name)
def test_every_metric_has_a_leaderboard_column(metric: Metric) -> None:
    # the leaderboard keeps each trial's best-epoch value of every metric (callbacks fill them by name)
    assert metric.name in trials_table.c
    assert metric.name in {f.name for f in dataclasses.fields(TrialRecord)}


@pytest.mark.parametrize("metric", ALL, ids=lambda m: m.name)
def test_direction_helpers_agree(metric: Metric) -> None:
    low, high = 0.2, 0.7
    good, bad = (low, high) if metric.ascending else (high, low)
    assert metric.better(good, bad) and not metric.better(bad, good) and metric.better(bad, None)
    assert not metric.better(math.nan, None)
    assert better(good, bad, metric.direction)
    assert best_of([bad, good, bad], lambda v: v, metric.direction) == good
    order = sorted([bad, None, good, math.nan], key=lambda v: best_first_key(v, metric.direction))
    assert order[:2] == [good, bad]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LeaderboardStore]:
    store = LeaderboardStore(f"sqlite:///{tmp_path / 'leaderboard.db'}")
    yield store
    store.engine.dispose()


@pytest.mark.parametrize("metric", ALL, ids=lambda m: m.name)
def test_ranking_follows_the_direction_in_config_store_and_views(store: LeaderboardStore, metric: Metric) -> None:
    from medpeft_ray.config import SearchSettings

    assert SearchSettings(metric=metric.name).resolved_mode == metric.direction
    assert lower_is_better(metric.name) == metric.ascending
    # the same value in every metric column: the metric's direction alone decides the order
    values = {"a": 0.3, "b": 0.9, "c": 0.6, "d": None}
    for trial_id, value in values.items():
        others = {m.name: value for m in ALL if m.name != "val_auroc"}
        store.record(leaderboard_row(trial_id, "lora", 0.1, value, **others))
    best_first = ["a", "c", "b"] if metric.ascending else ["b", "c", "a"]

    rows = store.query(metric=metric.name, ascending=lower_is_better(metric.name))
    assert list(rows["trial_id"]) == [*best_first, "d"]  # no value: last
    frame = store.query()
    assert list(views.ranked(frame, metric.name)["trial_id"]) == best_first
    assert views.best(frame, metric.name).iloc[0]["trial_id"] == best_first[0]
    assert views.compare(frame, metric=metric.name).iloc[0, 0] == values[best_first[0]]
    assert list(views.progress(frame, metric.name)["best_so_far"].dropna())[-1] == values[best_first[0]]
    assert set(views.pareto(frame, metric.name)["trial_id"]) == {best_first[0]}  # same parameter count
