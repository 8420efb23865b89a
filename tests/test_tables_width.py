"""`medpeft-ray leaderboard` at 80 and 120 columns: the compared columns are never cut, constant
columns move to the title, hyperparameters wrap, and `--columns` chooses the columns."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import fill_results, leaderboard_row
from rich.console import Console
from typer.testing import CliRunner

from medpeft_ray import cli
from medpeft_ray.leaderboard.tables import Column, fit_table

BACKBONE = "vit_base_patch16_224.augreg2_in21k_ft_in1k"
PARAMS = {"lr": 0.000312, "weight_decay": 0.0123, "rank": 16, "alpha": 32, "dropout": 0.1, "warmup_epochs": 2,
          "layer_decay": 0.75}


@pytest.fixture(autouse=True)
def _clean_env(no_results_env: None) -> None:
    """Every test here reads and writes only its own results folder."""


def row(trial_id: str, method: str, label_ratio: float, val_auroc: float, trainable: int, **overrides: Any) -> Any:
    values = {"experiment": "lora-synthetic", "backbone": BACKBONE, "params": PARAMS, "val_loss": 0.41235,
              "val_f1": 0.7712, "val_accuracy": 0.8125, "val_balanced_accuracy": 0.7999, "best_epoch": 7,
              "epochs_run": 12, "trainable_params": trainable, "wall_time_s": 1834.0}
    return leaderboard_row(trial_id, method, label_ratio, val_auroc, **{**values, **overrides})


@pytest.fixture
def results(tmp_path: Path) -> Path:
    return fill_results(
        tmp_path / "results",
        row("a", "lora", 0.1, 0.8671, 38_213),
        row("b", "adaptformer", 0.01, 0.8012, 1_204_866),
        row("c", "lora", 1.0, 0.9123, 38_213, status="stopped"),
    )


def render(width: int, monkeypatch: pytest.MonkeyPatch, *args: Any) -> tuple[Any, str]:
    """The command's exit and its table as a terminal ``width`` columns wide shows it."""
    console = Console(width=width, record=True, highlight=False)
    monkeypatch.setattr(cli, "console", console)
    result = CliRunner().invoke(cli.app, ["leaderboard", *map(str, args)])
    assert "Traceback" not in result.output
    return result, console.export_text()


def flat(out: str) -> str:
    """The output with each run of spaces and line breaks as one space (titles and captions wrap)."""
    return " ".join(out.split())


@pytest.mark.parametrize("width", [80, 120])
def test_compared_columns_are_whole_and_constant_ones_in_the_title(
        results: Path, monkeypatch: pytest.MonkeyPatch, width: int) -> None:
    result, out = render(width, monkeypatch, "--results", results)
    assert result.exit_code == 0, result.output
    assert "…" not in out
    assert all(len(line) <= width for line in out.splitlines()), out
    for text in ("0.8671", "0.8012", "0.9123", "lora", "adaptformer", "38,213", "1,204,866", "completed",
                 "stopped", "1834 s", "0.01", "0.1"):
        assert text in out, (text, out)
    title = out[:out.index("label")]
    assert f"experiment lora-synthetic · dataset synthetic · backbone {BACKBONE}" in flat(title)
    # the constant columns are not repeated per row
    assert out.count("lora-synthetic") == 1 and out.count(BACKBONE) == 1
    # every hyperparameter is there, wrapped rather than cut
    for pair in ("lr=0.000312", "weight_decay=0.0123", "rank=16", "warmup_epochs=2", "layer_decay=0.75"):
        assert pair in out, (pair, out)


def test_more_columns_appear_at_120(results: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, narrow = render(80, monkeypatch, "--results", results)
    _, wide = render(120, monkeypatch, "--results", results)
    assert "not shown at 80 columns: val loss, val f1, val accuracy" in flat(narrow)
    for value in ("0.4123", "0.7712", "0.8125"):  # val loss, F1 and accuracy
        assert value not in narrow and value in wide, value
    assert "not shown at 120 columns: epochs run" in flat(wide)


def test_columns_that_differ_are_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results = fill_results(tmp_path / "mixed", row("a", "lora", 0.1, 0.8671, 38_213),
                           row("b", "lora", 0.1, 0.8433, 38_213, dataset="ham10000", experiment="ham"))
    _, out = render(80, monkeypatch, "--results", results)
    # which row is which comes before the hyperparameters, which are left out here
    assert re.search(r"^lora-synthetic\s+synthetic\s+0\.1\s+lora\s+0\.8671\s+38,213", out, re.MULTILINE), out
    assert re.search(r"^ham\s+ham10000\s+0\.1\s+lora\s+0\.8433\s+38,213", out, re.MULTILINE), out
    assert "epochs run, params (choose with --columns)" in flat(out)
    assert f"backbone {BACKBONE}" in flat(out) and "dataset synthetic" not in flat(out)
    assert "…" not in out and all(len(line) <= 80 for line in out.splitlines())


def test_explicit_columns(results: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, out = render(80, monkeypatch, "--results", results, "--columns", "trial_id,method,val_loss,backbone")
    assert result.exit_code == 0, result.output
    # in the order given, the constant backbone included, nothing else
    assert re.search(rf"^c\s+lora\s+0\.4123\s+{re.escape(BACKBONE)}$", out, re.MULTILINE), out
    assert "38,213" not in out and "not shown" not in out and "·" not in out
    invoke = CliRunner().invoke
    records = json.loads(invoke(cli.app, ["leaderboard", "--results", str(results), "--columns", "trial_id,val_auroc",
                                          "--format", "json"]).stdout)
    assert records[0] == {"trial_id": "c", "val_auroc": 0.9123}
    text = invoke(cli.app, ["leaderboard", "--results", str(results), "--columns", "method,params",
                            "--format", "csv"]).stdout
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["method", "params"] and rows[1][0] == "lora" and json.loads(rows[1][1]) == PARAMS


@pytest.mark.parametrize("args,message", [
    (["--columns", "method,wall_time"], "--columns: unknown column 'wall_time' (did you mean wall_time_s?); known: id, experiment,"),
    (["--columns", ","], "--columns: give at least one column"),
    (["--columns", "method", "--compare", "methods"], "--columns chooses the trials' columns"),
])
def test_bad_columns_are_one_line_exit_2(results: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli.app, ["leaderboard", "--results", str(results), *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.stderr


def test_fit_table_drops_the_least_important_first_and_never_cuts() -> None:
    text = pd.DataFrame({"method": ["lora", "bitfit"], "score": ["0.8671", "0.7000"],
                         "extra": ["x" * 30, "y"], "other": ["z" * 30, "w"], "note": ["a b c d e f g h", "i"]})
    columns = [Column("method", "method"), Column("score", "val auroc", right=True),
               Column("extra", "extra", priority=2), Column("other", "other", priority=1),
               Column("note", "note", fold=True, priority=3)]
    console = Console(width=60, record=True)
    console.print(fit_table(text, columns, 60, title="t"))
    out = console.export_text()
    assert "z" * 30 in out and "x" * 30 not in out  # priority 1 kept, priority 2 does not fit
    assert "note" in out  # a narrow folding column still fits after the wide one was left out
    assert "not shown at 60 columns: extra" in out
    # a single row: every lifted column is constant
    lifted = [Column("method", "method", lift=True), Column("score", "val auroc")]
    console = Console(width=60, record=True)
    console.print(fit_table(text.head(1), lifted, 60, title="t"))
    assert "t method lora" in flat(console.export_text())


def test_comparison_cells_wrap_instead_of_being_cut(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [row(f"{dataset}-{ratio}-{method}", method, ratio, value, 38_213, dataset=dataset)
            for dataset, base in (("synthetic", 0.80), ("ham10000", 0.85))
            for ratio, step in ((0.01, 0.0), (0.1, 0.02), (1.0, 0.04))
            for method, value in (("lora", base + step + 0.0071), ("adaptformer", base + step))]
    results = fill_results(tmp_path / "grid", *rows)
    result, out = render(80, monkeypatch, "--results", results, "--compare", "methods")
    assert result.exit_code == 0, result.output
    assert "…" not in out and all(len(line) <= 80 for line in out.splitlines()), out
    for value in ("0.8071", "0.8471", "0.8900", "0.8971", "1.00", "2.00"):
        assert value in out, (value, out)
