"""Intervals and paired tests for the comparisons: what the leaderboard's rows' predictions support.

:mod:`~medpeft_ray.leaderboard.views` chooses each cell's configuration on validation and averages
its seeds (:func:`~medpeft_ray.leaderboard.views.cells`); this module reads the per-image
predictions those rows point to (:mod:`medpeft_ray.evaluation.predictions`) and adds:

- each cell's bootstrap confidence interval (:func:`cell_intervals`): patients resampled where the
  dataset has patient ids, every seed scored on the same resample, the seed-mean's interval;
- per task, each method against a baseline (:func:`task_tests`): DeLong's test for AUROC, a paired
  permutation test for F1 and the accuracies, p-values corrected over a method's tasks (Holm by
  default, or Benjamini-Hochberg), and a verdict at ``alpha``: better, worse or not distinguishable.

A cell whose rows kept no predictions (rows older than schema 6, a metric without per-image values
such as the loss, a file that is gone or from another epoch) has no interval and no test, and says
why: nothing is guessed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from medpeft_ray.errors import MedpeftError, UsageError
from medpeft_ray.evaluation.intervals import bootstrap_interval
from medpeft_ray.evaluation.paired import adjust, paired_test, verdict
from medpeft_ray.evaluation.predictions import SplitPredictions, check_paired, read_predictions
from medpeft_ray.leaderboard.formatting import interval_text
from medpeft_ray.leaderboard.views import (
    TASK_COLUMNS,
    StudyTable,
    cell_label,
    cells,
    checkpoint_labels,
    confirmation_seeds,
    wide,
)
from medpeft_ray.metrics import get_metric
from medpeft_ray.storage import cache_root, filesystem

#: the corrections for many comparisons ``--correction`` takes
CORRECTIONS = ("holm", "bh", "none")
CORRECTION_NAMES = {"holm": "Holm", "bh": "Benjamini-Hochberg", "none": "no correction"}
#: what a task's comparison with the baseline can conclude (and the counts' order in a line)
VERDICTS = ("better", "worse", "not distinguishable")


@dataclass(frozen=True)
class EvidenceSettings:
    """How intervals and tests are made: ``alpha`` (the intervals' level is 1 - alpha), the
    correction over a method's tasks, the bootstrap resamples and the random seed."""

    alpha: float = 0.05
    correction: str = "holm"
    resamples: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 0.5:
            raise UsageError(f"--alpha: {self.alpha:g} is not between 0 and 0.5 (e.g. 0.05)")
        if self.correction not in CORRECTIONS:
            raise UsageError(f"--correction: no correction {self.correction!r}; corrections: {', '.join(CORRECTIONS)}")
        if self.resamples < 100:
            raise UsageError(f"--resamples: {self.resamples} is too few for an interval (at least 100)")

    @property
    def level(self) -> float:
        return 1 - self.alpha


class IntervalCache:
    """Intervals computed before, on this machine: ``<cache>/intervals/<key>.json`` (the decode
    cache's folder, ``$MEDPEFT_CACHE``). An AUROC interval of a 25,000-image test split takes
    seconds per cell; a kept prediction file does not change once its row is final, so its
    interval is kept too. The key is the files (path, size, modification time), the metric and the
    settings: a rewritten file (a trial run again) is a new key. Best effort: a cache that cannot be
    read or written is recomputed, never an error."""

    VERSION = 1

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = (folder or cache_root()) / "intervals"

    def key(self, runs: Sequence[SplitPredictions], metric: str, settings: EvidenceSettings) -> str | None:
        try:
            files = [[run.source, *_identity(run.source)] for run in runs]
        except (OSError, MedpeftError):
            return None
        text = json.dumps([self.VERSION, files, metric, settings.level, settings.resamples, settings.seed])
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, key: str | None) -> dict[str, Any] | None:
        if key is None:
            return None
        try:
            return json.loads((self.folder / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None

    def put(self, key: str | None, value: dict[str, Any]) -> None:
        if key is None:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            partial = self.folder / f"{key}.json.partial"
            partial.write_text(json.dumps(value))
            partial.replace(self.folder / f"{key}.json")
        except OSError:
            pass


def _identity(source: str) -> tuple[int, int]:
    """A stored file's size and modification time (ns), wherever it lies."""
    fs, path = filesystem(source)
    info = fs.get_file_info(path)
    return int(info.size or 0), int(info.mtime_ns or 0)


@dataclass
class PredictionFiles:
    """Reads each row's predictions once (by leaderboard id) and says why a row has none; its
    ``cache`` keeps the intervals computed from them."""

    frame: pd.DataFrame
    read: dict[tuple[int, str], SplitPredictions | str] = field(default_factory=dict)
    cache: IntervalCache = field(default_factory=IntervalCache)

    def of_row(self, row_id: int, split: str) -> SplitPredictions | str:
        """Row ``row_id``'s predictions on ``split``, or why there are none."""
        key = (row_id, split)
        if key not in self.read:
            self.read[key] = self._load(row_id, split)
        return self.read[key]

    def of_rows(self, ids: Sequence[int], split: str) -> list[SplitPredictions] | str:
        """Every row's predictions on ``split`` (one configuration's seeds, same images), or why not."""
        runs = [self.of_row(int(i), split) for i in ids]
        missing = [r for r in runs if isinstance(r, str)]
        if missing:
            return missing[0]
        found = [r for r in runs if isinstance(r, SplitPredictions)]
        try:
            for other in found[1:]:
                check_paired(found[0], other)
        except MedpeftError as exc:
            return str(exc)
        return found

    def _load(self, row_id: int, split: str) -> SplitPredictions | str:
        row = self.frame.loc[self.frame["id"] == row_id]
        if row.empty:
            return f"row {row_id} is not in the leaderboard"
        record = row.iloc[0]
        folder = record.get("predictions")
        if not isinstance(folder, str) or not folder:
            return f"trial {record['trial_id']} kept no predictions (recorded before they were kept)"
        try:
            found = read_predictions(folder, split)
        except MedpeftError as exc:
            return str(exc)
        epoch = record.get("best_epoch")
        if epoch is not None and not pd.isna(epoch) and int(epoch) != found.epoch:
            return (f"{found.source}: predictions of epoch {found.epoch}, but trial {record['trial_id']}'s best "
                    f"epoch is {int(epoch)}")
        return found


def _metric_column(metric: str, split: str) -> str:
    return get_metric(metric).on_split(split)


def cell_intervals(long: pd.DataFrame, metric: str, settings: EvidenceSettings, files: PredictionFiles
                   ) -> pd.DataFrame:
    """The cells of :func:`~medpeft_ray.leaderboard.views.cells` (``long``) with each cell's interval:
    ``low``, ``high``, ``unit`` (patients or images), ``units`` and ``why`` (why there is none, else "")."""
    records = [{**cell, **interval_of(cell, metric, settings, files)} for cell in long.to_dict(orient="records")]
    return pd.DataFrame(records, columns=[*long.columns, "low", "high", "unit", "units", "why"])


def with_intervals(study: StudyTable, frame: pd.DataFrame, settings: EvidenceSettings,
                   files: PredictionFiles | None = None) -> StudyTable:
    """``study`` (made from ``frame``'s rows) with each cell's interval and the note saying what they are."""
    if study.cells is None or study.cells.empty:
        return study
    by = study.means.index.name
    intervals = cell_intervals(study.cells, study.metric, settings, files or PredictionFiles(frame))
    order = study.means.index
    low = wide(intervals, by, "low").astype("float64").reindex(order)
    high = wide(intervals, by, "high").astype("float64").reindex(order)
    note = interval_note(intervals, settings, study.several_seeds)
    return dataclasses.replace(study, low=low, high=high, interval_note=note)


def interval_of(cell: dict, metric: str, settings: EvidenceSettings, files: PredictionFiles) -> dict:
    """One cell's interval (``cell``: its rows' ``ids`` and its ``split``), from the cache when it was
    computed before: ``low``, ``high``, ``unit``, ``units`` and ``why`` (why none, else "")."""
    none = {"low": math.nan, "high": math.nan, "unit": "", "units": 0}
    if get_metric(metric).compute is None or not get_metric(metric).per_subgroup:
        return {**none, "why": f"{get_metric(metric).title} has no per-image values"}
    runs = files.of_rows(cell["ids"], cell["split"])
    if isinstance(runs, str):
        return {**none, "why": runs}
    column = _metric_column(metric, cell["split"])
    key = files.cache.key(runs, column, settings)
    found = files.cache.get(key)
    if found is not None:
        return found
    try:
        interval = bootstrap_interval(runs, column, level=settings.level, resamples=settings.resamples,
                                      seed=settings.seed)
    except MedpeftError as exc:  # a metric not defined for the data's task: said in the cell, not raised
        return {**none, "why": str(exc)}
    found = {"low": interval.low, "high": interval.high, "unit": interval.unit, "units": interval.units,
             "why": "" if interval.defined else (interval.note or "the interval is not defined on these images")}
    files.cache.put(key, found)
    return found


def best_interval(frame: pd.DataFrame, trial: dict[str, Any], metric: str, settings: EvidenceSettings) -> str:
    """The interval line ``best`` prints for a search ``trial`` (a row of ``frame``): its
    confirmation seeds' test value where it was confirmed, else its own validation value, e.g.
    ``test_auroc 0.8123, 95% interval [0.7901, 0.8302] (2 seeds, resampling 300 patients)``."""
    seeds = confirmation_seeds(frame, trial)
    ids, split = (list(seeds["id"]), "test") if len(seeds) else ([int(trial["id"])], "val")
    column = _metric_column(metric, split)
    values = pd.to_numeric((seeds if len(seeds) else frame[frame["id"] == trial["id"]])[column], errors="coerce")
    cell = {"ids": ids, "split": split}
    found = interval_of(cell, metric, settings, PredictionFiles(frame))
    shown = get_metric(metric)
    head = f"{column} {shown.format(values.mean())}" if values.notna().any() else column
    if found["why"]:
        return f"{head}: no interval ({found['why']})"
    return (f"{head}, {settings.level:.0%} interval {interval_text(metric, found['low'], found['high'])} "
            f"({len(ids)} seed(s), resampling {found['units']:,} {found['unit']}, {settings.resamples} resamples)")


#: one row per (method, task) of :func:`task_tests`
TEST_COLUMNS = ["method", "baseline", *TASK_COLUMNS, "task", "column", "value", "baseline_value", "difference",
                "p_value", "p_adjusted", "verdict", "test", "why", "per_class"]


def task_tests(frame: pd.DataFrame, metric: str, baseline: str, split: str | None,
               settings: EvidenceSettings, files: PredictionFiles | None = None) -> pd.DataFrame:
    """Each method against ``baseline`` in every task both ran (:data:`~medpeft_ray.leaderboard.views.TASK_COLUMNS`):
    the paired test on the chosen configurations' predictions, its p-value corrected over the
    method's tasks, and the verdict at ``settings.alpha`` (:data:`VERDICTS`; "" with ``why`` where
    the predictions do not allow a test)."""
    rows = frame[frame[metric].notna()]
    if rows.empty:
        return pd.DataFrame(columns=TEST_COLUMNS)
    keyed = rows.assign(checkpoint=checkpoint_labels(rows))
    long = cells(keyed, ["method", "backbone", "checkpoint"], metric, split)
    if long.empty or baseline not in set(long["method"]):
        return pd.DataFrame(columns=TEST_COLUMNS)
    files = files or PredictionFiles(frame)
    by_task = {tuple(c[k] for k in TASK_COLUMNS): c for c in long[long["method"] == baseline].to_dict("records")}
    records = []
    for cell in long[long["method"] != baseline].to_dict(orient="records"):
        task = tuple(cell[k] for k in TASK_COLUMNS)
        if task in by_task:
            records.append(_test_of(cell, by_task[task], metric, files, settings))
    table = pd.DataFrame(records, columns=TEST_COLUMNS)
    return _corrected(table, metric, settings)


def _test_of(cell: dict, base: dict, metric: str, files: PredictionFiles, settings: EvidenceSettings) -> dict:
    record = {"method": cell["method"], "baseline": base["method"], **{k: cell[k] for k in TASK_COLUMNS},
              "task": cell_label(cell["dataset"], cell["label_ratio"]),
              "column": _metric_column(metric, cell["split"]), "value": cell["mean"],
              "baseline_value": base["mean"], "difference": cell["mean"] - base["mean"],
              "p_value": math.nan, "test": "", "why": "", "per_class": None}
    if get_metric(metric).compute is None or not get_metric(metric).per_subgroup:
        return {**record, "why": f"{get_metric(metric).title} has no per-image values"}
    mine, theirs = files.of_rows(cell["ids"], cell["split"]), files.of_rows(base["ids"], base["split"])
    for runs in (mine, theirs):
        if isinstance(runs, str):
            return {**record, "why": runs}
    try:
        check_paired(theirs[0], mine[0])
    except MedpeftError as exc:
        return {**record, "why": str(exc)}
    try:
        result = paired_test(mine, theirs, _metric_column(metric, cell["split"]), seed=settings.seed)
    except MedpeftError as exc:  # a metric not defined for the data's task: said in the row, not raised
        return {**record, "why": str(exc)}
    # AUROC: each class's own DeLong test beside the macro one (uncorrected: for reading, not verdicts)
    per_class = ({name: [one.difference, one.p_value] for name, one in result.per_class.items()}
                 if result.per_class else None)
    return {**record, "difference": result.difference, "p_value": result.p_value, "test": result.test,
            "per_class": per_class}


def _corrected(table: pd.DataFrame, metric: str, settings: EvidenceSettings) -> pd.DataFrame:
    """Adds each method's corrected p-values (its family: its tasks) and the verdicts."""
    direction = get_metric(metric).direction
    table["p_adjusted"] = math.nan
    table["verdict"] = ""
    for _, group in table.groupby("method", sort=False):
        adjusted = adjust(group["p_value"].tolist(), settings.correction)
        table.loc[group.index, "p_adjusted"] = adjusted
    tested = table["p_adjusted"].notna()
    table.loc[tested, "verdict"] = [
        verdict(d, p, settings.alpha, direction) for d, p in zip(table.loc[tested, "difference"],
                                                                  table.loc[tested, "p_adjusted"])]
    return table


def verdict_lines(tests: pd.DataFrame, metric: str, settings: EvidenceSettings) -> list[str]:
    """Per method: ``lora vs full: 7 better, 2 worse, 9 not distinguishable of 18 tasks``, then how
    (the tests, the correction and alpha) and the tasks without a test."""
    lines = []
    for method, group in tests.groupby("method", sort=True):
        counts = group["verdict"].value_counts()
        untested = int((group["verdict"] == "").sum())
        line = (f"{method} vs {group['baseline'].iloc[0]}: "
                + ", ".join(f"{int(counts.get(v, 0))} {v}" for v in VERDICTS) + f" of {len(group)} tasks")
        if untested:
            line += f" ({untested} without predictions to test)"
        lines.append(line)
    if lines:
        tests_used = sorted({t for t in tests["test"] if t})
        lines.append(f"({', '.join(tests_used) or 'no test'} on {tests['column'].iloc[0]}"
                     f" per task; p-values corrected over each method's tasks by "
                     f"{CORRECTION_NAMES[settings.correction]}; alpha {settings.alpha:g})")
    return lines


def interval_note(intervals: pd.DataFrame, settings: EvidenceSettings, several_seeds: bool = True) -> str:
    """What the intervals are: level, of what (the seed mean where configurations ran several
    seeds), resampling unit, resamples; and how many cells have none."""
    have = intervals[intervals["why"] == ""]
    units = sorted({u for u in have["unit"] if u})
    missing = len(intervals) - len(have)
    reasons = intervals.loc[intervals["why"] != "", "why"]
    if have.empty:
        return f"no intervals: {reasons.iloc[0]}" if missing else ""
    text = (f"[low, high]: {settings.level:.0%} bootstrap interval{' of the seed mean' if several_seeds else ''}, "
            f"resampling {' or '.join(units)} ({settings.resamples} resamples)")
    return text + (f"; {missing} cell(s) without: {reasons.iloc[0]}" if missing else "")


