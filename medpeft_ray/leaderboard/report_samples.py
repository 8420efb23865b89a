"""The report's generation parts: which rows are generation trials, how their FID was computed,
and the samples' figure (``samples.png``: each method's best trial's images under the same prompts).

Where FID came from a stand-in feature extractor rather than Inception (``details["fid_stand_in"]``),
:func:`stand_in_note` says so, and the report shows it beside every FID.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from medpeft_ray.leaderboard import views
from medpeft_ray.leaderboard.formatting import is_missing
from medpeft_ray.leaderboard.report_figures import FigureResult, to_png
from medpeft_ray.metrics import get_metric
from medpeft_ray.samples import SAMPLE_SEED, SAMPLES_FILE
from medpeft_ray.storage import is_uri

#: the generated samples' figure (``samples.png``), drawn for generation rows only
SAMPLES_FIGURE = "samples"
#: the prompts (columns) the samples' figure shows at most: the first of the fixed validation prompts
SAMPLE_COLUMNS = 8
#: the metric of generation rows, shown beside each method's samples whatever the report ranks by
FID = "val_fid"


def generation_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of generation trials: those with an FID, or with the prompts of their samples in ``details``."""
    if not len(frame):
        return frame
    fid = frame[FID].notna() if FID in frame else pd.Series(False, index=frame.index)
    prompts = (frame["details"].map(lambda d: bool(views.details_of(d).get("prompts"))).astype(bool)
               if "details" in frame else pd.Series(False, index=frame.index))
    return frame[fid | prompts]


def fid_extractors(frame: pd.DataFrame) -> tuple[dict[str, bool], int, int]:
    """The FID feature extractors the generation rows with an FID name (each: whether it is a stand-in
    for Inception), how many of those rows used a stand-in (``details["fid_stand_in"]``), and how many
    rows have an FID."""
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


def stand_in_note(frame: pd.DataFrame) -> str:
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


def _fid_words(frame: pd.DataFrame) -> str:
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
    images: np.ndarray  # (columns, H, W) grey or (columns, H, W, 3) colour, uint8


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


def read_samples(checkpoint: Any, samples_file: str, count: int = SAMPLE_COLUMNS) -> tuple[np.ndarray | None, str]:
    """The first ``count`` images of a checkpoint folder's samples (uint8, (n, H, W) or (n, H, W, 3)),
    or None and why not, in a few words (no checkpoint, cloud storage, missing, unreadable, not images)."""
    if is_missing(checkpoint) or not str(checkpoint):
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


def sample_grids(frame: pd.DataFrame, metric: str, samples_file: str) -> tuple[list[SampleGrid], list[str]]:
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
                                   None if is_missing(fid) else float(fid), float(row[metric]), images))
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


def samples_grid_figure(grids: Sequence[SampleGrid], metric: str) -> Figure:
    """The samples' figure: a block per (dataset, label ratio) titled by it, a row of images per method
    (row label: method and FID), a column per prompt (header: the prompt, wrapped, in small type)."""
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


def samples_figure(frame: pd.DataFrame, metric: str) -> FigureResult | None:
    """The samples' figure of the generation rows, its caption and notes; None when there are none."""
    if generation_rows(frame).empty:
        return None
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
    png = to_png(samples_grid_figure(grids, metric)) if grids else None
    missing = ("no method's best trial has readable samples" if notes else
               f"no generation trial has a {ranking.title}")
    return FigureResult(SAMPLES_FIGURE, "Samples per method", caption.strip(), png, missing, legend, notes)
