"""The report's calibration section: each compared configuration's expected calibration error per
class on the split the comparison shows, and a reliability diagram per (dataset, label ratio).

Clinical users ask whether a predicted 0.8 means 80%. For each cell of the comparison table the
chosen configuration's kept predictions (:mod:`medpeft_ray.evaluation.predictions`) give, per seed,
the ECE of every class (one-vs-rest on its probability, 15 equal-width bins) and, for multi-class
data, of the top label; the table shows their means over the seeds. The diagram pools the seeds'
predictions: multi-class data plots the top label's confidence against how often it is right,
multi-label data every class's probability against how often the class is present.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from medpeft_ray.evaluation.calibration import Reliability, calibration, reliability, top_label_outcomes
from medpeft_ray.evaluation.predictions import SplitPredictions
from medpeft_ray.leaderboard import views
from medpeft_ray.leaderboard.evidence import EvidenceSettings, PredictionFiles, task_tests, with_intervals
from medpeft_ray.leaderboard.formatting import MISSING
from medpeft_ray.leaderboard.report_figures import FigureResult, method_colors, panel_grid, to_png
from medpeft_ray.leaderboard.views import StudyTable, cell_label

#: the bins of every ECE and diagram in the report
BINS = 15
CALIBRATION_FIGURE = "calibration"


@dataclass(frozen=True)
class CellCalibration:
    """One compared configuration's calibration in one cell (means over its seeds)."""

    name: str  # the table's row: a method (or backbone, experiment)
    cell: str  # ``dataset @ ratio``
    classes: tuple[str, ...]
    per_class_ece: tuple[float, ...]
    macro_ece: float
    top_label_ece: float | None
    pooled: Reliability  # the diagram's curve, all seeds pooled
    seeds: int


def study_calibration(study: StudyTable, files: PredictionFiles) -> tuple[list[CellCalibration], list[str]]:
    """Every cell's calibration where its rows kept predictions; and, for the others, why not."""
    found, missing = [], []
    if study.cells is None or study.cells.empty:
        return found, missing
    by = study.means.index.name
    for cell in study.cells.to_dict(orient="records"):
        label = cell_label(cell["dataset"], cell["label_ratio"])
        runs = files.of_rows(cell["ids"], cell["split"])
        if isinstance(runs, str):
            missing.append(f"{cell[by]} at {label}: {runs}")
            continue
        found.append(_cell_calibration(str(cell[by]), label, runs))
    return found, missing


def _cell_calibration(name: str, cell: str, runs: list[SplitPredictions]) -> CellCalibration:
    each = [calibration(run.labels, run.scores, run.multilabel, BINS) for run in runs]
    per_class = tuple(float(np.nanmean(values)) if not np.isnan(values).all() else math.nan
                      for values in np.array([c.per_class_ece for c in each], dtype=np.float64).T)
    tops = [c.top_label_ece for c in each if c.top_label_ece is not None]
    return CellCalibration(name, cell, runs[0].classes, per_class, float(np.mean([c.macro_ece for c in each])),
                           float(np.mean(tops)) if tops else None, _pooled(runs), len(runs))


def _pooled(runs: list[SplitPredictions]) -> Reliability:
    """The diagram's data over every seed: top label (multi-class) or every known (image, class)."""
    outcomes, confidences = [], []
    for run in runs:
        if run.multilabel:
            known = ~np.isnan(run.labels)
            outcomes.append(run.labels[known] > 0.5)
            confidences.append(run.scores[known])
        else:
            right, confidence = top_label_outcomes(run.labels, run.scores)
            outcomes.append(right)
            confidences.append(confidence)
    return reliability(np.concatenate(outcomes), np.concatenate(confidences), BINS)


def calibration_figure(found: list[CellCalibration], split: str) -> FigureResult:
    """A reliability diagram per cell, a line per compared configuration; the diagonal is perfect."""
    title = "Calibration: reliability diagrams"
    caption = (f"Per (dataset, label ratio), each configuration's predicted probability against the observed "
               f"frequency on the {split} split ({BINS} equal-width bins, seeds pooled; multi-class: the top "
               "label's probability and whether it is right; multi-label: every class's probability and whether "
               "the class is present). The dashed diagonal is perfect calibration; the legend gives the macro ECE.")
    if not found:
        return FigureResult(CALIBRATION_FIGURE, title, caption, None, "no compared configuration kept predictions")
    cells = sorted({c.cell for c in found})
    colors = method_colors([c.name for c in found])
    fig, axes = panel_grid(len(cells))
    for ax, cell in zip(axes, cells):
        ax.plot([0, 1], [0, 1], linestyle="--", color="#999999", linewidth=1)
        for entry in (c for c in found if c.cell == cell):
            filled = entry.pooled.count > 0
            ax.plot(entry.pooled.confidence[filled], entry.pooled.frequency[filled], marker="o", markersize=3,
                    color=colors[entry.name], label=f"{entry.name} (ECE {entry.macro_ece:.3f})")
        ax.set(title=cell, xlabel="predicted probability", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1))
        ax.legend(fontsize=8, loc="upper left")
    return FigureResult(CALIBRATION_FIGURE, title, caption, to_png(fig))


def calibration_html(found: list[CellCalibration], missing: list[str], split: str) -> str:
    """The ECE table: per cell and configuration, the macro and top-label ECE and each class's."""
    if not found and not missing:
        return ""
    parts = ["<h2>Calibration</h2>",
             f'<p class="meta">Expected calibration error on the {html.escape(split)} split ({BINS} equal-width bins; '
             "per class one-vs-rest on its probability; top label: multi-class only), the mean over the "
             "configuration's seeds. 0 is perfect.</p>"]
    if found:
        head = ('<tr><th class="name">cell</th><th class="name">configuration</th><th>seeds</th><th>macro ECE</th>'
                '<th>top-label ECE</th><th class="name">per class</th></tr>')
        rows = []
        for c in sorted(found, key=lambda c: (c.cell, c.name)):
            per_class = ", ".join(f"{name} {_ece(value)}" for name, value in zip(c.classes, c.per_class_ece))
            rows.append(f'<tr><td class="name">{html.escape(c.cell)}</td><td class="name">{html.escape(c.name)}</td>'
                        f"<td>{c.seeds}</td><td>{_ece(c.macro_ece)}</td><td>{_ece(c.top_label_ece)}</td>"
                        f'<td class="name">{html.escape(per_class)}</td></tr>')
        parts.append(f'<table class="calibration">{head}{"".join(rows)}</table>')
    parts += [f'<p class="missing">No calibration for {html.escape(line)}</p>' for line in missing]
    return "\n".join(parts)


@dataclass
class ReportEvidence:
    """What the report's comparison rests on, computed once: the study table with its intervals,
    the paired tests against the baseline, and the calibration of each compared configuration."""

    study: StudyTable
    tests: pd.DataFrame
    settings: EvidenceSettings
    calibration: list[CellCalibration]
    without_calibration: list[str]

    @property
    def figure(self) -> FigureResult:
        return calibration_figure(self.calibration, self.study.split)


def report_evidence(frame: pd.DataFrame, metric: str, split: str | None, baseline: str,
                    settings: EvidenceSettings) -> ReportEvidence:
    """The comparison of ``frame``'s rows on ``metric`` with intervals, tests and calibration."""
    files = PredictionFiles(frame)
    study = with_intervals(views.study_table(frame, metric=metric, split=split), frame, settings, files)
    tests = task_tests(frame, metric, baseline, study.split, settings, files)
    found, missing = study_calibration(study, files)
    return ReportEvidence(study, tests, settings, found, missing)


def _ece(value: float | None) -> str:
    return MISSING if value is None or not math.isfinite(value) else f"{value:.3f}"
