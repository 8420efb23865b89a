"""The report's page: one self-contained HTML file (figures embedded as data URIs; no script, font
or stylesheet from the network), its tables written by the leaderboard's one cell formatter
(:mod:`~medpeft_ray.leaderboard.formatting`).

The page holds the comparison table (methods x (dataset, label ratio), mean ± std over confirmation
seeds, rank and mean rank), each method's wins against a baseline, worst-group gaps, the figures,
the best configuration per study, failed trials, and each search's forecast beside its cost.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import pandas as pd

from medpeft_ray.leaderboard import views
from medpeft_ray.leaderboard.evidence import EvidenceSettings, verdict_lines
from medpeft_ray.leaderboard.formatting import (
    MISSING,
    cell_text,
    count_text,
    is_missing,
    metric_text,
    params_text,
    rank_text,
    seconds_text,
    study_cell_text,
)
from medpeft_ray.leaderboard.report_calibration import ReportEvidence, calibration_html, report_evidence
from medpeft_ray.leaderboard.report_figures import FigureResult
from medpeft_ray.leaderboard.report_samples import FID, SAMPLES_FIGURE, stand_in_note
from medpeft_ray.metrics import get_metric

_STYLE = """
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; margin: 24px auto;
       max-width: 1320px; padding: 0 16px; color: #1d2430; background: #fff; }
h1 { font-size: 24px; margin-bottom: 4px; } h2 { font-size: 19px; margin-top: 32px; border-bottom: 1px solid #dde2ea; }
.meta { color: #5a6473; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #dde2ea; padding: 4px 8px; text-align: right; }
th { background: #f3f5f9; } td.name, th.name { text-align: left; }
td.best { font-weight: 700; background: #eaf5ea; } .rank { color: #7a8494; font-size: 11px; }
p.wins { font-size: 14px; }
figure { margin: 12px 0 24px; } figure img { max-width: 100%; border: 1px solid #eef0f4; }
figcaption { color: #5a6473; font-size: 13px; margin-top: 4px; } .missing { color: #a05a00; }
p.warn { color: #8a1c1c; background: #fdf0ec; border-left: 4px solid #c0392b; padding: 6px 10px; font-size: 13px; }
code { font-size: 12px; }
"""


def comparison_html(study: views.StudyTable) -> str:
    """The methods-by-(dataset, ratio) table: each cell's value (its confidence interval, else mean ±
    std over confirmation seeds; bold: best in its column), its rank, and the mean rank."""
    ranking = get_metric(study.metric)
    table = study.means
    if table.empty:
        return f'<p class="missing">No trial has a {html.escape(ranking.title)} yet.</p>'
    cells = [c for c in table.columns if c != "mean_rank"]
    ranks = table[cells].rank(axis=0, ascending=ranking.ascending, method="average")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cells)
    lines = [f'<table class="compare"><tr><th class="name">method</th>{head}<th>mean rank</th></tr>']
    for method, row in table.iterrows():
        tds = []
        for column in cells:
            value, rank = row[column], ranks.at[method, column]
            if is_missing(value):
                tds.append(f"<td>{MISSING}</td>")
                continue
            css = ' class="best"' if rank == ranks[column].min() else ""
            text = html.escape(study_cell_text(study, method, column))
            tds.append(f'<td{css}>{text} <span class="rank">({rank:g})</span></td>')
        lines.append(f'<tr><td class="name">{html.escape(str(method))}</td>{"".join(tds)}'
                     f"<td>{rank_text(row['mean_rank'])}</td></tr>")
    lines.append("</table>")
    if study.interval_note:
        lines.append(f'<p class="meta">{html.escape(study.interval_note)}</p>')
    return "\n".join(lines)


def comparison_caption(study: views.StudyTable) -> str:
    """What the comparison table's cells hold, in words."""
    ranking = get_metric(study.metric)
    value = "its value" if study.column == study.metric else f"its {study.column}"
    return (f"Per method and (dataset, label ratio), the configuration chosen on {ranking.title}: the confirmed "
            "configuration with the best mean over its seeds where the top configurations were confirmed, else the "
            f"best search trial; {value} (mean over the confirmation seeds where several ran, with its bootstrap "
            "interval in brackets where the trials kept their predictions, else ± the std over the seeds), its rank "
            "in the column in round brackets (1 is best, ties share the mean rank), bold: best in the column; mean "
            "rank over the columns where the method has a value.")


def wins_html(study: views.StudyTable, frame: pd.DataFrame, baseline: str, tests: pd.DataFrame,
              settings: EvidenceSettings) -> str:
    """Per method against ``baseline``: the tests' verdicts (``lora vs full: 7 better, 2 worse, 9 not
    distinguishable of 18 tasks``) and the point estimates' count; then each task's test."""
    points = views.wins_lines(views.wins(frame, study.metric, baseline, study.split), study.metric)
    tested = len(tests) and (tests["verdict"] != "").any()
    lines = [*verdict_lines(tests, study.metric, settings), *[f"point estimates: {p}" for p in points]] \
        if tested else points
    if not lines:
        return ""
    return ('<p class="wins">' + "<br>".join(html.escape(line) for line in lines) + "</p>\n"
            f'<p class="meta">A task is one backbone, pre-trained checkpoint, dataset and label ratio where both the '
            f"method and {html.escape(baseline)} have a value; the values compared are the table's.</p>"
            + (tests_html(tests, study.metric) if tested else ""))


def tests_html(tests: pd.DataFrame, metric: str) -> str:
    """Each task's paired test: the two values, the difference, p, corrected p and the verdict."""
    head = ("<tr><th class=\"name\">method</th><th class=\"name\">task</th><th>value</th><th>baseline</th>"
            "<th>difference</th><th>p</th><th>corrected p</th><th class=\"name\">verdict</th>"
            "<th class=\"name\">test</th><th class=\"name\">per class: difference (p, uncorrected)</th></tr>")
    rows = []
    for t in tests.sort_values(["method", "task"], kind="stable").itertuples(index=False):
        verdict = t.verdict or f"no test: {t.why}"
        rows.append(f'<tr><td class="name">{html.escape(t.method)}</td><td class="name">{html.escape(t.task)}</td>'
                    f"<td>{metric_text(metric, t.value)}</td><td>{metric_text(metric, t.baseline_value)}</td>"
                    f"<td>{metric_text(metric, t.difference)}</td><td>{_p_text(t.p_value)}</td>"
                    f'<td>{_p_text(t.p_adjusted)}</td><td class="name">{html.escape(verdict)}</td>'
                    f'<td class="name">{html.escape(t.test)}</td>'
                    f'<td class="name">{html.escape(_per_class_text(t.per_class, metric))}</td></tr>')
    return f'<table class="tests">{head}{"".join(rows)}</table>'


def _per_class_text(per_class: Any, metric: str) -> str:
    """``Effusion +0.0210 (0.0312), ...``: each class's own test, where the test has them (AUROC)."""
    if not isinstance(per_class, dict):
        return ""
    return ", ".join(f"{name} {'+' if d > 0 else ''}{metric_text(metric, d)} ({_p_text(p)})"
                     for name, (d, p) in per_class.items() if d == d)


def _p_text(value: Any) -> str:
    if is_missing(value):
        return MISSING
    return f"{value:.4f}" if value >= 1e-4 else "< 0.0001"


def subgroups_html(frame: pd.DataFrame, metric: str) -> str:
    """The worst-group gap of each chosen configuration per attribute; empty when no row has subgroups."""
    gaps = views.subgroup_gaps(frame, metric)
    if gaps.empty:
        return ""
    ranking = get_metric(metric)
    attributes = sorted(gaps["attribute"].unique())
    head = "".join(f"<th>{html.escape(str(a))}</th>" for a in attributes)
    lines = ["<h2>Worst-group gap</h2>",
             f'<p class="meta">Per configuration of the comparison table: the best subgroup\'s '
             f"{html.escape(ranking.on_split('test'))} minus the worst subgroup's, per attribute (mean ± std over the "
             "confirmation seeds where several ran; the group most often worst in brackets). Lower is fairer.</p>",
             '<table class="subgroups"><tr><th class="name">dataset</th><th>label ratio</th>'
             f'<th class="name">method</th>{head}</tr>']
    for (dataset, ratio, method), group in gaps.groupby(["dataset", "label_ratio", "method"], sort=True):
        by_attribute = {row.attribute: row for row in group.itertuples(index=False)}
        tds = "".join(f"<td>{html.escape(_gap_text(by_attribute.get(a), metric))}</td>" for a in attributes)
        lines.append(f'<tr><td class="name">{html.escape(str(dataset))}</td><td>{ratio:g}</td>'
                     f'<td class="name">{html.escape(str(method))}</td>{tds}</tr>')
    lines.append("</table>")
    return "\n".join(lines)


def _gap_text(row: Any, metric: str) -> str:
    """``0.0520 ± 0.0100 (F)``; ``–`` where the configuration has no gap for the attribute."""
    if row is None:
        return MISSING
    return metric_text(metric, row.gap, row.gap_std) + ("" if is_missing(row.worst_group) else f" ({row.worst_group})")


def _percent(value: float) -> str:
    """Two significant digits below 10 (0.71, 7.6), whole numbers above (12, 100: not 1e+02)."""
    return f"{value:.2g}" if value < 10 else f"{value:.0f}"


def best_configs_html(frame: pd.DataFrame, metric: str) -> str:
    """The best trial of each (dataset, label ratio, method): its value, cost and hyperparameters."""
    best = views.best_per_group(frame, ["dataset", "label_ratio", "method"], metric)
    if best.empty:
        return '<p class="missing">No trial to show.</p>'
    ranking = get_metric(metric)
    best = best.sort_values(["dataset", "label_ratio", metric], ascending=[True, True, ranking.ascending])
    test = ranking.on_split("test")
    has_test = test in best and bool(best[test].notna().any())
    test_title = f"test {ranking.label}" if ranking.label else test  # test FID; test_auroc
    header = ["dataset", "label ratio", "method", "backbone", ranking.title, *([test_title] if has_test else []),
              "trainable params", "epochs", "wall time", "hyperparameters", "trial"]
    lines = ["<table><tr>" + "".join(f'<th class="name">{html.escape(h)}</th>' if h in ("dataset", "method",
             "backbone", "hyperparameters", "trial") else f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for row in best.to_dict(orient="records"):
        trainable = count_text(row["trainable_params"])
        if not is_missing(row["trainable_params"]) and not is_missing(row["total_params"]) and row["total_params"]:
            trainable += f" ({_percent(100.0 * int(row['trainable_params']) / int(row['total_params']))}%)"
        epochs = (MISSING if is_missing(row["epochs_run"]) else
                  f"{cell_text('best_epoch', row['best_epoch'])} / {cell_text('epochs_run', row['epochs_run'])}")
        cells = [
            ("name", row["dataset"]), ("", cell_text("label_ratio", row["label_ratio"])), ("name", row["method"]),
            ("name", row["backbone"]), ("", metric_text(metric, row[metric])),
            *([("", metric_text(metric, row[test]))] if has_test else []),
            ("", trainable), ("", epochs), ("", seconds_text(row["wall_time_s"])),
            ("name", params_text(row["params"])), ("name", f"{row['experiment']} / {row['trial_id']}"),
        ]
        lines.append("<tr>" + "".join(f'<td class="{c}">{html.escape(str(v))}</td>' if c else
                                      f"<td>{html.escape(str(v))}</td>" for c, v in cells) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def failures_html(frame: pd.DataFrame) -> str:
    failed = frame[frame["status"] == "failed"]
    if failed.empty:
        return ""
    lines = ["<h2>Failed trials</h2>", '<table><tr><th class="name">trial</th><th class="name">method</th>'
             '<th>label ratio</th><th class="name">error</th></tr>']
    for row in failed.to_dict(orient="records"):
        lines.append(f'<tr><td class="name">{html.escape(row["experiment"])} / {html.escape(row["trial_id"])}</td>'
                     f'<td class="name">{html.escape(row["method"])}</td><td>{row["label_ratio"]:g}</td>'
                     f'<td class="name">{html.escape(row["error"] or "")}</td></tr>')
    lines.append("</table>")
    return "\n".join(lines)


def costs_html(costs: Sequence[dict[str, Any]]) -> str:
    """Each search's forecast beside what it took (trials, epochs, device-hours, wall time), so
    users learn how far to trust a forecast; "" when no manifest is given."""
    if not costs:
        return ""
    rows = []
    for entry in costs:
        forecast = (entry.get("forecast") or {}).get("total") or {}
        actual = entry.get("actual") or {}

        def pair(key: str, fmt: str) -> str:
            made = format(forecast[key], fmt) if key in forecast else MISSING
            took = format(actual[key], fmt) if key in actual else MISSING
            return f"<td>{made}</td><td>{took}</td>"

        wall = (f"{forecast['wall_s']:.0f} ({forecast['wall_low_s']:.0f}..{forecast['wall_high_s']:.0f})"
                if "wall_s" in forecast else MISSING)
        took_wall = f"{actual['wall_s']:.0f}" if "wall_s" in actual else MISSING
        rows.append(f"<tr><td>{html.escape(str(entry.get('experiment', '')))}</td>{pair('trials', 'd')}"
                    f"{pair('epochs', '.0f')}{pair('device_hours', '.3f')}<td>{wall}</td><td>{took_wall}</td></tr>")
    head = ("<tr><th>search</th><th>trials forecast</th><th>trials</th><th>epochs forecast</th><th>epochs</th>"
            "<th>device-hours forecast</th><th>device-hours</th><th>wall s forecast (range)</th><th>wall s</th></tr>")
    note = ('<p class="meta">The forecast a search stored when it started (from the leaderboard\'s epoch times of '
            f"the same dataset, backbone and methods; {MISSING} where it had none) and what it took.</p>")
    return f"<h2>Forecast and actual cost</h2>{note}<table>{head}{''.join(rows)}</table>"


def render_html(
    frame: pd.DataFrame, experiments: list[str], figures: list[FigureResult], metric: str, source: str,
    split: str | None = None, baseline: str = "full", costs: Sequence[dict[str, Any]] = (),
    evidence: ReportEvidence | None = None,
) -> str:
    """The whole report page; images are embedded, nothing is fetched from the network.

    ``evidence``: the comparison's intervals, tests and calibration (None: made here with the
    default :class:`~medpeft_ray.leaderboard.evidence.EvidenceSettings`)."""
    evidence = evidence or report_evidence(frame, metric, split, baseline, EvidenceSettings())
    study, tests, settings = evidence.study, evidence.tests, evidence.settings
    statuses = frame["status"].value_counts().to_dict()
    counts = ", ".join(f"{statuses.get(s, 0)} {s}" for s in ("completed", "stopped", "failed"))
    names = ", ".join(experiments)
    datasets = ", ".join(sorted(frame["dataset"].unique()))
    methods = ", ".join(sorted(frame["method"].unique()))
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    shown = html.escape(get_metric(metric).title)
    fid_note = stand_in_note(frame)
    # beside every FID the page shows: the tables and figures of a report ranked by FID, and the samples
    warn = f'<p class="warn">{html.escape(fid_note)}</p>' if fid_note and metric == FID else ""
    shown_fid = get_metric(FID).title
    if warn:
        shown += " (stand-in feature extractor, not Inception)"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>medpeft-ray report: {html.escape(names)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>medpeft-ray report: {html.escape(names)}</h1>",
        f'<p class="meta">{len(frame)} trials ({counts}); datasets: {html.escape(datasets)}; '
        f"methods: {html.escape(methods)}; metric: {shown}<br>"
        f"leaderboard: <code>{html.escape(source)}</code>; generated {generated}</p>",
        "<h2>Methods compared</h2>",
        warn,
        f'<p class="meta">{html.escape(comparison_caption(study))}</p>',
        comparison_html(study),
        wins_html(study, frame, baseline, tests, settings),
        subgroups_html(frame, metric),
        calibration_html(evidence.calibration, evidence.without_calibration, study.split),
    ]
    for figure in figures:
        parts.append(f"<h2>{html.escape(figure.title)}</h2>")
        if figure.png is None:
            parts.append(f'<p class="missing">No figure: {html.escape(figure.missing)}.</p>')
        else:
            data = base64.b64encode(figure.png).decode("ascii")
            if fid_note and metric == FID and figure.name != SAMPLES_FIGURE:  # the samples' caption says it in full
                caption = f"{figure.caption} {shown_fid}: from a stand-in feature extractor, not Inception (see above)."
            else:
                caption = figure.caption
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(figure.title)}">'
                         f"<figcaption>{html.escape(caption)} ({figure.name}.png)</figcaption></figure>")
            parts += [f'<p class="meta">{html.escape(line)}</p>' for line in figure.legend]
        parts += [f'<p class="missing">{html.escape(line)}</p>' for line in figure.notes]
    parts += ["<h2>Best configuration per study</h2>", warn, best_configs_html(frame, metric), failures_html(frame),
              costs_html(costs), "</body></html>"]
    return "\n".join(p for p in parts if p)
