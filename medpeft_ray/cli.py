"""``medpeft-ray``: parses arguments, calls the library, prints. Never imports torch itself."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medpeft_ray.errors import MedpeftError, UsageError
from medpeft_ray.metrics import METRICS

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)
# Piped output (a log file, CI) gets wide lines instead of rich's 80-column default.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)

RESULTS_HELP = "results folder (default: $MEDPEFT_RESULTS or ./medpeft-results)"
DB_HELP = "leaderboard database URL (default: $MEDPEFT_DB or SQLite in the results folder)"
SPLIT_HELP = ("the split whose values the comparison shows, val or test (default: test when every cell's "
              "configuration has a test value, else val); configurations are always chosen on validation")
BASELINE_HELP = ("the method others are tested against, task by task (`lora vs full: 7 better, 2 worse, 9 not "
                 "distinguishable of 18 tasks`)")
ALPHA_HELP = "the tests' significance level; the confidence intervals' level is 1 - alpha"
CORRECTION_HELP = ("the correction of p-values over each method's tasks: holm (Holm's step-down), bh "
                   "(Benjamini-Hochberg) or none")


class OutputFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"
    markdown = "markdown"


def _either(words: list[str]) -> str:
    """``a``, ``a or b``, ``a, b or c``."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _sort_help() -> str:
    """The --sort help: which columns sort highest first and which lowest first (metric directions)."""
    highest = [m.name for m in METRICS.values() if not m.ascending]
    lowest = [m.name for m in METRICS.values() if m.ascending] + ["times and parameter counts"]
    return (f"column to sort by, best first ({_either(highest)} highest first; {', '.join(lowest)} lowest first); "
            "the metric of the views below; default: val_auroc, or val_fid for generation searches")


def _metric_help(wins: bool = False) -> str:
    """``val_auroc or val_loss``, or with ``wins``: ``val_auroc (highest wins) or val_loss (lowest wins)``."""
    return _either([f"{m.name} ({'lowest' if m.ascending else 'highest'} wins)" if wins else m.name
                    for m in METRICS.values()])


def _dataset_help() -> str:
    from medpeft_ray.data import list_datasets

    return f"dataset format ({', '.join(list_datasets())})"


def _fail(exc: MedpeftError) -> None:
    # one line, or one block (a missing-files summary); text such as "medpeft-ray[postgres]" or "x[1].png" is not markup
    err_console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
    raise typer.Exit(exc.exit_code)


def _load_space(space: Path, experiment: Optional[str] = None) -> Any:
    """A search-space YAML, validated, its backbone name looked up in timm's registry too.

    Config validation stays free of torch and timm, so it cannot know timm's names: without this,
    `validate` passed a misspelt backbone that the search then refused, naming the experiment
    rather than the file.
    """
    from medpeft_ray.config import load_search_config
    from medpeft_ray.errors import ConfigError
    from medpeft_ray.models.backbones import check_backbone_name

    config = load_search_config(space, experiment=experiment)
    try:
        check_backbone_name(config.model.backbone)
    except ConfigError as exc:
        raise exc.with_file(space.name) from None
    return config


def _load_searches(space: Path, experiment: Optional[str] = None) -> Any:
    """A search file's validated config, or a grid file's validated cells (see :mod:`medpeft_ray.config.grid`)."""
    from medpeft_ray.config.grid import is_grid, load_grid
    from medpeft_ray.config.loading import read_yaml
    from medpeft_ray.errors import ConfigError
    from medpeft_ray.models.backbones import check_backbone_name

    raw = read_yaml(space) if space.is_file() else None
    if not is_grid(raw):
        return _load_space(space, experiment=experiment)
    if experiment is not None:
        raise UsageError("--experiment names one search; a grid names each of its cells")
    cells = load_grid(space, raw)
    for cell in cells:
        try:
            check_backbone_name(cell.config.model.backbone)
        except ConfigError as exc:
            raise exc.with_file(f"{space.name} (cell {'/'.join(cell.entries)})") from None
    return cells


@app.command()
def validate(space: Path = typer.Option(..., "--space", "-s", help="search-space YAML")) -> None:
    """Validate a search-space YAML without running anything."""
    try:
        config = _load_searches(space)
    except MedpeftError as exc:
        _fail(exc)
    if isinstance(config, list):
        console.print(f"{space}: ok, a grid of {len(config)} searches: "
                      + ", ".join(cell.config.experiment_name for cell in config))
        return
    dists = ", ".join(config.search_space.distributions)
    console.print(f"{space}: ok ({' | '.join(config.method.names)} on {config.model.backbone}; searching {dists})")


@app.command()
def search(
    space: Optional[Path] = typer.Option(None, "--space", "-s", help="search-space YAML (see search_spaces/)"),
    resume: Optional[str] = typer.Option(
        None, help="continue the interrupted search of this experiment name (in the same --results) instead"
    ),
    address: Optional[str] = typer.Option(None, help="Ray cluster address ('auto' inside a cluster); default: local Ray"),
    results: Optional[Path] = typer.Option(None, help=RESULTS_HELP),
    db: Optional[str] = typer.Option(None, help=DB_HELP),
    experiment: Optional[str] = typer.Option(None, help="experiment name (default: from the YAML)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show Ray's own messages and the trials' output in "
                                 "the terminal (default: in Ray's session logs; same as MEDPEFT_WORKER_LOGS=1)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="pre-flight, time a few training and evaluation steps of "
                                 "each method here, and forecast trials, epochs, device-hours and wall time; "
                                 "starts no Ray and no trial"),
) -> None:
    """Run a hyperparameter search: one Optuna study per label ratio, trials on Ray Train."""
    if verbose:
        os.environ["MEDPEFT_WORKER_LOGS"] = "1"  # read where the search starts Ray
    try:
        if (space is None) == (resume is None):
            raise UsageError("give --space FILE for a new search, or --resume NAME to continue one (not both)")
        if resume is not None and experiment is not None:
            raise UsageError("--experiment names a new search; a resumed one keeps its name")
        # a new search's YAML (or every cell of a grid) is validated before anything imports Ray
        config = _load_searches(space, experiment=experiment) if space is not None else None
        if dry_run:
            if config is None:
                raise UsageError("--dry-run forecasts a new search: give --space FILE, not --resume")
            from medpeft_ray.search.forecast.dry_run import dry_run as forecast_searches

            for line in forecast_searches(config, results=results, db_url=db):
                if line.heading:  # a search's first line, its name in bold
                    console.print(f"[bold]{escape(line.heading)}[/bold]{escape(line.text)}", highlight=False)
                else:
                    console.print(line.text, highlight=False, markup=False, soft_wrap=True)
            return
        from medpeft_ray.search.runner import resumable_config, run_grid, run_search

        if isinstance(config, list):
            grid_results = run_grid(config, results=results, address=address, db_url=db, console=console)
        else:
            config = config or resumable_config(str(resume), results)
            grid_results = [run_search(config, results=results, address=address, db_url=db, console=console,
                                       resume=resume is not None)]
    except MedpeftError as exc:
        _fail(exc)
    except KeyboardInterrupt as exc:
        # run_search names the experiment it was running (a grid's current cell); without that
        # name the search had not started its studies, and a new search has nothing to resume
        name = getattr(exc, "experiment", None) or resume
        if name is None:
            err_console.print("interrupted before the search started its studies: nothing to resume")
        else:
            command = ["medpeft-ray", "search", "--resume", name, *(["--results", str(results)] if results else []),
                       *(["--db", db] if db else [])]
            err_console.print(f"interrupted: `{shlex.join(command)}` continues the search", markup=False,
                              soft_wrap=True)
        raise typer.Exit(130)
    failed = [result.experiment for result in grid_results if not _print_search_summary(result)]
    if failed:
        raise typer.Exit(1)


def _print_search_summary(result: Any) -> bool:
    """Prints a finished search's summary; returns whether any of its trials succeeded."""
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
    utilisation = result.slot_utilisation
    if utilisation is not None:
        console.print(f"slot utilisation {utilisation:.0%} (training + evaluation over the {result.slots} slot(s)' "
                      "time from the first trial's start to the last one's end)")
    console.print(f"leaderboard: {result.db_url}   (medpeft-ray leaderboard --experiment {result.experiment})")
    return bool(done)


class CompareBy(str, Enum):
    methods = "methods"
    backbones = "backbones"
    experiments = "experiments"


def _open_store(results: Optional[Path], db: Optional[str]) -> Any:
    from medpeft_ray.leaderboard import LeaderboardStore
    from medpeft_ray.storage import default_db_url, results_location

    if db is None and not os.environ.get("MEDPEFT_DB") and results is not None:
        storage, local = results_location(results)
        if local is None:
            # a search with results on cloud storage keeps its leaderboard in --db, never in the
            # bucket: without this, "s3://b/x" would be looked for as the folder ./s3:/b/x
            raise UsageError(f"{storage}: results on cloud storage keep no leaderboard; give the search's database: "
                             "--db postgresql://user@host/db (or MEDPEFT_DB)")
    return LeaderboardStore(db or default_db_url(results), create=False)


def _os_error(exc: OSError) -> MedpeftError:
    """A failed file write (an unwritable --out, a full disk) as one line naming the file."""
    where = f"{exc.filename}: " if exc.filename else ""
    return MedpeftError(f"{where}{exc.strerror or exc}")


@app.command()
def leaderboard(
    dataset: Optional[str] = typer.Option(None, help="only this dataset"),
    label_ratio: Optional[float] = typer.Option(None, "--label-ratio", help="only this label ratio"),
    method: Optional[str] = typer.Option(None, help="only this method"),
    backbone: Optional[str] = typer.Option(None, help="only this backbone"),
    experiment: Optional[str] = typer.Option(None, help="only this experiment"),
    status: Optional[str] = typer.Option(None, help="only trials with this status (completed, stopped, failed)"),
    role: Optional[str] = typer.Option(None, help="only search trials (search) or confirmation seeds "
                                       "(confirmation)"),
    since: Optional[str] = typer.Option(None, help="only trials recorded on or after this date (YYYY-MM-DD) or "
                                        "UTC time"),
    until: Optional[str] = typer.Option(None, help="only trials recorded on or before this date (the whole day) or "
                                        "UTC time"),
    sort: Optional[str] = typer.Option(None, help=_sort_help()),
    top: Optional[int] = typer.Option(None, min=1, help="show the best N rows"),
    group_by: Optional[str] = typer.Option(None, "--group-by", help="the best trial of each group: comma-separated "
                                           "columns among method, backbone, dataset, label_ratio, experiment, status"),
    compare: Optional[CompareBy] = typer.Option(None, "--compare", help="methods (or backbones, experiments) as "
                                                "rows, (dataset, label ratio) as columns: best metric per cell and "
                                                "mean rank"),
    pareto: bool = typer.Option(False, "--pareto", help="only the trials not beaten on both the metric and trainable "
                                                        "parameters, per (dataset, label ratio)"),
    split: Optional[str] = typer.Option(None, "--split", help=SPLIT_HELP),
    baseline: str = typer.Option("full", "--baseline", help=BASELINE_HELP),
    alpha: float = typer.Option(0.05, "--alpha", help=ALPHA_HELP),
    correction: str = typer.Option("holm", "--correction", help=CORRECTION_HELP),
    also: Optional[str] = typer.Option(None, "--also", help="with --compare: another metric's values of the same "
                                       "chosen configurations beside each cell's (e.g. val_accuracy: AUC and ACC "
                                       "per dataset, as MedMNIST+ tables them)"),
    output: OutputFormat = typer.Option(OutputFormat.table, "--format", help=_either([f.value for f in OutputFormat])),
    columns: Optional[str] = typer.Option(None, "--columns", help="the columns to show, comma-separated (e.g. "
                                          "method,val_auroc,params); default: those that fit the terminal"),
    results: Optional[Path] = typer.Option(None, help=RESULTS_HELP),
    db: Optional[str] = typer.Option(None, help=DB_HELP),
) -> None:
    """Show the best configurations found so far, or a comparison of methods, or the Pareto front."""
    from medpeft_ray.leaderboard.render import leaderboard_view

    filters = dict(experiment=experiment, dataset=dataset, label_ratio=label_ratio, method=method, backbone=backbone,
                   status=status, role=role, since=since, until=until)
    try:
        if sum((compare is not None, pareto, group_by is not None)) > 1:
            raise UsageError("--compare, --pareto and --group-by are separate views; pick one")
        if also is not None and compare is None:
            raise UsageError("--also puts a metric beside --compare's cells; add --compare methods")
        if compare is not None and columns is not None:
            raise UsageError("--columns chooses the trials' columns; --compare's columns are its "
                             "(dataset, label ratio) cells")
        shown = leaderboard_view(
            _open_store(results, db), filters, sort=sort, top=top, pareto=pareto, split=split, baseline=baseline,
            group_by=None if group_by is None else [c.strip() for c in group_by.split(",") if c.strip()],
            compare=None if compare is None else compare.value, output=output.value, width=console.width,
            columns=None if columns is None else [c.strip() for c in columns.split(",") if c.strip()],
            evidence=_evidence(alpha, correction), also=also)
    except MedpeftError as exc:
        _fail(exc)
    _show(shown)


def _evidence(alpha: float, correction: str) -> Any:
    """The intervals' and tests' settings from the options (a one-line UsageError for bad ones)."""
    from medpeft_ray.leaderboard.evidence import EvidenceSettings

    return EvidenceSettings(alpha=alpha, correction=correction)


def _show(rendered: Any) -> None:
    """Prints a :class:`~medpeft_ray.leaderboard.render.Rendered`: text for scripts as is, then the
    terminal's tables, and its lines as plain text (a value like "[q, v]" is no rich markup)."""
    sys.stdout.write(rendered.text)
    for item in rendered.shown:
        if isinstance(item, str):
            console.print(item, markup=False, soft_wrap=True)
        else:
            console.print(item)


@app.command()
def best(
    dataset: str = typer.Option(..., help="the dataset"),
    label_ratio: float = typer.Option(..., "--label-ratio", help="the label ratio"),
    method: Optional[str] = typer.Option(None, help="only this method (default: the best of any method)"),
    backbone: Optional[str] = typer.Option(None, help="only this backbone"),
    experiment: Optional[str] = typer.Option(None, help="only this experiment"),
    metric: Optional[str] = typer.Option(None, help=_metric_help(wins=True)),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="write the trial config YAML here "
                                       "(default: print it)"),
    export_adapter: Optional[Path] = typer.Option(
        None, "--export-adapter", help="write the trained adapter to this folder: checkpoint, peft format for peft "
                                       "methods, merged timm weights (model.safetensors) for mergeable methods"),
    alpha: float = typer.Option(0.05, "--alpha", help="the confidence interval's level is 1 - alpha"),
    results: Optional[Path] = typer.Option(None, help=RESULTS_HELP),
    db: Optional[str] = typer.Option(None, help=DB_HELP),
) -> None:
    """The best trial's config as YAML (`medpeft-ray train --config` runs it), and its adapter."""
    from medpeft_ray.leaderboard import views
    from medpeft_ray.leaderboard.evidence import best_interval
    from medpeft_ray.leaderboard.render import best_summary
    from medpeft_ray.train.export import best_config_yaml, write_best_yaml
    from medpeft_ray.train.export import export_adapter as write_adapter

    try:
        store = _open_store(results, db)
        metric = metric or store.default_metric(dataset=dataset, label_ratio=label_ratio, method=method,
                                                backbone=backbone, experiment=experiment)
        row = store.best(metric=metric, dataset=dataset, label_ratio=label_ratio, method=method, backbone=backbone,
                         experiment=experiment).iloc[0].to_dict()
        experiment_rows = store.query(experiment=row["experiment"])
        confirmed = views.confirmation_summary(experiment_rows, row, metric)
        interval = best_interval(experiment_rows, row, metric, _evidence(alpha, "holm"))
        text = best_config_yaml(row, metric)
        if out is not None:
            write_best_yaml(row, out, metric)
        exported = write_adapter(row, export_adapter, metric) if export_adapter is not None else None
    except MedpeftError as exc:
        _fail(exc)
    except OSError as exc:
        _fail(_os_error(exc))
    if out is None:
        print(text, end="")
    err_console.print(best_summary(row, metric) + (f" -> {out}" if out is not None else ""), soft_wrap=True)
    if confirmed is not None:
        err_console.print(confirmed, soft_wrap=True)
    err_console.print(interval, soft_wrap=True, markup=False)
    if exported is not None:
        err_console.print(f"adapter in {exported.directory}: {', '.join(exported.files)}", soft_wrap=True)
        if exported.note:
            err_console.print(exported.note, soft_wrap=True)


def _manifests(results: Optional[Path], experiments: list[str]) -> list[dict[str, Any]]:
    """The search manifests of ``experiments`` found in the results storage (a search run elsewhere has none here)."""
    from dataclasses import asdict

    from medpeft_ray.search.manifest import SearchManifest
    from medpeft_ray.storage import results_location

    storage, _ = results_location(results)
    found = []
    for name in experiments:
        try:
            found.append(asdict(SearchManifest.load(storage, name)))
        except MedpeftError:
            continue
    return found


@app.command()
def report(
    experiments: list[str] = typer.Argument(..., help="experiment(s) to report on; name several to compare their "
                                            "methods"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for index.html and the PNG figures"),
    metric: Optional[str] = typer.Option(None, help=_metric_help()),
    split: Optional[str] = typer.Option(None, "--split", help=SPLIT_HELP),
    baseline: str = typer.Option("full", "--baseline", help=BASELINE_HELP),
    alpha: float = typer.Option(0.05, "--alpha", help=ALPHA_HELP),
    correction: str = typer.Option("holm", "--correction", help=CORRECTION_HELP),
    results: Optional[Path] = typer.Option(None, help=RESULTS_HELP),
    db: Optional[str] = typer.Option(None, help=DB_HELP),
) -> None:
    """Write an HTML report (comparison table with wins and worst-group gaps; data-regime, Pareto, progress and
    importance figures)."""
    from medpeft_ray.leaderboard.report import write_report

    try:
        store = _open_store(results, db)
        index = write_report(store, experiments, out, metric or store.default_metric(experiment=experiments), split,
                             baseline, costs=_manifests(results, experiments), evidence=_evidence(alpha, correction))
    except MedpeftError as exc:
        _fail(exc)
    except OSError as exc:
        _fail(_os_error(exc))
    console.print(f"report: {index}")


@app.command()
def dashboard(
    results: Optional[Path] = typer.Option(None, help=RESULTS_HELP),
    db: Optional[str] = typer.Option(None, help=DB_HELP),
    host: str = typer.Option("127.0.0.1", help="address to listen on (127.0.0.1: this machine only; 0.0.0.0: "
                             "every interface)"),
    port: int = typer.Option(8080, min=1, max=65535, help="port to listen on"),
) -> None:
    """Show the searches' Optuna studies (history, learning curves, Pareto fronts) in optuna-dashboard."""
    try:
        import optuna_dashboard
    except ImportError:
        _fail(UsageError("optuna-dashboard is not installed: pip install 'medpeft-ray[dashboard]'"))
    from medpeft_ray.leaderboard import optuna_storage

    try:
        storage = optuna_storage(_open_store(results, db).url)  # refuses a missing leaderboard, as `leaderboard` does
    except MedpeftError as exc:
        _fail(exc)
    shown = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
    console.print(f"optuna-dashboard on http://{shown}:{port}/ (Ctrl-C to stop)", soft_wrap=True)
    try:
        optuna_dashboard.run_server(storage, host=host, port=port)
    except KeyboardInterrupt:  # the way to stop it: no "aborted", exit code 0
        pass
    except OSError as exc:  # the port is taken, the address is not this machine's
        _fail(UsageError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})"))


@app.command()
def train(
    config: Path = typer.Option(..., "--config", "-c", help="one trial's YAML (e.g. from `medpeft-ray best --out`)"),
    results: Optional[Path] = typer.Option(None, help=RESULTS_HELP),
) -> None:
    """Train one configuration and score its best epoch on the test split."""
    from medpeft_ray.config import load_trial_config
    from medpeft_ray.storage import results_dir

    try:
        trial = load_trial_config(config)
    except MedpeftError as exc:
        _fail(exc)
    out_dir = results_dir(results) / "train" / f"{trial.experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
    console.print(f"[bold]{trial.experiment}[/bold]: {trial.method.name} on {trial.model.backbone}, "
                  f"dataset {trial.dataset.name} at label ratio {trial.label_ratio:g}, {trial.train.epochs} epochs")
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from medpeft_ray.train.single import train_single

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} epochs"),
                  TimeElapsedColumn(), console=console, disable=not console.is_terminal) as progress:
        task = progress.add_task("training", total=trial.train.epochs)

        def on_epoch(metrics: dict[str, Any]) -> None:
            progress.update(task, completed=metrics["epoch"])
            # the trial's metric where this epoch has it (FID only at its epochs), after the losses
            value = metrics.get(trial.metric)
            shown = f"  {trial.metric}={value:.4f}" if trial.metric != "val_loss" and value == value else ""
            progress.console.print(f"epoch {metrics['epoch']}/{trial.train.epochs}  train_loss={metrics['train_loss']:.4f}  "
                                   f"val_loss={metrics['val_loss']:.4f}{shown}")

        try:
            result = train_single(trial, out_dir, on_epoch)
        except MedpeftError as exc:
            _fail(exc)
    metric = result["metric"]
    test_name = METRICS[metric].on_split("test") if metric in METRICS else "test_auroc"
    test = (f"{test_name}={result[test_name]:.4f} (epoch {result['test_epoch']})" if result.get(test_name) is not None
            else "no test split")
    console.print(f"best {metric}={result[f'best_{metric}']:.4f} (epoch {result['best_epoch']}); {test}; "
                  f"{result['wall_time_s']:.0f} s")
    console.print(f"checkpoint and result.json in {out_dir}")


@app.command("methods")
def methods_command(
    backbone: str = typer.Option("vit_base_patch16_224", help="timm backbone name (ViT or ResNet), or a diffusion "
                                 "U-Net (unet_tiny, unet_sd15)"),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", min=1, help="classes of the task (sizes the head) "
                                              "[14, or with --space the classes the dataset format fixes]"),
    image_size: int = typer.Option(224, "--image-size", min=16, help="input side in pixels"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON list instead of a table"),
    space: Optional[Path] = typer.Option(None, "--space", "-s", help="count the methods this search YAML (or each "
                                         "cell of this grid file) configures, with its backbone, image size, classes "
                                         "(those the dataset format fixes, else --num-classes) and method options; "
                                         "the dataset folder need not exist yet"),
) -> None:
    """The PEFT methods for a backbone, with trainable parameters under their default options."""
    from medpeft_ray.config.method_counts import default_method_counts, search_method_counts

    try:
        tables = (search_method_counts(space, num_classes) if space is not None
                  else [default_method_counts(backbone, num_classes, image_size)])
    except MedpeftError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps([row for counts in tables for row in counts.rows], indent=1))
        return
    for counts in tables:
        _print_method_counts(counts)


def _print_method_counts(counts: Any) -> None:
    """One model's methods as a table, fewest trainable parameters first."""
    rows = counts.rows
    # a U-Net has no classes: only a classifier's count depends on them
    task = rows[0]["task"] if rows else "classification"
    noun = "class" if counts.num_classes == 1 else "classes"
    classes = f", {counts.num_classes} {noun} {counts.classes_from}" if task != "generation" else ""
    table = Table(title=f"PEFT methods on {counts.backbone} at {counts.image_size} px{classes}; {counts.options_from}")
    for column in ("method", "trainable params", "share", "searched by default", "notes", "what it does"):
        table.add_column(column, justify="right" if column in ("trainable params", "share") else "left")
    names = [row["method"] for row in rows]
    for row in sorted(rows, key=lambda r: r["trainable_params"]):
        notes = ", ".join(n for n, on in (("identity at init", row["identity_at_init"]), ("mergeable", row["mergeable"]),
                                           ("peft", row["peft_native"])) if on)
        # a method configured differently in a grid's cells is one row per configuration
        method = row["method"] if names.count(row["method"]) == 1 else f"{row['method']} {json.dumps(row['options'])}"
        table.add_row(method, f"{row['trainable_params']:,}", f"{row['trainable_percent']:.3g}%",
                      ", ".join(row["searched"]), notes, row["description"])
    console.print(table)
    console.print(f"total parameters of the backbone: {min(r['total_params'] for r in rows):,}")


data_app = typer.Typer(no_args_is_help=True, help="Inspect datasets before spending GPU time on them.")
app.add_typer(data_app, name="data")

#: what `data check` prints, of the output formats: a table, or JSON for scripts (a dataset report
#: is no list of rows, so neither csv nor markdown)
DataCheckFormat = Enum("DataCheckFormat", {f.name: f.value for f in (OutputFormat.table, OutputFormat.json)}, type=str)


@data_app.command("check")
def data_check(
    dataset: Optional[str] = typer.Option(None, help=_dataset_help()),
    root: Optional[Path] = typer.Option(None, help="dataset folder"),
    option: list[str] = typer.Option([], "--option", "-o", help="a dataset option as key=value (YAML value), repeatable"),
    space: Optional[Path] = typer.Option(None, "--space", "-s", help="take the dataset section of this search YAML instead"),
    image_size: int = typer.Option(64, help="decode size for the check (the images are fully decoded either way)"),
    label_ratios: str = typer.Option("0.01,0.1,1.0", help="comma-separated label ratios to report positives for"),
    output: DataCheckFormat = typer.Option(  # type: ignore[valid-type]
        DataCheckFormat.table, "--format", help=_either([f.value for f in DataCheckFormat])),
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
    if OutputFormat(output.value) is OutputFormat.json:
        from dataclasses import asdict

        print(json.dumps({**asdict(report), "usable": report.usable}, indent=1, default=str))
    else:
        _print_report(report)
    if not report.usable:
        raise typer.Exit(1)


UNREADABLE_SHOWN = 20  # undecodable files listed one per line by `data check`


def _print_report(report: Any) -> None:
    console.print(f"[bold]{report.name}[/bold] {report.root or ''}: {len(report.class_names)} classes ({report.task}), "
                  f"images {'in colour (RGB)' if report.channels == 3 else 'grey (one channel)'}")
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
    if report.class_names:
        console.print(table)
        console.print("positives per class; column headers give the images in each split and label-ratio subset")
    else:  # image-text data without labels: the images per split and label-ratio subset are the whole story
        console.print(", ".join([*(f"{s} {report.images[s]:,}" for s in ("train", "val", "test")),
                                 *(f"train {r:g}: {n:,}" for r, n in report.ratio_images.items())]) + " images")
    if report.has_captions:
        left_out = f"; {report.uncaptioned:,} left out without one" if report.uncaptioned else ""
        console.print(f"captions: every image has one (the text a generation search conditions on){left_out}")
    from medpeft_ray.data.records import is_missing, is_uncaptioned

    if report.missing:
        console.print(f"[yellow]missing:[/yellow] {escape(report.missing)}", soft_wrap=True)
    # missing files are in the block above; a flood of undecodable ones is cut short too
    undecodable = [line for line in report.unreadable if not is_missing(line) and not is_uncaptioned(line)]
    for line in undecodable[:UNREADABLE_SHOWN]:
        console.print(f"[yellow]unreadable:[/yellow] {escape(line)}", soft_wrap=True)
    if len(undecodable) > UNREADABLE_SHOWN:
        console.print(f"[yellow]unreadable:[/yellow] ... and {len(undecodable) - UNREADABLE_SHOWN:,} more "
                      "(--format json lists every one)")
    for problem in report.problems:
        console.print(f"[red]problem:[/red] {problem}", soft_wrap=True)
    console.print("[green]usable[/green]" if report.usable else "[red]not usable[/red]")


def main() -> None:
    try:
        # not standalone: click's own errors (an unknown option, "--label-ratio abc") come back as
        # exceptions, printed below as one line like every other error instead of a multi-line usage box
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # click's UsageError, BadParameter and other ClickExceptions
        if type(exc).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
            ctx = getattr(exc, "ctx", None)
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            message = " ".join(exc.format_message().split())  # type: ignore[attr-defined]
            err_console.print(f"[red]error:[/red] {escape(message + hint)}", soft_wrap=True)
        sys.exit(exc.exit_code)  # type: ignore[attr-defined]
    except typer.Abort:  # end of input at a prompt
        err_console.print("aborted")
        sys.exit(1)
    except OSError as exc:
        # a full disk or a permission error: one line naming the file; rows already written stay
        where = f"{exc.filename}: " if exc.filename else ""
        err_console.print(f"[red]error:[/red] {escape(f'{where}{exc.strerror or exc}')}", soft_wrap=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)  # a command's typer.Exit(n) comes back as n


if __name__ == "__main__":
    main()
