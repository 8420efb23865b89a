"""Calibration of predicted probabilities: expected calibration error and reliability-diagram data.

Scores are binned into ``bins`` equal-width bins of [0, 1] (a bin holds [lo, hi); 1.0 falls in the
last one, as torchmetrics bins). In each bin the observed frequency (the share of positives, or of
right top-label guesses) is compared with the mean predicted probability; the expected calibration
error (ECE) is the mean of |frequency - confidence| over bins weighted by each bin's share of
images. Per class it is one-vs-rest on the class's probability (multi-label and multi-class
alike); multi-class data also has the top-label ECE (the argmax class's probability against
whether it is right).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Reliability:
    """A reliability diagram's data: per bin, mean confidence, observed frequency and image count
    (NaN confidence and frequency for an empty bin)."""

    #: the bins' bin + 1 edges, 0 to 1
    edges: np.ndarray
    confidence: np.ndarray
    frequency: np.ndarray
    count: np.ndarray

    @property
    def ece(self) -> float:
        """|frequency - confidence| averaged over bins, weighted by their share; NaN without images."""
        total = int(self.count.sum())
        if total == 0:
            return math.nan
        filled = self.count > 0
        gaps = np.abs(self.frequency[filled] - self.confidence[filled])
        return float((gaps * self.count[filled]).sum() / total)


@dataclass(frozen=True)
class Calibration:
    """Expected calibration errors per class, their mean, and the top-label one (multi-class)."""

    #: per class, one-vs-rest on its probability (NaN for a class without a known label)
    per_class_ece: tuple[float, ...]
    #: the mean over classes that have one
    macro_ece: float
    #: multi-class: the argmax class's probability against whether it is right; None for multi-label
    top_label_ece: float | None
    per_class: tuple[Reliability, ...]
    top_label: Reliability | None


def reliability(outcomes: np.ndarray, confidences: np.ndarray, bins: int = 15) -> Reliability:
    """Bins ``confidences`` (predicted probabilities) and compares each bin's mean with the share of
    ``outcomes`` (0/1) that are 1."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    confidences = np.asarray(confidences, dtype=np.float64)
    outcomes = np.asarray(outcomes, dtype=np.float64)
    # searchsorted on the edges (not floor(p * bins)) puts a probability on an edge in the bin it starts
    which = np.clip(np.searchsorted(edges, confidences, side="right") - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(which, confidences, bins) / count
        frequency = np.bincount(which, outcomes, bins) / count
    return Reliability(edges, np.where(count > 0, confidence, np.nan), np.where(count > 0, frequency, np.nan), count)


def top_label_outcomes(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Multi-class: whether each image's argmax class is right, and that class's probability."""
    guess = np.asarray(scores).argmax(axis=1)
    right = guess == np.nan_to_num(np.asarray(labels, dtype=np.float64), nan=0.0).argmax(axis=1)
    return right, np.asarray(scores, dtype=np.float64)[np.arange(len(guess)), guess]


def calibration(labels: np.ndarray, scores: np.ndarray, multilabel: bool, bins: int = 15) -> Calibration:
    """The expected calibration errors of ``scores`` (N, K probabilities) against ``labels`` (N, K:
    1, 0 or NaN; NaN images are left out of that class) in ``bins`` equal-width bins."""
    labels, scores = np.asarray(labels, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    per_class = []
    for k in range(labels.shape[1]):
        known = ~np.isnan(labels[:, k])
        per_class.append(reliability(labels[known, k] > 0.5, scores[known, k], bins))
    per_class_ece = tuple(diagram.ece for diagram in per_class)
    defined = [ece for ece in per_class_ece if not math.isnan(ece)]
    top_label = None if multilabel else reliability(*top_label_outcomes(labels, scores), bins)
    return Calibration(per_class_ece, float(np.mean(defined)) if defined else math.nan,
                       top_label.ece if top_label is not None else None, tuple(per_class), top_label)
