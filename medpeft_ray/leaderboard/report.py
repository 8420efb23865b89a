"""A self-contained HTML report of one or more experiments, with PNG figures made by matplotlib.

``write_report(store, ["exp"], "report/")`` writes ``report/index.html`` (figures embedded as
data URIs, so the file alone opens anywhere; no script, font or stylesheet from the network) and
the same figures as PNG files beside it. The page's comparison table is the studies' layout
(methods x (dataset, label ratio), mean ± std over confirmation seeds, mean rank), followed by each
method's paired tests against full fine-tuning (better, worse or not distinguishable per task, with
bootstrap intervals in the cells) and, when trials scored subgroups, their worst-group gaps.
Figures:

- ``metric_vs_ratio.png``: the best metric of each method against the label ratio;
- ``pareto.png``: metric against trainable parameters, the Pareto front per (dataset, ratio);
- ``progress.png``: best-so-far metric against cumulative trial time, per study;
- ``learning_curves.png``: each search trial's metric per epoch (the row's ``details["curve"]``);
- ``importance.png``: how strongly each searched hyperparameter goes with the metric;
- ``calibration.png``: per (dataset, label ratio), each compared configuration's reliability
  diagram (from the predictions its rows kept), beside a table of expected calibration errors;
- ``samples.png`` (generation searches only): per (dataset, label ratio), a row of images per
  method (its best trial's ``samples.npy``) under the same fixed validation prompts.

Generation rows are ranked by FID; where their FID came from a stand-in feature extractor rather
than Inception (``details["fid_stand_in"]``), the page says so beside every FID it shows.

This module writes the files; the figures are drawn in :mod:`~medpeft_ray.leaderboard.report_figures`,
the generation samples in :mod:`~medpeft_ray.leaderboard.report_samples`, and the page is written in
:mod:`~medpeft_ray.leaderboard.report_html`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from medpeft_ray.errors import MedpeftError
from medpeft_ray.leaderboard import views
from medpeft_ray.leaderboard.evidence import EvidenceSettings
from medpeft_ray.leaderboard.report_calibration import report_evidence
from medpeft_ray.leaderboard.report_figures import FigureResult, draw_figures
from medpeft_ray.leaderboard.report_html import render_html
from medpeft_ray.leaderboard.report_samples import SAMPLES_FIGURE, samples_figure
from medpeft_ray.leaderboard.store import TrialStore
from medpeft_ray.metrics import get_metric

INDEX_FILE = "index.html"


def report_rows(store: TrialStore, experiments: Sequence[str]) -> pd.DataFrame:
    """The rows of ``experiments``; raises naming any experiment the store does not have."""
    if not experiments:
        raise MedpeftError("name at least one experiment to report on")
    known = store.experiments()
    missing = [e for e in experiments if e not in known]
    if missing:
        has = f"it has: {', '.join(known)}" if known else "it is empty; run `medpeft-ray search` first"
        raise MedpeftError(f"experiment {missing[0]!r} is not in the leaderboard {store.label} ({has})")
    return store.query(experiment=list(experiments))


def write_report(
    store: TrialStore, experiments: Sequence[str], directory: str | Path, metric: str = "val_auroc",
    split: str | None = None, baseline: str = "full", costs: Sequence[dict[str, Any]] = (),
    evidence: EvidenceSettings | None = None,
) -> Path:
    """Writes the report of ``experiments`` to ``directory``; returns the path of ``index.html``.

    ``split`` is the split the comparison table shows (default: test where trials have test values);
    ``baseline`` the method the others are counted against, task by task. ``costs`` are the
    searches' manifests (``experiment``, ``forecast``, ``actual``): their forecast and what they
    took are shown side by side. ``evidence``: the intervals' level, the tests' correction and
    resamples (None: :class:`~medpeft_ray.leaderboard.evidence.EvidenceSettings`' defaults).
    """
    get_metric(metric)  # an unknown metric fails before the database is read
    if split is not None:
        views.check_split(split)  # so does an unknown split
    frame = report_rows(store, experiments)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    compared = report_evidence(frame, metric, split, baseline, evidence or EvidenceSettings())
    figures = [*make_figures(frame, metric), compared.figure]
    for figure in figures:
        path = out / f"{figure.name}.png"
        if figure.png is not None:
            path.write_bytes(figure.png)
        else:
            path.unlink(missing_ok=True)  # a figure from an earlier report of this folder would mislead
    if all(figure.name != SAMPLES_FIGURE for figure in figures):  # drawn for generation rows only
        (out / f"{SAMPLES_FIGURE}.png").unlink(missing_ok=True)
    index = out / INDEX_FILE
    index.write_text(render_html(frame, list(experiments), figures, metric, store.label, split, baseline, costs,
                                 compared))
    return index


def make_figures(frame: pd.DataFrame, metric: str) -> list[FigureResult]:
    """Every figure of the report, drawn from the rows of ``frame``: those of every search, then the
    samples' figure where some rows are generation trials."""
    results = draw_figures(frame, metric)
    samples = samples_figure(frame, metric) if len(frame) else None
    if samples is not None:
        results.append(samples)
    return results
