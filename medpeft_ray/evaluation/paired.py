"""Paired tests between two configurations on the same test images, and corrections for many of them.

- AUROC: DeLong, DeLong & Clarke-Pearson's (1988) test of correlated ROC curves, with the midrank
  computation of Sun & Xu (2014). Several seeds of a configuration enter as DeLong's general
  contrast (the mean AUROC over a's seeds minus the mean over b's, with the covariance of all the
  AUROCs on the same cases); the macro AUROC keeps the covariance between classes, which share
  images, through per-image influence values (the structural components). When patients have
  several images, the variance sums the influence values per patient first (Obuchowski 1997).
- F1, accuracy, balanced accuracy: a paired permutation test that swaps patients (all their
  images, all seeds of a configuration together) between the two configurations.
- :func:`adjust`: Holm's step-down (family-wise error) or Benjamini-Hochberg (false discovery rate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from medpeft_ray.errors import UsageError
from medpeft_ray.evaluation.predictions import SplitPredictions, check_paired
from medpeft_ray.evaluation.weighted import (
    RunScorer,
    counts_of_resamples,
    group_index,
    group_statistics,
    metric_from_totals,
    resolve_metric,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

#: swapped patients per matrix product in the permutation test (bounds its memory)
PERMUTATION_BATCH = 1000
#: |d*| >= |d| up to rounding: a swap that gives the observed difference counts, whatever its last bit
_TOLERANCE = 1e-12


@dataclass(frozen=True)
class DeLongResult:
    """DeLong's test of ``auc_a - auc_b`` (each a mean over seeds) on the same cases."""

    auc_a: float
    auc_b: float
    difference: float
    z: float
    p_value: float
    #: the variance of ``difference``
    variance: float
    #: the macro test's per-class tests, by class name (None for one class)
    per_class: dict[str, DeLongResult] | None = None


@dataclass(frozen=True)
class PairedResult:
    """A paired test of configuration a against b on one metric: ``difference`` is a minus b."""

    metric: str
    difference: float
    p_value: float
    test: str
    #: DeLong's per-class tests behind a macro AUROC test
    per_class: dict[str, DeLongResult] | None = None


# ------------------------------------------------------------------------------------------------
# DeLong
# ------------------------------------------------------------------------------------------------


def _small_sample_factor(units: int) -> float:
    """The n/(n-1) that makes a sum of squared influences DeLong's (unbiased) variance."""
    return units / (units - 1) if units > 1 else 1.0


def _class_influence(labels: np.ndarray, scores: np.ndarray, contrast: np.ndarray,
                     group_of_image: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """One class's AUROC per scoring row and the contrast's influence summed per group.

    ``scores`` (rows, n) are the seeds of both configurations; ``contrast`` (rows,) weighs them
    (1/S_a for a's, -1/S_b for b's). Sun & Xu's midranks give the placement values: V10 for a
    positive (the share of negatives below it, ties half), V01 for a negative (the share of
    positives above it). DeLong's covariance is S10/m + S01/n of their sample covariances; written
    as influence values, (V10 - AUC)/m for a positive and (V01 - AUC)/n for a negative, each part
    scaled by the root of its small-sample factor, the contrast's variance is the sum of squared
    per-group influences: exactly DeLong's L S L' when every group has one image, and the
    clustered (per-patient) variance of Obuchowski (1997) otherwise.
    """
    from scipy import stats  # about a second to import: only where a statistic is computed, not per leaderboard listing

    known = ~np.isnan(labels)
    truth = labels[known] > 0.5
    rows = scores[:, known]
    m, n = int(truth.sum()), int((~truth).sum())
    all_ranks = stats.rankdata(rows, axis=1)
    positive_ranks = stats.rankdata(rows[:, truth], axis=1)
    negative_ranks = stats.rankdata(rows[:, ~truth], axis=1)
    auc = (all_ranks[:, truth].sum(axis=1) - m * (m + 1) / 2.0) / (m * n)
    v10 = (all_ranks[:, truth] - positive_ranks) / n
    v01 = 1.0 - (all_ranks[:, ~truth] - negative_ranks) / m
    groups = group_of_image[known]
    positive_groups, negative_groups = groups[truth], groups[~truth]
    positive_part = contrast @ (v10 - auc[:, None]) / m
    negative_part = contrast @ (v01 - auc[:, None]) / n
    scaled = (np.bincount(positive_groups, positive_part, n_groups)
              * math.sqrt(_small_sample_factor(len(np.unique(positive_groups))))
              + np.bincount(negative_groups, negative_part, n_groups)
              * math.sqrt(_small_sample_factor(len(np.unique(negative_groups)))))
    return auc, scaled


def _z_test(difference: float, variance: float) -> tuple[float, float]:
    """z and the two-sided normal p; a zero variance gives z 0 and p 1 for no difference."""
    if math.isnan(difference) or math.isnan(variance):
        return math.nan, math.nan
    if variance <= 0:
        return (0.0, 1.0) if difference == 0 else (math.copysign(math.inf, difference), 0.0)
    from scipy import stats  # about a second to import: only where a statistic is computed

    z = difference / math.sqrt(variance)
    return z, float(2 * stats.norm.sf(abs(z)))


def _seed_rows(scores: np.ndarray, cases: int, name: str) -> np.ndarray:
    """``scores`` as (seeds, cases); one seed may come as (cases,)."""
    rows = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if rows.ndim != 2 or rows.shape[1] != cases:
        raise UsageError(f"{name}: scores of shape {rows.shape} for {cases} labelled cases; give (seeds, cases)")
    return rows


def _seed_blocks(scores: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    """``scores`` as (seeds, images, classes); one seed may come as (images, classes)."""
    blocks = np.asarray(scores, dtype=np.float64)
    blocks = blocks[None] if blocks.ndim == 2 else blocks
    if blocks.ndim != 3 or blocks.shape[1:] != shape:
        raise UsageError(f"{name}: scores of shape {np.shape(scores)} for labels of shape {shape}; "
                         "give (seeds, images, classes)")
    return blocks


def _groups_or_cases(groups: np.ndarray | None, cases: int) -> tuple[np.ndarray, int]:
    return group_index(groups) if groups is not None else (np.arange(cases), cases)


def delong(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, *,
           groups: np.ndarray | None = None) -> DeLongResult:
    """DeLong's paired test of two configurations' AUROC on one binary class.

    Args:
        labels: (n,) 1, 0 or NaN (NaN cases are left out).
        scores_a: (S_a, n) or (n,): configuration a's scores, one row per seed.
        scores_b: (S_b, n) or (n,): configuration b's.
        groups: (n,) patient ids; None: every case is its own patient.

    The difference is the mean AUROC over a's seeds minus the mean over b's; its variance is
    DeLong's for that contrast, from the covariance of all S_a + S_b AUROCs on the same cases.
    The p-value is two-sided, from the normal.
    """
    labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    rows_a, rows_b = _seed_rows(scores_a, len(labels), "scores_a"), _seed_rows(scores_b, len(labels), "scores_b")
    known = labels[~np.isnan(labels)]
    if not (known > 0.5).any() or (known > 0.5).all():
        return DeLongResult(*(math.nan,) * 6)
    contrast = np.r_[np.full(len(rows_a), 1.0 / len(rows_a)), np.full(len(rows_b), -1.0 / len(rows_b))]
    group_of_image, n_groups = _groups_or_cases(groups, len(labels))
    auc, influence = _class_influence(labels, np.vstack([rows_a, rows_b]), contrast, group_of_image, n_groups)
    auc_a, auc_b = float(auc[:len(rows_a)].mean()), float(auc[len(rows_a):].mean())
    variance = float(influence @ influence)
    return DeLongResult(auc_a, auc_b, auc_a - auc_b, *_z_test(auc_a - auc_b, variance), variance)


def delong_macro(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, *,
                 classes: Sequence[str] | None = None, groups: np.ndarray | None = None) -> DeLongResult:
    """DeLong's test of the macro AUROC (the mean over classes with both labels of the per-class
    AUROC, as the registry's ``auroc``), with each class's own test in ``per_class``.

    Args:
        labels: (n, K) 1, 0 or NaN: multi-label targets, or a multi-class one-hot (one-vs-rest).
        scores_a: (S_a, n, K) or (n, K) probabilities of configuration a, one block per seed.
        scores_b: (S_b, n, K) or (n, K) of configuration b.
        classes: the K class names (default "0".."K-1").
        groups: (n,) patient ids; None: every image is its own patient.

    The classes share images, so their AUROCs are correlated: the macro difference's influence on
    each patient is the mean over classes of the per-class contrast influences (see
    :func:`_class_influence`), and its variance is the sum of their squares, which keeps every
    covariance between classes and seeds.
    """
    labels = np.asarray(labels, dtype=np.float64)
    stack_a, stack_b = _seed_blocks(scores_a, labels.shape, "scores_a"), _seed_blocks(scores_b, labels.shape, "scores_b")
    names = [str(name) for name in classes] if classes is not None else [str(k) for k in range(labels.shape[1])]
    contrast = np.r_[np.full(len(stack_a), 1.0 / len(stack_a)), np.full(len(stack_b), -1.0 / len(stack_b))]
    group_of_image, n_groups = _groups_or_cases(groups, len(labels))
    per_class: dict[str, DeLongResult] = {}
    aucs, influences = [], []
    for k, name in enumerate(names):
        known = labels[~np.isnan(labels[:, k]), k] > 0.5
        if not known.any() or known.all():
            per_class[name] = DeLongResult(*(math.nan,) * 6)
            continue
        rows = np.vstack([stack_a[:, :, k], stack_b[:, :, k]])
        auc, influence = _class_influence(labels[:, k], rows, contrast, group_of_image, n_groups)
        auc_a, auc_b = float(auc[:len(stack_a)].mean()), float(auc[len(stack_a):].mean())
        variance = float(influence @ influence)
        per_class[name] = DeLongResult(auc_a, auc_b, auc_a - auc_b, *_z_test(auc_a - auc_b, variance), variance)
        aucs.append((auc_a, auc_b))
        influences.append(influence)
    if not aucs:
        return DeLongResult(*(math.nan,) * 6, per_class=per_class)
    auc_a, auc_b = (float(np.mean(side)) for side in zip(*aucs))
    macro_influence = np.mean(influences, axis=0)
    variance = float(macro_influence @ macro_influence)
    return DeLongResult(auc_a, auc_b, auc_a - auc_b, *_z_test(auc_a - auc_b, variance), variance, per_class)


# ------------------------------------------------------------------------------------------------
# The paired permutation test
# ------------------------------------------------------------------------------------------------


def _check_configurations(a_runs: list[SplitPredictions], b_runs: list[SplitPredictions], metric: str) -> None:
    if not a_runs or not b_runs:
        raise UsageError(f"{metric}: a paired test needs predictions of both configurations")
    for run in a_runs[1:] + b_runs:
        check_paired(a_runs[0], run)


def _swaps(n_groups: int, permutations: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """(swaps, exact): every one of the 2^G swap patterns when that is no more than ``permutations``
    (the exact test), else ``permutations`` random ones."""
    if n_groups < 63 and 2 ** n_groups <= permutations:
        every = (np.arange(2 ** n_groups)[:, None] >> np.arange(n_groups)) & 1
        return every.astype(np.float64), True
    return rng.integers(0, 2, (permutations, n_groups)).astype(np.float64), False


def _null_differences(kind: str, own_a: np.ndarray, own_b: np.ndarray, swaps: np.ndarray) -> np.ndarray:
    """(swaps,) seed-mean a minus seed-mean b when each swapped group's statistics (seeds, groups,
    F) trade places: a's totals gain swaps @ (b - a) and b's lose as much."""
    seeds, _, features = own_a.shape
    moved = np.einsum("pg,sgf->psf", swaps, own_b - own_a, optimize=True)

    def seed_mean(totals: np.ndarray) -> np.ndarray:
        return metric_from_totals(kind, totals.reshape(-1, features)).reshape(len(swaps), seeds).mean(axis=1)

    return seed_mean(own_a.sum(axis=1)[None] + moved) - seed_mean(own_b.sum(axis=1)[None] - moved)


def paired_permutation(a_runs: Sequence[SplitPredictions], b_runs: Sequence[SplitPredictions], metric: str, *,
                       permutations: int = 5000, seed: int = 0) -> PairedResult:
    """Paired permutation test of the seed-mean ``metric`` (F1, accuracy, balanced accuracy) of a minus b.

    Under the null hypothesis a patient's predictions by a and by b (all images, all seeds of a
    configuration together) are exchangeable; each permutation swaps a random set of patients and
    recomputes the difference. p = (1 + #{|d*| >= |d|}) / (1 + permutations); with 2^patients no
    more than ``permutations`` every swap is enumerated and p = #{|d*| >= |d|} / 2^patients (exact).
    Each configuration keeps its own decision thresholds (multi-label F1), seed by seed.

    Raises:
        UsageError: an AUROC or per-split metric without per-image computation, or a and b with
            different numbers of seeds (seed i of a is swapped with seed i of b).
    """
    a_runs, b_runs = list(a_runs), list(b_runs)
    _check_configurations(a_runs, b_runs, metric)
    resolved = resolve_metric(metric, a_runs + b_runs)
    if resolved.kind == "auroc":
        raise UsageError(f"{metric}: AUROC is compared with DeLong's test (paired_test or delong_macro)")
    if len(a_runs) != len(b_runs):
        raise UsageError(f"{metric}: a permutation test swaps seed i of one configuration with seed i of the "
                         f"other; they have {len(a_runs)} and {len(b_runs)} seeds")
    observed = (np.mean([resolved.metric.compute(run.metric_input()) for run in a_runs])
                - np.mean([resolved.metric.compute(run.metric_input()) for run in b_runs]))
    group_of_image, n_groups = group_index(a_runs[0].groups)
    own_a, own_b = (np.stack([group_statistics(run, resolved.kind, group_of_image, n_groups) for run in runs])
                    for runs in (a_runs, b_runs))
    swaps, exact = _swaps(n_groups, permutations, np.random.default_rng(seed))
    at_least = 0
    for start in range(0, len(swaps), PERMUTATION_BATCH):
        batch = swaps[start:start + PERMUTATION_BATCH]
        null = _null_differences(resolved.kind, own_a, own_b, batch)
        at_least += int((np.abs(null) >= abs(observed) - _TOLERANCE).sum())
    p_value = at_least / len(swaps) if exact else (1 + at_least) / (1 + len(swaps))
    if math.isnan(observed):
        p_value = math.nan
    return PairedResult(metric, float(observed), float(p_value), "paired permutation")


def paired_bootstrap(a_runs: Sequence[SplitPredictions], b_runs: Sequence[SplitPredictions], metric: str, *,
                     resamples: int = 5000, seed: int = 0) -> PairedResult:
    """Paired bootstrap test of the seed-mean ``metric`` of a minus b, for any numbers of seeds.

    Each resample draws patients with replacement (all their images) and scores every seed of both
    configurations on it; the difference's bootstrap distribution, centred on the observed
    difference, stands for its null distribution: p = (1 + #{|d* - d| >= |d|}) / (1 + resamples).
    What :func:`paired_test` uses when the two configurations ran different numbers of seeds, where
    a permutation cannot swap seed for seed.
    """
    a_runs, b_runs = list(a_runs), list(b_runs)
    _check_configurations(a_runs, b_runs, metric)
    resolved = resolve_metric(metric, a_runs + b_runs)
    observed = (np.mean([resolved.metric.compute(run.metric_input()) for run in a_runs])
                - np.mean([resolved.metric.compute(run.metric_input()) for run in b_runs]))
    group_of_image, n_groups = group_index(a_runs[0].groups)
    scorers = [[RunScorer(run, resolved.kind, group_of_image, n_groups) for run in runs] for runs in (a_runs, b_runs)]
    rng = np.random.default_rng(seed)
    differences = []
    for start in range(0, resamples, PERMUTATION_BATCH):
        drawn = rng.integers(0, n_groups, (min(PERMUTATION_BATCH, resamples - start), n_groups))
        counts = counts_of_resamples(drawn, n_groups)
        mine, theirs = (np.mean([scorer(counts) for scorer in side], axis=0) for side in scorers)
        differences.append(mine - theirs)
    null = np.concatenate(differences) - observed
    null = null[np.isfinite(null)]
    p_value = (1 + int((np.abs(null) >= abs(observed) - _TOLERANCE).sum())) / (1 + len(null))
    if math.isnan(observed) or not len(null):
        p_value = math.nan
    return PairedResult(metric, float(observed), float(p_value), "paired bootstrap")


def paired_test(a_runs: Sequence[SplitPredictions], b_runs: Sequence[SplitPredictions], metric: str, *,
                permutations: int = 5000, seed: int = 0) -> PairedResult:
    """Configuration a against b on ``metric`` (a registry name on any split), a minus b.

    AUROC: DeLong's test of the macro AUROC (per-class tests in ``per_class``), clustered by
    patient when patients have several images; the other per-image metrics: the paired
    permutation test (:func:`paired_permutation`), or where the two ran different numbers of seeds
    (a confirmed configuration against a search trial) the paired bootstrap (:func:`paired_bootstrap`).
    """
    a_runs, b_runs = list(a_runs), list(b_runs)
    _check_configurations(a_runs, b_runs, metric)
    resolved = resolve_metric(metric, a_runs + b_runs)
    if resolved.kind != "auroc" and len(a_runs) != len(b_runs):
        return paired_bootstrap(a_runs, b_runs, metric, resamples=permutations, seed=seed)
    if resolved.kind != "auroc":
        return paired_permutation(a_runs, b_runs, metric, permutations=permutations, seed=seed)
    first = a_runs[0]
    clustered = len(np.unique(first.groups)) < first.num_images
    result = delong_macro(first.labels, np.stack([run.scores for run in a_runs]),
                          np.stack([run.scores for run in b_runs]), classes=first.classes,
                          groups=first.groups if clustered else None)
    test = "DeLong, clustered by patient (Obuchowski)" if clustered else "DeLong"
    return PairedResult(metric, result.difference, result.p_value, test, result.per_class)


# ------------------------------------------------------------------------------------------------
# Many comparisons
# ------------------------------------------------------------------------------------------------


def _holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down: the i-th smallest of m p-values times (m - i + 1), made monotone, at most 1."""
    order = np.argsort(p_values, kind="mergesort")
    factors = len(p_values) - np.arange(len(p_values))
    stepped = np.minimum(1.0, np.maximum.accumulate(p_values[order] * factors))
    adjusted = np.empty_like(p_values)
    adjusted[order] = stepped
    return adjusted


def adjust(p_values: Sequence[float], method: Literal["holm", "bh", "none"] = "holm") -> list[float]:
    """``p_values`` adjusted for the family of comparisons they come from, in their order.

    holm: Holm's step-down, controlling the family-wise error (any false "better"); bh:
    Benjamini-Hochberg (scipy's ``false_discovery_control``), controlling the expected share of
    false ones among those called different; none: unchanged. NaN p-values (tests that could not
    be made) stay NaN and are not counted in the family.
    """
    from scipy import stats  # about a second to import: only where a statistic is computed

    values = np.asarray(list(p_values), dtype=np.float64)
    if method not in ("holm", "bh", "none"):
        raise UsageError(f"unknown p-value adjustment {method!r}; choose holm, bh or none")
    adjusted = values.copy()
    tested = ~np.isnan(values)
    if method != "none" and tested.any():
        adjusted[tested] = (_holm(values[tested]) if method == "holm"
                            else stats.false_discovery_control(values[tested], method="bh"))
    return [float(p) for p in adjusted]


def verdict(difference: float, adjusted_p: float, alpha: float = 0.05, direction: str = "max") -> str:
    """``better``, ``worse`` (a against b, for a metric maximised or minimised: ``direction``) or
    ``not distinguishable`` (adjusted p above ``alpha``, NaN, or no difference)."""
    if math.isnan(adjusted_p) or adjusted_p > alpha or not difference or math.isnan(difference):
        return "not distinguishable"
    return "better" if (difference > 0) == (direction == "max") else "worse"
