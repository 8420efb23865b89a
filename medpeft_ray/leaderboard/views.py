"""Views of the leaderboard that answer the studies' questions, as pandas DataFrames.

Every function takes the rows of :meth:`TrialStore.query` (any filtered subset) and returns
a new DataFrame; none touches the database. Trials without the metric (failed ones) take part in
no ranking; the metric's direction (:mod:`medpeft_ray.metrics`) says which way is best.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any, Sequence

from medpeft_ray.errors import MedpeftError, UsageError
from medpeft_ray.metrics import get_metric, metric_mode  # noqa: F401  (metric_mode: part of the views' API)

if TYPE_CHECKING:
    import pandas as pd

#: the columns that identify a study: one Optuna study per (experiment, label ratio)
STUDY_COLUMNS = ["experiment", "method", "dataset", "label_ratio"]
GROUP_COLUMNS = ("experiment", "dataset", "label_ratio", "method", "backbone", "status", "checkpoint_sha256")
#: hex digits of a checkpoint's SHA-256 shown to tell checkpoints apart
SHORT_HASH = 8


def checkpoint_labels(frame: "pd.DataFrame") -> "pd.Series":
    """Each row's pre-trained checkpoint as its hash's first digits (``-``: none recorded)."""
    import pandas as pd

    hashes = frame.get("checkpoint_sha256", pd.Series(None, index=frame.index, dtype=object))
    return hashes.map(lambda h: h[:SHORT_HASH] if isinstance(h, str) and h else "-")


def several_checkpoints(frame: "pd.DataFrame") -> bool:
    """Whether some dataset has rows that started from different pre-trained checkpoints."""
    if frame.empty:
        return False
    return bool(checkpoint_labels(frame).groupby(frame["dataset"]).nunique().max() > 1)


def cell_label(dataset: str, label_ratio: float) -> str:
    """The column name of one (dataset, label ratio) cell in :func:`compare`, e.g. ``nih @ 0.01``."""
    return f"{dataset} @ {label_ratio:g}"


def ranked(frame: "pd.DataFrame", metric: str = "val_auroc") -> "pd.DataFrame":
    """The rows that have ``metric``, best first (ties: first recorded first)."""
    ascending = get_metric(metric).ascending
    rows = frame[frame[metric].notna()]
    return rows.sort_values([metric, "id"], ascending=[ascending, True], kind="stable").reset_index(drop=True)


def best(frame: "pd.DataFrame", metric: str = "val_auroc", what: str = "the leaderboard") -> "pd.DataFrame":
    """The best trial as a one-row DataFrame.

    Raises:
        MedpeftError: no row has ``metric`` (``what`` names the selection in the message).
    """
    rows = ranked(frame, metric)
    if rows.empty:
        failed = int((frame["status"] == "failed").sum()) if len(frame) else 0
        detail = f" ({failed} failed)" if failed else ""
        raise MedpeftError(f"no trial with a {metric} in {what}{detail}")
    return rows.head(1)


def best_per_group(frame: "pd.DataFrame", by: Sequence[str], metric: str = "val_auroc") -> "pd.DataFrame":
    """The best trial of each group of ``by`` columns, best first."""
    by = list(by)
    for column in by:
        if column not in GROUP_COLUMNS:
            raise UsageError(f"cannot group by {column!r}; columns: {', '.join(GROUP_COLUMNS)}")
    rows = ranked(frame, metric)
    return rows.groupby(by, sort=False, dropna=False).head(1).reset_index(drop=True)


def compare(frame: "pd.DataFrame", by: str = "method", metric: str = "val_auroc") -> "pd.DataFrame":
    """The studies' comparison table: one row per ``by`` value (method or backbone), one column per
    (dataset, label ratio) holding the best ``metric`` there, and ``mean_rank``.

    When some dataset has trials from more than one pre-trained checkpoint, each row is a ``by``
    value and a checkpoint, labelled ``lora [1a2b3c4d]`` (the hash's first digits; ``-``: none
    recorded), so that results of different weights are never merged.

    A method's rank in a column is 1 for the best value (ties share the mean of their ranks); its
    mean rank averages the columns it has a value in. Rows are sorted by mean rank.
    """
    import pandas as pd

    if by not in ("method", "backbone", "experiment"):
        raise UsageError(f"cannot compare by {by!r}; compare methods, backbones or experiments")
    ranking = get_metric(metric)
    rows = frame[frame[metric].notna()]
    if rows.empty:
        return pd.DataFrame({"mean_rank": pd.Series(dtype="float64")}, index=pd.Index([], name=by))
    if several_checkpoints(rows):
        rows = rows.assign(**{by: rows[by].astype(str) + " [" + checkpoint_labels(rows) + "]"})
    cells = rows.groupby([by, "dataset", "label_ratio"])[metric].agg(ranking.direction)  # "max" or "min"
    wide = cells.unstack(["dataset", "label_ratio"]).sort_index(axis=1)
    ranks = wide.rank(axis=0, ascending=ranking.ascending, method="average")
    table = wide.copy()
    table.columns = [cell_label(dataset, ratio) for dataset, ratio in wide.columns]
    table["mean_rank"] = ranks.mean(axis=1).to_numpy()
    table.index.name = by
    return table.sort_values(["mean_rank"], kind="stable").rename_axis(by)


def pareto_mask(frame: "pd.DataFrame", metric: str = "val_auroc") -> "pd.Series":
    """True for the rows no other row of the same (dataset, label ratio) beats on both ``metric``
    and trainable parameters (at least as good on both and better on one)."""
    import pandas as pd

    ascending = get_metric(metric).ascending
    mask = pd.Series(False, index=frame.index)
    usable = frame[frame[metric].notna() & frame["trainable_params"].notna()]
    for _, group in usable.groupby(["dataset", "label_ratio"]):
        quality = -group[metric] if ascending else group[metric]  # higher is better from here on
        best_so_far = -math.inf
        # walk from fewest parameters up: a row is on the front if it beats every cheaper row
        for _, same_cost in quality.groupby(group["trainable_params"].astype("int64"), sort=True):
            top = same_cost.max()
            if top > best_so_far:
                mask[same_cost.index[same_cost == top]] = True
                best_so_far = top
    return mask


def pareto(frame: "pd.DataFrame", metric: str = "val_auroc") -> "pd.DataFrame":
    """The Pareto front of each (dataset, label ratio): fewest trainable parameters first."""
    front = frame[pareto_mask(frame, metric)]
    return front.sort_values(["dataset", "label_ratio", "trainable_params", "id"], kind="stable").reset_index(drop=True)


def progress(frame: "pd.DataFrame", metric: str = "val_auroc") -> "pd.DataFrame":
    """Search progress per study (experiment, method, dataset, label ratio), trials in recorded order.

    Columns: the study's columns, ``trial`` (1, 2, ...), ``trial_id``, ``compute_s`` (cumulative
    trial wall time), ``epochs`` (cumulative epochs run), ``metric`` and ``best_so_far``.
    """
    import pandas as pd

    ascending = get_metric(metric).ascending
    columns = [*STUDY_COLUMNS, "trial", "trial_id", "compute_s", "epochs", metric, "best_so_far"]
    parts = []
    for _, group in frame.sort_values("id").groupby(STUDY_COLUMNS, sort=True):
        values = group[metric].astype("float64")
        running = values.cummin() if ascending else values.cummax()
        parts.append(group[[*STUDY_COLUMNS, "trial_id", metric]].assign(
            trial=range(1, len(group) + 1),
            compute_s=group["wall_time_s"].fillna(0.0).cumsum(),
            epochs=group["epochs_run"].fillna(0).astype("int64").cumsum(),
            best_so_far=running.ffill(),  # a failed trial keeps the best so far
        ))
    if not parts:
        return pd.DataFrame(columns=columns)
    return pd.concat(parts, ignore_index=True)[columns]


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def importance(frame: "pd.DataFrame", metric: str = "val_auroc", min_trials: int = 3) -> "pd.DataFrame":
    """How strongly each searched hyperparameter goes with the metric, per method.

    The metric is first turned into its rank within each (method, dataset, label ratio), so that
    easier datasets and larger label ratios do not dominate. A numeric parameter's association is
    the absolute Spearman correlation with that rank (``spearman`` keeps the sign: positive means
    larger values did better); a categorical one's is the correlation ratio (eta) of the rank
    across its choices. Both lie in [0, 1]. Parameters seen in fewer than ``min_trials`` trials,
    or with a single value, are left out.
    """
    import pandas as pd

    ascending = get_metric(metric).ascending
    columns = ["method", "parameter", "kind", "association", "spearman", "trials"]
    rows = frame[frame[metric].notna()].copy()
    if rows.empty:
        return pd.DataFrame(columns=columns)
    rows["score"] = rows.groupby(["method", "dataset", "label_ratio"])[metric].rank(
        pct=True, ascending=not ascending)  # the best trial gets the highest score
    records = []
    for method, group in rows.groupby("method", sort=True):
        names = sorted({name for params in group["params"] for name in params})
        for name in names:
            values = group["params"].map(lambda p, n=name: p.get(n))
            present = values.notna()
            x, score = values[present], group["score"][present]
            if len(x) < min_trials or x.astype(str).nunique() < 2:
                continue
            if all(_is_number(v) for v in x):
                rho = float(x.astype("float64").rank().corr(score.rank()))
                if math.isnan(rho):
                    continue
                records.append((method, name, "numeric", abs(rho), rho, len(x)))
            else:
                eta = _correlation_ratio(x.astype(str), score)
                records.append((method, name, "categorical", eta, math.nan, len(x)))
    table = pd.DataFrame(records, columns=columns)
    return table.sort_values(["method", "association"], ascending=[True, False], kind="stable").reset_index(drop=True)


def _correlation_ratio(categories: "pd.Series", score: "pd.Series") -> float:
    """eta = sqrt(between-choice variance / total variance) of ``score``."""
    total = float(((score - score.mean()) ** 2).sum())
    if total == 0:
        return 0.0
    means = score.groupby(categories).transform("mean")
    between = float(((means - score.mean()) ** 2).sum())
    return math.sqrt(between / total)


def markdown_table(frame: "pd.DataFrame", index: bool = False) -> str:
    """A GitHub-flavoured Markdown table of ``frame``'s values as text ('|' escaped)."""
    data = frame.reset_index() if index else frame
    header = [str(c) for c in data.columns]

    def cell(value: Any) -> str:
        return ("" if value is None else str(value)).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in data.itertuples(index=False, name=None)]
    return "\n".join(lines)
