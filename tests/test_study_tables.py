"""The studies' tables from leaderboards with confirmation rows, test metrics and subgroups
(schema version 4's columns, built by hand): mean ± std over seeds, mean rank, wins against full
fine-tuning, worst-group gaps, and the CLI and report that print them."""

from __future__ import annotations

import json
import math
from itertools import count
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import fill_results, leaderboard_row
from typer.testing import CliRunner

from medpeft_ray.cli import app
from medpeft_ray.errors import UsageError
from medpeft_ray.leaderboard import evidence, report_html, views
from medpeft_ray.leaderboard.evidence import EvidenceSettings
from medpeft_ray.leaderboard.formatting import study_text

_ids = count(1)


def row(trial_id: str, method: str, val: float | None, test: float | None = None, *, ratio: float = 0.1,
        role: str = "search", source: str | None = None, seed: int = 0, **overrides: Any) -> dict[str, Any]:
    """One row as the store hands it out (``val_loss`` = 1 - ``val_auroc``)."""
    values = dict(
        id=next(_ids), experiment="study", trial_id=trial_id, dataset="nih", label_ratio=ratio, method=method,
        backbone="vit_base_patch16_224", status="completed" if val is not None else "failed",
        val_auroc=math.nan if val is None else val, val_loss=math.nan if val is None else 1 - val,
        test_auroc=math.nan if test is None else test, role=role, seed=seed, source_trial=source, details=None,
        checkpoint_sha256=None, params={"lr": 1e-3}, config={}, trainable_params=1000, total_params=10_000,
        wall_time_s=10.0, best_epoch=1, epochs_run=2, error=None,
    )
    return {**values, **overrides}


def frame(*rows: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(list(rows))


def confirmed(source: str, method: str, vals: list[float], tests: list[float], **overrides: Any) -> list[dict]:
    """Confirmation rows of ``source``'s configuration, one per seed."""
    return [row(f"{source}-s{seed}", method, v, t, role="confirmation", source=source, seed=seed, **overrides)
            for seed, (v, t) in enumerate(zip(vals, tests))]


def lora_and_full() -> pd.DataFrame:
    """lora at 0.1: two search trials, both confirmed with 3 seeds; full at 0.1: search trials only."""
    return frame(
        row("s1", "lora", 0.80, 0.78),
        row("s2", "lora", 0.82, 0.79),
        *confirmed("s1", "lora", [0.81, 0.82, 0.83], [0.80, 0.81, 0.82]),  # val mean 0.82: chosen
        *confirmed("s2", "lora", [0.80, 0.80, 0.81], [0.85, 0.85, 0.85]),  # better test, never chosen on it
        row("f1", "full", 0.79, 0.77),
        row("f2", "full", 0.75, 0.90),
    )


# ----------------------------------------------------------------------------------------------
# cells and the comparison table
# ----------------------------------------------------------------------------------------------


def test_a_confirmed_cell_is_the_mean_and_std_over_the_chosen_configurations_seeds() -> None:
    rows = lora_and_full()
    long = views.cells(rows, ["method"], "val_auroc").set_index("method")
    assert long.loc["lora", "mean"] == pytest.approx(0.81) and long.loc["lora", "std"] == pytest.approx(0.01)
    assert long.loc["lora", "seeds"] == 3 and long.loc["lora", "confirmed"] and long.loc["lora", "trial_id"] == "s1"
    # full was not confirmed: its best search trial on validation (f1), with f1's test value
    assert long.loc["full", "mean"] == 0.77 and math.isnan(long.loc["full", "std"]) and long.loc["full", "seeds"] == 1
    assert long.loc["full", "trial_id"] == "f1" and not long.loc["full", "confirmed"]


def test_study_table_shows_test_by_default_and_validation_on_request() -> None:
    study = views.study_table(lora_and_full())
    assert study.split == "test" and study.column == "test_auroc" and study.several_seeds
    assert list(study.means.index) == ["lora", "full"] and list(study.means["mean_rank"]) == [1.0, 2.0]
    text = study_text(study)
    assert text.loc["lora", "nih @ 0.1"] == "0.8100 ± 0.0100" and text.loc["full", "nih @ 0.1"] == "0.7700"
    assert list(text["mean rank"]) == ["1.00", "2.00"]
    on_val = views.study_table(lora_and_full(), split="val")
    assert on_val.means.loc["lora", "nih @ 0.1"] == pytest.approx(0.82)
    assert study_text(on_val).loc["lora", "nih @ 0.1"] == "0.8200 ± 0.0100"
    assert views.compare(lora_and_full(), split="val").equals(on_val.means)
    with pytest.raises(UsageError, match="no split 'train' to compare on; splits: val, test"):
        views.compare(lora_and_full(), split="train")


def test_a_table_never_mixes_test_and_validation_values() -> None:
    # full's chosen trial was never scored on the test split: by default the table shows validation
    rows = lora_and_full()
    rows.loc[rows["method"] == "full", "test_auroc"] = math.nan
    study = views.study_table(rows)
    assert study.split == "val" and study_text(study).loc["lora", "nih @ 0.1"] == "0.8200 ± 0.0100"
    assert set(views.cells(rows, ["method"])["split"]) == {"val"}
    on_test = views.study_table(rows, split="test")
    assert study_text(on_test)["nih @ 0.1"].to_dict() == {"lora": "0.8100 ± 0.0100", "full": "–"}
    assert on_test.means.at["lora", "mean_rank"] == 1.0 and math.isnan(on_test.means.at["full", "mean_rank"])


def test_a_leaderboard_without_new_columns_compares_as_before() -> None:
    old = frame(row("a", "lora", 0.7), row("b", "lora", 0.8), row("c", "bitfit", 0.75)).drop(
        columns=["role", "seed", "source_trial", "details", "test_auroc"])
    study = views.study_table(old)
    assert study.split == "val" and not study.several_seeds
    assert study.means.to_dict() == {"nih @ 0.1": {"lora": 0.8, "bitfit": 0.75}, "mean_rank": {"lora": 1.0,
                                                                                             "bitfit": 2.0}}
    assert study_text(study).loc["lora", "nih @ 0.1"] == "0.8000"
    # test values asked for but never recorded: no value, no rank
    on_test = views.study_table(old, split="test")
    assert on_test.means["nih @ 0.1"].isna().all() and study_text(on_test).loc["lora", "nih @ 0.1"] == "–"


def test_mean_rank_is_taken_on_the_means_and_loss_ranks_lowest_first() -> None:
    rows = frame(
        *confirmed("a", "lora", [0.80, 0.90], [0.80, 0.90]),  # mean 0.85
        row("b", "bitfit", 0.86, 0.86),  # one search trial beats lora's mean, not its best seed
        *confirmed("c", "lora", [0.70, 0.70], [0.70, 0.70], ratio=1.0),
        row("d", "bitfit", 0.60, 0.60, ratio=1.0),
    )
    table = views.compare(rows)
    assert table.loc["bitfit", "nih @ 0.1"] == 0.86 and table.loc["lora", "nih @ 0.1"] == pytest.approx(0.85)
    assert table["mean_rank"].to_dict() == {"lora": 1.5, "bitfit": 1.5}
    by_loss = views.compare(rows, metric="val_loss", split="val")
    assert by_loss.loc["lora", "nih @ 1"] == pytest.approx(0.30)
    assert by_loss.loc["bitfit", "nih @ 1"] == pytest.approx(0.4)


def test_confirmation_rows_take_no_part_in_progress_or_importance() -> None:
    rows = lora_and_full()
    steps = views.progress(rows)
    assert set(steps["trial_id"]) == {"s1", "s2", "f1", "f2"}
    assert list(steps[steps["method"] == "lora"]["compute_s"]) == [10.0, 20.0]
    assert views.search_rows(rows)["trial_id"].tolist() == ["s1", "s2", "f1", "f2"]


# ----------------------------------------------------------------------------------------------
# wins against full fine-tuning
# ----------------------------------------------------------------------------------------------

MAE, MRM = "a1" * 32, "b2" * 32


def tasks() -> pd.DataFrame:
    """Two checkpoints x two label ratios on nih: 4 tasks for lora, 3 with a full fine-tuning value."""
    rows = []
    for sha, ratio, lora, full in ((MAE, 0.01, 0.80, 0.77), (MAE, 0.1, 0.82, 0.83), (MRM, 0.01, 0.81, 0.81),
                                   (MRM, 0.1, 0.85, None)):
        rows.append(row(f"l-{sha[:2]}-{ratio}", "lora", lora, lora, ratio=ratio, checkpoint_sha256=sha))
        if full is not None:
            rows.append(row(f"f-{sha[:2]}-{ratio}", "full", full, full, ratio=ratio, checkpoint_sha256=sha))
    rows.append(row("b", "bitfit", 0.9, 0.9, ratio=0.01, checkpoint_sha256=MAE))
    return frame(*rows)


def test_wins_count_tasks_as_model_x_dataset_x_ratio() -> None:
    table = views.wins(tasks())
    assert table.to_dict(orient="records") == [
        {"method": "bitfit", "baseline": "full", "wins": 1, "ties": 0, "losses": 0, "tasks": 1,
         "best_margin": pytest.approx(0.13)},
        {"method": "lora", "baseline": "full", "wins": 1, "ties": 1, "losses": 1, "tasks": 3,
         "best_margin": pytest.approx(0.03)},
    ]
    assert views.wins_lines(table) == ["bitfit beats full in 1 of 1 tasks (by up to 0.1300)",
                                       "lora beats full in 1 of 3 tasks (ties 1) (by up to 0.0300)"]
    # by loss the lead is measured the other way round: the same wins
    assert list(views.wins(tasks(), metric="val_loss")["wins"]) == [1, 1]
    assert views.wins(tasks(), baseline="linear").empty and views.wins(tasks().iloc[:0]).empty


def test_wins_use_the_confirmed_means() -> None:
    rows = frame(*confirmed("a", "lora", [0.8, 0.8], [0.80, 0.76]), row("f", "full", 0.7, 0.79))
    assert views.wins_lines(views.wins(rows)) == ["lora beats full in 0 of 1 tasks"]  # test mean 0.78 < 0.79
    assert views.wins_lines(views.wins(rows, split="val")) == ["lora beats full in 1 of 1 tasks (by up to 0.1000)"]


# ----------------------------------------------------------------------------------------------
# worst-group gaps
# ----------------------------------------------------------------------------------------------


def details(female: float, male: float, gap: float | None = None) -> dict[str, Any]:
    """Subgroup results on the test split; ``gap`` stored as the trial recorded it (None: not stored)."""
    result: dict[str, Any] = {"subgroups": {"sex": {"F": {"test_auroc": female, "n": 40},
                                                    "M": {"test_auroc": male, "n": 60}}}}
    if gap is not None:
        result["worst_group_gap"] = {"sex": {"test_auroc": gap}}
    return result


def test_subgroup_gaps_of_the_chosen_configurations() -> None:
    rows = frame(
        row("s1", "lora", 0.80, 0.78, details=details(0.70, 0.90, gap=0.20)),  # not chosen: confirmed instead
        *[row(f"c{i}", "lora", 0.82, 0.8, role="confirmation", source="s1", seed=i,
              details=json.dumps(details(f, m, gap))) for i, (f, m, gap) in  # text, as JSON, works too
          enumerate(((0.75, 0.80, 0.05), (0.74, 0.81, 0.07), (0.82, 0.80, None)))],
        row("f1", "full", 0.79, 0.77, details=details(0.60, 0.80)),  # gap worked out from the subgroups
        row("f2", "full", 0.70, 0.70),
        row("b1", "bitfit", 0.70, 0.70),  # no details: no gap
    )
    gaps = views.subgroup_gaps(rows).set_index("method")
    assert list(gaps.index) == ["full", "lora"] and set(gaps["attribute"]) == {"sex"}
    lora, full = gaps.loc["lora"], gaps.loc["full"]
    assert lora["gap"] == pytest.approx((0.05 + 0.07 + 0.02) / 3) and lora["seeds"] == 3
    assert lora["gap_std"] == pytest.approx(pd.Series([0.05, 0.07, 0.02]).std())
    assert lora["worst_group"] == "F" and lora["trial_id"] == "s1"  # F is worst in two seeds of three
    assert full["gap"] == pytest.approx(0.20) and math.isnan(full["gap_std"]) and full["worst_group"] == "F"
    assert views.subgroup_gaps(rows.drop(columns="details")).empty
    assert views.subgroup_gaps(rows.assign(details=None)).empty


# ----------------------------------------------------------------------------------------------
# the report's tables
# ----------------------------------------------------------------------------------------------


def test_report_tables_show_mean_and_std_wins_and_gaps() -> None:
    rows = lora_and_full()
    rows.loc[rows["trial_id"] == "f1", "details"] = [details(0.60, 0.80)]
    study = views.study_table(rows, metric="val_auroc")
    table = report_html.comparison_html(study)
    assert '<td class="best">0.8100 ± 0.0100 <span class="rank">(1)</span></td>' in table
    assert '<td>0.7700 <span class="rank">(2)</span></td>' in table
    assert "test_auroc (mean over the confirmation seeds" in report_html.comparison_caption(study)
    settings = EvidenceSettings()
    no_tests = evidence.task_tests(rows, "val_auroc", "full", study.split, settings)
    wins = report_html.wins_html(study, rows, "full", no_tests, settings)
    assert '<p class="wins">lora beats full in 1 of 1 tasks (by up to 0.0400)</p>' in wins
    linear = evidence.task_tests(rows, "val_auroc", "linear", study.split, settings)
    assert report_html.wins_html(study, rows, "linear", linear, settings) == ""
    gaps = report_html.subgroups_html(rows, "val_auroc")
    assert "<h2>Worst-group gap</h2>" in gaps and "<th>sex</th>" in gaps
    assert '<td class="name">full</td><td>0.2000 (F)</td>' in gaps
    assert '<td class="name">lora</td>' not in gaps  # its confirmed configuration scored no subgroups
    page = report_html.render_html(rows, ["study"], [], "val_auroc", "test.db")
    for part in (table, gaps, "lora beats full in 1 of 1 tasks"):
        assert part in page
    assert report_html.subgroups_html(rows.assign(details=None), "val_auroc") == ""
    # a page without subgroups or a full fine-tuning baseline has neither section
    plain = report_html.render_html(rows.assign(details=None, method="lora"), ["study"], [], "val_auroc", "x")
    assert "Worst-group gap" not in plain and "beats" not in plain


# ----------------------------------------------------------------------------------------------
# From a real leaderboard: `leaderboard --compare` and `report`
# ----------------------------------------------------------------------------------------------


def record(trial_id: str, method: str, val: float, test: float, **overrides: Any) -> Any:
    return leaderboard_row(trial_id, method, 0.1, val, experiment="study", test_auroc=test, **overrides)


@pytest.fixture
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """lora confirmed with 3 seeds (test 0.80, 0.81, 0.82), full and bitfit search trials only."""
    monkeypatch.delenv("MEDPEFT_DB", raising=False)
    seeds = [record(f"c{i}", "lora", 0.82, t, role="confirmation", seed=i, source_trial="s1",
                    details=details(0.70 + i / 100, 0.80)) for i, t in enumerate((0.80, 0.81, 0.82))]
    return fill_results(tmp_path / "results", record("s1", "lora", 0.80, 0.78), *seeds,
                        record("f1", "full", 0.79, 0.77, details=details(0.60, 0.80)), record("b1", "bitfit", 0.7, 0.7))


def cli(*args: Any) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_leaderboard_compare_prints_mean_std_rank_and_wins(results: Path) -> None:
    compare = ("leaderboard", "--results", results, "--compare", "methods")
    assert cli(*compare, "--format", "markdown").strip().splitlines() == [
        "| method | synthetic @ 0.1 | mean rank |",
        "|---|---|---|",
        "| lora | **0.8100 ± 0.0100** | 1.00 |",
        "| full | 0.7700 | 2.00 |",
        "| bitfit | 0.7000 | 3.00 |",
        "",
        "- lora beats full in 1 of 1 tasks (by up to 0.0400)",
        "- bitfit beats full in 0 of 1 tasks",
    ]
    table = cli(*compare)
    assert "cells: test_auroc (mean ± std over confirmation seeds) of the configuration chosen on val_auroc" in table
    assert "0.8100 ± 0.0100" in table and "lora beats full in 1 of 1 tasks" in table
    records = json.loads(cli(*compare, "--format", "json"))
    assert records[0] == {"method": "lora", "synthetic @ 0.1": pytest.approx(0.81),
                          "synthetic @ 0.1 std": pytest.approx(0.01), "synthetic @ 0.1 seeds": 3, "mean_rank": 1.0}
    assert records[1]["synthetic @ 0.1 std"] is None and records[1]["synthetic @ 0.1 seeds"] == 1
    assert all(isinstance(r["synthetic @ 0.1 seeds"], int) for r in records)
    assert cli(*compare, "--format", "csv").splitlines()[0] == (
        "method,synthetic @ 0.1,synthetic @ 0.1 std,synthetic @ 0.1 seeds,mean_rank")
    on_val = cli(*compare, "--split", "val", "--baseline", "bitfit", "--format", "markdown")
    assert "| lora | **0.8200 ± 0.0000** | 1.00 |" in on_val
    assert "- lora beats bitfit in 1 of 1 tasks (by up to 0.1200)" in on_val
    bad = CliRunner().invoke(app, [*map(str, compare), "--split", "train"])
    assert bad.exit_code == 2 and "no split 'train' to compare on" in bad.stderr
    rows = cli("leaderboard", "--results", results, "--format", "markdown").splitlines()
    assert "| test auroc |" in rows[0] and "| role | seed |" in rows[0]


def test_report_command_has_the_study_table_wins_and_gaps(results: Path, tmp_path: Path) -> None:
    cli("report", "study", "--results", results, "--out", tmp_path / "report")
    page = (tmp_path / "report" / "index.html").read_text()
    assert '<td class="best">0.8100 ± 0.0100 <span class="rank">(1)</span></td>' in page
    assert "lora beats full in 1 of 1 tasks (by up to 0.0400)" in page
    # lora's seeds: gaps 0.10, 0.09, 0.08 (F worst); full: 0.20
    assert '<td class="name">full</td><td>0.2000 (F)</td>' in page
    assert '<td class="name">lora</td><td>0.0900 ± 0.0100 (F)</td>' in page
    assert "<th>test_auroc</th>" in page  # the best configurations show their test values too


def test_best_is_a_search_trial_and_says_how_its_configuration_confirmed() -> None:
    rows = frame(row("s1", "lora", 0.80), *confirmed("s1", "lora", [0.90, 0.84], [0.80, 0.82]), row("s2", "lora", 0.79))
    best = views.best(rows).iloc[0].to_dict()
    assert best["trial_id"] == "s1"  # not the lucky seed at 0.90: a confirmation re-trains s1's configuration
    assert views.confirmation_summary(rows, best) == ("confirmed with 2 seed(s): val_auroc 0.8700 ± 0.0424, "
                                                      "test_auroc 0.8100 ± 0.0141")
    assert views.confirmation_summary(rows, views.best(rows[rows["trial_id"] != "s1"]).iloc[0].to_dict()) is None
