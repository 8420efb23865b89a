"""The metrics trials are ranked by, each defined once: name, direction, computation and display.

Every epoch, each metric of :data:`METRICS` is computed from the validation split's
:class:`Predictions` (and, for the chosen epoch, from the test split's: ``val_auroc`` becomes
``test_auroc``). A metric's direction is the one rule for "best" everywhere: the epoch a trial
keeps, what a search optimises (``search.metric``), checkpoint retention, confirmation, the
leaderboard's order and every view of it.

Adding a metric is one more entry in :data:`METRICS`. The leaderboard keeps each trial's value in
the column of the metric's name (and its test value in its test name's); the columns come from
this registry, but :class:`~medpeft_ray.leaderboard.store.TrialRecord` needs the two fields;
``tests/test_metric_registry.py`` checks that they agree.

Kept free of heavy imports (numpy is imported where a metric is computed), so that the config,
the store, the views and the CLI's help can all import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
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

    ``thresholds`` are the per-class decision thresholds of multi-label data (what F1 counts as a
    predicted positive). None: they are chosen on these predictions, each class's F1-maximising
    one, which is what a validation split does; the test split is given the validation split's,
    unchanged, so that the test never takes part in choosing them. ``subgroups`` holds each
    image's value of the dataset's subgroup attributes (see :func:`subgroup_scores`).
    """

    labels: "np.ndarray"
    scores: "np.ndarray"
    loss_sum: float
    multilabel: bool = True
    thresholds: "np.ndarray | None" = None
    subgroups: dict[str, "np.ndarray"] = field(default_factory=dict)

    @cached_property
    def per_class_auroc(self) -> list[float]:
        """Each class's ROC AUC (NaN for a class without both labels); computed once per split."""
        return [roc_auc(self.labels[:, k], self.scores[:, k]) for k in range(self.labels.shape[1])]

    @cached_property
    def decision_thresholds(self) -> "np.ndarray":
        """Multi-label: the given thresholds, else each class's F1-maximising one on these predictions."""
        import numpy as np

        if self.thresholds is not None:
            return np.asarray(self.thresholds, dtype=np.float64)
        return np.asarray([best_f1_threshold(self.labels[:, k], self.scores[:, k]) for k in range(self.labels.shape[1])])

    @cached_property
    def predicted(self) -> "np.ndarray":
        """0/1 (images, classes): scores at or above the thresholds (multi-label), else the argmax class."""
        import numpy as np

        if self.multilabel:
            return (self.scores >= self.decision_thresholds[None, :]).astype(np.float64)
        return np.eye(self.scores.shape[1])[self.scores.argmax(axis=1)] if len(self.scores) else self.scores

    @cached_property
    def per_class_f1(self) -> list[float]:
        """Each class's F1 of :attr:`predicted` (NaN for a class neither labelled nor predicted)."""
        import numpy as np

        out = []
        for k in range(self.labels.shape[1]):
            known = ~np.isnan(self.labels[:, k])
            truth, guess = self.labels[known, k] > 0.5, self.predicted[known, k] > 0.5
            tp, fp, fn = int((truth & guess).sum()), int((~truth & guess).sum()), int((truth & ~guess).sum())
            out.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan"))
        return out

    def subset(self, index: "np.ndarray") -> "Predictions":
        """The predictions of the images ``index`` (with these thresholds; the loss is not split)."""
        return Predictions(self.labels[index], self.scores[index], float("nan"), self.multilabel,
                           self.decision_thresholds if self.multilabel else None)


def best_f1_threshold(labels: "np.ndarray", scores: "np.ndarray") -> float:
    """The score threshold (predict positive at or above it) with the highest F1 on one class.

    Candidates are the observed scores; NaN labels are left out. A class without a known positive
    keeps 0.5. Ties go to the highest threshold (fewest positives predicted).
    """
    import numpy as np

    labels = np.asarray(labels, dtype=np.float64)
    known = ~np.isnan(labels)
    truth, scores = labels[known] > 0.5, np.asarray(scores, dtype=np.float64)[known]
    positives = int(truth.sum())
    if positives == 0:
        return 0.5
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_truth = scores[order], truth[order]
    tp = np.cumsum(sorted_truth)
    fp = np.cumsum(~sorted_truth)
    # only the last of a run of tied scores is a cut: a threshold takes all of a tie or none of it
    last_of_tie = np.r_[np.diff(sorted_scores) != 0, True]
    f1 = np.where(last_of_tie, 2 * tp / (tp + fp + positives), -1.0)
    return float(sorted_scores[int(np.argmax(f1))])


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


def _f1(predictions: Predictions) -> float:
    return _mean_of_defined(predictions.per_class_f1)


def _label_index(predictions: Predictions) -> "np.ndarray":
    return predictions.labels.argmax(axis=1)


#: the score above which a multi-label accuracy counts a label as predicted (MedMNIST's ACC: `y_score > 0.5`)
ACCURACY_THRESHOLD = 0.5


def _accuracy(predictions: Predictions) -> float:
    """Multi-class: the share of images whose argmax class is right. Multi-label: each class's
    share of (known) images whose label is right at :data:`ACCURACY_THRESHOLD`, averaged over the
    classes (MedMNIST's ACC of ChestMNIST; F1's thresholds, chosen on validation, play no part)."""
    import numpy as np

    if not len(predictions.labels):
        return float("nan")
    if predictions.multilabel:
        known = ~np.isnan(predictions.labels)
        right = known & ((predictions.scores > ACCURACY_THRESHOLD) == (predictions.labels > 0.5))
        return _mean_of_defined([float(right[:, k].sum() / known[:, k].sum()) if known[:, k].any() else float("nan")
                                 for k in range(predictions.labels.shape[1])])
    return float(np.mean(predictions.scores.argmax(axis=1) == _label_index(predictions)))


def _balanced_accuracy(predictions: Predictions) -> float:
    """The mean over the classes present in the labels of each class's recall."""
    import numpy as np

    if predictions.multilabel or not len(predictions.labels):
        return float("nan")
    truth, guess = _label_index(predictions), predictions.scores.argmax(axis=1)
    return float(np.mean([np.mean(guess[truth == k] == k) for k in np.unique(truth)]))


# ------------------------------------------------------------------------------------------------
# The registry
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """One ranking metric: how it is named, which way is better, computed and shown."""

    #: the validation metric's name: ``search.metric``, the leaderboard column, ``--sort``
    name: str
    direction: Direction
    #: its value on a split's predictions (None: the generation recipe computes it, from samples)
    compute: Callable[[Predictions], float] | None
    #: what it measures, in words (help texts and docs)
    description: str
    #: how tables, figures and the report title it; None: its name, as users type it
    label: str | None = None
    #: decimals wherever values are shown side by side (comparison tables, report, best configs)
    digits: int = 4
    #: the tasks it is defined for (elsewhere it is NaN, and ``search.metric`` refuses it)
    tasks: frozenset[str] = frozenset({"multilabel", "multiclass"})
    #: whether it is also computed per subgroup (the loss is summed over the split, not kept per image)
    per_subgroup: bool = True
    #: whether every epoch has it; a metric that does not (FID, which costs a sampling run) leaves
    #: early stopping to ``val_loss``
    every_epoch: bool = True

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
        Metric("val_loss", "min", _loss, "mean loss (the training loss function) over the images; generation: the "
               "noise-prediction loss at fixed noise and timesteps, comparable across trials",
               per_subgroup=False, tasks=frozenset({"multilabel", "multiclass", "generation"})),
        Metric("val_f1", "max", _f1, "macro F1 over the classes (multi-label: per-class thresholds chosen "
               "on validation, applied unchanged to test; multi-class: the argmax class)"),
        Metric("val_accuracy", "max", _accuracy, "share of images whose argmax class is right (multi-class); "
               "multi-label: each class's share of images labelled right at a 0.5 threshold, averaged over classes"),
        Metric("val_balanced_accuracy", "max", _balanced_accuracy,
               "mean per-class recall of the argmax class (multi-class)", label="val_bal_acc",
               tasks=frozenset({"multiclass"})),
        Metric("val_fid", "min", None, "Frechet Inception Distance of samples for fixed validation prompts to the "
               "validation images (generation; computed at the scheduler's rungs and the last epoch)", label="FID",
               digits=2, tasks=frozenset({"generation"}), per_subgroup=False, every_epoch=False),
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
    return {metric.on_split(split): metric.compute(predictions) for metric in METRICS.values()
            if metric.compute is not None}


def require_defined(name: str, task: str, dataset: str) -> None:
    """Raises a one-line UsageError when ``name`` is not defined for ``dataset``'s ``task``."""
    metric = get_metric(name)
    if task not in metric.tasks:
        raise UsageError(f"search.metric: {name} is defined for {' and '.join(sorted(metric.tasks))} data; "
                         f"dataset {dataset!r} is {task}")


def names_on_split(split: str) -> list[str]:
    """Every metric's name on ``split`` (``test_auroc``, ...): on ``test``, the leaderboard's test columns."""
    return [metric.on_split(split) for metric in METRICS.values()]


def subgroup_scores(predictions: Predictions, split: str = VALIDATION_SPLIT) -> dict[str, dict[str, dict[str, float]]]:
    """Per attribute and value (unknown "" left out): each per-subgroup metric and the image count ``n``."""
    import numpy as np

    out: dict[str, dict[str, dict[str, float]]] = {}
    for attribute, values in predictions.subgroups.items():
        values = np.asarray(values, dtype=str)
        groups: dict[str, dict[str, float]] = {}
        for value in sorted(set(values.tolist()) - {""}):
            part = predictions.subset(np.flatnonzero(values == value))
            groups[value] = {m.on_split(split): m.compute(part) for m in METRICS.values() if m.per_subgroup}
            groups[value]["n"] = len(part.labels)
        out[attribute] = groups
    return out


def worst_group_gaps(subgroups: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per attribute and metric: the best group's value minus the worst group's (two groups or more)."""
    gaps: dict[str, dict[str, float]] = {}
    for attribute, groups in subgroups.items():
        names = {name for scores in groups.values() for name in scores if name != "n"}
        for name in sorted(names):
            finite = [s[name] for s in groups.values() if math.isfinite(s.get(name, math.nan))]
            if len(finite) >= 2:
                gaps.setdefault(attribute, {})[name] = max(finite) - min(finite)
    return gaps


def finite_or_none(value: Any) -> Any:
    """``value`` with NaN and inf, at any depth of dicts and lists, made None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def prediction_details(predictions: Predictions, class_names: Iterable[str], split: str = VALIDATION_SPLIT) -> dict[str, Any]:
    """What a leaderboard row keeps beside its metrics: per-class values, thresholds, subgroups and gaps."""
    names = list(class_names)
    details: dict[str, Any] = {
        "per_class": {f"{split}_auroc": dict(zip(names, predictions.per_class_auroc)),
                      f"{split}_f1": dict(zip(names, predictions.per_class_f1))},
    }
    if predictions.multilabel:
        details["thresholds"] = dict(zip(names, map(float, predictions.decision_thresholds)))
    if predictions.subgroups:
        details["subgroups"] = subgroup_scores(predictions, split)
        details["worst_group_gap"] = worst_group_gaps(details["subgroups"])
    return details


def nan_metrics() -> dict[str, Any]:
    """Every validation metric as NaN: the report of an epoch that failed before it was evaluated."""
    return dict.fromkeys(METRICS, math.nan)
