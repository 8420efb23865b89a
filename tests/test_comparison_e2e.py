"""A real two-method search ends with a comparison a reviewer accepts: each cell's bootstrap interval
from the confirmation seeds' kept predictions, and the paired test's verdict against the baseline,
in ``leaderboard --compare`` and in the report (Ray Tune + Optuna, warm executors, DeepSpeed)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import cli_in_process, leaderboard_rows, tiny_search

from medpeft_ray.evaluation.intervals import bootstrap_interval
from medpeft_ray.evaluation.predictions import read_predictions
from medpeft_ray.metrics import metric_values

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture
def cli(ray_session: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Any:
    """``medpeft-ray`` run in this process, in ``tmp_path``, on the test run's Ray."""
    return lambda *args: cli_in_process([str(a) for a in args], monkeypatch, capsys, cwd=tmp_path)


def _dataset(name: str, tmp_path: Path) -> dict[str, Any] | None:
    """The dataset section: None for the synthetic default, else a MedMNIST-layout fixture
    (DermaMNIST's layout: colour, 7 classes) at 28 px, as the medmnist package saves it."""
    if name == "synthetic":
        return None
    from medmnist_fixtures import write_medmnist

    write_medmnist(tmp_path / "medmnist", "dermamnist", 28, counts={"train": 70, "val": 35, "test": 60})
    return {"name": "medmnist", "root": str(tmp_path / "medmnist"), "label_ratios": [1.0], "image_size": 32,
            "options": {"flag": "dermamnist", "size": 28}}


@pytest.mark.parametrize("dataset", ["synthetic", "medmnist"])
def test_a_two_method_search_ends_with_intervals_and_tested_verdicts(dataset: str, tmp_path: Path, cli: Any) -> None:
    config = tiny_search(
        method={"name": ["lora", "full"], "options": {"lora": {"rank": 2}}},
        # one trial of each method, both confirmed with two seeds and scored on the test split
        search={"num_samples": 2, "seed": 0, "points_to_evaluate": [{"method": "lora"}, {"method": "full"}],
                "confirm": {"top_k": 2, "seeds": 2}},
    )
    # two label ratios on the synthetic default: their studies run at once, each with its own plan
    config["dataset"] = _dataset(dataset, tmp_path) or {**config["dataset"], "label_ratios": [0.5, 1.0]}
    del config["space"]  # each method's own default ranges
    space = tmp_path / "two.yaml"
    space.write_text(yaml.safe_dump(config))
    results = tmp_path / "results"
    search = cli("search", "--space", space, "--results", results)
    assert search.returncode == 0, search.stdout[-3000:] + search.stderr[-3000:]

    rows = leaderboard_rows(results)
    # a MedMNIST set is named as its file is, so that two sets are never one task
    assert {r["dataset"] for r in rows} == {"synthetic" if dataset == "synthetic" else "dermamnist"}
    seeds = [r for r in rows if r["role"] == "confirmation"]
    ratios = sorted({r["label_ratio"] for r in rows})
    assert sorted(r["method"] for r in seeds) == sorted(["full", "full", "lora", "lora"] * len(ratios))
    # seed 0 re-trains its search trial exactly (same configuration, seed, epochs and label ratio's
    # images): a confirmation that trained on another study's label ratio would differ here
    search = {r["trial_id"]: r for r in rows if r["role"] == "search"}
    for row in (r for r in seeds if r["seed"] == 0):
        source = search[row["source_trial"]]
        assert (row["label_ratio"], row["val_auroc"]) == (source["label_ratio"], source["val_auroc"]), row
    seeds = [r for r in seeds if r["label_ratio"] == 1.0]
    for method in ("lora", "full"):
        runs = [read_predictions(r["predictions"], "test") for r in seeds if r["method"] == method]
        mine = [r for r in seeds if r["method"] == method]
        # each seed's file gives its row's test value, and the interval is that of their mean
        for run, row in zip(runs, mine):
            assert metric_values(run.metric_input(), "test")["test_auroc"] == pytest.approx(row["test_auroc"], abs=1e-6)
        interval = bootstrap_interval(runs, "test_auroc")
        assert interval.estimate == pytest.approx(sum(r["test_auroc"] for r in mine) / 2, abs=1e-6)

    shown = cli("leaderboard", "--results", results, "--compare", "methods", "--baseline", "full")
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    assert re.search(r"lora 0\.\d{4} \[0\.\d{4}, [01]\.\d{4}\]", text), text
    verdict = re.search(r"lora vs full: (\d) better, (\d) worse, (\d) not distinguishable of (\d) tasks", text)
    assert verdict and sum(int(n) for n in verdict.groups()[:3]) == int(verdict.group(4)) == len(ratios), text
    assert "DeLong" in text and "Holm" in text and "bootstrap interval of the seed mean" in text
    records = json.loads(cli("leaderboard", "--results", results, "--compare", "methods", "--format", "json").stdout)
    for record in records:
        cell = next(k for k in record if k.endswith(" low")).removesuffix(" low")
        assert record[f"{cell} low"] <= record[cell] <= record[f"{cell} high"], record

    report = cli("report", "tiny", "--results", results, "--out", tmp_path / "report")
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "report" / "index.html").read_text()
    assert f"lora vs full: {verdict.group(1)} better" in page and '<table class="tests">' in page
    assert '<table class="calibration">' in page and (tmp_path / "report" / "calibration.png").is_file()
