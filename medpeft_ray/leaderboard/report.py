"""A self-contained HTML report of one or more experiments, with PNG figures made by matplotlib.

``write_report(store, ["exp"], "report/")`` writes ``report/index.html`` (figures embedded as
data URIs, so the file alone opens anywhere; no script, font or stylesheet from the network) and
the same figures as PNG files beside it. The page's comparison table is the studies' layout
(methods x (dataset, label ratio), mean ± std over confirmation seeds, mean rank), followed by each
method's wins against full fine-tuning and, when trials scored subgroups, their worst-group gaps.
Figures:

- ``metric_vs_ratio.png``: the best metric of each method against the label ratio;
- ``pareto.png``: metric against trainable parameters, the Pareto front per (dataset, ratio);
- ``progress.png``: best-so-far metric against cumulative trial time, per study;
- ``learning_curves.png``: each search trial's metric per epoch (the row's ``details["curve"]``);
- ``importance.png``: how strongly each searched hyperparameter goes with the metric;
- ``samples.png`` (generation searches only): per (dataset, label ratio), a row of images per
  method (its best trial's ``samples.npy``) under the same fixed validation prompts.

Generation rows are ranked by FID; where their FID came from a stand-in feature extractor rather
than Inception (``details["fid_stand_in"]``), the page says so beside every FID it shows.
"""

from __future__ import annotations

import base64
import html
import io
import math
import textwrap
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from medpeft_ray.errors import MedpeftError
from medpeft_ray.leaderboard import views
from medpeft_ray.leaderboard.formatting import study_cell_text
from medpeft_ray.metrics import get_metric

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    from matplotlib.figure import Figure

    from medpeft_ray.leaderboard.store import TrialStore

INDEX_FILE = "index.html"
#: the generated samples' figure (``samples.png``), drawn for generation rows only
SAMPLES_FIGURE = "samples"
#: the prompts (columns) the samples' figure shows at most: the first of the fixed validation prompts
SAMPLE_COLUMNS = 8
#: the metric of generation rows, shown beside each method's samples whatever the report ranks by
FID = "val_fid"
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


def report_rows(store: "TrialStore", experiments: Sequence[str]) -> "pd.DataFrame":
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
    store: "TrialStore", experiments: Sequence[str], directory: str | Path, metric: str = "val_auroc",
    split: str | None = None, baseline: str = "full", costs: Sequence[dict[str, Any]] = (),
) -> Path:
    """Writes the report of ``experiments`` to ``directory``; returns the path of ``index.html``.

    ``split`` is the split the comparison table shows (default: test where trials have test values);
    ``baseline`` the method the others are counted against, task by task. ``costs`` are the
    searches' manifests (``experiment``, ``forecast``, ``actual``): their forecast and what they
    took are shown side by side.
    """
    get_metric(metric)  # an unknown metric fails before the database is read
    if split is not None:
        views.check_split(split)  # so does an unknown split
    frame = report_rows(store, experiments)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    figures = make_figures(frame, metric)
    for figure in figures:
        path = out / f"{figure.name}.png"
        if figure.png is not None:
            path.write_bytes(figure.png)
        else:
            path.unlink(missing_ok=True)  # a figure from an earlier report of this folder would mislead
    if all(figure.name != SAMPLES_FIGURE for figure in figures):  # drawn for generation rows only
        (out / f"{SAMPLES_FIGURE}.png").unlink(missing_ok=True)
    index = out / INDEX_FILE
    index.write_text(render_html(frame, list(experiments), figures, metric, store.label, split, baseline, costs))
    return index


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------


def method_colors(methods: Sequence[str]) -> dict[str, Any]:
    """One colour per method, the same in every figure."""
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    return {m: palette[i % len(palette)] for i, m in enumerate(sorted(set(methods)))}


def _grid(count: int, width: float = 4.6, height: float = 3.6, ncols: int = 3) -> tuple["Figure", list[Any]]:
    from matplotlib.figure import Figure  # the object API needs no pyplot and no display

    ncols = max(1, min(ncols, count))
    nrows = math.ceil(count / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def _png(fig: "Figure") -> bytes:
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


def _parameter_axis(ax: Any, counts: "pd.Series") -> None:
    """Log scale where the counts span a decade or more; short labels (20k, 1.5M) either way."""
    from matplotlib.ticker import EngFormatter, NullFormatter

    if counts.max() >= 10 * counts.min():
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))


def figure_metric_vs_ratio(frame: "pd.DataFrame", metric: str, colors: dict[str, Any]) -> bytes | None:
    """Best metric of each method against the label ratio, one panel per dataset."""
    best = views.best_per_group(frame, ["dataset", "label_ratio", "method"], metric)
    if best.empty:
        return None
    datasets = sorted(best["dataset"].unique())
    fig, axes = _grid(len(datasets))
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
    return _png(fig)


def figure_pareto(frame: "pd.DataFrame", metric: str, colors: dict[str, Any]) -> bytes | None:
    """Every trial's metric against its trainable parameters; the front joined, per (dataset, ratio)."""
    rows = frame[frame[metric].notna() & frame["trainable_params"].notna()].copy()
    if rows.empty:
        return None
    rows["front"] = views.pareto_mask(rows, metric)
    groups = sorted(rows.groupby(["dataset", "label_ratio"]).groups)
    fig, axes = _grid(len(groups))
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
    return _png(fig)


def figure_progress(frame: "pd.DataFrame", metric: str, colors: dict[str, Any]) -> bytes | None:
    """Best-so-far metric against cumulative trial wall time, one line per study, a panel per dataset."""
    steps = views.progress(frame, metric)
    steps = steps[steps["best_so_far"].notna()]
    if steps.empty:
        return None
    datasets = sorted(steps["dataset"].unique())
    ratio_styles = {r: _LINESTYLES[i % len(_LINESTYLES)] for i, r in enumerate(sorted(steps["label_ratio"].unique()))}
    fig, axes = _grid(len(datasets), width=6.4, ncols=2)
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
    return _png(fig)


#: how a learning curve ends when the trial did not run all its epochs
_CURVE_ENDS = {"stopped": ("x", "stopped early"), "failed": ("v", "failed")}


def learning_curves(frame: "pd.DataFrame", metric: str) -> "pd.DataFrame":
    """One row per search trial with a recorded curve of ``metric``: its study keys, status, and
    the ``epoch`` and ``value`` lists (epochs without a value left out). Rows written before
    curves were kept, and confirmation rows (which report once), have none."""
    import pandas as pd

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


def learning_curves_figure(frame: "pd.DataFrame", metric: str, colors: dict[str, Any]) -> "Figure | None":
    """Each search trial's ``metric`` per epoch, a line per trial coloured by method, one panel per
    (dataset, label ratio); a trial that ended before its last epoch ends in a marker where it ended."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    curves = learning_curves(frame, metric)
    if curves.empty:
        return None
    sparse = not get_metric(metric).every_epoch  # FID: mark the epochs that have a value
    groups = sorted(curves.groupby(["dataset", "label_ratio"]).groups)
    fig, axes = _grid(len(groups))
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


def figure_learning_curves(frame: "pd.DataFrame", metric: str, colors: dict[str, Any]) -> bytes | None:
    """The learning curves' figure as PNG; None when no row recorded a curve (older leaderboards)."""
    fig = learning_curves_figure(frame, metric, colors)
    return None if fig is None else _png(fig)


def figure_importance(frame: "pd.DataFrame", metric: str, colors: dict[str, Any]) -> bytes | None:
    """Association of each searched hyperparameter with the metric, one panel per method."""
    table = views.importance(frame, metric)
    if table.empty:
        return None
    methods = sorted(table["method"].unique())
    fig, axes = _grid(len(methods), width=4.6, height=max(1.8, 0.6 + 0.45 * table.groupby("method").size().max()))
    for ax, method in zip(axes, methods):
        rows = table[table["method"] == method].iloc[::-1]
        labels = [f"{p} ({'+' if s > 0 else '-'})" if k == "numeric" else p
                  for p, k, s in zip(rows["parameter"], rows["kind"], rows["spearman"])]
        ax.barh(labels, rows["association"], color=colors[method])
        ax.set_xlim(0, 1)
        ax.set_title(method)
        ax.set_xlabel(f"association with {get_metric(metric).title} rank")
        ax.grid(axis="x", alpha=0.3)
    return _png(fig)


# ------------------------------------------------------------------------------------------------
# Generation: FID's feature extractor, and each method's samples
# ------------------------------------------------------------------------------------------------


def generation_rows(frame: "pd.DataFrame") -> "pd.DataFrame":
    """The rows of generation trials: those with an FID, or with the prompts of their samples in ``details``."""
    import pandas as pd

    if not len(frame):
        return frame
    fid = frame[FID].notna() if FID in frame else pd.Series(False, index=frame.index)
    prompts = (frame["details"].map(lambda d: bool(views.details_of(d).get("prompts"))).astype(bool)
               if "details" in frame else pd.Series(False, index=frame.index))
    return frame[fid | prompts]


def fid_extractors(frame: "pd.DataFrame") -> tuple[dict[str, bool], int, int]:
    """The FID feature extractors the generation rows with an FID name (each: whether it is a stand-in
    for Inception), how many of those rows used a stand-in (``details["fid_stand_in"]``), and how many
    rows have an FID."""
    import pandas as pd

    rows = generation_rows(frame)
    has_fid = pd.Series(False, index=rows.index)
    for column in (FID, get_metric(FID).on_split("test")):
        if column in rows:
            has_fid |= rows[column].notna()
    names: dict[str, bool] = {}
    stand_ins = 0
    for value in rows.loc[has_fid, "details"] if "details" in rows else ():
        details = views.details_of(value)
        stand_in = bool(details.get("fid_stand_in"))
        if details.get("fid_features"):
            names[str(details["fid_features"])] = stand_in
        stand_ins += stand_in
    return dict(sorted(names.items())), stand_ins, int(has_fid.sum())


def stand_in_note(frame: "pd.DataFrame") -> str:
    """A sentence saying that FID came from a stand-in feature extractor, not Inception; "" when no
    row with an FID used one."""
    names, stand_ins, with_fid = fid_extractors(frame)
    if not stand_ins:
        return ""
    title = get_metric(FID).title
    which = title if stand_ins == with_fid else f"{title} of {stand_ins} of the {with_fid} trials with one"
    stand_in_names = [name for name, stand_in in names.items() if stand_in]
    named = f" ({'; '.join(stand_in_names)})" if stand_in_names else ""
    return (f"{which} was computed with a stand-in feature extractor{named}, not Inception: its values rank "
            f"these trials against each other but are not comparable with published {title} values.")


def _fid_words(frame: "pd.DataFrame") -> str:
    """Which features FID used, in words, for the samples' caption."""
    note = stand_in_note(frame)
    if note:
        return note
    names, _, with_fid = fid_extractors(frame)
    return f"{get_metric(FID).title} features: {'; '.join(names)}." if names and with_fid else ""


@dataclass
class SampleRow:
    """One method's row of the samples' figure: its best trial and that trial's first images."""

    method: str
    trial: str
    fid: float | None
    value: float | None  # the report's metric
    images: "np.ndarray"  # (columns, H, W) grey or (columns, H, W, 3) colour, uint8


@dataclass
class SampleGrid:
    """The samples' figure of one (dataset, label ratio): the prompts (columns) and a row per method."""

    dataset: str
    label_ratio: float
    prompts: list[str]
    rows: list[SampleRow]
    #: how many fixed validation prompts the trials sampled (the columns are the first of them)
    total: int = 0


def _trial_words(row: dict[str, Any]) -> str:
    return f"{row['method']} ({row['dataset']} @ {row['label_ratio']:g}, trial {row['experiment']} / {row['trial_id']})"


def read_samples(checkpoint: Any, samples_file: str, count: int = SAMPLE_COLUMNS) -> tuple["np.ndarray | None", str]:
    """The first ``count`` images of a checkpoint folder's samples (uint8, (n, H, W) or (n, H, W, 3)),
    or None and why not, in a few words (no checkpoint, cloud storage, missing, unreadable, not images)."""
    import numpy as np

    from medpeft_ray.storage import is_uri

    if _missing(checkpoint) or not str(checkpoint):
        return None, "no checkpoint recorded"
    if is_uri(checkpoint):
        return None, f"its checkpoint is in cloud storage ({checkpoint}); the report reads local folders only"
    path = Path(str(checkpoint)) / samples_file
    if not path.is_file():
        return None, f"{path} is missing"
    try:
        with path.open("rb") as file:
            if file.read(6) != b"\x93NUMPY":  # numpy's advice for other files is to unpickle them: not here
                return None, f"cannot read {path} (not a .npy file)"
        samples = np.load(path, mmap_mode="r", allow_pickle=False)  # a few images of a large file are read
        images = np.array(samples[:count])
    except (OSError, ValueError, EOFError, TypeError, IndexError) as exc:
        return None, f"cannot read {path} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        return None, f"{path} holds {samples.dtype} of shape {samples.shape}, not uint8 (N, H, W) images"
    if not len(images) or not images.shape[1] or not images.shape[2]:
        return None, f"{path} holds no images"
    return images, ""


def sample_grids(frame: "pd.DataFrame", metric: str, samples_file: str) -> tuple[list[SampleGrid], list[str]]:
    """Per (dataset, label ratio) of the generation rows: each method's best trial by ``metric`` whose
    samples are readable, best first; and one line for each best trial whose samples could not be shown."""
    rows = generation_rows(frame)
    rows = rows[rows[metric].notna()] if metric in rows else rows.iloc[0:0]
    if rows.empty:
        return [], []
    best = views.best_per_group(rows, ["dataset", "label_ratio", "method"], metric)  # best first
    grids, notes = [], []
    for (dataset, ratio), cell in best.groupby(["dataset", "label_ratio"], sort=True):
        prompts: list[str] | None = None
        total = 0
        shown: list[SampleRow] = []
        for row in cell.to_dict(orient="records"):
            images, why = read_samples(row.get("checkpoint"), samples_file)
            if images is None:
                notes.append(f"{_trial_words(row)}: no samples shown: {why}.")
                continue
            every = [str(p) for p in views.details_of(row.get("details")).get("prompts") or []]
            mine = every[:SAMPLE_COLUMNS]
            if prompts is not None and mine and prompts and mine[: len(prompts)] != prompts[: len(mine)]:
                notes.append(f"{_trial_words(row)}: no samples shown: its prompts are not the other methods' "
                             "(another dataset or dataset seed?).")
                continue
            if mine and (prompts is None or len(mine) > len(prompts)):
                prompts = mine
            total = max(total, len(every))
            fid = row.get(FID)
            shown.append(SampleRow(row["method"], f"{row['experiment']} / {row['trial_id']}",
                                   None if _missing(fid) else float(fid), float(row[metric]), images))
        if shown:
            columns = max(len(r.images) for r in shown)
            headers = [(prompts[i] if prompts and i < len(prompts) else f"prompt {i + 1}") for i in range(columns)]
            grids.append(SampleGrid(str(dataset), float(ratio), headers, shown, max(total, columns)))
    return grids, notes


def _sample_label(row: SampleRow, metric: str) -> str:
    """``lora`` over ``FID 12.34`` (and the report's metric, when it ranks by another)."""
    fid = get_metric(FID)
    lines = [row.method, f"{fid.title} " + ("–" if row.fid is None else fid.format(row.fid))]
    if metric != FID and row.value is not None:
        lines.append(f"{get_metric(metric).title} {get_metric(metric).format(row.value)}")
    return "\n".join(lines)


def samples_grid_figure(grids: Sequence[SampleGrid], metric: str) -> "Figure":
    """The samples' figure: a block per (dataset, label ratio) titled by it, a row of images per method
    (row label: method and FID), a column per prompt (header: the prompt, wrapped, in small type)."""
    from matplotlib.figure import Figure

    size, wrap = 1.25, 22  # inches per image; characters per header line
    columns = max(len(grid.prompts) for grid in grids)
    headers = [[textwrap.fill(p, wrap, max_lines=6, placeholder=" …") for p in grid.prompts] for grid in grids]
    heights = [0.35 + 0.11 * max(h.count("\n") + 1 for h in lines) + size * len(grid.rows)
               for grid, lines in zip(grids, headers)]
    fig = Figure(figsize=(1.4 + size * columns, sum(heights)), layout="constrained")
    blocks = fig.subfigures(len(grids), 1, squeeze=False, height_ratios=heights).ravel()
    for block, grid, lines in zip(blocks, grids, headers):
        block.suptitle(f"{grid.dataset} @ {grid.label_ratio:g}", fontsize=10, fontweight="bold")
        axes = block.subplots(len(grid.rows), columns, squeeze=False)
        for r, (row, line) in enumerate(zip(grid.rows, axes)):
            for c, ax in enumerate(line):
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if c < len(row.images):
                    image = row.images[c]
                    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
                if r == 0 and c < len(lines):
                    ax.set_title(lines[c], fontsize=6.5, linespacing=1.05)
            line[0].set_ylabel(_sample_label(row, metric), rotation=0, ha="right", va="center", fontsize=8.5,
                               labelpad=6)
    return fig


def samples_figure(frame: "pd.DataFrame", metric: str) -> FigureResult | None:
    """The samples' figure of the generation rows, its caption and notes; None when there are none."""
    if generation_rows(frame).empty:
        return None
    # the file name and the seeds are the generation recipe's; imported here, as that module imports torch
    from medpeft_ray.train.generation import SAMPLE_SEED, SAMPLES_FILE

    ranking = get_metric(metric)
    grids, notes = sample_grids(frame, metric, SAMPLES_FILE)
    columns = max((len(grid.prompts) for grid in grids), default=SAMPLE_COLUMNS)
    total = max((grid.total for grid in grids), default=0)
    first = f"first {columns} of the {total}" if total > columns else f"{columns}"
    seeds = f"{SAMPLE_SEED}" if columns == 1 else f"{SAMPLE_SEED}–{SAMPLE_SEED + columns - 1}"
    fid = get_metric(FID)
    caption = (f"Per (dataset, label ratio), a row per method: the images its best trial by {ranking.title} generated "
               f"at its best epoch ({SAMPLES_FILE} in the trial's checkpoint), best first; row label: the method and "
               f"that trial's {fid.title}. Columns: the {first} fixed validation prompts, the same for every method "
               f"(header: the prompt); the sample of prompt i (from 0) was drawn from seed {SAMPLE_SEED} + i "
               f"(seeds {seeds}). "
               + _fid_words(frame))
    legend = []
    for grid in grids:
        methods = ", ".join(f"{r.method} ({fid.title} " + ("–" if r.fid is None else fid.format(r.fid)) +
                            f", trial {r.trial})" for r in grid.rows)
        prompts = "; ".join(f"seed {SAMPLE_SEED + i}: “{p}”" for i, p in enumerate(grid.prompts))
        legend.append(f"{grid.dataset} @ {grid.label_ratio:g}: rows {methods}. Columns {prompts}.")
    png = _png(samples_grid_figure(grids, metric)) if grids else None
    missing = ("no method's best trial has readable samples" if notes else
               f"no generation trial has a {ranking.title}")
    return FigureResult(SAMPLES_FIGURE, "Samples per method", caption.strip(), png, missing, legend, notes)


_FIGURES: list[tuple[str, str, str, Callable[..., bytes | None], str]] = [
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


def make_figures(frame: "pd.DataFrame", metric: str) -> list[FigureResult]:
    """Every figure of the report, drawn from the rows of ``frame``."""
    colors = method_colors(frame["method"].unique().tolist()) if len(frame) else {}
    ranking = get_metric(metric)
    words = {"metric": ranking.title, "better": "low" if ranking.ascending else "high",
             "epochs": "at each epoch" if ranking.every_epoch else
             f"at the epochs it was computed (a point each: {ranking.title} is not computed every epoch)"}
    results = []
    for name, title, caption, draw, missing in _FIGURES:
        png = draw(frame, metric, colors) if len(frame) else None
        results.append(FigureResult(name, title, caption.format(**words), png, missing.format(**words)))
    samples = samples_figure(frame, metric) if len(frame) else None
    if samples is not None:
        results.append(samples)
    return results


# ------------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------------

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


def _missing(value: Any) -> bool:
    """None, NaN or pandas' NA."""
    import pandas as pd

    return value is None or bool(pd.isna(value))


def _fmt(value: Any, digits: int = 4) -> str:
    if _missing(value):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))


def comparison_html(frame: "pd.DataFrame", metric: str, split: str | None = None) -> str:
    """The methods-by-(dataset, ratio) table: each cell's value (mean ± std over confirmation seeds;
    bold: best in its column), its rank, and the mean rank."""
    ranking = get_metric(metric)
    study = views.study_table(frame, metric=metric, split=split)
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
            if isinstance(value, float) and math.isnan(value):
                tds.append("<td>–</td>")
                continue
            css = ' class="best"' if rank == ranks[column].min() else ""
            text = html.escape(study_cell_text(study, method, column))
            tds.append(f'<td{css}>{text} <span class="rank">({rank:g})</span></td>')
        lines.append(f'<tr><td class="name">{html.escape(str(method))}</td>{"".join(tds)}'
                     f"<td>{_fmt(row['mean_rank'], 2)}</td></tr>")
    lines.append("</table>")
    return "\n".join(lines)


def comparison_caption(frame: "pd.DataFrame", metric: str, split: str | None = None) -> str:
    """What the comparison table's cells hold, in words."""
    ranking = get_metric(metric)
    column = views.study_table(frame, metric=metric, split=split).column
    value = "its value" if column == metric else f"its {column}"
    return (f"Per method and (dataset, label ratio), the configuration chosen on {ranking.title}: the confirmed "
            "configuration with the best mean over its seeds where the top configurations were confirmed, else the "
            f"best search trial; {value} (mean ± std over the confirmation seeds where several ran), its rank in "
            "the column in brackets (1 is best, ties share the mean rank), bold: best in the column; mean rank over "
            "the columns where the method has a value.")


def wins_html(frame: "pd.DataFrame", metric: str, split: str | None = None, baseline: str = "full") -> str:
    """``lora beats full in 13 of 18 tasks``, one line per method; empty without ``baseline`` trials."""
    split = views.study_table(frame, metric=metric, split=split).split  # the table's values
    lines = views.wins_lines(views.wins(frame, metric, baseline, split), metric)
    if not lines:
        return ""
    return ('<p class="wins">' + "<br>".join(html.escape(line) for line in lines) + "</p>\n"
            f'<p class="meta">A task is one backbone, pre-trained checkpoint, dataset and label ratio where both the '
            f"method and {html.escape(baseline)} have a value; the values compared are the table's.</p>")


def subgroups_html(frame: "pd.DataFrame", metric: str) -> str:
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
        tds = "".join(f"<td>{html.escape(_gap_text(by_attribute.get(a), ranking))}</td>" for a in attributes)
        lines.append(f'<tr><td class="name">{html.escape(str(dataset))}</td><td>{ratio:g}</td>'
                     f'<td class="name">{html.escape(str(method))}</td>{tds}</tr>')
    lines.append("</table>")
    return "\n".join(lines)


def _gap_text(row: Any, ranking: Any) -> str:
    """``0.0520 ± 0.0100 (F)``; ``–`` where the configuration has no gap for the attribute."""
    if row is None:
        return "–"
    text = ranking.format(row.gap) + ("" if _missing(row.gap_std) else f" ± {ranking.format(row.gap_std)}")
    return text + ("" if _missing(row.worst_group) else f" ({row.worst_group})")


def _percent(value: float) -> str:
    """Two significant digits below 10 (0.71, 7.6), whole numbers above (12, 100: not 1e+02)."""
    return f"{value:.2g}" if value < 10 else f"{value:.0f}"


def best_configs_html(frame: "pd.DataFrame", metric: str) -> str:
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
        trainable = "–"
        if not _missing(row["trainable_params"]):
            share = "" if _missing(row["total_params"]) or not row["total_params"] else \
                f" ({_percent(100.0 * int(row['trainable_params']) / int(row['total_params']))}%)"
            trainable = f"{int(row['trainable_params']):,}{share}"
        wall = "–" if _missing(row["wall_time_s"]) else f"{row['wall_time_s']:.0f} s"
        epochs = "–" if _missing(row["epochs_run"]) else f"{_fmt(row['best_epoch'])} / {row['epochs_run']}"
        cells = [
            ("name", row["dataset"]), ("", f"{row['label_ratio']:g}"), ("name", row["method"]),
            ("name", row["backbone"]), ("", "–" if _missing(row[metric]) else ranking.format(row[metric])),
            *([("", "–" if _missing(row[test]) else ranking.format(row[test]))] if has_test else []),
            ("", trainable), ("", epochs), ("", wall),
            ("name", _params_text(row["params"])), ("name", f"{row['experiment']} / {row['trial_id']}"),
        ]
        lines.append("<tr>" + "".join(f'<td class="{c}">{html.escape(str(v))}</td>' if c else
                                      f"<td>{html.escape(str(v))}</td>" for c, v in cells) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def failures_html(frame: "pd.DataFrame") -> str:
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
            made = format(forecast[key], fmt) if key in forecast else "–"
            took = format(actual[key], fmt) if key in actual else "–"
            return f"<td>{made}</td><td>{took}</td>"

        wall = (f"{forecast['wall_s']:.0f} ({forecast['wall_low_s']:.0f}..{forecast['wall_high_s']:.0f})"
                if "wall_s" in forecast else "–")
        took_wall = f"{actual['wall_s']:.0f}" if "wall_s" in actual else "–"
        rows.append(f"<tr><td>{html.escape(str(entry.get('experiment', '')))}</td>{pair('trials', 'd')}"
                    f"{pair('epochs', '.0f')}{pair('device_hours', '.3f')}<td>{wall}</td><td>{took_wall}</td></tr>")
    head = ("<tr><th>search</th><th>trials forecast</th><th>trials</th><th>epochs forecast</th><th>epochs</th>"
            "<th>device-hours forecast</th><th>device-hours</th><th>wall s forecast (range)</th><th>wall s</th></tr>")
    note = ('<p class="meta">The forecast a search stored when it started (from the leaderboard\'s epoch times of '
            "the same dataset, backbone and methods; – where it had none) and what it took.</p>")
    return f"<h2>Forecast and actual cost</h2>{note}<table>{head}{''.join(rows)}</table>"


def render_html(
    frame: "pd.DataFrame", experiments: list[str], figures: list[FigureResult], metric: str, source: str,
    split: str | None = None, baseline: str = "full", costs: Sequence[dict[str, Any]] = (),
) -> str:
    """The whole report page; images are embedded, nothing is fetched from the network."""
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
        f'<p class="meta">{html.escape(comparison_caption(frame, metric, split))}</p>',
        comparison_html(frame, metric, split),
        wins_html(frame, metric, split, baseline),
        subgroups_html(frame, metric),
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
