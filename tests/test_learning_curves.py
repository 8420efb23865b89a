"""Per-trial learning curves: the leaderboard callback keeps every epoch's metrics in the row's
details, and the report draws them (a line per trial, a stopped trial ending where it stopped)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import leaderboard_row

from medpeft_ray.leaderboard import LeaderboardStore
from medpeft_ray.leaderboard.report import make_figures
from medpeft_ray.leaderboard.report_figures import (
    figure_learning_curves,
    learning_curves,
    learning_curves_figure,
    method_colors,
)
from medpeft_ray.metrics import METRICS
from medpeft_ray.search.callbacks import LeaderboardCallback


class FakeTrial:
    def __init__(self, trial_id: str, config: dict[str, Any]) -> None:
        self.trial_id, self.config = trial_id, config

    def get_error(self) -> str | None:
        return None


# ----------------------------------------------------------------------------------------------
# Recorded by the callback
# ----------------------------------------------------------------------------------------------


def test_callback_records_every_metric_per_epoch_in_the_details(tiny_config: Any, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lb.db'}"
    config = tiny_config.model_copy(update={"train": tiny_config.train.model_copy(update={"epochs": 4})})
    callback = LeaderboardCallback(config, 1.0, url)
    full, early = FakeTrial("full", {"lr": 3e-3}), FakeTrial("early", {"lr": 1e-3})
    for trial in (full, early):
        callback.on_trial_start(0, [], trial)
    epochs = callback.epochs
    aurocs = [0.6 + 0.05 * e for e in range(epochs)]
    aurocs[-1] = 0.5  # the best epoch is not the last: the curve still holds every epoch
    for epoch, auroc in enumerate(aurocs, start=1):
        callback.on_trial_result(0, [], full, {"epoch": epoch, "val_auroc": auroc, "val_loss": 1.0 / epoch,
                                               "details": json.dumps({"thresholds": {"a": epoch / 10}})})
    callback.on_trial_result(0, [], early, {"epoch": 1, "val_auroc": 0.3, "val_loss": 0.9})
    callback.on_trial_result(0, [], early, {"epoch": 2, "val_auroc": 0.4, "val_loss": 0.8})
    # restored from its first epoch's checkpoint (a lost worker): epoch 2 again, then it is stopped
    callback.on_trial_result(0, [], early, {"epoch": 2, "val_auroc": float("nan"), "val_loss": 0.7})
    callback.on_trial_complete(0, [], full)
    callback.on_trial_complete(0, [], early)

    rows = LeaderboardStore(url).query().set_index("trial_id")
    curve = rows.loc["full", "details"]["curve"]
    assert set(curve) == {"epoch", *METRICS}
    assert curve["epoch"] == list(range(1, epochs + 1)) and curve["val_auroc"] == pytest.approx(aurocs)
    assert curve["val_loss"] == pytest.approx([1.0 / e for e in range(1, epochs + 1)])
    assert curve["val_f1"] == [None] * epochs  # a metric the results did not carry: a gap, not a zero
    # the best epoch's own details stay beside the curve
    best = max(range(epochs), key=lambda i: aurocs[i]) + 1
    assert rows.loc["full", "best_epoch"] == best and rows.loc["full", "details"]["thresholds"] == {"a": best / 10}
    # the stopped trial's curve ends where it stopped, the restored run's epoch replacing the lost
    # one; its NaN is stored as no value
    assert rows.loc["early", "status"] == "stopped" and rows.loc["early", "epochs_run"] == 2
    assert rows.loc["early", "details"]["curve"]["epoch"] == [1, 2]
    assert rows.loc["early", "details"]["curve"]["val_auroc"] == [0.3, None]
    assert rows.loc["early", "details"]["curve"]["val_loss"] == [0.9, 0.7]


def test_confirmation_rows_have_no_curve(tiny_config: Any, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lb.db'}"
    callback = LeaderboardCallback(tiny_config, 1.0, url, role="confirmation")
    trial = FakeTrial("seed1", {"point": {"params": {"lr": 3e-3}, "seed": 1, "trial_id": "full"}})
    callback.on_trial_start(0, [], trial)
    # a confirmation reports once, at its end: its last epoch's values, its best epoch's (best_*)
    # and that epoch's test values
    callback.on_trial_result(0, [], trial, {"epoch": 3, "val_auroc": 0.7, "best_val_auroc": 0.8, "test_auroc": 0.75, "test_epoch": 2,
                                            "best_details": json.dumps({"thresholds": {"a": 0.3}})})
    callback.on_trial_complete(0, [], trial)
    row = LeaderboardStore(url).query().iloc[0]
    assert row["role"] == "confirmation" and row["val_auroc"] == 0.8 and row["best_epoch"] == 2
    assert row["details"] == {"thresholds": {"a": 0.3}}


# ----------------------------------------------------------------------------------------------
# Drawn by the report
# ----------------------------------------------------------------------------------------------


def curve_row(trial_id: str, method: str, ratio: float, values: list[float | None], **overrides: Any) -> Any:
    curve = {"epoch": list(range(1, len(values) + 1)), "val_auroc": values,
             "val_loss": [None if v is None else 1.0 - v for v in values]}
    best = max((v for v in values if v is not None), default=None)
    return leaderboard_row(trial_id, method, ratio, best, details={"curve": curve}, epochs_run=len(values),
                           **overrides)


@pytest.fixture
def frame(tmp_path: Path) -> pd.DataFrame:
    """Rows through a real store: two methods at two ratios, a stopped and a failed trial, a
    confirmation row and a row from before curves were kept."""
    store = LeaderboardStore(f"sqlite:///{tmp_path / 'lb.db'}")
    rows = [
        curve_row("l1", "lora", 0.1, [0.6, 0.7, 0.75, 0.74]),
        curve_row("b1", "bitfit", 0.1, [0.55, 0.6, 0.62, 0.66]),
        curve_row("b2", "bitfit", 0.1, [0.5, 0.52], status="stopped"),
        curve_row("l2", "lora", 1.0, [0.7, None, 0.8, 0.85]),  # an epoch whose metric was NaN
        curve_row("l3", "lora", 1.0, [0.65, 0.66, 0.4], status="failed", error="training loss is nan"),
        leaderboard_row("old", "bitfit", 1.0, 0.8, epochs_run=4),
        leaderboard_row("c1", "lora", 1.0, 0.84, role="confirmation", seed=1, source_trial="l2",
                        details={"curve": {"epoch": [4], "val_auroc": [0.84]}}),
    ]
    for row in rows:
        store.record(row)
    yield store.query()
    store.engine.dispose()


def test_learning_curves_are_the_search_trials_recorded_epochs(frame: pd.DataFrame) -> None:
    curves = learning_curves(frame, "val_auroc").set_index("trial_id")
    assert sorted(curves.index) == ["b1", "b2", "l1", "l2", "l3"]  # neither the old row nor the confirmation
    assert curves.loc["b2", "epoch"] == [1, 2] and curves.loc["b2", "status"] == "stopped"
    assert curves.loc["l2", "epoch"] == [1, 3, 4] and curves.loc["l2", "value"] == [0.7, 0.8, 0.85]
    assert learning_curves(frame, "val_loss").set_index("trial_id").loc["l1", "value"] == pytest.approx(
        [0.4, 0.3, 0.25, 0.26])
    assert learning_curves(frame, "val_f1").empty  # no curve of that metric
    assert learning_curves(frame.drop(columns="details"), "val_auroc").empty


def test_learning_curves_figure_lines_colours_and_stop_markers(frame: pd.DataFrame) -> None:
    colors = method_colors(frame["method"].unique().tolist())
    fig = learning_curves_figure(frame, "val_auroc", colors)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["synthetic @ 0.1", "synthetic @ 1"]

    def lines(ax: Any) -> list[tuple[list[int], str, Any]]:
        return [(list(line.get_xdata()), line.get_marker(), line.get_color()) for line in ax.get_lines()]

    low, high = lines(panels[0]), lines(panels[1])
    # sorted by method then trial: bitfit b1, bitfit b2 (stopped: its line, then an x where it stopped), lora l1
    assert low == [([1, 2, 3, 4], "None", colors["bitfit"]), ([1, 2], "None", colors["bitfit"]),
                   ([2], "x", colors["bitfit"]), ([1, 2, 3, 4], "None", colors["lora"])]
    assert high == [([1, 3, 4], "None", colors["lora"]), ([1, 2, 3], "None", colors["lora"]),
                    ([3], "v", colors["lora"])]
    assert [t.get_text() for t in panels[0].get_legend().get_texts()] == ["bitfit", "lora", "stopped early"]
    assert [t.get_text() for t in panels[1].get_legend().get_texts()] == ["lora", "failed"]


def test_learning_curves_missing_from_old_leaderboards(frame: pd.DataFrame) -> None:
    old = frame[frame["trial_id"] == "old"]
    assert figure_learning_curves(old, "val_auroc", method_colors(["bitfit"])) is None
    figures = {f.name: f for f in make_figures(old, "val_auroc")}
    assert figures["learning_curves"].png is None and "per epoch" in figures["learning_curves"].missing
    assert figures["metric_vs_ratio"].png is not None  # the other figures do not need curves
    png = {f.name: f for f in make_figures(frame, "val_auroc")}["learning_curves"].png
    assert png is not None and png.startswith(b"\x89PNG")


def test_progress_pickled_before_curves_were_kept_resumes_with_an_empty_curve() -> None:
    from medpeft_ray.search.callbacks import _TrialProgress

    old = {"started_at": 1.0, "best": {"val_auroc": 0.7}, "last": None, "epochs_run": 2, "number": 1}
    restored = _TrialProgress.__new__(_TrialProgress)
    restored.__setstate__(old)  # what unpickling a search started by an older version does
    assert restored.curve == {} and restored.epochs_run == 2 and restored.best == {"val_auroc": 0.7}
