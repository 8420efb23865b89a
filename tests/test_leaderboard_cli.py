"""The leaderboard's commands: views (`--compare`, `--pareto`, `--group-by`, markdown, dates),
`best` (YAML, adapter export) and `report`, and their one-line errors."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import fill_results, leaderboard_row, tiny_search
from typer.testing import CliRunner

from medpeft_ray.cli import app
from medpeft_ray.config import TrialConfig, load_trial_config, validate_search_dict
from medpeft_ray.leaderboard import SCHEMA_VERSION, LeaderboardStore, TrialRecord


@pytest.fixture(autouse=True)
def _clean_env(no_results_env: None) -> None:
    """Every test here reads and writes only its own results folder."""


def trial_config(method: str, label_ratio: float, lr: float) -> dict[str, Any]:
    search = validate_search_dict(tiny_search(method={"name": method, "options": {}}), "tiny.yaml")
    return search.trial_config(label_ratio, {"lr": lr}).model_dump(mode="json")


def trial(trial_id: str, method: str, label_ratio: float, val_auroc: float | None, **overrides: Any) -> TrialRecord:
    lr = overrides.pop("lr", 0.003)
    values = dict(experiment="search", config=trial_config(method, label_ratio, lr), params={"lr": lr},
                  val_loss=None if val_auroc is None else round(1 - val_auroc, 6),
                  trainable_params={"lora": 2000, "bitfit": 500}[method], wall_time_s=20.0)
    return leaderboard_row(trial_id, method, label_ratio, val_auroc, **{**values, **overrides})


fill = fill_results


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """Two methods at two label ratios (values checked by hand below)."""
    return fill(
        tmp_path / "results",
        trial("l1", "lora", 0.1, 0.70, lr=0.001),
        trial("l2", "lora", 0.1, 0.76, lr=0.004),
        trial("l3", "lora", 1.0, 0.83),
        trial("l4", "lora", 1.0, None, error="training loss is nan"),
        trial("b1", "bitfit", 0.1, 0.72),
        trial("b2", "bitfit", 1.0, 0.81),
        trial("b3", "bitfit", 1.0, 0.86, experiment="other"),
    )


def run(*args: Any) -> Any:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    if result.exception is not None:
        assert isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def one_error_line(result: Any) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0].removeprefix("error: ")


# ----------------------------------------------------------------------------------------------
# leaderboard views
# ----------------------------------------------------------------------------------------------


def test_compare_methods_json_csv_markdown(results: Path) -> None:
    # lora: 0.76 @ 0.1 (rank 1), 0.83 @ 1 (rank 2) -> 1.5; bitfit: 0.72 (2), 0.86 (1, other experiment) -> 1.5
    result = run("leaderboard", "--results", results, "--compare", "methods", "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [
        {"method": "bitfit", "synthetic @ 0.1": 0.72, "synthetic @ 1": 0.86, "mean_rank": 1.5},
        {"method": "lora", "synthetic @ 0.1": 0.76, "synthetic @ 1": 0.83, "mean_rank": 1.5},
    ]
    # one experiment: bitfit's 0.86 is out, lora wins both columns
    result = run(
        "leaderboard", "--results", results, "--compare", "methods", "--experiment", "search", "--format", "csv"
    )
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [
        (r["method"], float(r["synthetic @ 0.1"]), float(r["synthetic @ 1"]), float(r["mean_rank"])) for r in rows
    ] == [("lora", 0.76, 0.83, 1.0), ("bitfit", 0.72, 0.81, 2.0)]
    result = run(
        "leaderboard", "--results", results, "--compare", "methods", "--experiment", "search", "--format", "markdown"
    )
    assert result.stdout.strip().splitlines() == [
        "| method | synthetic @ 0.1 | synthetic @ 1 | mean rank |",
        "|---|---|---|---|",
        "| lora | **0.7600** | **0.8300** | 1.00 |",
        "| bitfit | 0.7200 | 0.8100 | 2.00 |",
    ]
    table = run("leaderboard", "--results", results, "--compare", "methods").stdout
    assert "synthetic @ 0.1" in table and "0.7600" in table and "mean rank" in table


def test_compare_by_loss_and_backbones(results: Path) -> None:
    rows = json.loads(
        run(
            "leaderboard",
            "--results",
            results,
            "--compare",
            "methods",
            "--sort",
            "val_loss",
            "--experiment",
            "search",
            "--format",
            "json",
        ).stdout
    )
    assert rows[0]["method"] == "lora" and rows[0]["synthetic @ 0.1"] == pytest.approx(0.24)
    rows = json.loads(run("leaderboard", "--results", results, "--compare", "backbones", "--format", "json").stdout)
    assert rows == [
        {"backbone": "vit_tiny_patch16_224", "synthetic @ 0.1": 0.76, "synthetic @ 1": 0.86, "mean_rank": 1.0}
    ]


def test_pareto_and_group_by(results: Path) -> None:
    def ids(*args: Any) -> list[str]:
        result = run("leaderboard", "--results", results, *args, "--format", "json")
        assert result.exit_code == 0, result.output
        return [r["trial_id"] for r in json.loads(result.stdout)]

    # per ratio: bitfit is cheaper (500 vs 2000 parameters); lora is better where it beats bitfit
    assert ids("--pareto") == ["b1", "l2", "b3"]
    assert ids("--pareto", "--experiment", "search") == ["b1", "l2", "b2", "l3"]
    assert ids("--group-by", "method") == ["b3", "l3"]
    assert ids("--group-by", "method,label_ratio", "--experiment", "search") == ["l3", "b2", "l2", "b1"]
    assert ids("--group-by", "method", "--top", "1") == ["b3"]
    assert ids("--group-by", "method", "--sort", "val_loss") == ["b3", "l3"]


def test_markdown_rows_and_date_filters(results: Path) -> None:
    store = LeaderboardStore(f"sqlite:///{results / 'leaderboard.db'}")
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE medpeft_trials SET created_at = '2026-01-05T10:00:00+00:00' WHERE trial_id = 'l1'")
    store.engine.dispose()
    result = run("leaderboard", "--results", results, "--format", "markdown", "--top", "2")
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("| experiment | dataset | label ratio | method |") and lines[1].startswith("|---|")
    assert len(lines) == 4 and "| 0.8600 |" in lines[2] and "| 0.8300 |" in lines[3]
    rows = json.loads(run("leaderboard", "--results", results, "--until", "2026-01-05", "--format", "json").stdout)
    assert [r["trial_id"] for r in rows] == ["l1"]
    rows = json.loads(run("leaderboard", "--results", results, "--since", "2026-01-06", "--format", "json").stdout)
    assert len(rows) == 6 and "l1" not in [r["trial_id"] for r in rows]
    table = run("leaderboard", "--results", results, "--sort", "val_loss").stdout
    assert "val loss" in table  # the sort column is shown


@pytest.mark.parametrize(
    "args,message",
    [
        (["--compare", "methods", "--pareto"], "--compare, --pareto and --group-by are separate views; pick one"),
        (
            ["--compare", "methods", "--sort", "trainable_params"],
            "cannot rank trials by 'trainable_params'; metrics: val_auroc, val_loss",
        ),
        (["--group-by", "lr"], "cannot group by 'lr'"),
        (["--since", "last week"], "'last week' is not a date (YYYY-MM-DD) or time (YYYY-MM-DDTHH:MM[:SS])"),
    ],
)
def test_bad_view_arguments_exit_2(results: Path, args: list[str], message: str) -> None:
    result = run("leaderboard", "--results", results, *args)
    assert result.exit_code == 2
    assert one_error_line(result).startswith(message)


def test_rows_from_different_checkpoints_show_a_short_hash(tmp_path: Path) -> None:
    same = fill(tmp_path / "same", trial("a", "lora", 0.1, 0.7, checkpoint_sha256="ab" * 32),
                trial("b", "lora", 0.1, 0.8, checkpoint_sha256="ab" * 32))
    assert "checkpoint sha256" not in run("leaderboard", "--results", same, "--format", "markdown").stdout
    mixed = fill(tmp_path / "mixed", trial("a", "lora", 0.1, 0.7, checkpoint_sha256="ab" * 32),
                 trial("b", "lora", 0.1, 0.8, checkpoint_sha256="cd" * 32), trial("c", "lora", 0.1, 0.6))
    lines = run("leaderboard", "--results", mixed, "--format", "markdown").stdout.splitlines()
    assert "| backbone | checkpoint sha256 |" in lines[0]
    assert ["cdcdcdcd" in lines[2], "abababab" in lines[3], "| - |" in lines[4]] == [True, True, True]
    compare = run("leaderboard", "--results", mixed, "--compare", "methods", "--format", "json")
    assert [row["method"] for row in json.loads(compare.stdout)] == ["lora [cdcdcdcd]", "lora [abababab]", "lora [-]"]


def test_views_of_an_empty_store_say_so(tmp_path: Path) -> None:
    results = fill(tmp_path / "results")
    for args in (["--compare", "methods"], ["--pareto"], ["--group-by", "method"], []):
        result = run("leaderboard", "--results", results, *args)
        assert result.exit_code == 0 and result.stdout.strip() == "No trials recorded yet.", args
    results = fill(tmp_path / "only-failed", trial("x", "lora", 0.1, None))
    assert (
        run("leaderboard", "--results", results, "--compare", "methods").stdout.strip()
        == "No trial with a val_auroc matches."
    )
    assert run("leaderboard", "--results", results, "--pareto").stdout.strip() == "No trials match."


def test_newer_or_corrupt_store_is_one_line(tmp_path: Path) -> None:
    results = fill(tmp_path / "results", trial("a", "lora", 0.1, 0.7))
    conn = sqlite3.connect(results / "leaderboard.db")
    conn.execute(f"UPDATE medpeft_schema SET version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    for command in (
        ["leaderboard"],
        ["best", "--dataset", "synthetic", "--label-ratio", "0.1"],
        ["report", "search", "--out", tmp_path / "r"],
    ):
        result = run(*command, "--results", results)
        assert result.exit_code == 1, command
        newer = f"leaderboard schema version {SCHEMA_VERSION + 1}, newer than this medpeft-ray reads"
        assert newer in one_error_line(result)
    (results / "leaderboard.db").write_bytes(b"garbage" * 100)
    result = run("best", "--dataset", "synthetic", "--label-ratio", "0.1", "--results", results)
    assert result.exit_code == 1 and "not a usable leaderboard database (file is not a database)" in one_error_line(
        result
    )


# ----------------------------------------------------------------------------------------------
# best
# ----------------------------------------------------------------------------------------------


def test_best_prints_a_yaml_that_validates(results: Path) -> None:
    result = run("best", "--results", results, "--dataset", "synthetic", "--label-ratio", "0.1")
    assert result.exit_code == 0, result.output
    config = TrialConfig.model_validate(yaml.safe_load(result.stdout))
    assert config.model_dump(mode="json") == trial_config("lora", 0.1, 0.004)
    assert result.stdout.startswith(
        "# medpeft-ray: best lora on synthetic at label ratio 0.1\n# experiment search, trial l2"
    )
    assert result.stderr.strip().splitlines() == [
        "best lora on synthetic at label ratio 0.1: val_auroc 0.7600 (experiment search, trial l2)",
        # rows written by hand kept no predictions: the interval line says so rather than guess one
        "val_auroc 0.7600: no interval (trial l2 kept no predictions (recorded before they were kept))",
    ]


def test_best_out_file_with_method_and_experiment(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "configs" / "best.yaml"
    result = run(
        "best",
        "--results",
        results,
        "--dataset",
        "synthetic",
        "--label-ratio",
        "1",
        "--method",
        "bitfit",
        "--experiment",
        "search",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert result.stderr.strip().splitlines()[0].endswith(f"(experiment search, trial b2) -> {out}")
    config = TrialConfig.model_validate(yaml.safe_load(out.read_text()))
    assert config.method.name == "bitfit" and config.label_ratio == 1.0
    assert load_trial_config(out) == config  # what `medpeft-ray train --config` reads
    # without --experiment, the better bitfit trial of the other experiment wins
    run(
        "best", "--results", results, "--dataset", "synthetic", "--label-ratio", "1", "--method", "bitfit", "--out", out
    )
    assert "# experiment other, trial b3" in out.read_text()
    # by loss: the lowest wins
    run(
        "best",
        "--results",
        results,
        "--dataset",
        "synthetic",
        "--label-ratio",
        "0.1",
        "--metric",
        "val_loss",
        "--out",
        out,
    )
    assert "# val_loss 0.2400" in out.read_text()


def test_best_errors(results: Path, tmp_path: Path) -> None:
    result = run("best", "--results", results, "--dataset", "nih", "--label-ratio", "0.01")
    assert result.exit_code == 1
    assert one_error_line(result) == (
        "no trial with a val_auroc in the trials matching dataset 'nih', label ratio 0.01; "
        "the leaderboard has synthetic at label ratios 0.1, 1 (bitfit, lora)"
    )
    result = run("best", "--results", tmp_path / "nowhere", "--dataset", "nih", "--label-ratio", "0.01")
    assert result.exit_code == 1 and "no leaderboard here yet" in one_error_line(result)
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    result = run(
        "best", "--results", results, "--dataset", "synthetic", "--label-ratio", "0.1", "--out", blocker / "best.yaml"
    )
    assert result.exit_code == 1 and one_error_line(result).startswith(str(blocker))
    result = run(
        "best", "--results", results, "--dataset", "synthetic", "--label-ratio", "0.1", "--metric", "wall_time_s"
    )
    assert result.exit_code == 2 and one_error_line(result).startswith("cannot rank trials by 'wall_time_s'")
    result = run("best", "--results", results, "--dataset", "synthetic")
    assert result.exit_code == 2 and "--label-ratio" in result.output
    # the best trial has no checkpoint on this machine: one line, nothing half written
    result = run(
        "best",
        "--results",
        results,
        "--dataset",
        "synthetic",
        "--label-ratio",
        "0.1",
        "--export-adapter",
        tmp_path / "adapter",
    )
    assert (
        result.exit_code == 1
        and one_error_line(result) == "trial l2 of experiment 'search': no checkpoint recorded (status completed)"
    )
    assert not (tmp_path / "adapter").exists()


def test_best_export_adapter(tmp_path: Path) -> None:
    import torch

    from medpeft_ray.methods import prepare_model
    from medpeft_ray.models import build_backbone
    from medpeft_ray.train.checkpoint import save_checkpoint

    config = TrialConfig.model_validate(trial_config("bitfit", 0.5, 0.003))
    torch.manual_seed(config.train.seed)
    model = prepare_model(build_backbone("vit_tiny_patch16_224", 3, 32), "bitfit", {}, "vit")
    checkpoint = save_checkpoint(
        tmp_path / "ckpt", model, {"epoch": 1, "val_auroc_per_class": {"a": 0.5, "b": 0.6, "c": 0.7}}
    )
    results = fill(tmp_path / "results", trial("t", "bitfit", 0.5, 0.8, checkpoint=str(checkpoint)))
    out = tmp_path / "adapter"
    result = run(
        "best",
        "--results",
        results,
        "--dataset",
        "synthetic",
        "--label-ratio",
        "0.5",
        "--out",
        tmp_path / "b.yaml",
        "--export-adapter",
        out,
    )
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file() and (out / "trainable.safetensors").is_file()
    assert (
        f"adapter in {out}: trainable.safetensors, state.json, config.yaml, model.safetensors, export.json"
        in result.stderr
    )
    assert json.loads((out / "export.json").read_text())["class_names"] == ["a", "b", "c"]


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def test_report_command(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = run("report", "search", "other", "--results", results, "--out", out)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"report: {out / 'index.html'}"
    assert {p.name for p in out.iterdir()} == {
        "index.html",
        "metric_vs_ratio.png",
        "pareto.png",
        "progress.png",
        "importance.png",
    }
    page = (out / "index.html").read_text()
    assert "<h1>medpeft-ray report: search, other</h1>" in page
    assert "7 trials (6 completed, 0 stopped, 1 failed)" in page
    assert "training loss is nan" in page  # the failed trial is listed with its reason


def test_report_errors(results: Path, tmp_path: Path) -> None:
    result = run("report", "nope", "--results", results, "--out", tmp_path / "r")
    assert result.exit_code == 1
    assert one_error_line(result) == (
        f"experiment 'nope' is not in the leaderboard {results / 'leaderboard.db'} (it has: other, search)"
    )
    assert not (tmp_path / "r").exists()
    empty = fill(tmp_path / "empty")
    result = run("report", "search", "--results", empty, "--out", tmp_path / "r")
    assert result.exit_code == 1 and one_error_line(result).endswith("(it is empty; run `medpeft-ray search` first)")
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    result = run("report", "search", "--results", results, "--out", blocker / "report")
    assert result.exit_code == 1 and one_error_line(result).startswith(str(blocker))
    result = run("report", "search", "--results", results, "--out", tmp_path / "r", "--metric", "accuracy")
    assert result.exit_code == 2 and one_error_line(result).startswith("cannot rank trials by 'accuracy'")
    result = run("report", "--results", results, "--out", tmp_path / "r")
    assert result.exit_code == 2  # no experiment named


# ----------------------------------------------------------------------------------------------
# reading results needs no torch
# ----------------------------------------------------------------------------------------------

_PRINT_IMPORTED = 'print(json.dumps(sorted(m for m in ("torch", "ray") if m in sys.modules)))\n'
#: Runs ``medpeft-ray`` with the arguments in argv[1] (JSON) in a fresh interpreter, then prints
#: which of torch and ray it imported.
_RUN_CLI = """
import json, sys
from medpeft_ray.cli import main
sys.argv = ["medpeft-ray", *json.loads(sys.argv[1])]
try:
    main()
except SystemExit as exc:
    assert not exc.code, exc.code
""" + _PRINT_IMPORTED
_IMPORT_LEADERBOARD = "import json, sys\nimport medpeft_ray.leaderboard\n" + _PRINT_IMPORTED


@pytest.mark.parametrize("args,unwanted", [
    ([], {"torch", "ray"}),  # no command: `import medpeft_ray.leaderboard` alone
    (["leaderboard"], {"torch", "ray"}),
    (["leaderboard", "--compare", "methods"], {"torch", "ray"}),
    (["report", "search", "--out", "{out}"], {"torch"}),
])
def test_reading_the_leaderboard_imports_no_torch(results: Path, tmp_path: Path, args: list[str],
                                                  unwanted: set[str]) -> None:
    """Reading results (a table, a comparison, a report of classification rows) never imports the
    training side: torch alone takes seconds to import."""
    import subprocess
    import sys

    command = [a.format(out=tmp_path / "report") for a in args] + ["--results", str(results)]
    done = subprocess.run([sys.executable, "-c", _RUN_CLI if args else _IMPORT_LEADERBOARD, json.dumps(command)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    imported = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert not imported & unwanted, (command, imported)
    if args and args[0] == "report":
        assert (tmp_path / "report" / "index.html").is_file()
