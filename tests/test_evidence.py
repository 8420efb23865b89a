"""Intervals and paired tests in the comparisons: rows whose trials kept per-image predictions, read
back by ``leaderboard --compare``, ``best`` and the report (no Ray: the rows and files are written here)."""

from __future__ import annotations

import json
import math
import re
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import fill_results, leaderboard_row, tiny_search
from typer.testing import CliRunner

from medpeft_ray.cli import app
from medpeft_ray.config import validate_search_dict
from medpeft_ray.errors import UsageError
from medpeft_ray.evaluation.intervals import bootstrap_interval
from medpeft_ray.evaluation.paired import paired_test
from medpeft_ray.evaluation.predictions import SplitPredictions, read_predictions, write_predictions
from medpeft_ray.leaderboard import LeaderboardStore, views
from medpeft_ray.leaderboard.evidence import (
    EvidenceSettings,
    IntervalCache,
    PredictionFiles,
    interval_of,
    task_tests,
    with_intervals,
)
from medpeft_ray.metrics import metric_values

PATIENTS, IMAGES_PER_PATIENT, CLASSES = 120, 3, ("a", "b")


def _labels(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    groups = np.repeat(np.arange(PATIENTS), IMAGES_PER_PATIENT).astype(str)
    patient_finding = rng.random((PATIENTS, len(CLASSES))) < 0.4
    labels = patient_finding[np.repeat(np.arange(PATIENTS), IMAGES_PER_PATIENT)].astype(np.float32)
    return labels, groups


def _predictions(labels: np.ndarray, groups: np.ndarray, signal: float, seed: int, split: str = "test",
                 epoch: int = 2) -> SplitPredictions:
    """Scores whose separation of the classes grows with ``signal``."""
    noise = np.random.default_rng(seed).normal(size=labels.shape)
    scores = 1 / (1 + np.exp(-(signal * (labels - 0.5) + noise)))
    return SplitPredictions(split, epoch, scores.astype(np.float32), labels, groups, CLASSES, True,
                            np.full(len(CLASSES), 0.5))


def _confirmed(results: Path, method: str, dataset: str, signal: float, seeds: list[int],
               labels: np.ndarray, groups: np.ndarray, epoch: int = 2) -> list:
    """A search trial of ``method`` on ``dataset`` confirmed with ``seeds``, each seed's test
    predictions written and its row's test values computed from them."""
    source = f"{method}-{dataset}"
    # a whole trial config, as a search stores it (`best` validates it before printing)
    search = validate_search_dict(tiny_search(method={"name": method, "options": {}}), "tiny.yaml")
    config = search.trial_config(1.0, {"lr": 1e-3}).model_dump(mode="json")
    records = [leaderboard_row(source, method, 1.0, val_auroc=0.8, dataset=dataset, experiment="study",
                               config=config)]
    for seed in seeds:
        kept = _predictions(labels, groups, signal, seed=zlib.crc32(f"{source}-{seed}".encode()), epoch=epoch)
        folder = results / "trials" / f"{source}-s{seed}" / "predictions"
        write_predictions(str(folder), kept)
        scored = metric_values(kept.metric_input(), "test")
        records.append(leaderboard_row(
            f"{source}-s{seed}", method, 1.0, val_auroc=0.8, dataset=dataset, experiment="study", role="confirmation",
            seed=seed, source_trial=source, best_epoch=epoch, predictions=str(folder),
            test_auroc=scored["test_auroc"], test_f1=scored["test_f1"], test_accuracy=scored["test_accuracy"]))
    return records


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """lora clearly ahead of full on dataset ``clear``, level with it on ``level``; 2 seeds each.
    ``old`` has rows without predictions (written before they were kept)."""
    rng = np.random.default_rng(0)
    labels, groups = _labels(rng)
    out = tmp_path / "results"
    out.mkdir()
    records = [
        *_confirmed(out, "lora", "clear", 3.0, [0, 1], labels, groups),
        *_confirmed(out, "full", "clear", 0.8, [0, 1], labels, groups),
        *_confirmed(out, "lora", "level", 1.5, [0, 1], labels, groups),
        *_confirmed(out, "full", "level", 1.5, [0, 1], labels, groups),
        leaderboard_row("lora-old", "lora", 1.0, val_auroc=0.7, dataset="old", experiment="study"),
        leaderboard_row("full-old", "full", 1.0, val_auroc=0.6, dataset="old", experiment="study"),
    ]
    return fill_results(out, *records)


def _rows(results: Path) -> pd.DataFrame:
    store = LeaderboardStore(f"sqlite:///{results / 'leaderboard.db'}", create=False)
    try:
        return store.query()
    finally:
        store.engine.dispose()


def run(*args: object) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cells_get_the_bootstrap_interval_of_their_seeds(results: Path) -> None:
    rows = _rows(results)
    settings = EvidenceSettings(resamples=500)
    study = with_intervals(views.study_table(rows, metric="val_auroc"), rows, settings)
    # the cells where every configuration was confirmed show test values; "old" has only validation
    assert study.split == "val"  # one cell (old) has no test value: the table shows validation
    study = with_intervals(views.study_table(rows, metric="val_auroc", split="test"), rows, settings)
    files = PredictionFiles(rows)
    cell = study.cells[(study.cells["method"] == "lora") & (study.cells["dataset"] == "clear")].iloc[0]
    runs = files.of_rows(cell["ids"], "test")
    expected = bootstrap_interval(runs, "test_auroc", level=0.95, resamples=500, seed=0)
    assert study.low.at["lora", "clear @ 1"] == pytest.approx(expected.low)
    assert study.high.at["lora", "clear @ 1"] == pytest.approx(expected.high)
    assert expected.low < study.means.at["lora", "clear @ 1"] < expected.high
    assert expected.unit == "patients" and expected.units == PATIENTS and expected.seeds == 2
    # the rows without predictions have no interval, and the note says why
    assert math.isnan(study.low.at["lora", "old @ 1"]) or "old @ 1" not in study.low
    assert "95% bootstrap interval of the seed mean, resampling patients (500 resamples)" in study.interval_note


def test_paired_tests_say_better_or_not_distinguishable_and_count_them(results: Path) -> None:
    rows = _rows(results)
    settings = EvidenceSettings()
    tests = task_tests(rows, "val_auroc", "full", "test", settings).set_index("dataset")
    assert tests.at["clear", "verdict"] == "better" and tests.at["clear", "test"].startswith("DeLong")
    assert tests.at["level", "verdict"] == "not distinguishable"
    # AUROC's per-class DeLong tests come along (for reading; the verdict is the macro test's)
    assert set(tests.at["clear", "per_class"]) == set(CLASSES)
    assert all(d > 0 and 0 <= p < 0.05 for d, p in tests.at["clear", "per_class"].values())
    # the same test as the statistics module gives on the same files, then Holm over lora's two tasks
    files = PredictionFiles(rows)
    mine = files.of_rows(rows.loc[rows["trial_id"].str.startswith("lora-clear-s"), "id"].tolist(), "test")
    theirs = files.of_rows(rows.loc[rows["trial_id"].str.startswith("full-clear-s"), "id"].tolist(), "test")
    direct = paired_test(mine, theirs, "test_auroc")
    assert tests.at["clear", "p_value"] == pytest.approx(direct.p_value)
    assert tests.at["clear", "difference"] == pytest.approx(direct.difference)
    ordered = sorted(tests["p_value"].dropna())
    assert tests["p_adjusted"].dropna().min() == pytest.approx(min(1.0, 2 * ordered[0]))  # Holm's first step
    # F1 goes through the paired permutation test
    f1 = task_tests(rows, "val_auroc", "full", "test", settings)
    assert set(f1["test"]) - {""} <= {"DeLong", "DeLong, clustered by patient (Obuchowski)"}


def test_leaderboard_compare_shows_intervals_and_verdict_counts(results: Path) -> None:
    shown = run("leaderboard", "--results", results, "--compare", "methods", "--split", "test",
                "--dataset", "clear")
    assert shown.exit_code == 0, shown.output
    out = " ".join(shown.stdout.split())
    assert "lora vs full: 1 better, 0 worse, 0 not distinguishable of 1 tasks" in out
    assert "(point estimates: lora beats full in 1 of 1 tasks" in out
    assert "95% bootstrap interval of the seed mean" in out and "[" in out
    every = run("leaderboard", "--results", results, "--compare", "methods", "--split", "test")
    text = " ".join(every.stdout.split())
    # "old" is a task both ran, without predictions: counted, and said
    assert "lora vs full: 1 better, 0 worse, 1 not distinguishable of 3 tasks (1 without predictions to test)" in text
    records = json.loads(run("leaderboard", "--results", results, "--compare", "methods", "--split", "test",
                             "--format", "json").stdout)
    lora = next(r for r in records if r["method"] == "lora")
    assert lora["clear @ 1 low"] < lora["clear @ 1"] < lora["clear @ 1 high"]
    # Benjamini-Hochberg and another level are options; a bad one is one line
    assert "alpha 0.01" in " ".join(run("leaderboard", "--results", results, "--compare", "methods", "--split",
                                        "test", "--alpha", "0.01", "--correction", "bh").stdout.split())
    bad = run("leaderboard", "--results", results, "--compare", "methods", "--correction", "bonferroni")
    assert bad.exit_code == 2 and "--correction: no correction 'bonferroni'; corrections: holm, bh, none" in bad.output


def test_best_prints_the_confirmed_configurations_interval(results: Path) -> None:
    shown = run("best", "--results", results, "--dataset", "clear", "--label-ratio", "1", "--method", "lora")
    assert shown.exit_code == 0, shown.output
    line = shown.stderr.strip().splitlines()[-1]
    assert line.startswith("test_auroc 0.") and "95% interval [0." in line
    assert "(2 seed(s), resampling 120 patients, 2000 resamples)" in line


def test_a_file_from_another_epoch_or_gone_is_named_not_used(results: Path) -> None:
    rows = _rows(results)
    seed = rows[rows["trial_id"] == "lora-clear-s0"].iloc[0]
    # the file says epoch 2; a row whose best epoch is 3 must not be scored with it
    rows.loc[rows["id"] == seed["id"], "best_epoch"] = 3
    found = PredictionFiles(rows).of_row(int(seed["id"]), "test")
    assert isinstance(found, str) and "predictions of epoch 2, but trial lora-clear-s0's best epoch is 3" in found
    Path(seed["predictions"], "test.npz").write_text("not an archive")
    garbage = PredictionFiles(_rows(results)).of_row(int(seed["id"]), "test")
    assert isinstance(garbage, str) and garbage.endswith("test.npz: not a predictions file (no NumPy .npz archive)")
    Path(seed["predictions"], "test.npz").unlink()
    gone = PredictionFiles(_rows(results)).of_row(int(seed["id"]), "test")
    assert isinstance(gone, str) and "test.npz: cannot read the trial's test predictions" in gone


def test_bad_settings_are_one_line() -> None:
    with pytest.raises(UsageError, match="--alpha: 0.7 is not between 0 and 0.5"):
        EvidenceSettings(alpha=0.7)
    with pytest.raises(UsageError, match="--resamples: 10 is too few"):
        EvidenceSettings(resamples=10)


def test_report_has_intervals_tests_and_calibration(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    shown = run("report", "study", "--results", results, "--out", out, "--split", "test")
    assert shown.exit_code == 0, shown.output
    page = (out / "index.html").read_text()
    assert "lora vs full: 1 better, 0 worse, 1 not distinguishable of 3 tasks (1 without predictions to test)" in page
    assert '<table class="tests">' in page and "no test: trial lora-old kept no predictions" in page
    assert "per class: difference (p, uncorrected)" in page and re.search(r"<td class=\"name\">a \+0\.\d{4} \(", page)
    assert '<table class="calibration">' in page and (out / "calibration.png").is_file()
    assert "No calibration for lora at old @ 1: trial lora-old kept no predictions" in page


def test_experiments_compare_with_intervals(results: Path) -> None:
    """``--compare experiments``: each experiment a row (its key is a cell's experiment too)."""
    shown = run("leaderboard", "--results", results, "--compare", "experiments", "--split", "test",
                "--dataset", "clear", "--method", "lora")
    assert shown.exit_code == 0, shown.output
    out = " ".join(shown.stdout.split())
    assert "experiment clear @ 1" in out and "study 0.9" in out and "[0.9" in out, out


def test_another_metric_beside_each_cell_is_that_of_the_same_configuration(results: Path) -> None:
    """The benchmark papers' layout (AUC and ACC per dataset): the configuration is chosen on the
    ranking metric; the other metric is the same seeds' mean, never chosen on."""
    records = json.loads(run("leaderboard", "--results", results, "--compare", "methods", "--split", "test",
                             "--also", "val_accuracy", "--format", "json").stdout)
    rows = _rows(results)
    for record in records:
        seeds = rows[rows["trial_id"].str.startswith(f"{record['method']}-clear-s")]
        assert record["clear @ 1 test_accuracy"] == pytest.approx(seeds["test_accuracy"].mean())
        assert record["clear @ 1 low"] < record["clear @ 1"] < record["clear @ 1 high"]
    shown = run("leaderboard", "--results", results, "--compare", "methods", "--split", "test",
                "--also", "val_accuracy", "--format", "markdown", "--dataset", "clear")
    assert "| method | clear @ 1 | clear @ 1 test_accuracy | mean rank |" in shown.stdout
    alone = run("leaderboard", "--results", results, "--also", "val_accuracy")
    assert alone.exit_code == 2 and "--also puts a metric beside --compare's cells" in alone.output


def test_intervals_are_kept_per_file_and_recomputed_when_a_file_changes(results: Path, tmp_path: Path) -> None:
    rows = _rows(results)
    cell = {"ids": rows.loc[rows["trial_id"].str.startswith("lora-clear-s"), "id"].tolist(), "split": "test"}
    settings = EvidenceSettings(resamples=200)
    cache = IntervalCache(tmp_path / "cache")
    first = interval_of(cell, "val_auroc", settings, PredictionFiles(rows, cache=cache))
    (kept,) = (tmp_path / "cache" / "intervals").glob("*.json")
    assert json.loads(kept.read_text()) == first and first["why"] == ""
    # a second comparison reads it: what the file says is what it gives
    kept.write_text(json.dumps({**first, "low": 0.123}))
    assert interval_of(cell, "val_auroc", settings, PredictionFiles(rows, cache=cache))["low"] == 0.123
    # other settings, or a rewritten predictions file (a trial run again), are another key
    assert interval_of(cell, "val_auroc", EvidenceSettings(resamples=300), PredictionFiles(rows, cache=cache)
                        )["low"] != 0.123
    folder = rows.loc[rows["id"] == cell["ids"][0], "predictions"].iloc[0]
    write_predictions(folder, read_predictions(folder, "test"))
    again = interval_of(cell, "val_auroc", settings, PredictionFiles(rows, cache=cache))
    assert again["low"] == pytest.approx(first["low"])
