"""The ``medpeft-ray`` CLI: validate, search (failing fast on bad configs) and leaderboard."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import fill_results
from typer.testing import CliRunner

from medpeft_ray.cli import app
from medpeft_ray.leaderboard import TrialRecord

REPO = Path(__file__).resolve().parents[1]
LORA_YAML = REPO / "search_spaces" / "lora.yaml"
CONSOLE_SCRIPT = Path(sys.executable).with_name("medpeft-ray")
COLUMNS = ["experiment", "dataset", "label_ratio", "method", "backbone", "val_auroc", "trainable_params",
           "total_params", "config"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MEDPEFT_DB", raising=False)
    monkeypatch.delenv("MEDPEFT_RESULTS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # a stray ./medpeft-results would land here, not in the repo


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: Any) -> Any:
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    if result.exception is not None:
        assert isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def bad_yaml(tmp_path: Path) -> Path:
    data = yaml.safe_load(LORA_YAML.read_text())
    data["space"]["rank"] = {"type": "int", "low": 0, "high": 8}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def record(trial_id: str, **overrides: Any) -> TrialRecord:
    values: dict[str, Any] = dict(
        experiment="exp1", trial_id=trial_id, dataset="synthetic", label_ratio=1.0, method="lora",
        backbone="vit_tiny_patch16_224", status="completed",
        config={"method": {"name": "lora", "options": {"rank": 8}}, "train": {"lr": 0.001}},
        params={"lr": 0.001, "rank": 8}, val_auroc=0.7, val_loss=0.5, best_epoch=1, epochs_run=2,
        trainable_params=20_000, total_params=5_500_000, wall_time_s=30.0, startup_s=3.0, train_time_s=27.0,
    )
    values.update(overrides)
    return TrialRecord(**values)


fill = fill_results


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """A results folder with four trials in two experiments."""
    return fill(
        tmp_path / "results",
        record("a", val_auroc=0.7, val_loss=0.50, label_ratio=0.1),
        record("b", val_auroc=0.9, val_loss=0.40, label_ratio=1.0, params={"lr": 0.002, "rank": 16}),
        record("c", val_auroc=0.8, val_loss=0.30, method="bitfit", label_ratio=0.1, params={"lr": 0.01},
               config={"method": {"name": "bitfit", "options": {}}}),
        record("d", experiment="exp2", val_auroc=0.6, val_loss=0.60, method="full", backbone="resnet50",
               trainable_params=23_000_000, total_params=23_000_000),
    )


def leaderboard_json(runner: CliRunner, *args: Any) -> list[dict[str, Any]]:
    result = invoke(runner, "leaderboard", *args, "--format", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# ----------------------------------------------------------------------------------------------
# validate
# ----------------------------------------------------------------------------------------------


def test_validate_ok(runner: CliRunner) -> None:
    result = invoke(runner, "validate", "--space", LORA_YAML)
    assert result.exit_code == 0, result.output
    assert f"{LORA_YAML}: ok" in result.stdout
    assert "lora on vit_tiny_patch16_224" in result.stdout
    assert "searching lr, rank" in result.stdout
    assert result.stderr == ""


def test_validate_bad_yaml_exits_2_with_one_line(runner: CliRunner, tmp_path: Path) -> None:
    result = invoke(runner, "validate", "--space", bad_yaml(tmp_path))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0] == "error: bad.yaml: space.rank.low: must be >= 1 (got 0)"
    assert result.stdout == ""


def test_validate_missing_file_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    result = invoke(runner, "validate", "--space", tmp_path / "nope.yaml")
    assert result.exit_code == 2
    assert "nope.yaml: file not found" in result.stderr


def test_validate_requires_space(runner: CliRunner) -> None:
    result = runner.invoke(app, ["validate"])
    assert result.exit_code == 2
    assert "--space" in result.output


# ----------------------------------------------------------------------------------------------
# search: a bad config stops it before anything starts
# ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_search_with_bad_yaml_exits_2_before_starting(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[Any] = []
    fake_runner = types.ModuleType("medpeft_ray.search.runner")
    fake_runner.run_search = lambda *a, **k: started.append((a, k))  # type: ignore[attr-defined]
    # Even if validation wrongly passed, nothing real could start.
    monkeypatch.setitem(sys.modules, "medpeft_ray.search.runner", fake_runner)
    ray_loaded = "ray" in sys.modules

    t0 = time.monotonic()
    result = invoke(runner, "search", "--space", bad_yaml(tmp_path), "--results", tmp_path / "results")
    elapsed = time.monotonic() - t0

    assert result.exit_code == 2, result.output
    assert "bad.yaml: space.rank.low" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert started == []
    assert ("ray" in sys.modules) == ray_loaded
    assert not (tmp_path / "results").exists()
    assert elapsed < 10


@pytest.mark.timeout(60)
def test_search_with_bad_experiment_name_exits_2(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_runner = types.ModuleType("medpeft_ray.search.runner")
    fake_runner.run_search = lambda *a, **k: pytest.fail("search started")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "medpeft_ray.search.runner", fake_runner)
    result = invoke(runner, "search", "--space", LORA_YAML, "--experiment", "a/b")
    assert result.exit_code == 2
    assert "lora.yaml: experiment: must be 1-100 letters" in result.stderr


# ----------------------------------------------------------------------------------------------
# leaderboard
# ----------------------------------------------------------------------------------------------


def test_leaderboard_without_database(runner: CliRunner, tmp_path: Path) -> None:
    empty = tmp_path / "results"
    result = invoke(runner, "leaderboard", "--results", empty)
    assert result.exit_code != 0
    assert "no leaderboard here yet" in result.stderr
    assert "run `medpeft-ray search` first" in result.stderr
    assert str(empty) in result.stderr
    assert not (empty / "leaderboard.db").exists()


def test_leaderboard_empty_store(runner: CliRunner, tmp_path: Path) -> None:
    results = fill(tmp_path / "results")
    result = invoke(runner, "leaderboard", "--results", results)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "No trials recorded yet."
    assert leaderboard_json(runner, "--results", results) == []


def test_leaderboard_json(runner: CliRunner, results: Path) -> None:
    rows = leaderboard_json(runner, "--results", results)
    assert isinstance(rows, list) and len(rows) == 4
    for row in rows:
        assert set(COLUMNS) <= set(row)
        assert isinstance(row["config"], dict)
        assert isinstance(row["params"], dict)
    assert [r["val_auroc"] for r in rows] == [0.9, 0.8, 0.7, 0.6]
    best = rows[0]
    assert (best["experiment"], best["dataset"], best["label_ratio"], best["method"], best["backbone"]) == (
        "exp1", "synthetic", 1.0, "lora", "vit_tiny_patch16_224")
    assert (best["trainable_params"], best["total_params"]) == (20_000, 5_500_000)
    assert best["params"] == {"lr": 0.002, "rank": 16}
    assert best["config"] == {"method": {"name": "lora", "options": {"rank": 8}}, "train": {"lr": 0.001}}


def test_leaderboard_csv(runner: CliRunner, results: Path) -> None:
    result = invoke(runner, "leaderboard", "--results", results, "--format", "csv")
    assert result.exit_code == 0, result.output
    header = result.stdout.splitlines()[0].split(",")
    assert set(COLUMNS) <= set(header)
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 4
    assert [r["method"] for r in rows] == ["lora", "bitfit", "lora", "full"]
    assert json.loads(rows[0]["config"]) == {"method": {"name": "lora", "options": {"rank": 8}}, "train": {"lr": 0.001}}
    assert json.loads(rows[0]["params"]) == {"lr": 0.002, "rank": 16}


def test_leaderboard_table(runner: CliRunner, results: Path) -> None:
    result = invoke(runner, "leaderboard", "--results", results)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "medpeft-ray leaderboard" in out
    for text in ("lora", "bitfit", "full", "exp2", "resnet50", "0.9000", "20,000", "23,000,000", "rank=16", "30 s"):
        assert text in out, text
    assert out.index("0.9000") < out.index("0.8000") < out.index("0.7000") < out.index("0.6000")


def test_leaderboard_filters(runner: CliRunner, results: Path) -> None:
    def ids(*args: Any) -> list[str]:
        return [r["trial_id"] for r in leaderboard_json(runner, "--results", results, *args)]

    assert ids("--method", "lora") == ["b", "a"]
    assert ids("--label-ratio", "0.1") == ["c", "a"]
    assert ids("--top", "2") == ["b", "c"]
    assert ids("--experiment", "exp2") == ["d"]
    assert ids("--backbone", "resnet50") == ["d"]
    assert ids("--dataset", "synthetic", "--method", "bitfit") == ["c"]
    assert ids("--status", "completed", "--top", "1") == ["b"]
    assert ids("--sort", "val_loss") == ["c", "b", "a", "d"]  # lower loss first
    assert ids("--sort", "trainable_params", "--top", "1") == ["a"]  # fewest first; ties by insertion


def test_leaderboard_table_filters(runner: CliRunner, results: Path) -> None:
    result = invoke(runner, "leaderboard", "--results", results, "--method", "bitfit")
    assert result.exit_code == 0
    assert "bitfit" in result.stdout
    assert "0.8000" in result.stdout and "0.9000" not in result.stdout


@pytest.mark.parametrize("args", [["--method", "adapter"], ["--label-ratio", "0.5"], ["--experiment", "nope"],
                                  ["--status", "failed"]])
def test_leaderboard_filter_matching_nothing(runner: CliRunner, results: Path, args: list[str]) -> None:
    result = invoke(runner, "leaderboard", "--results", results, *args)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "No trials match."


def test_leaderboard_bad_sort_column(runner: CliRunner, results: Path) -> None:
    result = invoke(runner, "leaderboard", "--results", results, "--sort", "accuracy")
    assert result.exit_code == 2
    assert "cannot sort by 'accuracy'" in result.stderr


def test_leaderboard_top_must_be_positive(runner: CliRunner, results: Path) -> None:
    result = runner.invoke(app, ["leaderboard", "--results", str(results), "--top", "0"])
    assert result.exit_code == 2


def test_leaderboard_honours_medpeft_results(runner: CliRunner, results: Path, monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    monkeypatch.setenv("MEDPEFT_RESULTS", str(results))
    assert len(leaderboard_json(runner)) == 4
    # an explicit --results wins over the environment
    other = fill(tmp_path / "other", record("z", experiment="solo"))
    rows = leaderboard_json(runner, "--results", other)
    assert [r["experiment"] for r in rows] == ["solo"]
    monkeypatch.setenv("MEDPEFT_RESULTS", str(tmp_path / "empty"))
    result = invoke(runner, "leaderboard")
    assert result.exit_code != 0
    assert str(tmp_path / "empty") in result.stderr


def test_leaderboard_default_results_folder_is_cwd(runner: CliRunner, tmp_path: Path) -> None:
    fill(Path.cwd() / "medpeft-results", record("here"))
    assert [r["trial_id"] for r in leaderboard_json(runner)] == ["here"]


def test_leaderboard_db_option_and_env(runner: CliRunner, results: Path, monkeypatch: pytest.MonkeyPatch,
                                       tmp_path: Path) -> None:
    url = f"sqlite:///{results / 'leaderboard.db'}"
    assert len(leaderboard_json(runner, "--db", url)) == 4
    monkeypatch.setenv("MEDPEFT_DB", url)
    assert len(leaderboard_json(runner, "--results", tmp_path / "ignored")) == 4


def test_leaderboard_json_is_strict_json_with_missing_metrics(runner: CliRunner, tmp_path: Path) -> None:
    results = fill(tmp_path / "results", record("ok", val_auroc=0.8),
                   record("failed", status="failed", val_auroc=None, val_loss=None, best_epoch=None,
                          trainable_params=None, total_params=None, error="diverged"))
    result = invoke(runner, "leaderboard", "--results", results, "--format", "json")
    assert result.exit_code == 0

    def reject(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    # pandas turns a column with missing values into floats with NaN; NaN is not JSON
    rows = json.loads(result.stdout, parse_constant=reject)
    assert [r["trial_id"] for r in rows] == ["ok", "failed"]
    assert rows[1]["val_auroc"] is None and rows[1]["trainable_params"] is None and rows[1]["best_epoch"] is None
    assert rows[1]["error"] == "diverged"
    assert rows[0]["val_auroc"] == 0.8
    assert rows[0]["trainable_params"] == 20_000


def test_leaderboard_on_empty_database_file(runner: CliRunner, tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "leaderboard.db").write_bytes(b"")
    result = runner.invoke(app, ["leaderboard", "--results", str(results)])
    assert result.exit_code != 0
    assert "no leaderboard" in result.stderr


# ----------------------------------------------------------------------------------------------
# The installed console script
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_console_script(tmp_path: Path) -> None:
    assert CONSOLE_SCRIPT.is_file(), CONSOLE_SCRIPT
    env = {k: v for k, v in os.environ.items() if k not in ("MEDPEFT_DB", "MEDPEFT_RESULTS")}
    env["HF_HUB_OFFLINE"] = "1"

    ok = subprocess.run([str(CONSOLE_SCRIPT), "validate", "--space", "search_spaces/lora.yaml"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("search_spaces/lora.yaml: ok (lora on vit_tiny_patch16_224; searching lr, rank)")

    bad = subprocess.run([str(CONSOLE_SCRIPT), "validate", "--space", str(bad_yaml(tmp_path))], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr + bad.stdout
    assert bad.stderr.strip().splitlines() == ["error: bad.yaml: space.rank.low: must be >= 1 (got 0)"]


@pytest.mark.parametrize("backbone,expected", [
    ("vit_base_patch16_224", {"lora": 307_214, "linear": 12_302, "full": 85_809_422}),  # 14 classes, 224 px
    ("vit_large_patch16_224", {"lora": 802_830, "linear": 16_398}),
    ("resnet50", {"tsa": 1_286_158, "linear": 28_686, "full": 23_536_718}),
])
@pytest.mark.slow
def test_methods_json_lists_trainable_parameters(runner: CliRunner, backbone: str, expected: dict[str, int]) -> None:
    result = runner.invoke(app, ["methods", "--backbone", backbone, "--num-classes", "14", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r for r in json.loads(result.stdout)}
    for method, count in expected.items():
        assert rows[method]["trainable_params"] == count, method
    for row in rows.values():
        assert row["backbone"] == backbone
        assert row["trainable_percent"] == pytest.approx(100 * row["trainable_params"] / row["total_params"])
    family = "resnet" if backbone.startswith("resnet") else "vit"
    from medpeft_ray.methods import list_methods

    assert set(rows) == set(list_methods(family))
    # LoRA on Q and V, rank 8: 2 x 8 x (d + d) per block, plus the 14-class head and fc_norm
    if backbone == "vit_base_patch16_224":
        assert rows["lora"]["trainable_params"] == 12 * 2 * 8 * (768 + 768) + (768 * 14 + 14) + 2 * 768


@pytest.mark.slow
def test_methods_table_and_bad_backbone(runner: CliRunner) -> None:
    table = runner.invoke(app, ["methods", "--backbone", "vit_small_patch16_224", "--num-classes", "3"])
    assert table.exit_code == 0, table.output
    assert "vpt_deep" in table.stdout and "trainable params" in table.stdout
    bad = runner.invoke(app, ["methods", "--backbone", "vit_bse_patch16_224"])
    assert bad.exit_code == 2
    assert "model.backbone: unknown timm model 'vit_bse_patch16_224' (did you mean 'vit_base_patch16_224'?)" in bad.output
