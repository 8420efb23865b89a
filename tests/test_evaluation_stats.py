"""The statistics of medpeft_ray.evaluation: bootstrap intervals, paired tests, corrections, calibration.

Each statistic is checked against an independent computation (the registry, pROC's published
DeLong results on its aSAH data, the 1988 definitions, a brute-force enumeration, scipy,
scikit-learn, torchmetrics) or against a known answer on synthetic data (interval coverage, a uniform p under
the null).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score

from medpeft_ray.errors import MedpeftError, UsageError
from medpeft_ray.evaluation.calibration import calibration, reliability
from medpeft_ray.evaluation.intervals import bootstrap_interval
from medpeft_ray.evaluation.paired import (
    adjust,
    delong,
    delong_macro,
    paired_bootstrap,
    paired_permutation,
    paired_test,
    verdict,
)
from medpeft_ray.evaluation.predictions import SplitPredictions
from medpeft_ray.evaluation.weighted import PER_IMAGE_METRICS, RunScorer, counts_of_resamples, group_index
from medpeft_ray.metrics import METRICS, get_metric

# ------------------------------------------------------------------------------------------------
# Synthetic predictions
# ------------------------------------------------------------------------------------------------


def _run(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray | None = None, multilabel: bool = True,
         thresholds: np.ndarray | None = None, split: str = "test") -> SplitPredictions:
    groups = np.arange(len(labels)).astype(str) if groups is None else np.asarray(groups).astype(str)
    classes = tuple(f"c{k}" for k in range(labels.shape[1]))
    return SplitPredictions(split, 3, np.asarray(scores, dtype=np.float32), np.asarray(labels, dtype=np.float32),
                            groups, classes, multilabel, thresholds)


def _multilabel(rng: np.random.Generator, images: int, classes: int, seeds: int, *, per_patient: int = 1,
                signal: float = 0.3, decimals: int = 2) -> list[SplitPredictions]:
    """Seeds of one configuration: rounded scores (ties), 10% unknown labels, a class with no positive."""
    labels = (rng.random((images, classes)) < 0.25).astype(np.float64)
    labels[rng.random((images, classes)) < 0.1] = np.nan
    labels[:, -1] = np.where(np.isnan(labels[:, -1]), np.nan, 0.0)
    groups = np.arange(images) // per_patient
    runs = []
    for _ in range(seeds):
        scores = np.round(np.clip(signal * np.nan_to_num(labels) + 0.7 * rng.random((images, classes)), 0, 1), decimals)
        runs.append(_run(scores, labels, groups, True, 0.25 + 0.5 * rng.random(classes)))
    return runs


def _multiclass(rng: np.random.Generator, images: int, classes: int, seeds: int, *, per_patient: int = 1,
                signal: float = 1.0, decimals: int = 2) -> list[SplitPredictions]:
    truth = rng.integers(0, classes, images)
    labels = np.eye(classes)[truth]
    groups = np.arange(images) // per_patient
    runs = []
    for _ in range(seeds):
        logits = signal * labels + rng.normal(size=(images, classes))
        scores = np.round(np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True), decimals)
        runs.append(_run(scores, labels, groups, False))
    return runs


def _metrics_of(run: SplitPredictions) -> list[str]:
    task = "multilabel" if run.multilabel else "multiclass"
    return [name for name in PER_IMAGE_METRICS if task in METRICS[name].tasks]


def _registry(run: SplitPredictions, name: str) -> float:
    return METRICS[name].compute(run.metric_input())


def _scorer_value(run: SplitPredictions, name: str, counts: np.ndarray) -> np.ndarray:
    group_of_image, n_groups = group_index(run.groups)
    return RunScorer(run, name.removeprefix("val_"), group_of_image, n_groups)(counts)


# ------------------------------------------------------------------------------------------------
# Weighted metrics: the registry's values, computed from patient weights
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("make", [_multilabel, _multiclass], ids=["multilabel", "multiclass"])
def test_weighted_metrics_at_unit_weights_equal_the_registry_bit_for_bit(seed: int, make) -> None:
    rng = np.random.default_rng(seed)
    # one decimal: heavy ties in the scores (and in the multi-class argmax)
    for run in make(rng, 150, 5, 2, per_patient=2, decimals=1):
        if run.multilabel:
            assert math.isnan(run.metric_input().per_class_auroc[-1])  # a class left out of the mean
        _, n_groups = group_index(run.groups)
        for name in _metrics_of(run):
            assert _scorer_value(run, name, np.ones((1, n_groups), np.int32))[0] == _registry(run, name), name


@pytest.mark.parametrize("make", [_multilabel, _multiclass], ids=["multilabel", "multiclass"])
def test_weighted_metrics_equal_the_registry_on_the_resampled_images(make) -> None:
    rng = np.random.default_rng(7)
    run = make(rng, 90, 4, 1, per_patient=3, decimals=1)[0]
    group_of_image, n_groups = group_index(run.groups)
    drawn = rng.integers(0, n_groups, (6, n_groups))
    for name in _metrics_of(run):
        values = _scorer_value(run, name, counts_of_resamples(drawn, n_groups))
        for patients, value in zip(drawn, values):
            images = np.concatenate([np.flatnonzero(group_of_image == g) for g in patients])
            resampled = _run(run.scores[images], run.labels[images], run.groups[images], run.multilabel,
                             run.thresholds)
            assert value == pytest.approx(_registry(resampled, name), abs=1e-12), name


# ------------------------------------------------------------------------------------------------
# Bootstrap intervals
# ------------------------------------------------------------------------------------------------


def test_interval_estimate_is_the_seed_mean_of_the_registry_and_resamples_patients() -> None:
    runs = _multilabel(np.random.default_rng(3), 200, 4, 3, per_patient=2)
    interval = bootstrap_interval(runs, "test_auroc", resamples=400, seed=5)
    per_seed = [_registry(run, "val_auroc") for run in runs]
    assert interval.estimate == float(np.mean(per_seed))
    assert interval.seed_std == pytest.approx(np.std(per_seed, ddof=1))
    assert (interval.unit, interval.units, interval.seeds, interval.resamples) == ("patients", 100, 3, 400)
    assert interval.low < interval.estimate < interval.high and interval.defined and interval.note == ""
    assert bootstrap_interval(runs, "test_auroc", resamples=400, seed=5) == interval  # seeded
    assert bootstrap_interval(runs, "test_auroc", resamples=400, seed=6).low != interval.low
    f1 = bootstrap_interval(runs[:1], "test_f1", resamples=400)
    assert f1.estimate == _registry(runs[0], "val_f1") and f1.seeds == 1 and math.isnan(f1.seed_std)
    single = bootstrap_interval(_multiclass(np.random.default_rng(4), 150, 3, 1), "test_balanced_accuracy",
                                resamples=300)
    assert single.unit == "images" and single.units == 150 and single.low < single.estimate < single.high


def test_interval_refuses_what_has_no_per_image_computation_in_one_line() -> None:
    runs = _multilabel(np.random.default_rng(0), 40, 3, 2)
    for metric, words in (("test_loss", "no per-image computation"), ("test_fid", "no per-image computation"),
                          ("val_auroc", "measured on val predictions"), ("test_balanced_accuracy", "multiclass"),
                          ("test_nonsense", "cannot rank trials")):
        with pytest.raises(UsageError, match=words) as error:
            bootstrap_interval(runs, metric)
        assert "\n" not in str(error.value)
    other = _multilabel(np.random.default_rng(1), 41, 3, 1)
    with pytest.raises(MedpeftError, match="not the same test images"):
        bootstrap_interval([runs[0], other[0]], "test_auroc")


def test_interval_bounds_are_nan_with_the_reason_when_undefined() -> None:
    negatives = _run(np.linspace(0, 1, 20)[:, None], np.zeros((20, 1)))
    undefined = bootstrap_interval([negatives], "test_auroc")
    assert math.isnan(undefined.estimate) and math.isnan(undefined.low) and "undefined" in undefined.note
    one_patient = _run(np.linspace(0, 1, 6)[:, None], np.array([[0], [1]] * 3), groups=np.zeros(6))
    lonely = bootstrap_interval([one_patient], "test_auroc")
    assert lonely.estimate == _registry(one_patient, "val_auroc") and math.isnan(lonely.high)
    assert lonely.note == "one patient: nothing to resample"
    perfect = _run(np.r_[np.zeros(10), np.ones(10)][:, None], np.r_[np.zeros(10), np.ones(10)][:, None])
    assert "same test_auroc" in bootstrap_interval([perfect], "test_auroc", resamples=200).note


def test_resamples_without_both_labels_are_left_out_up_to_a_share() -> None:
    rng = np.random.default_rng(0)
    # 4 positives in 60 images: (56/60)^60 = 1.6% of resamples draw none
    rare = _run(rng.random((60, 1)), np.r_[np.ones(4), np.zeros(56)][:, None])
    interval = bootstrap_interval([rare], "test_auroc", resamples=1000)
    assert interval.defined and 0 < 1000 - interval.resamples < 50
    assert interval.note == f"{1000 - interval.resamples} of 1000 resamples leave test_auroc undefined; " \
                            "the interval rests on the others"
    # 2 positives: 13% draw none, too many to leave out
    rarer = _run(rng.random((60, 1)), np.r_[np.ones(2), np.zeros(58)][:, None])
    interval = bootstrap_interval([rarer], "test_auroc", resamples=1000)
    assert not interval.defined and interval.note.endswith("too few patients with both labels")


def _binormal(rng: np.random.Generator, patients: int, per_patient: int, separation: float,
              patient_sd: float) -> SplitPredictions:
    """Positives N(separation, 1), negatives N(0, 1) (population AUROC Phi(separation / sqrt 2)),
    the label and a share patient_sd^2 of the variance shared by a patient's images."""
    sick = (rng.random(patients) < 0.3).astype(np.float64)
    latent = (separation * sick + rng.normal(0, patient_sd, patients))[:, None]
    scores = latent + rng.normal(0, math.sqrt(1 - patient_sd ** 2), (patients, per_patient))
    return _run(1 / (1 + np.exp(-scores.reshape(-1, 1))), np.repeat(sick, per_patient)[:, None],
                np.repeat(np.arange(patients), per_patient), True, np.array([0.5]))


def _coverage(make, truth: float, metric: str, replications: int = 200) -> float:
    rng = np.random.default_rng(2024)
    covered = 0
    for _ in range(replications):
        interval = bootstrap_interval([make(rng)], metric, resamples=500, seed=int(rng.integers(2 ** 31)))
        covered += interval.low <= truth <= interval.high
    return covered / replications


def test_bootstrap_interval_covers_the_population_auroc() -> None:
    # binormal scores, population AUROC Phi(1.8 / sqrt 2) = 0.898; 400 replications: a 95% interval
    # covers 380 +- 3 sd (13) of them
    coverage = _coverage(lambda rng: _binormal(rng, 100, 1, 1.8, 0.0), stats.norm.cdf(1.8 / math.sqrt(2)),
                         "test_auroc", replications=400)
    assert 0.90 <= coverage <= 0.99


def test_bootstrap_interval_covers_the_population_accuracy_of_a_multiclass_model() -> None:
    def three_classes(rng: np.random.Generator) -> SplitPredictions:
        truth = rng.integers(0, 3, 120)
        guess = np.where(rng.random(120) < 0.75, truth, (truth + rng.integers(1, 3, 120)) % 3)
        return _run(0.1 + 0.7 * np.eye(3)[guess], np.eye(3)[truth], multilabel=False)

    assert 0.90 <= _coverage(three_classes, 0.75, "test_accuracy") <= 0.99
    assert 0.90 <= _coverage(three_classes, 0.75, "test_balanced_accuracy") <= 0.99


def test_patient_resampling_covers_where_image_resampling_does_not() -> None:
    # 80 patients with 3 images each, 64% of the score variance shared within a patient
    def clustered(rng: np.random.Generator) -> SplitPredictions:
        return _binormal(rng, 80, 3, 1.8, 0.8)

    def as_single_images(rng: np.random.Generator) -> SplitPredictions:
        run = clustered(rng)
        return _run(run.scores, run.labels, np.arange(run.num_images), True, run.thresholds)

    truth = stats.norm.cdf(1.8 / math.sqrt(2))
    by_patient, by_image = _coverage(clustered, truth, "test_auroc"), _coverage(as_single_images, truth, "test_auroc")
    assert 0.90 <= by_patient <= 0.99
    assert by_image < 0.88 and by_image < by_patient - 0.08, (by_patient, by_image)


# ------------------------------------------------------------------------------------------------
# DeLong
# ------------------------------------------------------------------------------------------------

# pROC's aSAH data (Turck et al. 2010, Intensive Care Medicine 36:107-115; R package pROC, data/aSAH):
# 113 patients after aneurysmal subarachnoid haemorrhage, outcome Poor (1) or Good (0), in pROC's row order
ASAH_POOR_OUTCOME = [
    0, 0, 0, 0, 1, 1, 0, 1, 0, 0, 1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1,
    1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1, 0, 1, 1,
    1, 1, 0, 0, 0, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0,
    0, 1, 0, 0, 0
]
ASAH_S100B = [
    0.13, 0.14, 0.1, 0.04, 0.13, 0.1, 0.47, 0.16, 0.18, 0.1, 0.12, 0.1, 0.44, 0.71, 0.04, 0.08, 0.49, 0.04,
    0.07, 0.33, 0.09, 0.09, 0.07, 0.11, 0.07, 0.17, 0.07, 0.11, 0.13, 0.19, 0.05, 0.16, 0.41, 0.14, 0.34, 0.35,
    0.48, 0.09, 0.96, 0.25, 0.5, 0.46, 0.16, 0.07, 0.43, 0.45, 0.11, 0.08, 0.09, 0.86, 0.52, 0.08, 0.06, 0.13,
    2.07, 0.1, 0.14, 0.15, 0.07, 0.06, 0.77, 0.05, 0.09, 0.3, 0.03, 0.09, 0.04, 0.23, 0.7, 0.09, 0.27, 0.71,
    0.08, 0.26, 0.08, 0.16, 0.09, 0.13, 0.1, 0.08, 0.11, 0.33, 0.11, 0.28, 0.07, 0.1, 0.32, 0.22, 0.07, 0.05,
    0.24, 0.38, 0.1, 0.15, 0.08, 0.14, 0.1, 0.07, 0.04, 0.19, 0.56, 0.14, 0.58, 0.32, 0.82, 0.74, 0.15, 0.47,
    0.17, 0.44, 0.15, 0.5, 0.48
]
ASAH_NDKA = [
    3.01, 8.54, 8.09, 10.42, 17.4, 12.75, 6.0, 13.2, 15.54, 6.01, 15.96, 17.86, 5.18, 8.9, 13.41, 20.75, 11.6,
    16.11, 32.37, 54.82, 32.41, 49.94, 40.34, 9.47, 6.29, 12.53, 6.54, 6.3, 80.3, 12.8, 9.8, 9.81, 9.85, 18.21,
    5.03, 14.04, 21.93, 8.02, 7.42, 8.38, 6.59, 9.63, 13.12, 7.96, 14.34, 41.43, 7.63, 7.06, 12.59, 13.56, 3.87,
    9.44, 7.66, 12.98, 419.19, 27.19, 22.27, 9.95, 21.22, 11.73, 10.4, 58.83, 6.39, 11.09, 12.22, 13.67, 17.21,
    22.63, 12.9, 9.7, 21.57, 8.23, 72.57, 15.54, 10.51, 10.6, 14.57, 5.19, 9.63, 4.61, 21.48, 17.3, 12.71, 9.44,
    11.07, 19.46, 10.83, 5.37, 11.97, 7.75, 9.83, 10.55, 28.49, 8.53, 12.57, 12.9, 46.83, 11.68, 12.67, 9.01,
    9.57, 34.06, 11.72, 14.26, 47.61, 11.67, 24.58, 10.33, 13.87, 15.89, 22.43, 6.79, 13.45
]
ASAH_WFNS = [
    1, 1, 1, 1, 3, 2, 5, 4, 1, 2, 5, 2, 5, 5, 1, 2, 5, 2, 2, 5, 2, 1, 1, 1, 1, 2, 1, 2, 1, 1, 3, 4, 2, 1, 4, 5,
    4, 1, 4, 2, 5, 5, 1, 1, 2, 4, 1, 1, 2, 5, 5, 2, 1, 2, 5, 1, 2, 2, 2, 1, 5, 1, 1, 2, 5, 2, 1, 4, 5, 2, 4, 4,
    1, 4, 1, 2, 1, 4, 2, 1, 2, 3, 2, 4, 2, 1, 4, 5, 1, 1, 5, 4, 2, 2, 1, 1, 1, 3, 1, 2, 5, 2, 2, 5, 5, 5, 2, 4,
    4, 5, 1, 1, 1
]


@pytest.mark.parametrize(("first", "second", "z", "p_value"), [
    # pROC's tests/testthat/test-roc.test.R: roc.test(r.ndka, r.s100b), (r.wfns, r.s100b), (r.wfns, r.ndka)
    ("ndka", "s100b", -1.39077002573558, 0.164295175223054),
    ("wfns", "s100b", 2.20898359144091, 0.0271757822291882),
    ("wfns", "ndka", 2.79777591868904, 0.00514557970691098),
])
def test_delong_matches_proc_on_its_asah_data(first: str, second: str, z: float, p_value: float) -> None:
    markers = {"s100b": ASAH_S100B, "ndka": ASAH_NDKA, "wfns": ASAH_WFNS}
    result = delong(np.array(ASAH_POOR_OUTCOME), np.array(markers[first]), np.array(markers[second]))
    assert result.z == pytest.approx(z, rel=1e-10)
    assert result.p_value == pytest.approx(p_value, rel=1e-10)
    # pROC's test-auc.R: AUROC of s100b 0.731368563685637, ndka 0.611957994579946, wfns 0.823678861788618
    aucs = {"s100b": 0.731368563685637, "ndka": 0.611957994579946, "wfns": 0.823678861788618}
    assert (result.auc_a, result.auc_b) == (pytest.approx(aucs[first], abs=1e-12), pytest.approx(aucs[second], abs=1e-12))
    if first == "ndka":  # pROC's 95% interval of the difference: -0.2876917446341914 to 0.0488706064228094
        half = stats.norm.ppf(0.975) * math.sqrt(result.variance)
        assert (result.difference - half, result.difference + half) == (pytest.approx(-0.2876917446341914, abs=1e-12),
                                                                        pytest.approx(0.0488706064228094, abs=1e-12))


def _delong_by_definition(labels: np.ndarray, rows: np.ndarray, contrast: np.ndarray) -> tuple[np.ndarray, float]:
    """DeLong, DeLong & Clarke-Pearson (1988), O(m n): the kernel psi(X, Y) = 1, 1/2, 0 for X >, =, < Y;
    V10(X_i) = mean_j psi(X_i, Y_j), V01(Y_j) = mean_i psi(X_i, Y_j); S10, S01 their sample
    covariances over the curves; var(L theta) = L (S10 / m + S01 / n) L'."""
    positives, negatives = rows[:, labels > 0.5], rows[:, labels < 0.5]
    m, n = positives.shape[1], negatives.shape[1]
    psi = (positives[:, :, None] > negatives[:, None, :]) + 0.5 * (positives[:, :, None] == negatives[:, None, :])
    theta = psi.mean(axis=(1, 2))
    s10 = np.atleast_2d(np.cov(psi.mean(axis=2)))
    s01 = np.atleast_2d(np.cov(psi.mean(axis=1)))
    return theta, float(contrast @ (s10 / m + s01 / n) @ contrast)


@pytest.mark.parametrize(("seeds_a", "seeds_b"), [(1, 1), (3, 2), (2, 5)])
@pytest.mark.parametrize("seed", range(3))
def test_delong_matches_the_1988_definitions_with_ties_and_seeds(seeds_a: int, seeds_b: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = (rng.random(90) < 0.35).astype(np.float64)
    shared = rng.normal(size=90)  # the two configurations' scores are correlated, as on one test set
    scores_a = np.round(0.8 * labels + shared + 0.5 * rng.normal(size=(seeds_a, 90)), 1)
    scores_b = np.round(0.5 * labels + shared + 0.5 * rng.normal(size=(seeds_b, 90)), 1)
    result = delong(labels, scores_a, scores_b)
    contrast = np.r_[np.full(seeds_a, 1 / seeds_a), np.full(seeds_b, -1 / seeds_b)]
    theta, variance = _delong_by_definition(labels, np.vstack([scores_a, scores_b]), contrast)
    assert result.auc_a == pytest.approx(np.mean([roc_auc_score(labels, row) for row in scores_a]), abs=1e-12)
    assert result.auc_b == pytest.approx(np.mean([roc_auc_score(labels, row) for row in scores_b]), abs=1e-12)
    assert result.difference == pytest.approx(contrast @ theta, abs=1e-12)
    assert result.variance == pytest.approx(variance, rel=1e-10)
    assert result.z == pytest.approx(contrast @ theta / math.sqrt(variance), rel=1e-9)
    assert result.p_value == pytest.approx(2 * stats.norm.sf(abs(result.z)), rel=1e-9)


def test_delong_drops_unknown_labels_and_calls_identical_curves_equal() -> None:
    rng = np.random.default_rng(1)
    labels = (rng.random(60) < 0.4).astype(np.float64)
    scores_a, scores_b = rng.random(60) + labels, rng.random(60)
    with_unknown = np.where(rng.random(60) < 0.2, np.nan, labels)
    known = ~np.isnan(with_unknown)
    assert delong(with_unknown, scores_a, scores_b) == delong(labels[known], scores_a[known], scores_b[known])
    same = delong(labels, scores_a, scores_a)
    assert (same.difference, same.z, same.p_value) == (0.0, 0.0, 1.0)
    assert math.isnan(delong(np.zeros(5), rng.random(5), rng.random(5)).p_value)
    with pytest.raises(UsageError, match="scores of shape"):
        delong(labels, scores_a[:-1], scores_b)
    with pytest.raises(UsageError, match="give \\(seeds, images, classes\\)"):
        delong_macro(labels[:, None], scores_a[:, None], scores_b[:-1, None])
    assert math.isnan(delong(labels, np.where(labels > 0, np.nan, scores_a), scores_b).p_value)


def _correlated_configurations(rng: np.random.Generator, patients: int, per_patient: int, classes: int = 4,
                               seeds: int = 2) -> tuple[list[SplitPredictions], list[SplitPredictions]]:
    """Two configurations' seeds on one multi-label test set. Findings co-occur, and each
    configuration's errors are shared by its classes (so the per-class differences correlate) and,
    with several images per patient,
    mostly by a patient's images; both share an image effect (so the configurations correlate)."""
    sick = rng.random((patients, 1)) < 0.4  # findings come together: the classes' labels correlate
    labels = np.repeat((rng.random((patients, classes)) < np.where(sick, 0.7, 0.1)).astype(np.float64), per_patient,
                       axis=0)
    groups = np.repeat(np.arange(patients), per_patient)
    within_patient = 0.8 if per_patient > 1 else 0.0

    def shared_error() -> np.ndarray:
        by_patient = np.repeat(rng.normal(size=(patients, 1)), per_patient, axis=0)
        return math.sqrt(within_patient) * by_patient + math.sqrt(1 - within_patient) * rng.normal(size=(len(labels), 1))

    image = shared_error()

    def configuration(signal: float) -> list[SplitPredictions]:
        own = 1.2 * shared_error()
        return [_run(1 / (1 + np.exp(-(signal * labels + image + own + 0.5 * rng.normal(size=labels.shape)))),
                     labels, groups, True, np.full(classes, 0.5)) for _ in range(seeds)]

    return configuration(1.2), configuration(0.9)


@pytest.mark.parametrize("per_patient", [1, 3])
def test_macro_delong_variance_agrees_with_a_paired_patient_bootstrap(per_patient: int) -> None:
    a_runs, b_runs = _correlated_configurations(np.random.default_rng(11), 300 // per_patient, per_patient)
    labels, groups = a_runs[0].labels, a_runs[0].groups
    scores_a, scores_b = np.stack([r.scores for r in a_runs]), np.stack([r.scores for r in b_runs])
    result = delong_macro(labels, scores_a, scores_b, groups=groups)
    assert result.difference == pytest.approx(np.mean([_registry(r, "val_auroc") for r in a_runs])
                                              - np.mean([_registry(r, "val_auroc") for r in b_runs]), abs=1e-12)
    # the bootstrap: 2000 resamples of patients, both configurations' seeds scored on each
    group_of_image, n_groups = group_index(groups)
    counts = counts_of_resamples(np.random.default_rng(0).integers(0, n_groups, (2000, n_groups)), n_groups)
    bootstrap_sd = (np.mean([_scorer_value(r, "val_auroc", counts) for r in a_runs], axis=0)
                    - np.mean([_scorer_value(r, "val_auroc", counts) for r in b_runs], axis=0)).std(ddof=1)
    assert math.sqrt(result.variance) == pytest.approx(bootstrap_sd, rel=0.1)
    per_class = [delong(labels[:, k], scores_a[..., k], scores_b[..., k], groups=groups) for k in range(4)]
    assert list(result.per_class.values()) == per_class
    # the classes share images and errors: treating them as independent understates the variance
    independent_sd = math.sqrt(sum(r.variance for r in per_class)) / 4
    assert independent_sd < 0.85 * bootstrap_sd
    if per_patient > 1:  # so do a patient's images: ignoring that understates it too
        assert math.sqrt(delong_macro(labels, scores_a, scores_b).variance) < 0.75 * bootstrap_sd


def test_paired_test_compares_auroc_with_delong_per_class_and_macro() -> None:
    a_runs, b_runs = _correlated_configurations(np.random.default_rng(5), 150, 1, classes=3)
    result = paired_test(a_runs, b_runs, "test_auroc")
    macro = delong_macro(a_runs[0].labels, np.stack([r.scores for r in a_runs]), np.stack([r.scores for r in b_runs]),
                         classes=a_runs[0].classes)
    assert (result.metric, result.test, result.difference, result.p_value) == (
        "test_auroc", "DeLong", macro.difference, macro.p_value)
    assert list(result.per_class) == ["c0", "c1", "c2"] and result.per_class == macro.per_class
    clustered = paired_test(*_correlated_configurations(np.random.default_rng(5), 50, 3, classes=3), "test_auroc")
    assert clustered.test == "DeLong, clustered by patient (Obuchowski)"
    one_class_undefined = delong_macro(np.c_[np.ones(20), np.r_[np.zeros(10), np.ones(10)]],
                                       np.random.default_rng(0).random((20, 2)),
                                       np.random.default_rng(1).random((20, 2)))
    assert math.isnan(one_class_undefined.per_class["0"].p_value)
    assert one_class_undefined.difference == one_class_undefined.per_class["1"].difference


# ------------------------------------------------------------------------------------------------
# The paired permutation test
# ------------------------------------------------------------------------------------------------


def _swapped(a_run: SplitPredictions, b_run: SplitPredictions, swapped_images: np.ndarray) -> SplitPredictions:
    """a's run with b's predictions on ``swapped_images``; each keeps its own decision (its thresholds
    on multi-label data), so the swap moves 0/1 decisions there and scores on multi-class data."""
    if a_run.multilabel:
        a_scores, b_scores = (run.metric_input().predicted for run in (a_run, b_run))
        return _run(np.where(swapped_images[:, None], b_scores, a_scores), a_run.labels, a_run.groups, True,
                    np.full(len(a_run.classes), 0.5))
    return _run(np.where(swapped_images[:, None], b_run.scores, a_run.scores), a_run.labels, a_run.groups, False)


def _brute_force_p(a_runs, b_runs, name: str) -> tuple[float, float]:
    """The exact permutation p from the registry on every one of the 2^patients swapped splits."""
    group_of_image, n_groups = group_index(a_runs[0].groups)

    def difference(swaps: np.ndarray) -> float:
        moved = swaps[group_of_image].astype(bool)
        return (np.mean([_registry(_swapped(a, b, moved), name) for a, b in zip(a_runs, b_runs)])
                - np.mean([_registry(_swapped(b, a, moved), name) for a, b in zip(a_runs, b_runs)]))

    observed = difference(np.zeros(n_groups))
    null = [difference(np.array(swaps)) for swaps in itertools.product([0, 1], repeat=n_groups)]
    return observed, float(np.mean(np.abs(null) >= abs(observed) - 1e-12))


@pytest.mark.parametrize(("make", "metric"), [(_multilabel, "test_f1"), (_multiclass, "test_f1"),
                                              (_multiclass, "test_accuracy"), (_multiclass, "test_balanced_accuracy")])
def test_permutation_p_equals_a_brute_force_enumeration(make, metric: str) -> None:
    rng = np.random.default_rng(8)
    a_runs = make(rng, 16, 3, 2, per_patient=2, signal=0.6 if make is _multilabel else 2.0)  # 8 patients
    b_runs = [_run(make(rng, 16, 3, 1, signal=0.2)[0].scores, run.labels, run.groups, run.multilabel,
                   0.3 + 0.4 * rng.random(3) if run.multilabel else None) for run in a_runs]
    result = paired_permutation(a_runs, b_runs, metric, permutations=2000)
    observed, p_value = _brute_force_p(a_runs, b_runs, metric.replace("test", "val"))
    assert result.difference == pytest.approx(observed, abs=1e-12)
    assert result.p_value == p_value and result.test == "paired permutation"
    assert result.p_value < 1.0  # the data are not all alike: some swaps give smaller differences


def test_permutation_p_is_uniform_under_the_null() -> None:
    rng = np.random.default_rng(31)
    p_values = []
    for replication in range(200):
        # a and b: independent draws from one model given each patient's labels (60 patients, 2 images),
        # seed i of both with the same decision thresholds (other thresholds are another classifier)
        both = _multilabel(rng, 120, 3, 4, per_patient=2)
        a_runs = both[:2]
        b_runs = [_run(run.scores, a_runs[0].labels, run.groups, True, a.thresholds) for run, a in zip(both[2:], a_runs)]
        p_values.append(paired_permutation(a_runs, b_runs, "test_f1", permutations=300, seed=replication).p_value)
    rejected = np.mean(np.array(p_values) <= 0.05)
    assert 0.01 <= rejected <= 0.10, rejected
    assert stats.kstest(p_values, "uniform").pvalue > 0.01


def test_permutation_p_is_small_for_a_clear_difference() -> None:
    rng = np.random.default_rng(2)
    a_runs = _multiclass(rng, 200, 3, 2, per_patient=2, signal=2.0)
    b_runs = [_run(run.scores, a_runs[0].labels, a_runs[0].groups, False)
              for run in _multiclass(rng, 200, 3, 2, signal=0.5)]
    for metric in ("test_accuracy", "test_balanced_accuracy", "test_f1"):
        result = paired_test(a_runs, b_runs, metric)
        assert result.difference > 0.1 and result.p_value == pytest.approx(1 / 5001), metric


def test_permutation_refuses_auroc_and_unequal_seeds_in_one_line() -> None:
    a_runs = _multiclass(np.random.default_rng(0), 30, 3, 2)
    with pytest.raises(UsageError, match="DeLong"):
        paired_permutation(a_runs, a_runs, "test_auroc")
    with pytest.raises(UsageError, match="they have 2 and 1 seeds"):
        paired_permutation(a_runs, a_runs[:1], "test_accuracy")
    with pytest.raises(MedpeftError, match="not the same test images"):
        paired_test(a_runs, _multiclass(np.random.default_rng(0), 31, 3, 1), "test_accuracy")


def test_unequal_seeds_go_to_the_paired_bootstrap_which_holds_its_level() -> None:
    """A confirmed configuration (2 seeds) against a search trial (1): no seed-for-seed swap exists,
    so the difference is tested by the paired patient bootstrap; under the null its p-values reject
    about alpha of the time, and a clear difference gives the smallest p it can."""
    rng = np.random.default_rng(41)
    p_values = []
    for replication in range(150):
        both = _multiclass(rng, 120, 3, 3, per_patient=2, signal=1.0)
        a_runs = both[:2]
        b_runs = [_run(both[2].scores, a_runs[0].labels, a_runs[0].groups, False)]
        p_values.append(paired_bootstrap(a_runs, b_runs, "test_accuracy", resamples=400, seed=replication).p_value)
    rejected = np.mean(np.array(p_values) <= 0.05)
    assert 0.0 <= rejected <= 0.12, rejected
    a_runs = _multiclass(rng, 200, 3, 2, per_patient=2, signal=2.0)
    b_runs = [_run(_multiclass(rng, 200, 3, 1, signal=0.3)[0].scores, a_runs[0].labels, a_runs[0].groups, False)]
    result = paired_test(a_runs, b_runs, "test_accuracy", permutations=1000)
    assert result.test == "paired bootstrap" and result.difference > 0.1 and result.p_value == pytest.approx(1 / 1001)


# ------------------------------------------------------------------------------------------------
# Many comparisons
# ------------------------------------------------------------------------------------------------


def test_holm_on_a_hand_worked_family() -> None:
    # sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04 -> 0.06 (step-down monotone)
    assert adjust([0.01, 0.04, 0.03, 0.005], "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # a NaN (no test) is left out of the family: m stays 4
    adjusted = adjust([0.01, math.nan, 0.04, 0.03, 0.005], "holm")
    assert math.isnan(adjusted[1]) and adjusted[:1] + adjusted[2:] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert adjust([0.5, 0.6], "holm") == [1.0, 1.0]
    assert adjust([], "holm") == [] and adjust([math.nan], "holm")[0] != adjust([math.nan], "holm")[0]


def test_benjamini_hochberg_is_scipys_and_leaves_nan_out() -> None:
    # by hand: 0.005 x 4/1 = 0.02, 0.01 x 4/2 = 0.02, 0.03 x 4/3 = 0.04, 0.04 x 4/4 = 0.04
    assert adjust([0.01, 0.04, 0.03, 0.005], "bh") == pytest.approx([0.02, 0.04, 0.04, 0.02])
    p_values = np.random.default_rng(0).random(20) ** 3
    assert adjust(p_values, "bh") == pytest.approx(stats.false_discovery_control(p_values, method="bh"))
    with_nan = adjust([*p_values[:10], math.nan, *p_values[10:]], "bh")
    assert math.isnan(with_nan[10]) and with_nan[:10] + with_nan[11:] == adjust(p_values, "bh")
    assert adjust([0.2, math.nan], "none")[0] == 0.2
    with pytest.raises(UsageError, match="choose holm, bh or none"):
        adjust([0.1], "bonferroni")  # type: ignore[arg-type]


def test_verdict_follows_the_metrics_direction() -> None:
    assert verdict(0.02, 0.01, 0.05, get_metric("val_auroc").direction) == "better"
    assert verdict(-0.02, 0.01, 0.05, "max") == "worse"
    assert verdict(0.02, 0.01, 0.05, "min") == "worse" and verdict(-0.02, 0.01, 0.05, "min") == "better"
    assert verdict(0.02, 0.06, 0.05, "max") == "not distinguishable"
    assert verdict(0.02, math.nan, 0.05, "max") == "not distinguishable"
    assert verdict(0.02, 0.05, 0.05, "max") == "better"  # at alpha: rejected


# ------------------------------------------------------------------------------------------------
# Calibration
# ------------------------------------------------------------------------------------------------


def _binned_by_loop(outcomes: np.ndarray, confidences: np.ndarray, bins: int) -> tuple[float, list[int]]:
    """ECE the long way: each probability's bin [i/bins, (i+1)/bins), 1.0 in the last."""
    outcomes, confidences = np.asarray(outcomes, dtype=np.float64), np.asarray(confidences, dtype=np.float64)
    members: list[list[int]] = [[] for _ in range(bins)]
    for index, confidence in enumerate(confidences):
        members[min(int(confidence * bins), bins - 1)].append(index)
    ece = sum(len(m) / len(confidences) * abs(np.mean(outcomes[m]) - np.mean(confidences[m])) for m in members if m)
    return ece, [len(m) for m in members]


def _calibration_data(rng: np.random.Generator) -> tuple[SplitPredictions, SplitPredictions]:
    # probabilities with 3 decimals: none on an edge of 15 bins, exact enough in float32 for 10
    return _multilabel(rng, 400, 4, 1, decimals=3)[0], _multiclass(rng, 400, 5, 1, decimals=3)[0]


def test_calibration_matches_a_loop_and_sklearns_reliability_curve() -> None:
    multilabel, multiclass = _calibration_data(np.random.default_rng(4))
    found = calibration(multilabel.labels, multilabel.scores, multilabel=True, bins=15)
    assert found.top_label_ece is None and found.macro_ece == pytest.approx(np.nanmean(found.per_class_ece))
    for k in range(4):
        known = ~np.isnan(multilabel.labels[:, k])
        outcomes, confidences = multilabel.labels[known, k], multilabel.scores[known, k].astype(np.float64)
        loop_ece, loop_counts = _binned_by_loop(outcomes, confidences, 15)
        assert found.per_class_ece[k] == pytest.approx(loop_ece, abs=1e-12)
        diagram = found.per_class[k]
        assert diagram.count.tolist() == loop_counts
        frequency, confidence = calibration_curve(outcomes, confidences, n_bins=15, strategy="uniform")
        filled = diagram.count > 0
        assert diagram.frequency[filled] == pytest.approx(frequency, abs=1e-12)
        assert diagram.confidence[filled] == pytest.approx(confidence, abs=1e-12)
    found = calibration(multiclass.labels, multiclass.scores, multilabel=False, bins=10)
    confidence = multiclass.scores.max(axis=1)
    right = multiclass.scores.argmax(axis=1) == multiclass.labels.argmax(axis=1)
    assert found.top_label_ece == pytest.approx(_binned_by_loop(right, confidence, 10)[0], abs=1e-12)
    assert found.per_class_ece[2] == pytest.approx(
        _binned_by_loop(multiclass.labels[:, 2], multiclass.scores[:, 2], 10)[0], abs=1e-12)
    diagram = found.top_label
    filled = diagram.count > 0
    assert diagram.count.sum() == 400 and np.isnan(diagram.confidence[~filled]).all()
    assert (diagram.confidence[filled] >= diagram.edges[:-1][filled]).all()


@pytest.mark.slow  # importing torchmetrics (and torch) takes 10-30 s here
def test_calibration_matches_torchmetrics() -> None:
    import torch  # imported here: the other tests do not need torch
    from torchmetrics.classification import BinaryCalibrationError, MulticlassCalibrationError

    multilabel, multiclass = _calibration_data(np.random.default_rng(4))
    found = calibration(multilabel.labels, multilabel.scores, multilabel=True, bins=15)
    for k in range(4):
        known = ~np.isnan(multilabel.labels[:, k])
        expected = BinaryCalibrationError(n_bins=15, norm="l1")(
            torch.from_numpy(multilabel.scores[known, k]), torch.from_numpy(multilabel.labels[known, k]).long())
        assert found.per_class_ece[k] == pytest.approx(float(expected), abs=1e-6)
    found = calibration(multiclass.labels, multiclass.scores, multilabel=False, bins=10)
    expected = MulticlassCalibrationError(num_classes=5, n_bins=10, norm="l1")(
        torch.from_numpy(multiclass.scores), torch.from_numpy(multiclass.labels.argmax(axis=1)))
    assert found.top_label_ece == pytest.approx(float(expected), abs=1e-6)


def test_perfectly_calibrated_probabilities_have_near_zero_ece() -> None:
    rng = np.random.default_rng(9)
    probabilities = rng.random((200_000, 2))
    outcomes = (rng.random(probabilities.shape) < probabilities).astype(np.float64)
    assert max(calibration(outcomes, probabilities, multilabel=True).per_class_ece) < 0.01
    overconfident = (rng.random(probabilities.shape) < probabilities ** 2).astype(np.float64)
    assert min(calibration(overconfident, probabilities, multilabel=True).per_class_ece) > 0.1
    # multi-class: classes drawn from the predicted distribution itself
    distribution = rng.dirichlet(np.ones(4), 100_000)
    drawn = (distribution.cumsum(axis=1) < rng.random((100_000, 1))).sum(axis=1)
    found = calibration(np.eye(4)[drawn], distribution, multilabel=False)
    assert found.top_label_ece < 0.01 and found.macro_ece < 0.01


def test_reliability_of_an_empty_class_is_nan() -> None:
    diagram = reliability(np.array([]), np.array([]), bins=5)
    assert math.isnan(diagram.ece) and diagram.count.tolist() == [0] * 5
    found = calibration(np.full((3, 1), np.nan), np.full((3, 1), 0.2), multilabel=True)
    assert math.isnan(found.per_class_ece[0]) and math.isnan(found.macro_ece)
