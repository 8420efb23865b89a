"""The leaderboard as the ``leaderboard`` command shows it: rows, a comparison of methods, wins.

Each function takes the store's rows or a view of them and returns a :class:`Rendered`: the text a
script reads (JSON, CSV, Markdown: printed as is), or the tables and lines a person reads in a
terminal (a rich ``Table`` fitted to its width, see :mod:`~medpeft_ray.leaderboard.tables`). Nothing
here prints; every value is written by :mod:`~medpeft_ray.leaderboard.formatting`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from rich import box
from rich.markup import escape
from rich.table import Table

from medpeft_ray.errors import UsageError
from medpeft_ray.leaderboard import views
from medpeft_ray.leaderboard.board import LeaderboardStore
from medpeft_ray.leaderboard.evidence import EvidenceSettings, PredictionFiles, task_tests, with_intervals
from medpeft_ray.leaderboard.evidence import verdict_lines as evidence_lines
from medpeft_ray.leaderboard.formatting import cell_text, header, metric_of, plain, study_text
from medpeft_ray.leaderboard.store import lower_is_better
from medpeft_ray.leaderboard.tables import Column, fit_table
from medpeft_ray.metrics import METRICS, get_metric

#: The output formats: a table for people, the others for scripts and documents.
FORMATS = ("table", "json", "csv", "markdown")
#: The comparisons ``--compare`` makes: rows of methods, backbones or experiments.
COMPARISONS = ("methods", "backbones", "experiments")

#: Always shown, at full width: what rows are compared on.
_COMPARED = ("label_ratio", "method", "trainable_params", "status", "wall_time_s")
#: Which rows are which when they differ (shown in the title when every row has one value), then the
#: hyperparameters; then the rest, the first of them kept longest on a narrow terminal.
_PRIORITY = {"dataset": 1.0, "backbone": 1.1, "experiment": 1.2, "checkpoint_sha256": 1.3, "params": 2.0,
             "role": 4.0, "seed": 4.1, "best_epoch": 6.0, "epochs_run": 6.1}


@dataclass
class Rendered:
    """What a command prints: ``text`` for scripts (complete lines, printed as is), then ``shown``
    for a terminal (rich tables, and lines of plain text that are not rich markup)."""

    text: str = ""
    shown: list[Table | str] = field(default_factory=list)

    def __add__(self, other: Rendered) -> Rendered:
        return Rendered(self.text + other.text, [*self.shown, *other.shown])


def _check_format(output: str) -> str:
    if output not in FORMATS:
        raise UsageError(f"no output format {output!r}; formats: {', '.join(FORMATS)}")
    return output


def leaderboard_view(store: LeaderboardStore, filters: dict[str, Any], *, sort: str | None = None,
                     top: int | None = None, group_by: Sequence[str] | None = None, compare: str | None = None,
                     pareto: bool = False, split: str | None = None, baseline: str = "full", output: str = "table",
                     columns: Sequence[str] | None = None, width: int = 80,
                     evidence: EvidenceSettings | None = None, also: str | None = None) -> Rendered:
    """The rows of ``store`` matching ``filters`` as one view, rendered for ``output``.

    The view: the rows best first by ``sort`` (default: the store's metric), the best of each
    ``group_by`` group, the Pareto front, or with ``compare`` (one of :data:`COMPARISONS`) the
    studies' comparison table followed by each method's wins against ``baseline``. ``top`` keeps
    the best rows; ``columns`` chooses the rows' columns (default: those that fit ``width``).

    A comparison has each cell's confidence interval and, per task, each method's paired test
    against ``baseline`` where the rows kept their predictions (``evidence``: the level, the
    correction and the resamples; None: the defaults of :class:`EvidenceSettings`). ``also`` puts
    another metric's values of the same chosen configurations beside each cell's (the benchmark
    papers' layout: AUC and ACC per dataset).
    """
    _check_format(output)
    sort = sort or store.default_metric(**filters)
    if compare is not None:
        if compare not in COMPARISONS:
            raise UsageError(f"cannot compare {compare!r}; compare {', '.join(COMPARISONS)}")
        settings = evidence or EvidenceSettings()
        rows = store.query(**filters)
        study = views.study_table(rows, by=compare.removesuffix("s"), metric=sort, split=split)
        files = PredictionFiles(rows)
        study = with_intervals(top_rows(study, top), rows, settings, files)
        store_empty = study.means.empty and store.count() == 0
        if also is not None:
            study = dataclasses.replace(study, means=beside(study, views.companion(study, rows, also), also))
        shown = comparison(study, output, sort, store_empty)
        if study.means.index.name == "method":
            won = views.wins(rows, sort, baseline, study.split)
            shown += wins(won, output, sort, tests=task_tests(rows, sort, baseline, study.split, settings, files),
                          settings=settings)
        return fitted_lines(shown, width)
    if pareto:
        frame = views.pareto(store.query(**filters), metric=sort)
    elif group_by is not None:
        frame = views.best_per_group(store.query(**filters), list(group_by), metric=sort)
    else:
        frame = store.query(**filters, metric=sort, ascending=lower_is_better(sort), top=top)
    frame = frame.head(top) if top is not None else frame
    store_empty = frame.empty and store.count() == 0
    return trial_rows(frame, output, store_empty, sort, columns, width)


def beside(study: views.StudyTable, other: pd.DataFrame, also: str) -> pd.DataFrame:
    """The study's means with ``other`` (another metric's values of the same configurations) as a
    column after each cell's, named ``<cell> <metric>`` (``dermamnist @ 1 test_accuracy``)."""
    name = get_metric(also).on_split(study.split)
    columns = {}
    for cell in (c for c in study.means.columns if c != "mean_rank"):
        columns[cell] = study.means[cell]
        columns[f"{cell} {name}"] = other[cell] if cell in other else float("nan")
    return study.means[[]].assign(**columns, mean_rank=study.means["mean_rank"])


def fitted_lines(rendered: Rendered, width: int) -> Rendered:
    """``rendered`` with its lines of text wrapped at ``width`` (a long note stays on the screen, in
    words, rather than running past the terminal's edge)."""
    shown: list[Table | str] = []
    for item in rendered.shown:
        if isinstance(item, str) and len(item) > width:
            shown.append("\n".join(textwrap.wrap(item, width, subsequent_indent="  ", break_on_hyphens=False)))
        else:
            shown.append(item)
    return Rendered(rendered.text, shown)


def trial_rows(frame: pd.DataFrame, output: str = "table", store_empty: bool = False, sort: str = "val_auroc",
               chosen: Sequence[str] | None = None, width: int = 80) -> Rendered:
    """Trials, one per row: every column (or the ``chosen`` ones) for scripts; for a terminal, the
    compared columns, the metrics and what fits ``width`` (see :func:`row_column`)."""
    chosen = None if chosen is None else list(chosen)
    if chosen is not None:
        check_columns(chosen, frame)
    if _check_format(output) == "json":
        # missing metrics are NaN in the DataFrame and null in JSON (NaN is not valid JSON)
        picked = frame if chosen is None else frame[chosen]
        records = [{k: plain(v) for k, v in r.items()} for r in picked.to_dict(orient="records")]
        return Rendered(json.dumps(records, indent=1, default=str) + "\n")
    if output == "csv":
        flat = frame.assign(config=frame["config"].map(json.dumps), params=frame["params"].map(json.dumps))
        return Rendered((flat if chosen is None else flat[chosen]).to_csv(index=False))
    if frame.empty:
        return Rendered(shown=["No trials recorded yet." if store_empty else "No trials match."])
    columns = ["experiment", "dataset", "label_ratio", "method", "backbone", *metric_columns(frame, sort),
               "best_epoch", "epochs_run", "trainable_params", "params", "status", "wall_time_s"]
    if sort not in columns:
        columns.insert(columns.index("best_epoch"), sort)  # the column the rows are ordered by is shown
    if "role" in frame and (frame["role"] == "confirmation").any():  # which rows re-train a configuration
        frame = frame.assign(role=frame["role"].fillna("search"), seed=frame.get("seed"))
        columns[columns.index("status"):columns.index("status")] = ["role", "seed"]
    labels = views.checkpoint_labels(frame)
    if labels.nunique() > 1 or (chosen is not None and "checkpoint_sha256" in chosen):
        # trials from different pre-trained weights: say which is which
        frame = frame.assign(checkpoint_sha256=labels)
        if labels.nunique() > 1:
            columns.insert(columns.index("backbone") + 1, "checkpoint_sha256")
    columns = columns if chosen is None else chosen
    rows = [[cell_text(column, row[column]) for column in columns] for row in frame.to_dict(orient="records")]
    if output == "markdown":
        return Rendered(views.markdown_table(pd.DataFrame(rows, columns=[header(c) for c in columns])) + "\n")
    text = pd.DataFrame(rows, columns=columns)
    return Rendered(shown=[fit_table(text, [row_column(c, sort) for c in columns], width,
                                     title="medpeft-ray leaderboard", explicit=chosen is not None)])


def row_column(name: str, sort: str) -> Column:
    """How the leaderboard's table shows column ``name`` (see :mod:`~medpeft_ray.leaderboard.tables`)."""
    metric = metric_of(name)
    right = name in ("trainable_params", "total_params", "wall_time_s", "seed") or metric is not None
    if name == sort or name in _COMPARED:
        priority = 0.0
    elif metric is not None:
        # the sort metric's test value, then the other metrics in the registry's order
        test = METRICS[sort].on_split("test") if sort in METRICS else None
        priority = 3.0 if name == test else 5.0 + list(METRICS).index(metric.name) / 100
    else:
        priority = _PRIORITY.get(name, 7.0)
    fold = name in ("experiment", "dataset", "backbone", "params", "config", "error", "checkpoint")
    return Column(name, header(name), right=right, fold=fold, priority=priority,
                  lift=name in ("experiment", "dataset", "backbone"))


def check_columns(chosen: Sequence[str], frame: pd.DataFrame) -> None:
    """Raises UsageError for a chosen column the rows do not have (naming the closest), or for none."""
    known = list(frame.columns)
    unknown = [c for c in chosen if c not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UsageError(f"--columns: unknown column {unknown[0]!r}{hint}; known: {', '.join(known)}")
    if not chosen:
        raise UsageError("--columns: give at least one column, e.g. --columns method,val_auroc")


def metric_columns(frame: pd.DataFrame, sort: str) -> list[str]:
    """The sort metric, each other validation metric some row has, and the sort metric's test column
    if some row has it."""
    shown = [name for name in METRICS if name == sort or (name in frame and frame[name].notna().any())]
    test = METRICS[sort].on_split("test") if sort in METRICS else None
    return shown + ([test] if test in frame and frame[test].notna().any() else [])


def top_rows(study: views.StudyTable, top: int | None) -> views.StudyTable:
    """The study table's best ``top`` rows (all with None)."""
    if top is None:
        return study
    return dataclasses.replace(study, means=study.means.head(top), std=study.std.head(top), seeds=study.seeds.head(top))


def comparison_records(study: views.StudyTable) -> pd.DataFrame:
    """The table for JSON and CSV: means and mean rank; ``<cell> low`` and ``<cell> high`` (the
    confidence interval) where some cell has one, ``<cell> std`` and ``<cell> seeds`` where some
    configuration ran with several seeds."""
    table = study.means
    intervals = study.low is not None and study.high is not None and bool(study.low.notna().to_numpy().any())
    if not study.several_seeds and not intervals:
        return table
    cells = [c for c in table.columns if c != "mean_rank"]
    columns = {}
    for cell in cells:
        columns[cell] = table[cell]
        if cell not in study.std:  # another metric's values beside the cells (--also)
            continue
        if intervals:
            columns.update({f"{cell} low": study.low[cell], f"{cell} high": study.high[cell]})
        if study.several_seeds:
            columns.update({f"{cell} std": study.std[cell], f"{cell} seeds": study.seeds[cell]})
    return table[[]].assign(**columns, mean_rank=table["mean_rank"])


def comparison(study: views.StudyTable, output: str, metric: str, store_empty: bool = False) -> Rendered:
    """Methods as rows, (dataset, label ratio) cells (mean ± std over confirmation seeds), mean rank;
    the best value of each column in bold."""
    table = study.means
    by = table.index.name
    if _check_format(output) == "json":
        # column by column, so that seed counts stay integers beside the float means
        records = [{k: plain(v) for k, v in row.items()}
                   for row in comparison_records(study).reset_index().to_dict(orient="records")]
        return Rendered(json.dumps(records, indent=1) + "\n")
    if output == "csv":
        return Rendered(comparison_records(study).to_csv())
    if table.empty:
        return Rendered(shown=["No trials recorded yet." if store_empty else f"No trial with a {metric} matches."])
    ranking = get_metric(metric)
    cells = [c for c in table.columns if c != "mean_rank"]
    best = table[cells].min() if ranking.ascending else table[cells].max()
    text = study_text(study)
    if output == "markdown":
        for column in cells:
            text.loc[table[column] == best[column], column] = text[column].map(lambda s: f"**{s}**")
        return Rendered(views.markdown_table(text.rename_axis(by), index=True) + "\n")
    # no vertical rules (as the leaderboard's rows): ten more characters for the cells at 80 columns
    rich_table = Table(title=f"{study.column} per (dataset, label ratio)", box=box.SIMPLE_HEAD, show_edge=False,
                       pad_edge=False, padding=(0, 1, 0, 0))
    # a squeezed cell wraps (rich would otherwise cut it to "0.…")
    rich_table.add_column(by, overflow="fold")
    for column in [*cells, "mean rank"]:
        rich_table.add_column(column, justify="right", overflow="fold")
    for name, row in text.iterrows():
        marked = [f"[bold]{row[c]}[/bold]" if table.at[name, c] == best[c] else row[c] for c in cells]
        rich_table.add_row(escape(str(name)), *marked, row["mean rank"])
    return Rendered(shown=[rich_table, *comparison_notes(study)])


def comparison_notes(study: views.StudyTable) -> list[str]:
    """What the comparison's cells hold, e.g. ``test_auroc of the configuration chosen on val_auroc ...``,
    then what the intervals are."""
    ranking = get_metric(study.metric)
    spread = " (mean ± std over confirmation seeds)" if study.several_seeds else ""
    if study.low is not None and study.low.notna().to_numpy().any():
        spread = " (mean over confirmation seeds)" if study.several_seeds else ""
    if study.column == study.metric:
        first = f"cells: best {ranking.title}{spread}; bold: best in the column"
    else:
        first = f"cells: {study.column}{spread} of the configuration chosen on {ranking.title}; bold: best in the column"
    return [first, study.interval_note] if study.interval_note else [first]


def wins(table: pd.DataFrame | None, output: str, metric: str, tests: pd.DataFrame | None = None,
         settings: EvidenceSettings | None = None) -> Rendered:
    """Under the table (not in JSON or CSV, which scripts read): per method, the paired tests'
    verdicts against the baseline (``lora vs full: 7 better, 2 worse, 9 not distinguishable of 18
    tasks``) where the rows kept predictions, and the point estimates' count (``lora beats full in 13
    of 18 tasks``)."""
    if table is None or _check_format(output) in ("json", "csv"):
        return Rendered()
    lines = []
    if tests is not None and len(tests) and (tests["verdict"] != "").any():
        lines += evidence_lines(tests, metric, settings or EvidenceSettings())
        lines += [f"(point estimates: {line})" for line in views.wins_lines(table, metric)]
    else:
        lines += views.wins_lines(table, metric)
    if not lines:
        return Rendered()
    if output == "markdown":
        return Rendered("\n" + "\n".join(f"- {line}" for line in lines) + "\n")
    return Rendered(shown=lines)


def best_summary(row: dict[str, Any], metric: str) -> str:
    """``best lora on nih at label ratio 0.01: val_auroc 0.8120 (experiment e, trial t)``."""
    value = get_metric(metric).format(row[metric])
    return (f"best {row['method']} on {row['dataset']} at label ratio {row['label_ratio']:g}: {metric} {value} "
            f"(experiment {row['experiment']}, trial {row['trial_id']})")
