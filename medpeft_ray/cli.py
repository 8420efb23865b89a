"""``medpeft-ray``: parses arguments, calls the library, prints. Never imports torch itself."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from medpeft_ray.errors import MedpeftError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)
# Piped output (a log file, CI) gets wide lines instead of rich's 80-column default.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)

RESULTS_HELP = "results folder (default: $MEDPEFT_RESULTS or ./medpeft-results)"
DB_HELP = "leaderboard database URL (default: $MEDPEFT_DB or SQLite in the results folder)"


class OutputFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


def _fail(exc: MedpeftError) -> None:
    err_console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
    raise typer.Exit(exc.exit_code)


@app.command()
def validate(space: Path = typer.Option(..., "--space", "-s", help="search-space YAML")) -> None:
    """Validate a search-space YAML without running anything."""
    from medpeft_ray.config import load_search_config

    try:
        config = load_search_config(space)
    except MedpeftError as exc:
        _fail(exc)
    dists = ", ".join(config.distributions())
    console.print(f"{space}: ok ({config.method.name} on {config.model.backbone}; searching {dists})")


@app.command()
def search(
    space: Path = typer.Option(..., "--space", "-s", help="search-space YAML (see search_spaces/)"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address ('auto' inside a cluster); default: local Ray"),
    results: Optional[Path] = typer.Option(None, help=RESULTS_HELP),
    db: Optional[str] = typer.Option(None, help=DB_HELP),
    experiment: Optional[str] = typer.Option(None, help="experiment name (default: from the YAML)"),
) -> None:
    """Run a hyperparameter search: one Optuna study per label ratio, trials on Ray Train."""
    from medpeft_ray.config import load_search_config

    try:
        config = load_search_config(space, experiment=experiment)
        from medpeft_ray.search.runner import run_search

        result = run_search(config, results=results, address=address, db_url=db, console=console)
    except MedpeftError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        err_console.print("interrupted: trials that finished are in the leaderboard")
        raise typer.Exit(130)
    _print_search_summary(result)


def _print_search_summary(result: Any) -> None:
    records = [s.record for s in result.trials]
    done = [r for r in records if r.status != "failed"]
    failed = len(records) - len(done)
    console.print(
        f"\n[bold]{result.experiment}[/bold]: {len(records)} trials in {result.wall_time_s:.0f} s"
        + (f", [red]{failed} failed[/red]" if failed else "")
    )
    startups = [r.startup_s for r in done if r.startup_s is not None]
    trains = [r.train_time_s for r in done if r.train_time_s is not None]
    if startups and trains:
        console.print(
            f"per trial: start-up (trial start to first training step) {sum(startups) / len(startups):.1f} s, "
            f"training + evaluation {sum(trains) / len(trains):.1f} s (means)"
        )
    console.print(f"leaderboard: {result.db_url}   (medpeft-ray leaderboard --experiment {result.experiment})")
    if not done:
        raise typer.Exit(1)


@app.command()
def leaderboard(
    dataset: Optional[str] = typer.Option(None, help="only this dataset"),
    label_ratio: Optional[float] = typer.Option(None, "--label-ratio", help="only this label ratio"),
    method: Optional[str] = typer.Option(None, help="only this method"),
    backbone: Optional[str] = typer.Option(None, help="only this backbone"),
    experiment: Optional[str] = typer.Option(None, help="only this experiment"),
    status: Optional[str] = typer.Option(None, help="only trials with this status (completed, stopped, failed)"),
    sort: str = typer.Option("val_auroc", help="column to sort by (best first)"),
    top: Optional[int] = typer.Option(None, min=1, help="show the best N"),
    output: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table, json or csv"),
    results: Optional[Path] = typer.Option(None, help=RESULTS_HELP),
    db: Optional[str] = typer.Option(None, help=DB_HELP),
) -> None:
    """Show the best configurations found so far."""
    from medpeft_ray.leaderboard import LeaderboardStore, default_db_url

    try:
        store = LeaderboardStore(db or default_db_url(results), create=False)
        frame = store.query(
            experiment=experiment, dataset=dataset, label_ratio=label_ratio, method=method, backbone=backbone,
            status=status, metric=sort, ascending=sort in ("val_loss", "wall_time_s", "trainable_params"), top=top,
        )
    except MedpeftError as exc:
        _fail(exc)
    if output is OutputFormat.json:
        # missing metrics are NaN in the DataFrame and null in JSON (NaN is not valid JSON)
        records = [{k: None if isinstance(v, float) and v != v else v for k, v in r.items()} for r in frame.to_dict(orient="records")]
        print(json.dumps(records, indent=1, default=str))
        return
    if output is OutputFormat.csv:
        flat = frame.assign(config=frame["config"].map(json.dumps), params=frame["params"].map(json.dumps))
        flat.to_csv(sys.stdout, index=False)
        return
    if frame.empty:
        console.print("No trials match." if any((dataset, label_ratio, method, backbone, experiment, status)) else "No trials recorded yet.")
        return
    table = Table(title="medpeft-ray leaderboard")
    columns = ["experiment", "dataset", "label_ratio", "method", "backbone", "val_auroc", "best_epoch", "epochs_run",
               "trainable_params", "params", "status", "wall_time_s"]
    for column in columns:
        table.add_column(column.replace("_", " "), justify="right" if column in ("val_auroc", "trainable_params", "wall_time_s") else "left")
    for row in frame.to_dict(orient="records"):
        table.add_row(*(_cell(column, row[column]) for column in columns))
    console.print(table)


def _cell(column: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if column == "params":
        return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items())
    if column == "trainable_params":
        return f"{int(value):,}"
    if column == "wall_time_s":
        return f"{value:.0f} s"
    if isinstance(value, float):
        return f"{value:.4f}" if column == "val_auroc" else f"{value:g}"
    return str(value)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
