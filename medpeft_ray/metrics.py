"""The metrics trials are ranked by, each defined once: name, direction, computation and display.

Every epoch, each metric of :data:`METRICS` is computed from the validation split's
:class:`Predictions` (and, for the chosen epoch, from the test split's: ``val_auroc`` becomes
``test_auroc``). A metric's direction is the one rule for "best" everywhere: the epoch a trial
keeps, what a search optimises (``search.metric``), checkpoint retention, confirmation, the
leaderboard's order and every view of it.

Adding a metric is one more entry in :data:`METRICS`. The leaderboard keeps each trial's value in
the column of the metric's name, so a new metric also needs that column (and ``TrialRecord``
field) in :mod:`medpeft_ray.leaderboard.store`, with a schema upgrade step for existing
leaderboards; ``tests/test_metric_registry.py`` checks that the two agree.

Kept free of heavy imports (numpy is imported where a metric is computed), so that the config,
the store, the views and the CLI's help can all import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, TypeVar

from medpeft_ray.errors import UsageError

if TYPE_CHECKING:
    import numpy as np

Direction = Literal["max", "min"]
#: the split a ranking metric is measured on; its name on another split swaps this prefix
VALIDATION_SPLIT = "val"

T = TypeVar("T")


def better(value: float, than: float | None, direction: Direction | str) -> bool:
    """Whether ``value`` beats ``than`` (None: nothing yet) in ``direction``; NaN and inf never do."""
    if not math.isfinite(value):
        return False
    return than is None or (value > than if direction == "max" else value < than)


def best_of(items: Iterable[T], key: Callable[[T], float], direction: Direction | str) -> T:
    """The item whose ``key`` is best in ``direction`` (ties: the first)."""
    return max(items, key=key) if direction == "max" else min(items, key=key)


def best_first_key(value: float | None, direction: Direction | str) -> float:
    """A sort key that puts the best ``value`` first and NaN or missing values last."""
    if value is None or not math.isfinite(value):
        return math.inf
    return -value if direction == "max" else value


# ------------------------------------------------------------------------------------------------
# What the metrics are computed from
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Predictions:
    """A model's predictions on one split, gathered from every rank, in the split's order.

    ``labels`` and ``scores`` are (images, classes): targets 0/1 (NaN: unknown) and predicted
    probabilities (sigmoid for multi-label, softmax for multi-class data). ``loss_sum`` is the
    training loss summed over the split (each batch's mean loss times its size), since the loss
    needs the logits and the loss function, which only the engine has.
    """

    labels: "np.ndarray"
    scores: "np.ndarray"
    loss_sum: float

    @cached_property
    def per_class_auroc(self) -> list[float]:
        """Each class's ROC AUC (NaN for a class without both labels); computed once per split."""
        return [roc_auc(self.labels[:, k], self.scores[:, k]) for k in range(self.labels.shape[1])]


def roc_auc(labels: "np.ndarray", scores: "np.ndarray") -> float:
    """ROC AUC of one binary column (Mann-Whitney U with average ranks for ties); NaN if one class.

    NaN labels (unknown) are left out.
    """
    import numpy as np

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


def _mean_of_defined(per_class: list[float]) -> float:
    """The unweighted mean over the classes that have an AUROC; NaN when none has."""
    import numpy as np

    defined = [a for a in per_class if not np.isnan(a)]
    return float(np.mean(defined)) if defined else float("nan")


def mean_auroc(labels: "np.ndarray", scores: "np.ndarray") -> tuple[float, list[float]]:
    """Unweighted mean of the per-class AUROCs over classes that have both labels; and the list.

    Classes with only positives or only negatives in ``labels`` are NaN in the list and left out
    of the mean (a tiny validation split can miss a rare class).
    """
    per_class = [roc_auc(labels[:, k], scores[:, k]) for k in range(labels.shape[1])]
    return _mean_of_defined(per_class), per_class


def _auroc(predictions: Predictions) -> float:
    return _mean_of_defined(predictions.per_class_auroc)


def _loss(predictions: Predictions) -> float:
    return predictions.loss_sum / len(predictions.labels)


# ------------------------------------------------------------------------------------------------
# The registry
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """One ranking metric: how it is named, which way is better, computed and shown."""

    #: the validation metric's name: ``search.metric``, the leaderboard column, ``--sort``
    name: str
    direction: Direction
    #: its value on a split's predictions
    compute: Callable[[Predictions], float]
    #: what it measures, in words (help texts and docs)
    description: str
    #: how tables, figures and the report title it; None: its name, as users type it
    label: str | None = None
    #: decimals wherever values are shown side by side (comparison tables, report, best configs)
    digits: int = 4

    @property
    def title(self) -> str:
        return self.label or self.name

    @property
    def ascending(self) -> bool:
        """Whether a best-first order sorts ascending (the metric is minimised)."""
        return self.direction == "min"

    def better(self, value: float, than: float | None) -> bool:
        """Whether ``value`` beats ``than`` (None: nothing yet); NaN and inf never do."""
        return better(value, than, self.direction)

    def format(self, value: float) -> str:
        return f"{value:.{self.digits}f}"

    def on_split(self, split: str) -> str:
        """The metric's name on ``split``: ``val_auroc`` on ``test`` is ``test_auroc``."""
        return f"{split}{self.name.removeprefix(VALIDATION_SPLIT)}"


#: Every metric, in the order the leaderboard, messages and help texts list them.
METRICS: dict[str, Metric] = {
    metric.name: metric
    for metric in (
        Metric("val_auroc", "max", _auroc, "mean ROC AUC over the classes that have both labels"),
        Metric("val_loss", "min", _loss, "mean loss (the training loss function) over the images"),
    )
}

#: The names ``search.metric`` and a trial's ``metric`` accept (pydantic lists them in its error).
MetricName = Literal[tuple(METRICS)]  # type: ignore[valid-type]


def get_metric(name: str) -> Metric:
    """The metric called ``name``.

    Raises:
        UsageError: no metric has that name (the leaderboard cannot rank trials by it).
    """
    if name not in METRICS:
        raise UsageError(f"cannot rank trials by {name!r}; metrics: {', '.join(METRICS)}")
    return METRICS[name]


def metric_mode(name: str) -> Direction:
    """``max`` or ``min``: which way ``name`` ranks trials (what Tune and Optuna call the mode)."""
    return get_metric(name).direction


def metric_values(predictions: Predictions, split: str = VALIDATION_SPLIT) -> dict[str, float]:
    """Every metric on one split's predictions, by its name on that split (``val_auroc``, ``test_loss``)."""
    return {metric.on_split(split): metric.compute(predictions) for metric in METRICS.values()}


def nan_metrics() -> dict[str, Any]:
    """Every validation metric as NaN: the report of an epoch that failed before it was evaluated."""
    return dict.fromkeys(METRICS, math.nan)
