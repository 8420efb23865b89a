"""The search driver: one Ray Tune study per label ratio, on the search's warm executors.

:func:`run_search` checks the results location (:mod:`medpeft_ray.storage`) and runs the
pre-flight (:mod:`medpeft_ray.search.preflight`) before Ray starts, then joins or starts Ray
(:mod:`medpeft_ray.search.ray_session`), takes its executors and runs the studies: each a
``Tuner`` over :func:`medpeft_ray.search.trial.run_trial` with ``OptunaSearch`` (define-by-run,
seeded) and ASHA on epochs, then the confirmation of its best configurations if asked for.
Finished trials go to the leaderboard as they end.

This module imports Ray: the CLI imports it only inside the command that runs a search.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import ray
from ray import tune

from medpeft_ray.config import SearchConfig
from medpeft_ray.errors import MedpeftError
from medpeft_ray.leaderboard import LeaderboardStore, TrialRecord, optuna_storage
from medpeft_ray.metrics import get_metric
from medpeft_ray.search import ray_session
from medpeft_ray.search.budget import BudgetedSearch, SearchBudget, StudyBudget
from medpeft_ray.search.callbacks import (
    CheckpointRetention,
    LeaderboardCallback,
    SearchTimeline,
    StudyTail,
    TrialSummary,
)
from medpeft_ray.search.cluster import (
    ClusterCapacity,
    ResourcePlan,
    cluster_capacity,
    plan_resources,
    release_resource_requests,
)
from medpeft_ray.search.confirm import choose, confirm_study, describe, record_confirmation
from medpeft_ray.search.dispatcher import WAITING_PER_EXECUTOR
from medpeft_ray.search.executor_spec import ExecutorSpec
from medpeft_ray.search.manifest import SearchManifest, load_dry_run_forecast
from medpeft_ray.search.optuna_states import EpochStatesSearch
from medpeft_ray.search.pools import ExecutorPool, release_executors, return_executors, take_executors
from medpeft_ray.search.preflight import preflight
from medpeft_ray.search.progress import SearchReporter
from medpeft_ray.search.space import SpaceSampler, make_sampler, make_scheduler
from medpeft_ray.search.tracking import TrackingTargets, check_tracking
from medpeft_ray.search.tracking_callback import tracking_callbacks
from medpeft_ray.search.trial import TrialPlan, confirm_trial, run_trial, trial_folder
from medpeft_ray.search.tune_side import ExecutorCallback, ExecutorGate, ExecutorHandouts
from medpeft_ray.search.warm_start import warm_start_points
from medpeft_ray.storage import check_results_folder, results_location, search_db_url

if TYPE_CHECKING:
    from ray.actor import ActorHandle
    from rich.console import Console

    from medpeft_ray.config.grid import GridCell


@dataclass
class SearchResult:
    """What a finished search returns: its leaderboard rows and timings."""

    experiment: str
    wall_time_s: float
    trials: list[TrialSummary]  # best first per label ratio
    results_dir: Path | str  # a local folder, or a cloud storage URI (s3://, gs://)
    db_url: str
    slots: int = 1  # trials that ran at a time (the slot-seconds of slot utilisation)
    executors: dict[str, Any] | None = None  # the warm executors' statistics, None for cold trials
    timeline: SearchTimeline | None = None  # when trials ran, and how long they trained

    @property
    def slot_utilisation(self) -> float | None:
        """Training + evaluation seconds over the slot-seconds from the first trial's start to the last one's end."""
        return self.timeline.utilisation(self.slots) if self.timeline is not None else None


@dataclass
class SearchRun:
    """What the studies of one search share while it runs."""

    config: SearchConfig
    plan: ResourcePlan
    storage: str
    facts: dict[str, Any]  # pre-flight's findings
    db_url: str
    reporter: SearchReporter
    manifest: SearchManifest
    dispatcher: tuple[ActorHandle, str] | None = None  # (actor, name) of the warm executors, None for cold trials
    timeline: SearchTimeline | None = None
    tracking: TrackingTargets | None = None  # MLflow and W&B, where the YAML's tracking section names them
    budget: SearchBudget = field(init=False)  # split among the studies
    lock: threading.Lock = field(default_factory=threading.Lock)  # overlapping studies share the manifest and budget

    def __post_init__(self) -> None:
        settings = self.config.search
        self.budget = SearchBudget(settings.time_budget_s, settings.max_trials, started_at=self.manifest.started_at)


def _plan_resources(config: SearchConfig, existing_cluster: bool = False) -> tuple[ResourcePlan, ClusterCapacity]:
    """The trials' resources and concurrency on the connected cluster (its maximum size if it autoscales)."""
    capacity = cluster_capacity(existing_cluster)
    return plan_resources(config, capacity), capacity


def run_search(
    config: SearchConfig,
    *,
    results: str | Path | None = None,
    address: str | None = None,
    db_url: str | None = None,
    console: Console | None = None,
    resume: bool = False,
    facts: dict[str, Any] | None = None,
) -> SearchResult:
    """Runs the whole search: every label ratio of ``config`` is its own Optuna study.

    Args:
        config: a validated search config.
        results: results folder (default ``$MEDPEFT_RESULTS`` or ``./medpeft-results``), or a
            cloud storage URI (``s3://bucket/prefix``) that every node of a cluster can reach.
        address: Ray cluster address (``auto`` for the cluster this machine belongs to);
            None starts a local Ray.
        db_url: leaderboard database (default: SQLite in the results folder, or ``$MEDPEFT_DB``;
            required with cloud storage results).
        console: a ``rich.console.Console`` for progress lines, or None for silence.
        resume: continue the last search named ``config.experiment`` in these results (see
            :func:`resumable_config`) instead of starting a new one.
        facts: :func:`preflight`'s result when the caller ran it already (a grid checks every cell first).

    The search's executors stay warm for the process's next search that fits them (see
    :mod:`medpeft_ray.search.pools`; :func:`medpeft_ray.search.pools.release_executors` ends them).
    """
    started = time.time()
    storage, results_path = results_location(results)
    check_results_folder(results_path)  # a read-only or full results folder fails here, before Ray starts
    db_url = search_db_url(storage, results_path, db_url)  # with cloud results, --db is required
    if results_path is not None:
        results_path.mkdir(parents=True, exist_ok=True)
    LeaderboardStore(db_url)  # fails now, not after the first trial, if the database is unusable
    tracking = check_tracking(config, results_path)  # a missing package or an unreachable server, before Ray
    facts = facts or preflight(config)
    reporter = SearchReporter(console)
    reporter.search_starts(config, facts)

    # Tune's own tables and Optuna's per-study log lines would drown the per-trial progress lines.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ray_session.connect(address)
    plan, capacity = _plan_resources(config, existing_cluster=bool(address))
    reporter.cluster(config, plan, capacity, storage)
    if resume:
        manifest = SearchManifest.load(storage, config.experiment_name)
        manifest.attempt += 1  # fences off whatever the interrupted run left writing
    else:
        # forecast.py is imported here, as the dry run's CLI path imports it: it stays free of Ray
        from medpeft_ray.search.forecast import recorded_forecast

        # the leaderboard's epoch times of the same setting, else the last `search --dry-run`'s timing
        forecast = recorded_forecast(config, facts, plan, db_url) or load_dry_run_forecast(storage, config.experiment_name)
        manifest = SearchManifest(config.experiment_name, config.model_dump(mode="json"), forecast=forecast)
    manifest.save(storage)

    run = SearchRun(config, plan, storage, facts, db_url, reporter, manifest, timeline=SearchTimeline(),
                    tracking=tracking)
    reporter.watch(config.search.metric, config.search.resolved_mode, plan.concurrency, run.timeline)
    executor_stats, pool, ended_well = None, None, False
    try:
        if config.resources.warm_executors:
            pool = _take_executors(run)
            run.dispatcher = (pool.dispatcher, pool.name)
        else:
            release_executors()  # idle executors of an earlier search would hold the cold trials' resources
            reporter.cold_trials()
        summaries = _run_studies(run)
        _record_actual_costs(run, [s.record for s in summaries], time.time() - started)
        ended_well = True
    except KeyboardInterrupt as exc:
        reporter.interrupted()
        exc.experiment = config.experiment_name  # type: ignore[attr-defined]  # the CLI's resume command names it
        raise
    finally:
        reporter.close()
        if pool is not None:
            # kept warm for this process's next search; after a failure, ended (trials may be mid-way)
            executor_stats = return_executors(pool, config.experiment_name, keep=ended_well)
        if capacity.autoscaling:
            release_resource_requests()
    return SearchResult(config.experiment_name, time.time() - started, summaries, results_path or storage, db_url,
                        slots=plan.concurrency, executors=executor_stats, timeline=run.timeline)


def _record_actual_costs(run: SearchRun, records: list[TrialRecord], wall_s: float) -> None:
    """What the search cost, beside its forecast in the manifest (the report shows the two side by side)."""
    from medpeft_ray.search.forecast import actual_costs, devices_per_trial

    run.manifest.actual = actual_costs(records, wall_s, devices_per_trial(run.config, run.plan))
    run.manifest.save(run.storage)


def run_grid(cells: list[GridCell], *, console: Console | None = None, **options: Any) -> list[SearchResult]:
    """Runs a grid's searches one after another on one set of warm executors and one leaderboard.

    Every cell is pre-flighted (data, checkpoint, methods on the backbone) before the first one
    starts. Cells share the executors (each finds the previous cell's warm), so they must ask for
    the same ``resources``. ``options`` are :func:`run_search`'s (results, address, db_url).

    Raises:
        MedpeftError: a cell fails its pre-flight, or its resources differ from the first cell's.
    """
    first = cells[0].config.resources
    for cell in cells[1:]:
        if cell.config.resources != first:
            raise MedpeftError(f"grid cell {'/'.join(cell.entries)}: its resources differ from the first cell's; "
                               "the cells of a grid share their trial executors (set resources in the base file)")
    _, results_path = results_location(options.get("results"))
    for cell in cells:
        check_tracking(cell.config, results_path)
    all_facts = [preflight(cell.config) for cell in cells]
    results = []
    for cell, facts in zip(cells, all_facts):
        if console is not None:
            console.print(f"\n[bold]grid cell {'/'.join(cell.entries)}[/bold] ({len(results) + 1} of {len(cells)})")
        results.append(run_search(cell.config, console=console, facts=facts, **options))
    return results


def _take_executors(run: SearchRun) -> ExecutorPool:
    """The search's executors, one per trial slot, ready before Tune starts: this process's warm
    ones where they fit, else new ones."""
    config, plan, storage, facts = run.config, run.plan, run.storage, run.facts

    spec = ExecutorSpec(
        num_workers=config.resources.workers_per_trial, use_gpu=plan.use_gpu, resources_per_worker=plan.per_worker,
        storage_path=f"{storage}/executors", experiment=config.experiment_name, max_executors=plan.concurrency,
        threads=max(1, int(plan.per_worker.get("CPU", 1))), worker_start_timeout_s=config.resources.worker_start_timeout_s,
        idle_exit_s=config.resources.executor_idle_s, warm_up=facts["warm_up"], host_resources=plan.executor_host,
    )
    started = time.time()
    pool, warm = take_executors(spec, facts["dataset_key"], resumed=run.manifest.attempt > 1)
    # Tune starts its trials once executors are ready: a trial then starts on a loaded backbone
    # instead of holding a slot (and its share of a time budget) while an executor boots.
    try:
        ready = ray.get(pool.dispatcher.wait_ready.remote(plan.concurrency))
    except ray.exceptions.RayTaskError as exc:
        return_executors(pool, config.experiment_name, keep=False)
        raise MedpeftError(f"the trial executors could not set up: {exc.cause}") from None
    run.reporter.executors_ready(ready, plan.concurrency, time.time() - started, warm=warm)
    return pool


def resumable_config(name: str, results: str | Path | None = None) -> SearchConfig:
    """The config of the last search named ``name`` in ``results``, to continue it with ``run_search(resume=True)``.

    Raises:
        MedpeftError: no such search, or it finished already.
    """
    storage, _ = results_location(results)
    manifest = SearchManifest.load(storage, name)
    if manifest.finished:
        raise MedpeftError(f"{storage}: the search {name!r} finished; its trials are in the leaderboard (nothing to resume)")
    return SearchConfig.model_validate(manifest.config)


def _run_studies(run: SearchRun) -> list[TrialSummary]:
    """One Tune study per label ratio; returns the finished trials, best first per ratio.

    Each study runs in a thread of its own, and the next one starts as soon as the previous one
    starts no more trials, so that its last trials' free slots go to the next label ratio.

    Resuming (``manifest`` lists studies already started), a finished study is not run again, an
    unfinished one is restored from Tune's state (finished trials stay finished, interrupted ones
    restart from their last checkpoint, the searcher and its Optuna study keep their history),
    and the rest start as usual.
    """
    config, manifest = run.config, run.manifest
    ratios = config.dataset.label_ratios
    results: dict[float, list[TrialSummary]] = {}
    errors: list[BaseException] = []
    threads: list[threading.Thread] = []

    def run_study(index: int, label_ratio: float, tail: threading.Event) -> None:
        try:
            results[label_ratio] = _run_study(run, index, tail)
        except BaseException as exc:  # noqa: BLE001  (raised again in the search's own thread)
            errors.append(exc)
        finally:
            tail.set()

    for index, label_ratio in enumerate(ratios):
        if errors:
            break
        if label_ratio in manifest.studies_done:
            results[label_ratio] = _recorded_trials(config, label_ratio, run.db_url, manifest)
            continue
        # The next study starts once this one starts no more trials: its last trials' slots would
        # otherwise wait for them (warm starts read the trials of earlier ratios finished by then).
        tail = threading.Event()
        thread = threading.Thread(target=run_study, args=(index, label_ratio, tail), name=f"study-{label_ratio:g}",
                                  daemon=True)
        thread.start()
        threads.append(thread)
        while not tail.wait(0.5):
            pass
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    manifest.finished = True
    manifest.save(run.storage)
    return [summary for ratio in ratios for summary in results.get(ratio, [])]


def _run_study(run: SearchRun, index: int, tail: threading.Event) -> list[TrialSummary]:
    """The study of one label ratio (restored if it was interrupted); sets ``tail`` once it starts no more trials."""
    config, manifest = run.config, run.manifest
    settings = config.search
    ratios = config.dataset.label_ratios
    label_ratio = ratios[index]
    with run.lock:
        share = run.budget.share(len(ratios) - index)
    num_samples = settings.num_samples if share.trials is None else min(settings.num_samples, share.trials)
    if num_samples == 0 or not share.allows_another():
        run.reporter.not_searched(label_ratio, share.spent)
        return []
    trial_plan = _trial_plan(run, label_ratio)
    study_name = config.study_name(label_ratio, manifest.run_stamp)
    trainable = study_trainable(run_trial, trial_plan, run.plan.driver, config.run_name(label_ratio))
    study_path = f"{run.storage}/tune/{config.run_name(label_ratio)}"
    if label_ratio in manifest.studies_started and tune.Tuner.can_restore(study_path):
        run.reporter.resuming(label_ratio)
        tuner = _restore_tuner(study_path, trainable)
    else:
        tuner = _new_tuner(run, index, trainable, study_name, num_samples, share, tail)
        with run.lock:
            manifest.studies_started.append(label_ratio)
            manifest.save(run.storage)
    run.reporter.study_starts(label_ratio, num_samples)
    tuner.fit()
    tail.set()
    run.reporter.study_ends(label_ratio)
    trials = _recorded_trials(config, label_ratio, run.db_url, manifest)
    if settings.confirm is not None:
        _confirm(run, label_ratio, trials, trial_plan, study_name)
    with run.lock:
        _finish_study(manifest, run.storage, label_ratio)
    metrics, _ = settings.objectives
    if len(metrics) > 1 and run.reporter.listening:
        front = optuna.load_study(study_name=study_name, storage=optuna_storage(run.db_url)).best_trials
        run.reporter.pareto_front(label_ratio, metrics, front)
    if share.spent:
        run.reporter.budget_spent(label_ratio, share.spent, share.started)
    return trials


def study_trainable(function: Any, trial_plan: TrialPlan, resources: Any, study: str) -> Any:
    """``function`` (a Tune function trainable) with this study's ``trial_plan`` and the driver's
    ``resources``, named after the ``study``.

    Tune finds a trial's trainable by its name, in one registry for the whole driver, where the
    studies of the label ratios run at once (a thread each): under one shared name, the study that
    registered last would hand its plan, and its label ratio, to the other studies' later trials,
    which would train silently on another ratio's images. The name keeps Tune's folder layout
    (``run_trial-<study>_<trial id>_<number>_...``) and is the same when the study is resumed.
    """
    trainable = tune.with_parameters(function, plan=trial_plan)
    trainable.__name__ = f"{function.__name__}-{study.replace('_', '-')}"
    return tune.with_resources(trainable, resources)


def _restore_tuner(study_path: str, trainable: Any) -> tune.Tuner:
    """The interrupted study's tuner, from Tune's saved state.

    Tune pickles the study's searcher and callbacks, which name this package's classes by module:
    state written by a medpeft-ray whose modules were laid out otherwise cannot be read back.

    Raises:
        MedpeftError: the state names a medpeft_ray module or class this version does not have, or
            a trainable of another name (studies saved before each study's trainable was named).
    """
    try:
        # finished trials stay finished; trials that were running restart from their last checkpoint;
        # the searcher comes back with its Optuna study, the leaderboard callback with its database
        return tune.Tuner.restore(study_path, trainable=trainable, resume_unfinished=True, resume_errored=False)
    except (ModuleNotFoundError, AttributeError, ValueError) as exc:
        # ValueError: Tune's check that the trainable has the name the study was saved with
        if "medpeft_ray" not in str(exc) and "trainable" not in str(exc):
            raise
        raise MedpeftError(f"{study_path}: the study's saved state was written by another version of medpeft-ray "
                           f"({exc}); finish the search with that version (its rows and checkpoints are kept)") from exc


def _trial_plan(run: SearchRun, label_ratio: float) -> TrialPlan:
    """What every trial of ``label_ratio``'s study shares."""
    config, plan = run.config, run.plan
    return TrialPlan(
        search=config,
        label_ratio=label_ratio,
        num_workers=config.resources.workers_per_trial,
        use_gpu=plan.use_gpu,
        resources_per_worker=plan.per_worker,
        storage_path=f"{run.storage}/train",
        dataset_key=run.facts["dataset_key"],
        max_failures=config.resources.max_failures,
        worker_start_timeout_s=config.resources.worker_start_timeout_s,
        dispatcher=run.dispatcher[0] if run.dispatcher is not None else None,
        attempt=run.manifest.attempt,
    )


def _new_tuner(run: SearchRun, index: int, trainable: Any, study_name: str, num_samples: int, share: StudyBudget,
               tail: threading.Event) -> tune.Tuner:
    """A fresh Tune run of one study: Optuna searcher (warm-started, budgeted, gated on executors) and scheduler."""
    config, dispatcher, settings, space = run.config, run.dispatcher, run.config.search, run.config.search_space
    ratios = config.dataset.label_ratios
    label_ratio = ratios[index]
    metrics, modes = settings.objectives
    points = warm_start_points(config, label_ratio, run.db_url, ratios[:index])
    run.reporter.trying_first(label_ratio, points)
    # stopped trials PRUNED, completed ones told their best epoch, as the leaderboard rows have them
    searcher: Any = EpochStatesSearch(
        space=SpaceSampler.of(space),
        metric=metrics if len(metrics) > 1 else metrics[0],
        mode=modes if len(modes) > 1 else modes[0],
        sampler=make_sampler(settings, space.distributions, conditional=space.several_methods),
        points_to_evaluate=points or None,
        # Optuna's study lives in the leaderboard's database (optuna-dashboard opens it); one
        # study per run, so a re-run of an experiment starts a fresh history
        storage=optuna_storage(run.db_url),
        study_name=study_name,
        epochs=config.train.epochs_for(label_ratio),
    )
    if share.deadline is not None or share.trials is not None:
        searcher = BudgetedSearch(searcher, share)
    if dispatcher is not None:
        # a trial starts only when an executor can take it, or take it next (WAITING_PER_EXECUTOR)
        searcher = ExecutorGate(searcher, dispatcher[1])
    experiment = config.run_name(label_ratio)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,  # the searcher and the scheduler each know their objectives
            scheduler=make_scheduler(settings, config.train.epochs_for(label_ratio),
                                     state_uri=f"{run.storage}/tune/{experiment}/scheduler_state.pkl"),
            num_samples=num_samples,
            # with executors, each slot's next trial waits beside it, ready the moment it is free
            max_concurrent_trials=run.plan.concurrency * (1 + WAITING_PER_EXECUTOR if dispatcher is not None else 1),
            # No reuse of trial driver processes: a driver whose trial the scheduler stopped
            # may still be waiting for its executor when the next trial asks for it, and Tune
            # then drops that next trial instead of starting a fresh driver.
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=experiment,
            storage_path=f"{run.storage}/tune",
            callbacks=[LeaderboardCallback(config, label_ratio, run.db_url, run.reporter, run.timeline,
                                           handouts=ExecutorHandouts(dispatcher[1], experiment) if dispatcher else None),
                       StudyTail(num_samples, share, tail),
                       *([ExecutorCallback(dispatcher[1], experiment),
                          # after the row is written: it names the best epoch's checkpoint
                          CheckpointRetention(config, functools.partial(trial_folder, f"{run.storage}/train", experiment))]
                         if dispatcher is not None else []),
                       # last: a trial's row is written when it reaches this, and the best adapter is found by it
                       *tracking_callbacks(config, label_ratio, study_name, run.tracking, run.db_url, run.facts)],
            verbose=0,
        ),
    )


def _confirm(run: SearchRun, label_ratio: float, trials: list[TrialSummary], trial_plan: TrialPlan,
             study_name: str) -> None:
    """Re-trains the study's best configurations with several seeds and records which one is chosen."""
    settings = run.config.search
    confirm = settings.confirm
    assert confirm is not None
    top = [t.record for t in trials if t.record.status != "failed"][: confirm.top_k]
    name = run.config.run_name(label_ratio, confirmation=True)
    trainable = study_trainable(confirm_trial, trial_plan, run.plan.driver, name)
    # each seed is a leaderboard row of its own (role "confirmation"): views show mean and spread
    handouts = ExecutorHandouts(run.dispatcher[1], name) if run.dispatcher is not None else None
    callbacks = [LeaderboardCallback(run.config, label_ratio, run.db_url, role="confirmation", handouts=handouts),
                 *([ExecutorCallback(run.dispatcher[1], name)] if run.dispatcher is not None else []),
                 *tracking_callbacks(run.config, label_ratio, study_name, run.tracking, run.db_url, run.facts,
                                     role="confirmation")]
    confirmed = confirm_study(run.config, label_ratio, top, trainable, run.plan.concurrency, run.storage, callbacks)
    chosen = choose(confirmed, settings.resolved_mode)
    with run.lock:
        run.manifest.confirmations[f"{label_ratio:g}"] = record_confirmation(study_name, run.db_url, confirmed, chosen)
    run.reporter.confirmed(label_ratio, len(top), confirm.seeds, describe(confirmed, chosen, settings.metric))


def _finish_study(manifest: SearchManifest, storage: str, label_ratio: float) -> None:
    manifest.studies_done.append(label_ratio)
    manifest.save(storage)


def _recorded_trials(config: SearchConfig, label_ratio: float, db_url: str,
                     manifest: SearchManifest) -> list[TrialSummary]:
    """This run's trials of one label ratio as the leaderboard has them, best first."""
    since = datetime.fromtimestamp(int(manifest.started_at), timezone.utc)
    rows = LeaderboardStore(db_url).query(
        experiment=config.experiment_name, label_ratio=label_ratio, since=since, role="search",
        metric=config.search.metric, ascending=get_metric(config.search.metric).ascending,
    )
    return [TrialSummary(TrialRecord.from_row(row), row["params"]) for row in rows.to_dict(orient="records")]
