"""The report's figures, drawn with matplotlib's object API (no pyplot, no display) as PNG bytes.

One colour per method in every figure (:func:`method_colors`). Each ``figure_*`` function takes the
rows, the metric and the colours, and returns a PNG, or None when the rows hold nothing to draw;
:data:`FIGURES` lists them with their titles and captions, in the report's order. The samples of
generation searches are drawn in :mod:`~medpeft_ray.leaderboard.report_samples`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter, MaxNLocator, NullFormatter

from medpeft_ray.leaderboard import views
from medpeft_ray.metrics import get_metric

_LINESTYLES = ("-", "--", ":", "-.")


@dataclass
class FigureResult:
    """One figure of the report: its file (None when there was nothing to draw) and captions."""

    name: str
    title: str
    caption: str
    png: bytes | None
    missing: str = ""
    #: lines shown under the figure (what it holds, in words: each grid's rows and prompts)
    legend: list[str] = field(default_factory=list)
    #: one line each about what the figure could not show (a trial whose samples are unreadable)
    notes: list[str] = field(default_factory=list)


def method_colors(methods: Sequence[str]) -> dict[str, Any]:
    """One colour per method, the same in every figure."""
    palette = colormaps["tab10"].colors
    return {m: palette[i % len(palette)] for i, m in enumerate(sorted(set(methods)))}


def panel_grid(count: int, width: float = 4.6, height: float = 3.6, ncols: int = 3) -> tuple[Figure, list[Any]]:
    """A figure of ``count`` panels, ``ncols`` to a row (``width`` x ``height`` inches each), and its axes."""
    ncols = max(1, min(ncols, count))
    nrows = math.ceil(count / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def to_png(fig: Figure) -> bytes:
    """The figure as PNG bytes (100 dpi)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _ratio_axis(ax: Any, ratios: Sequence[float]) -> None:
    ratios = sorted(set(ratios))
    if len(ratios) > 1 and ratios[-1] / ratios[0] >= 5:
        ax.set_xscale("log")
    ax.set_xticks(ratios)
    ax.set_xticklabels([f"{r * 100:g}%" for r in ratios])
    ax.minorticks_off()


def _parameter_axis(ax: Any, counts: pd.Series) -> None:
    """Log scale where the counts span a decade or more; short labels (20k, 1.5M) either way."""
    if counts.max() >= 10 * counts.min():
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))


def figure_metric_vs_ratio(frame: pd.DataFrame, metric: str, colors: dict[str, Any]) -> bytes | None:
    """Best metric of each method against the label ratio, one panel per dataset."""
    best = views.best_per_group(frame, ["dataset", "label_ratio", "method"], metric)
    if best.empty:
        return None
    datasets = sorted(best["dataset"].unique())
    fig, axes = panel_grid(len(datasets))
    for ax, dataset in zip(axes, datasets):
        rows = best[best["dataset"] == dataset]
        for method, group in rows.groupby("method", sort=True):
            group = group.sort_values("label_ratio")
            ax.plot(group["label_ratio"], group[metric], marker="o", label=method, color=colors[method])
        _ratio_axis(ax, rows["label_ratio"])
        ax.set_title(dataset)
        ax.set_xlabel("label ratio (share of training labels)")
        ax.set_ylabel(f"best {get_metric(metric).title}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return to_png(fig)


def figure_pareto(frame: pd.DataFrame, metric: str, colors: dict[str, Any]) -> bytes | None:
    """Every trial's metric against its trainable parameters; the front joined, per (dataset, ratio)."""
    rows = frame[frame[metric].notna() & frame["trainable_params"].notna()].copy()
    if rows.empty:
        return None
    rows["front"] = views.pareto_mask(rows, metric)
    groups = sorted(rows.groupby(["dataset", "label_ratio"]).groups)
    fig, axes = panel_grid(len(groups))
    for ax, (dataset, ratio) in zip(axes, groups):
        group = rows[(rows["dataset"] == dataset) & (rows["label_ratio"] == ratio)]
        for method, points in group.groupby("method", sort=True):
            ax.scatter(points["trainable_params"].astype(float), points[metric], s=30, alpha=0.7,
                       color=colors[method], edgecolors="none", label=method)
        front = group[group["front"]].sort_values("trainable_params")
        ax.step(front["trainable_params"].astype(float), front[metric], where="post", color="black",
                linewidth=1, alpha=0.8, label="Pareto front")
        ax.scatter(front["trainable_params"].astype(float), front[metric], s=90, facecolors="none",
                   edgecolors="black", linewidths=1.2)
        _parameter_axis(ax, group["trainable_params"].astype(float))
        ax.set_title(f"{dataset} @ {ratio:g}")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(get_metric(metric).title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return to_png(fig)


def figure_progress(frame: pd.DataFrame, metric: str, colors: dict[str, Any]) -> bytes | None:
    """Best-so-far metric against cumulative trial wall time, one line per study, a panel per dataset."""
    steps = views.progress(frame, metric)
    steps = steps[steps["best_so_far"].notna()]
    if steps.empty:
        return None
    datasets = sorted(steps["dataset"].unique())
    ratio_styles = {r: _LINESTYLES[i % len(_LINESTYLES)] for i, r in enumerate(sorted(steps["label_ratio"].unique()))}
    fig, axes = panel_grid(len(datasets), width=6.4, ncols=2)
    for ax, dataset in zip(axes, datasets):
        rows = steps[steps["dataset"] == dataset]
        # name the experiment only where one method ran in several experiments on this dataset
        several_experiments = rows.groupby("method")["experiment"].nunique().max() > 1
        for (experiment, method, _, ratio), study in rows.groupby(views.STUDY_COLUMNS, sort=True):
            label = f"{method} @ {ratio:g}" + (f" ({experiment})" if several_experiments else "")
            ax.step(study["compute_s"] / 60.0, study["best_so_far"], where="post", marker="o", markersize=3,
                    color=colors[method], linestyle=ratio_styles[ratio], label=label)
        ax.set_title(dataset)
        ax.set_xlim(left=0)  # compute starts at zero: a short search is not stretched across the panel
        ax.set_xlabel("cumulative trial wall time (minutes)")
        ax.set_ylabel(f"best {get_metric(metric).title} so far")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside, not over, the lines
    return to_png(fig)


#: how a learning curve ends when the trial did not run all its epochs
_CURVE_ENDS = {"stopped": ("x", "stopped early"), "failed": ("v", "failed")}


def learning_curves(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per search trial with a recorded curve of ``metric``: its study keys, status, and
    the ``epoch`` and ``value`` lists (epochs without a value left out). Rows written before
    curves were kept, and confirmation rows (which report once), have none."""
    columns = ["dataset", "label_ratio", "method", "status", "trial_id", "epoch", "value"]
    if "details" not in frame:
        return pd.DataFrame(columns=columns)
    rows = []
    for row in views.search_rows(frame).to_dict(orient="records"):
        curve = views.details_of(row["details"]).get("curve") or {}
        points = [(int(e), float(v)) for e, v in zip(curve.get("epoch") or [], curve.get(metric) or [])
                  if v is not None and math.isfinite(v)]
        if points:
            epochs, values = zip(*sorted(points))
            rows.append({**{k: row[k] for k in columns[:5]}, "epoch": list(epochs), "value": list(values)})
    return pd.DataFrame(rows, columns=columns)


def learning_curves_figure(frame: pd.DataFrame, metric: str, colors: dict[str, Any]) -> Figure | None:
    """Each search trial's ``metric`` per epoch, a line per trial coloured by method, one panel per
    (dataset, label ratio); a trial that ended before its last epoch ends in a marker where it ended."""
    curves = learning_curves(frame, metric)
    if curves.empty:
        return None
    sparse = not get_metric(metric).every_epoch  # FID: mark the epochs that have a value
    groups = sorted(curves.groupby(["dataset", "label_ratio"]).groups)
    fig, axes = panel_grid(len(groups))
    for ax, (dataset, ratio) in zip(axes, groups):
        group = curves[(curves["dataset"] == dataset) & (curves["label_ratio"] == ratio)]
        ends = set()
        for row in group.sort_values(["method", "trial_id"]).itertuples(index=False):
            # full colour, as in the other figures: the method's colour is how a reader tells the lines apart
            ax.plot(row.epoch, row.value, color=colors[row.method], linewidth=1.2,
                    marker="o" if sparse or len(row.epoch) == 1 else None, markersize=3)  # one epoch: a point
            if row.status in _CURVE_ENDS:
                ends.add(row.status)
                ax.plot(row.epoch[-1:], row.value[-1:], linestyle="none", marker=_CURVE_ENDS[row.status][0],
                        markersize=7, markeredgewidth=1.5, color=colors[row.method])
        # a legend entry per method and per kind of end, not one per trial
        handles = [Line2D([], [], color=colors[m], label=m) for m in sorted(group["method"].unique())]
        handles += [Line2D([], [], color="black", linestyle="none", marker=_CURVE_ENDS[s][0], label=_CURVE_ENDS[s][1])
                    for s in _CURVE_ENDS if s in ends]
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set_title(f"{dataset} @ {ratio:g}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(get_metric(metric).title)
        ax.grid(alpha=0.3)
        ax.legend(handles=handles, fontsize="small")
    return fig


def figure_learning_curves(frame: pd.DataFrame, metric: str, colors: dict[str, Any]) -> bytes | None:
    """The learning curves' figure as PNG; None when no row recorded a curve (older leaderboards)."""
    fig = learning_curves_figure(frame, metric, colors)
    return None if fig is None else to_png(fig)


def figure_importance(frame: pd.DataFrame, metric: str, colors: dict[str, Any]) -> bytes | None:
    """Association of each searched hyperparameter with the metric, one panel per method."""
    table = views.importance(frame, metric)
    if table.empty:
        return None
    methods = sorted(table["method"].unique())
    fig, axes = panel_grid(len(methods), width=4.6, height=max(1.8, 0.6 + 0.45 * table.groupby("method").size().max()))
    for ax, method in zip(axes, methods):
        rows = table[table["method"] == method].iloc[::-1]
        labels = [f"{p} ({'+' if s > 0 else '-'})" if k == "numeric" else p
                  for p, k, s in zip(rows["parameter"], rows["kind"], rows["spearman"])]
        ax.barh(labels, rows["association"], color=colors[method])
        ax.set_xlim(0, 1)
        ax.set_title(method)
        ax.set_xlabel(f"association with {get_metric(metric).title} rank")
        ax.grid(axis="x", alpha=0.3)
    return to_png(fig)


FIGURES: list[tuple[str, str, str, Callable[..., bytes | None], str]] = [
    ("metric_vs_ratio", "Metric against label ratio",
     "Best {metric} of each method at each label ratio (the data-regime view).", figure_metric_vs_ratio,
     "no trial has a {metric}"),
    ("pareto", "Metric against trainable parameters",
     "Every trial; outlined points and the black line are the Pareto front of each (dataset, label ratio): "
     "no other trial there has at least as {better} a {metric} with at most as many trainable parameters.",
     figure_pareto, "no trial has both a {metric} and a parameter count"),
    ("progress", "Search progress",
     "Best {metric} so far against the summed wall time of the study's finished trials "
     "(line style: label ratio).", figure_progress, "no trial has a {metric}"),
    ("learning_curves", "Learning curves",
     "Every search trial's {metric} {epochs}, a line per trial coloured by method, per "
     "(dataset, label ratio); a trial stopped early by the scheduler ends in ×, a failed one in ▼.",
     figure_learning_curves, "no trial recorded its {metric} per epoch (rows written before curves were kept)"),
    ("importance", "Hyperparameter importance",
     "Per method: |Spearman correlation| (numeric; sign in brackets: + means larger did better) or "
     "correlation ratio (categorical) between a hyperparameter and the trial's {metric} rank within "
     "its (dataset, label ratio).", figure_importance,
     "needs at least 3 trials of a method in which a hyperparameter took different values"),
]


def draw_figures(frame: pd.DataFrame, metric: str) -> list[FigureResult]:
    """The report's figures of every search (those of :data:`FIGURES`), drawn from the rows of ``frame``."""
    colors = method_colors(frame["method"].unique().tolist()) if len(frame) else {}
    ranking = get_metric(metric)
    words = {"metric": ranking.title, "better": "low" if ranking.ascending else "high",
             "epochs": "at each epoch" if ranking.every_epoch else
             f"at the epochs it was computed (a point each: {ranking.title} is not computed every epoch)"}
    results = []
    for name, title, caption, draw, missing in FIGURES:
        png_bytes = draw(frame, metric, colors) if len(frame) else None
        results.append(FigureResult(name, title, caption.format(**words), png_bytes, missing.format(**words)))
    return results
