"""Views of the leaderboard that answer the studies' questions, as pandas DataFrames.

Every function takes the rows of :meth:`TrialStore.query` (any filtered subset) and returns
a new DataFrame; none touches the database. Trials without the metric (failed ones) take part in
no ranking; the metric's direction (:mod:`medpeft_ray.metrics`) says which way is best.

Rows of ``role`` ``confirmation`` (a top configuration re-trained with other seeds) stand for their
configuration in the comparisons (:func:`cells`: mean and std over the seeds); search progress and
hyperparameter importance read the search's own trials only. Columns an older leaderboard lacks
(``role``, test metrics, ``details``) read as search trials without those values.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import pandas as pd

from medpeft_ray.errors import MedpeftError, UsageError
from medpeft_ray.metrics import get_metric, metric_mode  # noqa: F401  (metric_mode: part of the views' API)

#: the columns that identify a study: one Optuna study per (experiment, label ratio)
STUDY_COLUMNS = ["experiment", "method", "dataset", "label_ratio"]
GROUP_COLUMNS = ("experiment", "dataset", "label_ratio", "method", "backbone", "status", "checkpoint_sha256")
#: hex digits of a checkpoint's SHA-256 shown to tell checkpoints apart
SHORT_HASH = 8
#: a row's ``role``: a trial of the search, or a re-training of a top configuration with another seed
ROLE_SEARCH, ROLE_CONFIRMATION = "search", "confirmation"
#: the splits a comparison can show (the configuration is always chosen on validation)
SPLITS = ("val", "test")


def checkpoint_labels(frame: pd.DataFrame) -> pd.Series:
    """Each row's pre-trained checkpoint as its hash's first digits (``-``: none recorded)."""
    hashes = frame.get("checkpoint_sha256", pd.Series(None, index=frame.index, dtype=object))
    return hashes.map(lambda h: h[:SHORT_HASH] if isinstance(h, str) and h else "-")


def several_checkpoints(frame: pd.DataFrame) -> bool:
    """Whether some dataset has rows that started from different pre-trained checkpoints."""
    if frame.empty:
        return False
    return bool(checkpoint_labels(frame).groupby(frame["dataset"]).nunique().max() > 1)


def cell_label(dataset: str, label_ratio: float) -> str:
    """The column name of one (dataset, label ratio) cell in :func:`compare`, e.g. ``nih @ 0.01``."""
    return f"{dataset} @ {label_ratio:g}"


def ranked(frame: pd.DataFrame, metric: str = "val_auroc") -> pd.DataFrame:
    """The rows that have ``metric``, best first (ties: first recorded first)."""
    ascending = get_metric(metric).ascending
    rows = frame[frame[metric].notna()]
    return rows.sort_values([metric, "id"], ascending=[ascending, True], kind="stable").reset_index(drop=True)


def best(frame: pd.DataFrame, metric: str = "val_auroc", what: str = "the leaderboard") -> pd.DataFrame:
    """The best trial as a one-row DataFrame.

    Raises:
        MedpeftError: no row has ``metric`` (``what`` names the selection in the message).
    """
    rows = ranked(search_rows(frame), metric)  # a confirmation seed re-trains a search trial's config
    if rows.empty:
        failed = int((frame["status"] == "failed").sum()) if len(frame) else 0
        detail = f" ({failed} failed)" if failed else ""
        raise MedpeftError(f"no trial with a {metric} in {what}{detail}")
    return rows.head(1)


def confirmation_seeds(frame: pd.DataFrame, trial: dict[str, Any]) -> pd.DataFrame:
    """The confirmation rows that re-train search ``trial``'s configuration (none if it was not)."""
    if "source_trial" not in frame:
        return frame.iloc[:0]
    return frame[(roles(frame) == ROLE_CONFIRMATION) & (frame["source_trial"] == trial["trial_id"])
                 & (frame["experiment"] == trial["experiment"])]


def confirmation_summary(frame: pd.DataFrame, trial: dict[str, Any], metric: str = "val_auroc") -> str | None:
    """``confirmed with 3 seeds: val_f1 0.81 ± 0.01, test_f1 0.79 ± 0.02`` for a search trial whose
    configuration was re-trained with several seeds; None when it was not."""
    seeds = confirmation_seeds(frame, trial)
    if seeds.empty:
        return None
    shown = get_metric(metric)
    parts = []
    for name in (metric, shown.on_split("test")):
        values = _column(seeds, name).dropna()
        if len(values):
            spread = f" ± {shown.format(values.std(ddof=1))}" if len(values) > 1 else ""
            parts.append(f"{name} {shown.format(values.mean())}{spread}")
    return f"confirmed with {len(seeds)} seed(s): {', '.join(parts) or 'no values'}"


def best_per_group(frame: pd.DataFrame, by: Sequence[str], metric: str = "val_auroc") -> pd.DataFrame:
    """The best trial of each group of ``by`` columns, best first."""
    by = list(by)
    for column in by:
        if column not in GROUP_COLUMNS:
            raise UsageError(f"cannot group by {column!r}; columns: {', '.join(GROUP_COLUMNS)}")
    rows = ranked(frame, metric)
    return rows.groupby(by, sort=False, dropna=False).head(1).reset_index(drop=True)


def roles(frame: pd.DataFrame) -> pd.Series:
    """Each row's role: ``search`` or ``confirmation`` (rows written before roles were are search trials)."""
    if "role" not in frame:
        return pd.Series(ROLE_SEARCH, index=frame.index, dtype=object)
    return frame["role"].where(frame["role"].notna(), ROLE_SEARCH)


def search_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The trials of the searches themselves, without the confirmation re-trainings."""
    return frame[roles(frame) != ROLE_CONFIRMATION]


def resolve_split(frame: pd.DataFrame, metric: str, split: str | None = None, keys: Sequence[str] = ("method",)
                  ) -> str:
    """The split whose values the comparison of ``keys`` shows: ``split``, or by default ``test`` when
    every cell's chosen configuration has the metric's test value (the studies report the test score
    of the configuration chosen on validation), else ``val`` (a table never mixes the two)."""
    return _split_of(_choices(frame, list(keys), metric), metric, split)


def _split_of(choices: list[tuple[Any, pd.DataFrame]], metric: str, split: str | None) -> str:
    if split is not None:
        return check_split(split)
    test = get_metric(metric).on_split("test")
    every = bool(choices) and all(_column(runs, test).notna().any() for _, runs in choices)
    return "test" if every else "val"


def check_split(split: str) -> str:
    """``split`` if a comparison can show it; raises UsageError otherwise."""
    if split not in SPLITS:
        raise UsageError(f"no split {split!r} to compare on; splits: {', '.join(SPLITS)}")
    return split


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    """``frame[name]`` as floats; all NaN when an older leaderboard has no such column."""
    if name not in frame:
        return pd.Series(math.nan, index=frame.index, dtype="float64")
    return frame[name].astype("float64")


def _chosen_runs(group: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The rows behind one cell: the confirmed configuration with the best mean validation value
    (all its seeds), else the best search trial."""
    confirmed = group[roles(group) == ROLE_CONFIRMATION].sort_values("id", kind="stable")
    if confirmed.empty:
        return ranked(group, metric).head(1)
    source = confirmed.get("source_trial", confirmed["trial_id"])
    config = confirmed["experiment"].astype(str) + "/" + source.where(source.notna(), confirmed["trial_id"]).astype(str)
    means = confirmed.groupby(config, sort=False)[metric].mean()  # first recorded first: ties keep it
    chosen = means.idxmin() if get_metric(metric).ascending else means.idxmax()
    return confirmed[config == chosen]


def _cell_values(runs: pd.DataFrame, column: str) -> dict[str, Any]:
    """Mean, sample std (NaN for one value) and count of ``column`` over the chosen runs."""
    values = _column(runs, column).dropna()
    confirmed = bool((roles(runs) == ROLE_CONFIRMATION).any())
    source = runs["source_trial"].iloc[0] if confirmed and "source_trial" in runs else runs["trial_id"].iloc[0]
    return {"mean": values.mean() if len(values) else math.nan,
            "std": values.std(ddof=1) if len(values) > 1 else math.nan,
            "seeds": len(values), "confirmed": confirmed, "experiment": runs["experiment"].iloc[0],
            "trial_id": source, "ids": tuple(int(i) for i in runs["id"])}


CELL_COLUMNS = ["split", "mean", "std", "seeds", "confirmed", "experiment", "trial_id", "ids"]


def _choices(frame: pd.DataFrame, keys: list[str], metric: str) -> list[tuple[Any, pd.DataFrame]]:
    """Each (``keys``, dataset, label ratio) group's key and its chosen runs (:func:`_chosen_runs`)."""
    rows = frame[frame[metric].notna()]
    groups = rows.groupby([*keys, "dataset", "label_ratio"], sort=True)
    return [(key, _chosen_runs(group, metric)) for key, group in groups]


def cells(frame: pd.DataFrame, keys: Sequence[str], metric: str = "val_auroc", split: str | None = None
          ) -> pd.DataFrame:
    """The value each group of ``keys`` has at each (dataset, label ratio): one row per cell.

    A cell's configuration is chosen on validation ``metric``: where confirmation rows exist, the
    confirmed configuration (``source_trial``) with the best mean over its seeds, else the best
    search trial. ``mean``, ``std`` (NaN for a single run) and ``seeds`` are that configuration's
    values on ``split`` (default: see :func:`resolve_split`), named in column ``split``; ``trial_id``
    is the search trial that proposed it and ``ids`` the rows averaged.
    """
    by = [*keys, "dataset", "label_ratio"]
    choices = _choices(frame, list(keys), metric)
    split = _split_of(choices, metric, split)
    column = get_metric(metric).on_split(split)
    records = [{**dict(zip(by, key)), "split": split, **_cell_values(runs, column)} for key, runs in choices]
    # comparing experiments: the key is the cell's experiment already, a column only once
    return pd.DataFrame(records, columns=[*by, *(c for c in CELL_COLUMNS if c not in by)])


@dataclass
class StudyTable:
    """The studies' comparison table: ``means`` (what :func:`compare` returns: one column per
    (dataset, label ratio) and ``mean_rank``), with the spread over confirmation seeds beside it.
    :func:`~medpeft_ray.leaderboard.formatting.study_text` writes it as text."""

    means: pd.DataFrame
    std: pd.DataFrame
    seeds: pd.DataFrame
    metric: str
    split: str
    #: the cells behind the table, one row each (what :func:`cells` returns: their rows' ``ids``)
    cells: pd.DataFrame | None = None
    #: each cell's confidence interval, where one was computed
    #: (:func:`~medpeft_ray.leaderboard.evidence.with_intervals`), and what the intervals are
    low: pd.DataFrame | None = None
    high: pd.DataFrame | None = None
    interval_note: str = ""

    @property
    def column(self) -> str:
        """The leaderboard column shown, e.g. ``test_auroc``."""
        return get_metric(self.metric).on_split(self.split)

    @property
    def several_seeds(self) -> bool:
        return bool((self.seeds > 1).to_numpy().any())


def wide(long: pd.DataFrame, by: str, value: str) -> pd.DataFrame:
    """A value of :func:`cells`' rows as a table: one row per ``by`` value, one column per cell."""
    wide = long.set_index([by, "dataset", "label_ratio"])[value].unstack(["dataset", "label_ratio"]).sort_index(axis=1)
    wide.columns = [cell_label(dataset, ratio) for dataset, ratio in wide.columns]
    return wide.rename_axis(by)


def study_table(frame: pd.DataFrame, by: str = "method", metric: str = "val_auroc", split: str | None = None
                ) -> StudyTable:
    """:func:`compare`'s table with its standard deviations and seed counts (see :func:`cells`)."""
    if by not in ("method", "backbone", "experiment"):
        raise UsageError(f"cannot compare by {by!r}; compare methods, backbones or experiments")
    ranking = get_metric(metric)
    rows = frame[frame[metric].notna()]
    if rows.empty:
        empty = pd.DataFrame({"mean_rank": pd.Series(dtype="float64")}, index=pd.Index([], name=by))
        split = check_split(split) if split is not None else "val"
        return StudyTable(empty, empty.drop(columns="mean_rank"), empty.drop(columns="mean_rank"), metric, split)
    if several_checkpoints(rows):
        rows = rows.assign(**{by: rows[by].astype(str) + " [" + checkpoint_labels(rows) + "]"})
    long = cells(rows, [by], metric, split)
    split = long["split"].iloc[0]
    means = wide(long, by, "mean").astype("float64")
    ranks = means.rank(axis=0, ascending=ranking.ascending, method="average")
    means["mean_rank"] = ranks.mean(axis=1)
    order = means.sort_values(["mean_rank"], kind="stable").index
    std, seeds = wide(long, by, "std").astype("float64"), wide(long, by, "seeds").fillna(0).astype("int64")
    return StudyTable(means.loc[order], std.loc[order], seeds.loc[order], metric, split, long)


def companion(study: StudyTable, frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Another metric's values of the configurations ``study`` chose (on its own metric), cell by
    cell: the mean over the same rows of ``metric`` on the study's split. What benchmark tables
    show beside the ranking metric (MedMNIST's ACC beside AUC), never chosen on."""
    try:
        get_metric(metric)
    except UsageError as exc:
        raise UsageError(f"--also: {exc}") from None
    if study.cells is None or study.cells.empty:
        return study.means.drop(columns="mean_rank").astype("float64")
    column = get_metric(metric).on_split(study.split)
    values = _column(frame, column).groupby(frame["id"]).mean()
    long = study.cells.assign(mean=[float(values.reindex(list(ids)).mean()) for ids in study.cells["ids"]])
    by = study.means.index.name
    return wide(long, by, "mean").astype("float64").reindex(study.means.index)


def compare(frame: pd.DataFrame, by: str = "method", metric: str = "val_auroc", split: str | None = None
            ) -> pd.DataFrame:
    """The studies' comparison table: one row per ``by`` value (method or backbone), one column per
    (dataset, label ratio) holding the value of the configuration chosen there on validation
    ``metric`` (see :func:`cells`: the mean over its confirmation seeds where it was confirmed, else
    the best search trial's value), on ``split`` (default: test when every cell has a test value,
    else validation), and ``mean_rank``. :func:`study_table` adds the standard deviations.

    When some dataset has trials from more than one pre-trained checkpoint, each row is a ``by``
    value and a checkpoint, labelled ``lora [1a2b3c4d]`` (the hash's first digits; ``-``: none
    recorded), so that results of different weights are never merged.

    A method's rank in a column is 1 for the best value (ties share the mean of their ranks); its
    mean rank averages the columns it has a value in. Rows are sorted by mean rank.
    """
    return study_table(frame, by, metric, split).means


#: what identifies one transfer task when methods are counted against a baseline (as MED-PEFT
#: counts them: pre-trained model x dataset x label ratio)
TASK_COLUMNS = ["backbone", "checkpoint", "dataset", "label_ratio"]


def task_values(frame: pd.DataFrame, metric: str = "val_auroc", split: str | None = None) -> pd.DataFrame:
    """One row per task (:data:`TASK_COLUMNS`), one column per method: the value :func:`cells` chose."""
    keyed = frame.assign(checkpoint=checkpoint_labels(frame))
    long = cells(keyed, ["method", "backbone", "checkpoint"], metric, split)
    return long.set_index([*TASK_COLUMNS, "method"])["mean"].astype("float64").unstack("method")


WINS_COLUMNS = ["method", "baseline", "wins", "ties", "losses", "tasks", "best_margin"]


def wins(frame: pd.DataFrame, metric: str = "val_auroc", baseline: str = "full", split: str | None = None
         ) -> pd.DataFrame:
    """Per method, in how many tasks (backbone, checkpoint, dataset, label ratio, where both ran) it
    beats ``baseline``: ``wins``, ``ties``, ``losses``, ``tasks`` and ``best_margin`` (its largest
    lead, in the metric's units). Most wins first; empty when ``baseline`` has no value anywhere."""
    ranking = get_metric(metric)
    values = task_values(frame[frame[metric].notna()], metric, split) if len(frame) else pd.DataFrame()
    if baseline not in values:
        return pd.DataFrame(columns=WINS_COLUMNS)
    records = [_wins_of(method, values[method], values[baseline], baseline, ranking.ascending)
               for method in values.columns if method != baseline]
    table = pd.DataFrame([r for r in records if r[5]], columns=WINS_COLUMNS)
    return table.sort_values(["wins", "method"], ascending=[False, True], kind="stable").reset_index(drop=True)


def _wins_of(method: str, mine: pd.Series, theirs: pd.Series, baseline: str, ascending: bool) -> tuple:
    both = mine.notna() & theirs.notna()
    lead = (theirs - mine if ascending else mine - theirs)[both]
    best_margin = float(lead.max()) if bool((lead > 0).any()) else math.nan
    return (method, baseline, int((lead > 0).sum()), int((lead == 0).sum()), int((lead < 0).sum()), int(both.sum()),
            best_margin)


def wins_lines(table: pd.DataFrame, metric: str = "val_auroc") -> list[str]:
    """:func:`wins` in words: ``lora beats full in 13 of 18 tasks (by up to 0.0290)``."""
    ranking, lines = get_metric(metric), []
    for row in table.itertuples(index=False):
        line = f"{row.method} beats {row.baseline} in {row.wins} of {row.tasks} tasks"
        if row.ties:
            line += f" (ties {row.ties})"
        if row.best_margin == row.best_margin:
            line += f" (by up to {ranking.format(row.best_margin)})"
        lines.append(line)
    return lines


def details_of(value: Any) -> dict[str, Any]:
    """A row's ``details`` as a dict: parsed JSON text, the dict itself, or ``{}`` when absent."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


def _row_gaps(details: dict[str, Any], name: str) -> dict[str, tuple[float, str | None]]:
    """Per attribute: the worst-group gap of ``name`` (as stored, else from the subgroups) and the worst group."""
    stored, subgroups = details.get("worst_group_gap") or {}, details.get("subgroups") or {}
    gaps = {}
    for attribute in sorted({*stored, *subgroups}):
        scores = {group: float(s[name]) for group, s in (subgroups.get(attribute) or {}).items()
                  if _is_number(s.get(name)) and math.isfinite(s[name])}
        gap = (stored.get(attribute) or {}).get(name)
        if gap is None and len(scores) >= 2:
            gap = max(scores.values()) - min(scores.values())
        if _is_number(gap) and math.isfinite(gap):
            gaps[attribute] = (float(gap), _worst(scores, name))
    return gaps


def _worst(scores: dict[str, float], name: str) -> str | None:
    """The group with the worst value of ``name`` (None: no group scores)."""
    if not scores:
        return None
    pick = max if get_metric(_validation_name(name)).ascending else min
    return pick(scores, key=scores.__getitem__)


def _validation_name(name: str) -> str:
    return "val_" + name.split("_", 1)[1]


GAP_COLUMNS = ["method", "dataset", "label_ratio", "attribute", "gap", "gap_std", "seeds", "worst_group", "trial_id"]


def subgroup_gaps(frame: pd.DataFrame, metric: str = "val_auroc") -> pd.DataFrame:
    """Per method, (dataset, label ratio) and attribute: the worst-group gap of the configuration
    chosen there (see :func:`cells`; mean and std over its seeds), on the test split: the best
    group's test value minus the worst group's. ``worst_group`` is the group most often worst.
    Empty when no row has subgroup results (``details``)."""
    name = get_metric(metric).on_split("test")
    if "details" not in frame or frame.empty:
        return pd.DataFrame(columns=GAP_COLUMNS)
    per_row = {int(i): _row_gaps(details_of(d), name) for i, d in zip(frame["id"], frame["details"])}
    records = []
    for cell in cells(frame, ["method"], metric, "val").itertuples(index=False):
        records += _cell_gaps(cell, [per_row.get(i, {}) for i in cell.ids])
    return pd.DataFrame(records, columns=GAP_COLUMNS)


def _cell_gaps(cell: Any, runs: list[dict[str, tuple[float, str]]]) -> list[tuple]:
    records = []
    for attribute in sorted({a for run in runs for a in run}):
        gaps = pd.Series([run[attribute][0] for run in runs if attribute in run], dtype="float64")
        named = pd.Series([run[attribute][1] for run in runs if attribute in run]).dropna()
        worst = named.mode().iloc[0] if len(named) else None
        records.append((cell.method, cell.dataset, cell.label_ratio, attribute, gaps.mean(),
                        gaps.std(ddof=1) if len(gaps) > 1 else math.nan, len(gaps), worst, cell.trial_id))
    return records


def pareto_mask(frame: pd.DataFrame, metric: str = "val_auroc") -> pd.Series:
    """True for the rows no other row of the same (dataset, label ratio) beats on both ``metric``
    and trainable parameters (at least as good on both and better on one)."""
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


def pareto(frame: pd.DataFrame, metric: str = "val_auroc") -> pd.DataFrame:
    """The Pareto front of each (dataset, label ratio): fewest trainable parameters first."""
    front = frame[pareto_mask(frame, metric)]
    return front.sort_values(["dataset", "label_ratio", "trainable_params", "id"], kind="stable").reset_index(drop=True)


def progress(frame: pd.DataFrame, metric: str = "val_auroc") -> pd.DataFrame:
    """Search progress per study (experiment, method, dataset, label ratio), trials in recorded order.

    Columns: the study's columns, ``trial`` (1, 2, ...), ``trial_id``, ``compute_s`` (cumulative
    trial wall time), ``epochs`` (cumulative epochs run), ``metric`` and ``best_so_far``.
    """
    ascending = get_metric(metric).ascending
    columns = [*STUDY_COLUMNS, "trial", "trial_id", "compute_s", "epochs", metric, "best_so_far"]
    parts = []
    for _, group in search_rows(frame).sort_values("id").groupby(STUDY_COLUMNS, sort=True):
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


def importance(frame: pd.DataFrame, metric: str = "val_auroc", min_trials: int = 3) -> pd.DataFrame:
    """How strongly each searched hyperparameter goes with the metric, per method.

    The metric is first turned into its rank within each (method, dataset, label ratio), so that
    easier datasets and larger label ratios do not dominate. A numeric parameter's association is
    the absolute Spearman correlation with that rank (``spearman`` keeps the sign: positive means
    larger values did better); a categorical one's is the correlation ratio (eta) of the rank
    across its choices. Both lie in [0, 1]. Parameters seen in fewer than ``min_trials`` trials,
    or with a single value, are left out.
    """
    ascending = get_metric(metric).ascending
    columns = ["method", "parameter", "kind", "association", "spearman", "trials"]
    rows = search_rows(frame)
    rows = rows[rows[metric].notna()].copy()
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


def _correlation_ratio(categories: pd.Series, score: pd.Series) -> float:
    """eta = sqrt(between-choice variance / total variance) of ``score``."""
    total = float(((score - score.mean()) ** 2).sum())
    if total == 0:
        return 0.0
    means = score.groupby(categories).transform("mean")
    between = float(((means - score.mean()) ** 2).sum())
    return math.sqrt(between / total)


def markdown_table(frame: pd.DataFrame, index: bool = False) -> str:
    """A GitHub-flavoured Markdown table of ``frame``'s values as text ('|' escaped)."""
    data = frame.reset_index() if index else frame
    header = [str(c) for c in data.columns]

    def cell(value: Any) -> str:
        return ("" if value is None else str(value)).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in data.itertuples(index=False, name=None)]
    return "\n".join(lines)
