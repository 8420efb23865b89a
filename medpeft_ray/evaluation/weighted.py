"""The registry's per-image metrics as functions of patient weights: what a resample or a swap changes.

A bootstrap resample draws patients (groups) with replacement; a permutation test swaps patients
between two configurations. Both leave each image's prediction as it is and change only how many
times each patient counts. So every metric here is written as a function of ``counts``, an array
(resamples, groups) of integer multiplicities, and computed for all resamples at once:

- AUROC (per class, one-vs-rest): the Mann-Whitney U of weighted images, from one sort of the
  class's scores per run (the sort does not depend on the weights);
- F1, accuracy and balanced accuracy: sums of per-patient counts (true positives, false positives,
  false negatives, correct images, images per class), so a resample is one matrix product.

At unit weights each function gives exactly (bit for bit) the registry's value in
:mod:`medpeft_ray.metrics`, including its rule for classes without both labels (left out of the
mean); ``tests/test_evaluation_stats.py`` checks this for every metric.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medpeft_ray.errors import UsageError
from medpeft_ray.evaluation.predictions import SplitPredictions
from medpeft_ray.metrics import ACCURACY_THRESHOLD, VALIDATION_SPLIT, Metric, get_metric

#: the registry metrics (by validation name) that are computed from per-image predictions
PER_IMAGE_METRICS = ("val_auroc", "val_f1", "val_accuracy", "val_balanced_accuracy")


@dataclass(frozen=True)
class MetricOnSplit:
    """A registry metric named on a split (``test_auroc``): the metric and the split it asks for."""

    name: str
    split: str
    metric: Metric

    @property
    def kind(self) -> str:
        """``auroc``, ``f1``, ``accuracy`` or ``balanced_accuracy``."""
        return self.metric.name.removeprefix(f"{VALIDATION_SPLIT}_")


def resolve_metric(name: str, runs: list[SplitPredictions]) -> MetricOnSplit:
    """The per-image metric ``name`` (a registry name on any split) for ``runs``.

    Raises:
        UsageError: ``name`` is no registry metric, has no per-image computation (loss, FID), names
            another split than the runs', or is not defined for their task (one line).
    """
    split, _, rest = name.partition("_")
    metric = get_metric(f"{VALIDATION_SPLIT}_{rest}") if rest else get_metric(name)
    if metric.name not in PER_IMAGE_METRICS:
        raise UsageError(f"{name}: no per-image computation (the loss and FID are not kept per image); "
                         f"intervals and paired tests take {', '.join(m.removeprefix('val_') for m in PER_IMAGE_METRICS)}")
    for run in runs:
        if run.split != split:
            raise UsageError(f"{name} is measured on {split} predictions; {run.source or 'these'} are {run.split}'s")
        task = "multilabel" if run.multilabel else "multiclass"
        if task not in metric.tasks:
            raise UsageError(f"{name} is defined for {' and '.join(sorted(metric.tasks))} data; "
                             f"{run.source or 'these predictions'} are {task}")
    return MetricOnSplit(name, split, metric)


def group_index(groups: np.ndarray) -> tuple[np.ndarray, int]:
    """Each image's group as an index 0..G-1 (in sorted order of the ids), and G."""
    ids, index = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    return index.reshape(-1), len(ids)


def counts_of_resamples(resampled_groups: np.ndarray, n_groups: int) -> np.ndarray:
    """(resamples, groups) multiplicities of each group in each row of ``resampled_groups`` (resamples, draws)."""
    rows = np.atleast_2d(resampled_groups).astype(np.int64)
    offsets = rows + n_groups * np.arange(len(rows))[:, None]
    counts = np.bincount(offsets.ravel(), minlength=n_groups * len(rows)).reshape(len(rows), n_groups)
    return counts.astype(np.int32)


def mean_over_defined(values: np.ndarray) -> np.ndarray:
    """Per row of (resamples, classes): the mean over the non-NaN classes (NaN when none), as the
    registry's ``np.mean`` of the defined list computes it (same summation order, so bit-equal)."""
    defined = ~np.isnan(values)
    if defined.all():
        return values.mean(axis=1)
    out = np.full(len(values), np.nan)
    patterns, which = np.unique(defined, axis=0, return_inverse=True)
    for number, pattern in enumerate(patterns):
        rows = np.flatnonzero(which.reshape(-1) == number)
        if pattern.any():
            out[rows] = values[np.ix_(rows, np.flatnonzero(pattern))].mean(axis=1)
    return out


# ------------------------------------------------------------------------------------------------
# AUROC: weighted Mann-Whitney U from one sort per class
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ClassRanking:
    """One class's known images, split into positives and negatives in ascending score order, and
    for each positive the number of negatives scored below it (``below``) and at most it (``up_to``)."""

    positive_groups: np.ndarray
    negative_groups: np.ndarray
    below: np.ndarray
    up_to: np.ndarray
    tied: np.ndarray


def _class_ranking(labels: np.ndarray, scores: np.ndarray, group_of_image: np.ndarray) -> _ClassRanking:
    known = np.flatnonzero(~np.isnan(labels))
    truth = labels[known] > 0.5
    positives, negatives = known[truth], known[~truth]
    negative_order = np.argsort(scores[negatives], kind="mergesort")
    negatives = negatives[negative_order]
    negative_scores = scores[negatives]
    below = np.searchsorted(negative_scores, scores[positives], side="left")
    up_to = np.searchsorted(negative_scores, scores[positives], side="right")
    return _ClassRanking(group_of_image[positives], group_of_image[negatives], below, up_to, below != up_to)


def weighted_auroc(ranking: _ClassRanking, counts: np.ndarray) -> np.ndarray:
    """(resamples,) ROC AUC of one class under group ``counts`` (resamples, groups); NaN without both labels.

    U = sum over positives p of w_p * (negative weight below p + half the tied negative weight),
    with cumulative negative weights taken once in score order. Integer arithmetic keeps it exact
    (int32 holds any cumulative image count; the sums are int64). Resamples are rows so that the
    cumulative sum runs along contiguous memory (4x faster than down columns).
    """
    cumulative = np.zeros((len(counts), len(ranking.negative_groups) + 1), dtype=np.int32)
    np.cumsum(np.take(counts, ranking.negative_groups, axis=1), axis=1, dtype=np.int32, out=cumulative[:, 1:])
    positive_weights = np.take(counts, ranking.positive_groups, axis=1)
    twice_u = 2 * (positive_weights * np.take(cumulative, ranking.below, axis=1)).sum(axis=1, dtype=np.int64)
    if ranking.tied.any():  # a tie is half a pair: 2U counts the tied negatives once more
        tied = np.flatnonzero(ranking.tied)
        extra = np.take(cumulative, ranking.up_to[tied], axis=1) - np.take(cumulative, ranking.below[tied], axis=1)
        twice_u += (positive_weights[:, tied] * extra).sum(axis=1, dtype=np.int64)
    pairs = positive_weights.sum(axis=1, dtype=np.int64).astype(np.float64) * cumulative[:, -1].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, (twice_u / 2.0) / pairs, np.nan)


# ------------------------------------------------------------------------------------------------
# F1, accuracy, balanced accuracy: per-group counts
# ------------------------------------------------------------------------------------------------


def group_statistics(run: SplitPredictions, kind: str, group_of_image: np.ndarray, n_groups: int) -> np.ndarray:
    """(groups, F) per-group counts from which ``kind`` (f1, accuracy, balanced_accuracy) follows:
    f1: true positives, false positives, false negatives per class (3K); accuracy: correct images
    and images (2), or on multi-label data labels right at 0.5 and known labels per class (2K);
    balanced_accuracy: correct images and images per labelled class (2K)."""
    predictions = run.metric_input()
    labels = predictions.labels
    if kind == "f1":
        known = ~np.isnan(labels)
        truth, guess = known & (labels > 0.5), known & (predictions.predicted > 0.5)
        per_image = np.concatenate([truth & guess, ~truth & known & guess, truth & ~guess], axis=1)
    elif kind == "accuracy" and run.multilabel:
        known = ~np.isnan(labels)
        right = known & ((predictions.scores > ACCURACY_THRESHOLD) == (labels > 0.5))
        per_image = np.concatenate([right, known], axis=1)
    else:
        truth_class, guess_class = labels.argmax(axis=1), predictions.scores.argmax(axis=1)
        correct = truth_class == guess_class
        if kind == "accuracy":
            per_image = np.stack([correct, np.ones_like(correct)], axis=1)
        else:
            of_class = np.eye(labels.shape[1], dtype=bool)[truth_class]
            per_image = np.concatenate([of_class & correct[:, None], of_class], axis=1)
    totals = np.zeros((n_groups, per_image.shape[1]), dtype=np.float64)
    np.add.at(totals, group_of_image, per_image.astype(np.float64))
    return totals


def metric_from_totals(kind: str, totals: np.ndarray) -> np.ndarray:
    """(resamples,) values of ``kind`` from (resamples, F) summed :func:`group_statistics`."""
    with np.errstate(invalid="ignore", divide="ignore"):
        if kind == "f1":
            tp, fp, fn = np.split(totals, 3, axis=1)
            counted = tp + fp + fn
            return mean_over_defined(np.where(counted > 0, 2 * tp / (2 * tp + fp + fn), np.nan))
        # accuracy: (correct, images) of multi-class data; multi-label data's per class, (correct K, known K),
        # averaged over classes as balanced accuracy's are (one class: the same formula either way)
        if kind == "accuracy" and totals.shape[1] == 2:
            return np.where(totals[:, 1] > 0, totals[:, 0] / totals[:, 1], np.nan)
        correct, images = np.split(totals, 2, axis=1)
        return mean_over_defined(np.where(images > 0, correct / images, np.nan))


class RunScorer:
    """One run's ``kind`` metric under group counts: prepared once, then called per batch of resamples."""

    def __init__(self, run: SplitPredictions, kind: str, group_of_image: np.ndarray, n_groups: int) -> None:
        self.kind = kind
        if kind == "auroc":
            labels, scores = run.labels.astype(np.float64), run.scores.astype(np.float64)
            self.rankings = [_class_ranking(labels[:, k], scores[:, k], group_of_image)
                             for k in range(labels.shape[1])]
        else:
            self.statistics = group_statistics(run, kind, group_of_image, n_groups)

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        """(resamples,) metric values for ``counts`` (resamples, groups) of integer multiplicities."""
        if self.kind == "auroc":
            per_class = np.stack([weighted_auroc(ranking, counts) for ranking in self.rankings], axis=1)
            return mean_over_defined(per_class)
        return metric_from_totals(self.kind, counts.astype(np.float64) @ self.statistics)
