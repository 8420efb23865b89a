"""Bootstrap confidence intervals of a configuration's metric on a test (or validation) split.

The interval covers the variability that comes from the finite test set: had other patients been
drawn from the same population, the seed-mean metric would have come out elsewhere. It is computed
from the configuration's confirmation seeds' per-image predictions (:mod:`.predictions`) by
resampling patients, the unit that is independent (images of one patient are not). The spread
over training seeds is another variability, reported beside it (:attr:`Interval.seed_std`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from medpeft_ray.errors import UsageError
from medpeft_ray.evaluation.predictions import SplitPredictions, check_paired
from medpeft_ray.evaluation.weighted import RunScorer, counts_of_resamples, group_index, resolve_metric

if TYPE_CHECKING:
    from collections.abc import Sequence

#: scipy's interval method. BCa (bias-corrected and accelerated), not the percentile interval: an
#: AUROC near 0.9 has a skewed bootstrap distribution, which the percentile interval does not
#: correct. 95% intervals over 1,000 binormal data sets (population AUROC 0.898) covered it 0.939
#: (100 images) and 0.946 (60) of the time with BCa, 0.919 and 0.914 with percentiles (see
#: docs/statistics.md). BCa costs one jackknife pass (one evaluation per patient) more.
METHOD = "BCa"
#: above this many patients (or images), the percentile interval instead: BCa's correction shrinks
#: as the sample grows while its jackknife grows with it (25,000 images of 2,800 patients, 14
#: classes, 3 seeds: 20.2 s for BCa's AUROC interval, 9.3 s for the percentile one; bench/evidence_speed.py)
BCA_MAX_UNITS = 1000
LARGE_SAMPLE_METHOD = "percentile"
#: resamples per call of the statistic: a few hundred keep the per-class arrays in the CPU's cache
BATCH = 256
#: the largest share of resamples that may leave the metric undefined (a class without both labels
#: in the resample, where it is the only class); they are left out, as a stratified bootstrap would
#: never draw them. Beyond it the split is too small for an interval of that metric: NaN bounds.
MAX_UNDEFINED_SHARE = 0.05


@dataclass(frozen=True)
class Interval:
    """A metric's seed-mean on one split and its bootstrap confidence interval over patients."""

    metric: str
    #: the mean over seeds of the registry's value of ``metric`` on each seed's predictions
    estimate: float
    low: float
    high: float
    level: float
    #: what was resampled: "patients" (some have several images) or "images" (one image each)
    unit: str
    #: how many patients (or images) were resampled
    units: int
    seeds: int
    #: the resamples the bounds rest on (those that leave the metric undefined are left out)
    resamples: int
    method: str
    #: the sample standard deviation of the metric over seeds (NaN for one seed): training variability
    seed_std: float
    #: why the bounds are NaN, or how many resamples were left out
    note: str = ""

    @property
    def defined(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)


def bootstrap_interval(runs: Sequence[SplitPredictions], metric: str, *, level: float = 0.95,
                       resamples: int = 2000, seed: int = 0) -> Interval:
    """The seed-mean of ``metric`` over ``runs`` and its ``level`` bootstrap interval over patients.

    ``runs`` are the confirmation seeds of one configuration: predictions on the same images
    (1..S files). The estimate is the registry's value of ``metric`` (``test_auroc``, ``val_f1``,
    ...) on each seed, averaged. Each bootstrap resample draws patients (groups) with replacement,
    with all their images; every seed is scored on that same resample and the scores are
    averaged. So the interval covers the test-set sampling variability of the seed-mean, not the
    variability over training seeds, which is :attr:`Interval.seed_std`. Multi-label decision
    thresholds stay as chosen on validation; a class without both labels in a resample is left out
    of that resample's mean, as the registry does.

    Raises:
        UsageError: ``metric`` has no per-image computation (loss, FID), is not defined for the
            task, or names another split; no runs.
        MedpeftError: the runs are not predictions on the same images.
    """
    runs = list(runs)
    if not runs:
        raise UsageError(f"{metric}: a confidence interval needs at least one seed's predictions")
    for other in runs[1:]:
        check_paired(runs[0], other)
    resolved = resolve_metric(metric, runs)
    per_seed = np.asarray([resolved.metric.compute(run.metric_input()) for run in runs], dtype=np.float64)
    group_of_image, n_groups = group_index(runs[0].groups)
    unit = "images" if n_groups == runs[0].num_images else "patients"

    def interval(low: float, high: float, note: str = "", used: int = resamples) -> Interval:
        return Interval(metric, float(per_seed.mean()), float(low), float(high), level, unit, n_groups, len(runs),
                        used, _method(n_groups), float(per_seed.std(ddof=1)) if len(runs) > 1 else math.nan, note)

    if not np.isfinite(per_seed).all():
        return interval(math.nan, math.nan, f"{metric} is undefined on these predictions")
    if n_groups < 2:
        return interval(math.nan, math.nan, f"one {unit[:-1]}: nothing to resample")
    scorers = [RunScorer(run, resolved.kind, group_of_image, n_groups) for run in runs]

    def seed_mean(resampled_groups: np.ndarray, axis: int = -1) -> np.ndarray:
        counts = counts_of_resamples(resampled_groups, n_groups)
        values = np.mean([scorer(counts) for scorer in scorers], axis=0)
        return values if np.ndim(resampled_groups) > 1 else values[0]

    (low, high), used, note = _bootstrap(seed_mean, n_groups, level, resamples, seed, metric)
    return interval(low, high, note, used)


def _method(units: int) -> str:
    """scipy's interval method for ``units`` patients (or images): :data:`METHOD`, else, for a large
    sample, :data:`LARGE_SAMPLE_METHOD`."""
    return METHOD if units <= BCA_MAX_UNITS else LARGE_SAMPLE_METHOD


def _bootstrap(statistic: Callable[..., np.ndarray], n_groups: int, level: float, resamples: int, seed: int,
               metric: str) -> tuple[tuple[float, float], int, str]:
    """scipy's interval of ``statistic`` over resampled group indices: the bounds, the resamples they
    rest on, and a note. Resamples that leave the metric undefined (a class without both labels,
    for a one-class AUROC) are left out, up to :data:`MAX_UNDEFINED_SHARE`; beyond, NaN bounds."""
    from scipy import stats  # about a second to import: only where a statistic is computed, not per leaderboard listing

    data = (np.arange(n_groups),)
    options = dict(vectorized=True, paired=False, confidence_level=level, method=_method(n_groups), batch=BATCH)
    with warnings.catch_warnings():  # a degenerate distribution gives NaN bounds, explained below
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        with np.errstate(invalid="ignore", divide="ignore"):
            result = stats.bootstrap(data, statistic, n_resamples=resamples, rng=np.random.default_rng(seed), **options)
            undefined = np.isnan(result.bootstrap_distribution)
            left_out = f"{undefined.sum()} of {resamples} resamples leave {metric} undefined"
            if undefined.mean() > MAX_UNDEFINED_SHARE:
                return (math.nan, math.nan), resamples, f"{left_out}: too few patients with both labels"
            note = ""
            if undefined.any():
                note = f"{left_out}; the interval rests on the others"
                defined = dataclasses.replace(result, bootstrap_distribution=result.bootstrap_distribution[~undefined])
                result = stats.bootstrap(data, statistic, n_resamples=0, bootstrap_result=defined,
                                         rng=np.random.default_rng(seed), **options)
    low, high = (float(bound) for bound in result.confidence_interval)
    used = resamples - int(undefined.sum())
    if not (math.isfinite(low) and math.isfinite(high)):
        spread = np.ptp(result.bootstrap_distribution[np.isfinite(result.bootstrap_distribution)])
        why = (f"every resample gives the same {metric}" if spread == 0
               else f"the {_method(n_groups)} interval of {metric} is undefined (a leave-one-out {metric} is)")
        return (math.nan, math.nan), used, why
    return (low, high), used, note
