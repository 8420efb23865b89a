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


def tiny_multiclass() -> Predictions:
    """Five images, three classes (softmax scores); two are wrong."""
    labels = np.eye(3, dtype=np.float32)[[0, 0, 1, 2, 2]]
    scores = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.5, 0.1, 0.4]])
    return Predictions(labels, scores, loss_sum=2.5, multilabel=False)


@pytest.mark.parametrize("metric", ALL, ids=lambda m: m.name)
def test_every_metric_has_a_direction_a_computation_and_a_display(metric: Metric) -> None:
    assert metric.direction in ("max", "min")
    assert metric.ascending == (metric.direction == "min")
    assert metric.name.startswith("val_") and metric.description
    if metric.compute is None:  # computed by the generation recipe from samples (tests/test_generation.py)
        assert metric.tasks == {"generation"} and not metric.every_epoch
        assert metric.on_split("test") == "test_" + metric.name.removeprefix("val_")
        return
    predictions = tiny_predictions() if "multilabel" in metric.tasks else tiny_multiclass()
    value = metric.compute(predictions)
    assert isinstance(value, float) and math.isfinite(value)
    assert metric.title and metric.format(value) == f"{value:.{metric.digits}f}"
    assert metric.on_split("test") == "test_" + metric.name.removeprefix("val_")


def test_the_built_in_metrics_on_tiny_predictions() -> None:
    values = metric_values(tiny_predictions())
    # every metric computed from predictions, in the registry's order
    assert list(values) == [m.name for m in ALL if m.compute is not None]
    # class 0: positives score 0.9, 0.6 above both negatives -> 1; class 1: 0.8 vs 0.2, 0.4 -> 1
    assert values["val_auroc"] == 1.0
    assert values["val_loss"] == 0.5  # 2.0 summed over 4 images
    assert list(metric_values(tiny_predictions(), "test")) == [m.on_split("test") for m in ALL if m.compute is not None]


def test_an_unknown_metric_is_one_line_naming_the_metrics() -> None:
    with pytest.raises(UsageError, match="cannot rank trials by 'accuracy'; metrics: val_auroc, val_loss, val_f1"):
        get_metric("accuracy")


def test_multiclass_f1_accuracy_and_balanced_accuracy_by_hand() -> None:
    values = metric_values(tiny_multiclass())
    # argmax: 0, 1, 1, 2, 0 for labels 0, 0, 1, 2, 2
    assert values["val_accuracy"] == pytest.approx(3 / 5)
    assert values["val_balanced_accuracy"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    # per class F1 = 2TP / (2TP + FP + FN): class 0: 2/(2+1+1); class 1: 2/(2+1+0); class 2: 2/(2+0+1)
    assert values["val_f1"] == pytest.approx((2 / 4 + 2 / 3 + 2 / 3) / 3)


def test_multiclass_f1_agrees_with_scikit_learn() -> None:
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, 200)
    scores = rng.random((200, 4)) + 0.8 * np.eye(4)[truth]
    predictions = Predictions(np.eye(4)[truth], scores, 0.0, multilabel=False)
    guess = scores.argmax(axis=1)
    assert metric_values(predictions)["val_f1"] == pytest.approx(sklearn.f1_score(truth, guess, average="macro"))
    assert metric_values(predictions)["val_balanced_accuracy"] == pytest.approx(
        sklearn.balanced_accuracy_score(truth, guess))


def test_multilabel_f1_chooses_thresholds_on_validation_and_applies_them_unchanged() -> None:
    labels = np.array([[1], [1], [0], [0], [1]], dtype=np.float32)
    scores = np.array([[0.9], [0.4], [0.35], [0.1], [0.3]])
    val = Predictions(labels, scores, 0.0)
    # cuts: >=0.9 -> F1 2/4; >=0.4 -> 4/5; >=0.35 -> 4/6; >=0.3 -> 6/7 (best); >=0.1 -> 6/8
    assert val.decision_thresholds.tolist() == [pytest.approx(0.3)]
    assert metric_values(val)["val_f1"] == pytest.approx(6 / 7)
    # the test split is scored with validation's threshold, not its own best one
    test = Predictions(np.array([[1], [0], [1]], np.float32), np.array([[0.25], [0.2], [0.9]]), 0.0,
                       thresholds=val.decision_thresholds)
    assert test.predicted[:, 0].tolist() == [0, 0, 1]
    assert metric_values(test, "test")["test_f1"] == pytest.approx(2 / 3)
    # multi-label accuracy is each label's at 0.5 (MedMNIST's ACC), not at F1's thresholds: 3 of 5 right
    assert metric_values(val)["val_accuracy"] == pytest.approx(3 / 5)
    # balanced accuracy needs one class per image: not defined for multi-label data
    assert math.isnan(metric_values(val)["val_balanced_accuracy"])


def test_a_tied_score_is_taken_whole_by_a_threshold() -> None:
    from medpeft_ray.metrics import best_f1_threshold

    # 0.5 is shared by a positive and a negative: a cut inside the tie does not exist
    assert best_f1_threshold(np.array([1, 0, 1, 0.0]), np.array([0.5, 0.5, 0.9, 0.1])) in (0.5, 0.9)
    assert best_f1_threshold(np.array([0, 0.0]), np.array([0.2, 0.4])) == 0.5  # no positive: the default


def test_subgroup_scores_and_worst_group_gap() -> None:
    from medpeft_ray.metrics import prediction_details

    base = tiny_multiclass()
    predictions = Predictions(base.labels, base.scores, 2.5, multilabel=False,
                              subgroups={"skin_type": np.array(["1", "1", "2", "2", ""])})
    details = prediction_details(predictions, ["a", "b", "c"], "test")
    groups = details["subgroups"]["skin_type"]
    assert set(groups) == {"1", "2"}  # the unknown value is no group
    assert groups["1"]["n"] == 2 and groups["1"]["test_accuracy"] == pytest.approx(0.5)
    assert groups["2"]["test_accuracy"] == pytest.approx(1.0)
    assert "test_loss" not in groups["1"]  # the loss is summed per split, not kept per image
    assert details["worst_group_gap"]["skin_type"]["test_accuracy"] == pytest.approx(0.5)
    assert set(details["per_class"]) == {"test_auroc", "test_f1"} and list(details["per_class"]["test_f1"]) == ["a", "b", "c"]


def test_a_metric_of_another_task_is_refused_in_one_line() -> None:
    from medpeft_ray.metrics import require_defined

    require_defined("val_f1", "multilabel", "nih")
    require_defined("val_accuracy", "multilabel", "nih")  # per label at 0.5
    with pytest.raises(UsageError, match="search.metric: val_balanced_accuracy is defined for multiclass data; "
                                         "dataset 'nih' is multilabel"):
        require_defined("val_balanced_accuracy", "multilabel", "nih")


@pytest.mark.parametrize("metric", ALL, ids=lambda m: m.name)
def test_every_metric_has_a_leaderboard_column(metric: Metric) -> None:
    # the leaderboard keeps each trial's best-epoch value of every metric (callbacks fill them by
    # name), on validation and on the test split
    for name in (metric.name, metric.on_split("test")):
        assert name in trials_table.c
        assert name in {f.name for f in dataclasses.fields(TrialRecord)}


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
