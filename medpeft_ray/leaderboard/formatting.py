"""How a leaderboard value is written as text: one convention for the terminal, Markdown and the HTML report.

- a missing value (None, NaN, pandas' NA) is an en dash, ``–``: a hyphen could be read as the
  sign of a number (a Spearman correlation, a worst-group gap) where the table holds numbers;
- a metric has its registry's digits (``0.8120``; FID ``12.34``), a confidence interval follows it
  in brackets (``0.8120 [0.7901, 0.8302]``), else a spread over confirmation seeds
  (``0.8120 ± 0.0130``); a mean rank has two decimals;
- counts group thousands with commas (``1,204,866``), wall times are whole seconds (``1834 s``);
- hyperparameters are ``name=value`` pairs in the order the search recorded them, separated by a
  comma and a space (``lr=0.000312, rank=16``), floats to three significant digits.

JSON keeps values (:func:`plain`), not text; only the tables for people go through :func:`cell_text`.
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any

import pandas as pd

from medpeft_ray.metrics import METRICS, Metric, get_metric

if TYPE_CHECKING:
    from medpeft_ray.leaderboard.views import StudyTable

#: what a cell without a value shows
MISSING = "–"


def is_missing(value: Any) -> bool:
    """None, NaN or pandas' NA (a list or dict, such as a row's hyperparameters, is a value)."""
    if value is None:
        return True
    if isinstance(value, (dict, list, tuple, str)):
        return False
    return bool(pd.isna(value))


def plain(value: Any) -> Any:
    """JSON-ready scalars: NaN/NA become None, numpy and pandas integers become int."""
    if isinstance(value, (dict, list, str)) or value is None:
        return value
    if pd.isna(value):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def metric_of(column: str) -> Metric | None:
    """The registry's metric of a validation or test column (``test_f1``: val_f1), or None."""
    name = "val_" + column.removeprefix("test_") if column.startswith("test_") else column
    return METRICS.get(name)


def header(column: str) -> str:
    """A column's heading: a metric's label (on its split), else the name with spaces."""
    metric = metric_of(column)
    if metric is not None and column.startswith("test_"):
        return metric.title.replace("val_", "test_", 1).replace("_", " ")
    return (metric.title if metric is not None else column).replace("_", " ")


def params_text(params: dict[str, Any]) -> str:
    """``lr=0.000312, rank=16``: the hyperparameters in the order they were recorded."""
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def count_text(value: Any) -> str:
    """``1,204,866``; the missing mark for no count."""
    return MISSING if is_missing(value) else f"{int(value):,}"


def seconds_text(value: Any) -> str:
    """``1834 s``; the missing mark for no time."""
    return MISSING if is_missing(value) else f"{value:.0f} s"


def metric_text(metric: str, value: Any, std: Any = None) -> str:
    """``0.8120``, with the spread over seeds where there is one (``0.8120 ± 0.0130``), or the missing mark."""
    if is_missing(value):
        return MISSING
    shown = get_metric(metric)
    return shown.format(value) + ("" if is_missing(std) else f" ± {shown.format(std)}")


def rank_text(value: Any) -> str:
    """A mean rank: ``1.50``."""
    return MISSING if is_missing(value) else f"{value:.2f}"


def cell_text(column: str, value: Any) -> str:
    """A leaderboard row's value in ``column`` as text (see the module's conventions)."""
    value = plain(value)
    if value is None:
        return MISSING
    if column == "params":
        return params_text(value)
    if column in ("trainable_params", "total_params"):
        return count_text(value)
    if column == "wall_time_s":
        return seconds_text(value)
    if column == "mean_rank":
        return rank_text(value)
    metric = metric_of(column)
    if isinstance(value, float):
        return metric.format(value) if metric is not None else f"{value:g}"
    return str(value)


def interval_text(metric: str, low: Any, high: Any) -> str:
    """A confidence interval: ``[0.7901, 0.8302]``; "" when there is none."""
    if is_missing(low) or is_missing(high):
        return ""
    shown = get_metric(metric)
    return f"[{shown.format(low)}, {shown.format(high)}]"


def study_cell_text(study: StudyTable, name: Any, cell: str) -> str:
    """One cell of the comparison table: ``0.8120 [0.7901, 0.8302]`` where the cell has a confidence
    interval, else ``0.8120 ± 0.0130`` (several seeds), ``0.8120`` (one) or ``–``; a column of
    another metric beside the cells (``<cell> test_accuracy``) has that metric's value alone."""
    if cell not in study.std.columns:
        companion = metric_of(cell.rsplit(" ", 1)[-1])
        return metric_text(companion.name if companion else study.metric, study.means.at[name, cell])
    if study.low is not None and study.high is not None:
        interval = interval_text(study.metric, study.low.at[name, cell], study.high.at[name, cell])
        if interval and not is_missing(study.means.at[name, cell]):
            return f"{metric_text(study.metric, study.means.at[name, cell])} {interval}"
    return metric_text(study.metric, study.means.at[name, cell], study.std.at[name, cell])


def study_text(study: StudyTable) -> pd.DataFrame:
    """The comparison table as text: every cell as :func:`study_cell_text`, and ``mean rank``."""
    cells = [c for c in study.means.columns if c != "mean_rank"]
    text = study.means[cells].astype(object)
    for name in text.index:
        for cell in cells:
            text.at[name, cell] = study_cell_text(study, name, cell)
    text["mean rank"] = study.means["mean_rank"].map(rank_text)
    return text
