"""Tests for the validation metrics (medpeft_ray/metrics.py) against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medpeft_ray.metrics import mean_auroc, roc_auc


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("n", [2, 7, 50, 333])
def test_roc_auc_matches_sklearn_continuous(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    labels = np.zeros(n)
    labels[: max(1, n // 3)] = 1
    rng.shuffle(labels)
    if labels.min() == labels.max():
        labels[0] = 1 - labels[0]
    scores = rng.normal(size=n) + 0.8 * labels
    assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(15))
@pytest.mark.parametrize("decimals", [0, 1])
def test_roc_auc_matches_sklearn_with_heavy_ties(seed: int, decimals: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n = 200
    labels = (rng.random(n) < 0.3).astype(np.float32)
    scores = np.round(rng.random(n) * 0.6 + 0.3 * labels, decimals)
    assert len(np.unique(scores)) < n / 10  # really heavy ties
    expected = roc_auc_score(labels, scores)
    got = roc_auc(labels, scores)
    assert got == pytest.approx(expected, abs=1e-12)


def test_roc_auc_all_scores_tied_is_half() -> None:
    labels = np.array([0, 1, 0, 1, 1])
    assert roc_auc(labels, np.full(5, 0.3)) == pytest.approx(0.5)


def test_roc_auc_small_hand_computed() -> None:
    # pairs (pos, neg): (0.8>0.1) (0.8>0.4) (0.4=0.4 -> 0.5) (0.4>0.1) => 3.5 / 4
    labels = np.array([1, 0, 1, 0])
    scores = np.array([0.8, 0.4, 0.4, 0.1])
    assert roc_auc(labels, scores) == pytest.approx(0.875)


def test_roc_auc_integer_and_list_inputs() -> None:
    labels = [0, 0, 1, 1, 0, 1]
    scores = [3, 1, 3, 5, 2, 4]
    assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))


def test_roc_auc_labels_thresholded_at_half() -> None:
    # soft labels: > 0.5 counts as positive
    labels = np.array([0.0, 0.2, 0.9, 1.0])
    scores = np.array([0.1, 0.2, 0.3, 0.4])
    assert roc_auc(labels, scores) == pytest.approx(1.0)


def test_roc_auc_perfect_and_inverted() -> None:
    labels = np.array([0, 0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.9, 0.8, 0.25, 0.7])
    assert roc_auc(labels, scores) == 1.0
    assert roc_auc(labels, -scores) == 0.0
    assert roc_auc(1 - labels, scores) == 0.0


def test_roc_auc_does_not_depend_on_order() -> None:
    rng = np.random.default_rng(3)
    labels = (rng.random(80) < 0.4).astype(float)
    scores = np.round(rng.random(80), 1)
    perm = rng.permutation(80)
    assert roc_auc(labels, scores) == pytest.approx(roc_auc(labels[perm], scores[perm]))


@pytest.mark.parametrize("labels", [np.zeros(6), np.ones(6)])
def test_roc_auc_single_class_is_nan(labels: np.ndarray) -> None:
    assert math.isnan(roc_auc(labels, np.linspace(0, 1, 6)))


def test_roc_auc_does_not_modify_inputs() -> None:
    labels = np.array([1.0, 0.0, 1.0, 0.0])
    scores = np.array([0.3, 0.1, 0.3, 0.9])
    l0, s0 = labels.copy(), scores.copy()
    roc_auc(labels, scores)
    assert np.array_equal(labels, l0) and np.array_equal(scores, s0)


@pytest.mark.parametrize("seed", range(5))
def test_mean_auroc_matches_sklearn_macro(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = (rng.random((120, 4)) < [0.1, 0.3, 0.5, 0.7]).astype(np.float32)
    scores = np.round(rng.random((120, 4)) + 0.5 * labels, 1)
    mean, per_class = mean_auroc(labels, scores)
    expected = [roc_auc_score(labels[:, k], scores[:, k]) for k in range(4)]
    assert per_class == pytest.approx(expected, abs=1e-12)
    assert mean == pytest.approx(roc_auc_score(labels, scores, average="macro"), abs=1e-12)


def test_mean_auroc_excludes_single_class_columns() -> None:
    rng = np.random.default_rng(0)
    n = 60
    labels = (rng.random((n, 4)) < 0.4).astype(np.float32)
    labels[:, 1] = 0.0  # no positives
    labels[:, 3] = 1.0  # no negatives
    scores = rng.random((n, 4))
    mean, per_class = mean_auroc(labels, scores)
    assert len(per_class) == 4
    assert math.isnan(per_class[1]) and math.isnan(per_class[3])
    valid = [roc_auc_score(labels[:, k], scores[:, k]) for k in (0, 2)]
    assert per_class[0] == pytest.approx(valid[0]) and per_class[2] == pytest.approx(valid[1])
    assert mean == pytest.approx(np.mean(valid))
    assert not math.isnan(mean)


def test_mean_auroc_all_columns_single_class_is_nan() -> None:
    labels = np.zeros((10, 3))
    mean, per_class = mean_auroc(labels, np.random.default_rng(0).random((10, 3)))
    assert math.isnan(mean)
    assert all(math.isnan(a) for a in per_class)


def test_mean_auroc_perfect_and_inverted() -> None:
    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0], [1, 0]], dtype=np.float32)
    perfect = labels * 0.8 + 0.1
    mean, per_class = mean_auroc(labels, perfect)
    assert mean == 1.0 and per_class == [1.0, 1.0]
    mean, per_class = mean_auroc(labels, -perfect)
    assert mean == 0.0 and per_class == [0.0, 0.0]
    # one perfect and one inverted column average to 0.5
    mixed = perfect.copy()
    mixed[:, 1] = -mixed[:, 1]
    mean, per_class = mean_auroc(labels, mixed)
    assert per_class == [1.0, 0.0] and mean == pytest.approx(0.5)
