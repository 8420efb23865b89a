"""Validation metrics: per-class ROC AUC and its unweighted mean (the studies' metric)."""

from __future__ import annotations

import numpy as np


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of one binary column (Mann-Whitney U with average ranks for ties); NaN if one class.

    NaN labels (unknown) are left out.
    """
    labels = np.asarray(labels, dtype=np.float64)
    known = ~np.isnan(labels)
    labels, scores = labels[known] > 0.5, np.asarray(scores)[known]
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = np.asarray(scores)[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # average rank within each run of tied scores
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def mean_auroc(labels: np.ndarray, scores: np.ndarray) -> tuple[float, list[float]]:
    """Unweighted mean of the per-class AUROCs over classes that have both labels; and the list.

    Classes with only positives or only negatives in ``labels`` are NaN in the list and left out
    of the mean (a tiny validation split can miss a rare class).
    """
    per_class = [roc_auc(labels[:, k], scores[:, k]) for k in range(labels.shape[1])]
    valid = [a for a in per_class if not np.isnan(a)]
    return (float(np.mean(valid)) if valid else float("nan")), per_class
