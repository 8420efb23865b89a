"""``medpeft-ray``: parses arguments, calls the library, prints. Never imports torch itself."""

from __future__ import annotations

import json
import numbers
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from medpeft_ray.errors import MedpeftError, UsageError

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
        records = [{k: _plain(v) for k, v in r.items()} for r in frame.to_dict(orient="records")]
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


def _plain(value: Any) -> Any:
    """JSON-ready scalars: NaN/NA become None, numpy and pandas integers become int."""
    import pandas as pd

    if isinstance(value, (dict, list, str)) or value is None:
        return value
    if pd.isna(value):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def _cell(column: str, value: Any) -> str:
    value = _plain(value)
    if value is None:
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


@app.command("methods")
def methods_command(
    backbone: str = typer.Option("vit_base_patch16_224", help="timm backbone name (ViT or ResNet)"),
    num_classes: int = typer.Option(14, "--num-classes", min=1, help="classes of the task (sizes the head)"),
    image_size: int = typer.Option(224, "--image-size", min=16, help="input side in pixels"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON list instead of a table"),
) -> None:
    """The PEFT methods for a backbone, with trainable parameters under their default options."""
    from medpeft_ray.methods import method_summaries

    try:
        rows = method_summaries(backbone, num_classes, image_size)
    except MedpeftError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = Table(title=f"PEFT methods on {backbone} ({num_classes} classes, {image_size} px), default options")
    for column in ("method", "trainable params", "share", "searched by default", "notes", "what it does"):
        table.add_column(column, justify="right" if column in ("trainable params", "share") else "left")
    for row in sorted(rows, key=lambda r: r["trainable_params"]):
        notes = ", ".join(n for n, on in (("identity at init", row["identity_at_init"]), ("mergeable", row["mergeable"]),
                                           ("peft", row["peft_native"])) if on)
        table.add_row(row["method"], f"{row['trainable_params']:,}", f"{row['trainable_percent']:.3g}%",
                      ", ".join(row["searched"]), notes, row["description"])
    console.print(table)
    console.print(f"total parameters of the backbone: {min(r['total_params'] for r in rows):,}")


data_app = typer.Typer(no_args_is_help=True, help="Inspect datasets before spending GPU time on them.")
app.add_typer(data_app, name="data")


@data_app.command("check")
def data_check(
    dataset: Optional[str] = typer.Option(None, help="dataset format (nih, chexpert, rsna, ham10000, busi, folder, csv, splitfile, synthetic)"),
    root: Optional[Path] = typer.Option(None, help="dataset folder"),
    option: list[str] = typer.Option([], "--option", "-o", help="a dataset option as key=value (YAML value), repeatable"),
    space: Optional[Path] = typer.Option(None, "--space", "-s", help="take the dataset section of this search YAML instead"),
    image_size: int = typer.Option(64, help="decode size for the check (the images are fully decoded either way)"),
    label_ratios: str = typer.Option("0.01,0.1,1.0", help="comma-separated label ratios to report positives for"),
    output: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json"),
) -> None:
    """Images per split and class, positives at each label ratio, and every unreadable file."""
    import yaml

    from medpeft_ray.data.check import check_dataset

    try:
        if space is not None:
            from medpeft_ray.config import load_search_config

            ds = load_search_config(space).dataset
            name, root, options, ratios, seed = ds.name, ds.root, ds.options, ds.label_ratios, ds.seed
        else:
            if dataset is None:
                raise UsageError("give --dataset NAME (and --root PATH), or --space FILE")
            options = {}
            for item in option:
                key, sep, value = item.partition("=")
                if not sep:
                    raise UsageError(f"--option {item!r}: expected key=value")
                options[key.strip()] = yaml.safe_load(value)
            name, ratios, seed = dataset, [float(r) for r in label_ratios.split(",") if r.strip()], 0
        report = check_dataset(name, root, options, image_size=image_size, label_ratios=ratios, seed=seed)
    except MedpeftError as exc:
        _fail(exc)
    except KeyError as exc:
        from medpeft_ray.errors import ConfigError

        _fail(ConfigError("dataset.name", exc.args[0]))
    if output is OutputFormat.json:
        from dataclasses import asdict

        print(json.dumps({**asdict(report), "usable": report.usable}, indent=1, default=str))
    else:
        _print_report(report)
    if not report.usable:
        raise typer.Exit(1)


def _print_report(report: Any) -> None:
    console.print(f"[bold]{report.name}[/bold] {report.root or ''}: {len(report.class_names)} classes ({report.task})")
    table = Table()
    table.add_column("class")
    for split in ("train", "val", "test"):
        table.add_column(f"{split} ({report.images[split]})", justify="right")
    for ratio, n in report.ratio_images.items():
        table.add_column(f"train {ratio:g} ({n})", justify="right")
    for cls in report.class_names:
        cells = [str(report.positives[s][cls]) for s in ("train", "val", "test")]
        cells += [str(report.ratio_positives[r][cls]) for r in report.ratio_images]
        table.add_row(cls, *cells)
    console.print(table)
    console.print("positives per class; column headers give the images in each split and label-ratio subset")
    for line in report.unreadable:
        console.print(f"[yellow]unreadable:[/yellow] {line}", soft_wrap=True)
    for problem in report.problems:
        console.print(f"[red]problem:[/red] {problem}", soft_wrap=True)
    console.print("[green]usable[/green]" if report.usable else "[red]not usable[/red]")


def main() -> None:
    try:
        app()
    except OSError as exc:
        # a full disk or a permission error: one line naming the file; rows already written stay
        where = f"{exc.filename}: " if exc.filename else ""
        err_console.print(f"[red]error:[/red] {where}{exc.strerror or exc}", soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
