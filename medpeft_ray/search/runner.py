"""The search driver: pre-flight checks, then one Ray Tune study per label ratio.

Each study is a ``Tuner`` over :func:`medpeft_ray.search.trial.run_trial` with ``OptunaSearch``
(define-by-run, seeded) and ASHA on epochs. Finished trials go to the leaderboard as they end.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medpeft_ray.config import SearchConfig
from medpeft_ray.errors import ConfigError, DataError, MedpeftError, UsageError
from medpeft_ray.leaderboard import LeaderboardStore, default_db_url, optuna_storage, results_dir
from medpeft_ray.search.manifest import SearchManifest
from medpeft_ray.search.progress import SearchReporter
from medpeft_ray.search.cluster import (  # noqa: F401  DRIVER_* are part of this module's interface
    DRIVER_RESOURCE,
    DRIVER_SLOTS,
    ClusterCapacity,
    ResourcePlan,
    cluster_capacity,
    plan_resources,
    release_resource_requests,
)


@dataclass
class SearchResult:
    """What a finished search returns: its leaderboard rows and timings."""

    experiment: str
    wall_time_s: float
    trials: list[Any]  # TrialSummary, best first per label ratio
    results_dir: Path | str  # a local folder, or a cloud storage URI (s3://, gs://)
    db_url: str
    slots: int = 1  # trials that ran at a time (the slot-seconds of slot utilisation)
    executors: dict[str, Any] | None = None  # the warm executors' statistics, None for cold trials
    timeline: Any = None  # SearchTimeline: when trials ran, and how long they trained

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
    dispatcher: tuple[Any, str] | None = None  # (actor, name) of the warm executors, None for cold trials
    timeline: Any = None  # SearchTimeline
    budget: Any = field(init=False)  # SearchBudget, split among the studies
    lock: threading.Lock = field(default_factory=threading.Lock)  # overlapping studies share the manifest and budget

    def __post_init__(self) -> None:
        from medpeft_ray.search.budget import SearchBudget

        settings = self.config.search
        self.budget = SearchBudget(settings.time_budget_s, settings.max_trials, started_at=self.manifest.started_at)


def preflight(config: SearchConfig) -> dict[str, Any]:
    """Checks what needs torch before any Ray work: backbone name, checkpoint, data, method on the backbone.

    Builds the dataset's decode-once cache on this machine (later trials here only read it) and
    the model on the meta device (no memory, no weights), with the method applied.

    Returns:
        facts for the progress line (classes, images per split and ratio, trainable params) and
        the dataset's cache key, which trials reuse instead of walking the dataset again, and
        the pre-trained checkpoint's path and SHA-256.
    """
    import torch

    from medpeft_ray.data import dataset_key, load_splits, train_subset_index
    from medpeft_ray.models.normalisation import input_statistics
    from medpeft_ray.methods import count_parameters, prepare_model
    from medpeft_ray.metrics import METRICS, require_defined
    from medpeft_ray.models import build_backbone
    from medpeft_ray.models.backbones import check_backbone_name
    from medpeft_ray.models.checkpoints import checkpoint_identity, match_checkpoint

    from medpeft_ray.train.engine import augment_processes_override

    augment_processes_override()  # a worker would read it only once its trial starts
    backbone = config.model.backbone
    try:
        check_backbone_name(backbone)
    except ConfigError as exc:
        raise exc.with_file(config.experiment or "") from None
    checkpoint = None
    generation = config.task == "generation"
    if config.model.checkpoint is not None and generation:
        from medpeft_ray.models.unet import check_pipeline_folder, pipeline_weights

        check_pipeline_folder(config.model.checkpoint)  # every part there, before any worker reads one
        checkpoint = checkpoint_identity(pipeline_weights(config.model.checkpoint))
    elif config.model.checkpoint is not None:
        # the workers' own check, on a meta model: a file of another model stops here, not in a trial
        # (the head does not take part, so its size does not matter yet)
        with torch.device("meta"):
            bare = build_backbone(backbone, 1, config.dataset.image_size)
        match_checkpoint(bare, config.model.checkpoint)
        checkpoint = checkpoint_identity(config.model.checkpoint)
    if config.search.fid_weights is not None:
        from medpeft_ray.train.fid import check_fid_weights

        check_fid_weights(config.search.fid_weights)

    ds = config.dataset
    key = dataset_key(ds.name, ds.root, ds.image_size, ds.options, ds.seed)
    splits = load_splits(ds.name, ds.root, ds.image_size, ds.options, ds.seed, key=key)
    for name in ("train", "val"):
        if len(getattr(splits, name)) == 0:
            raise MedpeftError(f"{ds.root or ds.name}: the {name} split has no images")
    if generation and not splits.has_captions:
        raise DataError(f"{ds.root or ds.name}: dataset {ds.name!r} has no captions; a generation search needs images "
                        "with their report text (mimic_cxr, captions, synthetic)")
    for metric in config.search.objectives[0]:  # accuracy has no meaning on multi-label data, say
        if metric in METRICS:  # also_minimize may name a cost column
            require_defined(metric, "generation" if generation else splits.task, ds.name)
    images_per_ratio = {r: len(train_subset_index(splits, r, ds.seed)) for r in ds.label_ratios}

    # Each method is applied with the first value of each searched option, to catch options that
    # do not fit this backbone (a block index past its depth, say) before trials start.
    space = config.search_space
    trainable_by_method: dict[str, int] = {}
    for method in space.methods:
        trial = space.trial_config(ds.label_ratios[0], space.first_point(method))
        with torch.device("meta"):
            model = build_backbone(backbone, splits.num_classes, ds.image_size, drop_path=trial.train.drop_path)
            try:
                model = prepare_model(model, trial.method.name, trial.method.options, trial.family)
            except ValueError as exc:
                raise ConfigError(config.method.options_key(method), str(exc), config.experiment) from None
        trainable_by_method[method], total = count_parameters(model)
    trainable = max(trainable_by_method.values())
    return {
        "classes": splits.num_classes,
        "images": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "train_images_per_ratio": images_per_ratio,
        "trainable_params": trainable,
        "trainable_params_by_method": trainable_by_method,
        "total_params": total,
        "dataset_key": key,
        "skipped": list(splits.skipped),
        "channels": splits.channels,
        "normalisation": input_statistics(config.model).describe(),
        "checkpoint": checkpoint,  # {path, sha256} of the pre-trained weights, or None
        # what warm executors build while they set up (data, pristine backbone, the method's imports)
        "warm_up": space.trial_config(ds.label_ratios[0], space.first_point(space.methods[0])),
    }


def _connect(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    # Ray's own notices (token authentication, worker counts, deprecations) and the trials' output
    # reach the terminal only when asked for: MEDPEFT_WORKER_LOGS=1 or `medpeft-ray search --verbose`
    verbose = bool(os.environ.get("MEDPEFT_WORKER_LOGS"))
    level = logging.WARNING if verbose else logging.INFO  # INFO lands in the session log, not the terminal
    if address:
        hint = (
            "start one (`ray start --head --port 6380`, `ray up clusters/aws-gpu.yaml`) or leave --address out "
            "to run on a local Ray"
        )
        # Ray retries an address where nothing listens for minutes; a refused connection says it at once.
        host, sep, port = address.rpartition(":")
        if sep and host and port.isdigit() and "://" not in address:
            try:
                socket.create_connection((host, int(port)), timeout=10).close()
            except OSError as exc:
                raise MedpeftError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc}); {hint}") from None
        try:
            _start_ray(lambda: ray.init(address=address, log_to_driver=verbose, logging_level=level), verbose)
        except ConnectionError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MedpeftError(f"--address {address}: no Ray cluster to join ({reason}); {hint}") from None
    else:
        _start_ray(
            lambda: ray.init(resources={DRIVER_RESOURCE: DRIVER_SLOTS}, log_to_driver=verbose, logging_level=level),
            verbose,
        )


def _start_ray(init: Any, verbose: bool) -> None:
    """Calls ``init`` (a ``ray.init``); unless ``verbose``, Ray's own output goes to its session log.

    For the rest of the process, ``<session>/logs/medpeft-driver.log`` receives the ``ray``
    loggers' records (token authentication notices, Tune's warnings), Python warnings raised in
    Ray's code or of Ray's deprecation category, and the notices the raylet sends the driver
    ("N PYTHON worker processes have been started ..."), which Ray prints even without
    ``log_to_driver``. Records from before the session folder exists are held and written to it
    once it does; if ``init`` fails they go to the terminal with the error, as without this.
    """
    if verbose:
        init()
        return
    import logging.handlers
    import warnings

    import ray
    import ray._private.worker as ray_worker
    from ray.util.annotations import RayDeprecationWarning

    ray_logger = logging.getLogger("ray")
    terminal = list(ray_logger.handlers)
    held = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1)
    for handler in terminal:
        ray_logger.removeHandler(handler)
    ray_logger.addHandler(held)
    ray_code = os.path.dirname(ray.__file__) + os.sep
    show_warning = warnings.showwarning
    # Ray's private printer of the raylet's notices; a Ray without it leaves those notices alone
    print_notice = getattr(ray_worker, "print_to_stdstream", None)

    def ray_warning(message: Any, category: type[Warning], filename: str, lineno: int, *rest: Any) -> None:
        if issubclass(category, RayDeprecationWarning) or filename.startswith(ray_code):
            ray_logger.warning("%s:%s: %s: %s", filename, lineno, category.__name__, message)
        else:
            show_warning(message, category, filename, lineno, *rest)

    def raylet_notice(data: dict[str, Any], ignore_prefix: bool) -> None:
        for line in data.get("lines", ()):
            ray_logger.warning("(%s) %s", data.get("pid", "raylet"), line)

    def back_to_terminal() -> None:
        warnings.showwarning = show_warning
        if print_notice is not None:
            ray_worker.print_to_stdstream = print_notice
        ray_logger.removeHandler(held)
        for handler in terminal:
            ray_logger.addHandler(handler)
            for record in held.buffer:
                handler.handle(record)

    warnings.showwarning = ray_warning
    if print_notice is not None:
        ray_worker.print_to_stdstream = raylet_notice
    try:
        init()
    except BaseException:
        back_to_terminal()
        raise
    try:
        log_file = logging.FileHandler(os.path.join(ray_worker._global_node.get_logs_dir_path(), "medpeft-driver.log"))
    except (AttributeError, OSError):  # no session folder to write to: the search goes on, as if verbose
        back_to_terminal()
        return
    log_file.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"))
    held.setTarget(log_file)
    held.flush()
    ray_logger.removeHandler(held)
    ray_logger.addHandler(log_file)


def _plan_resources(config: SearchConfig, existing_cluster: bool = False) -> tuple[ResourcePlan, ClusterCapacity]:
    """The trials' resources and concurrency on the connected cluster (its maximum size if it autoscales)."""
    capacity = cluster_capacity(existing_cluster)
    return plan_resources(config, capacity), capacity


_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/+(.*)$")


def results_location(results: str | Path | None = None) -> tuple[str, Path | None]:
    """Where a search writes trial checkpoints and Tune state: (location, local folder or None).

    A cloud storage URI (``s3://bucket/prefix``, ``gs://...``), given or in ``$MEDPEFT_RESULTS``,
    is used as is, so that every node of a cluster reads and writes the same checkpoints;
    anything else is a local (or shared file system) folder.

    Raises:
        UsageError: a URI with query parameters (``?endpoint_override=...``).
    """
    raw = results if results is not None else os.environ.get("MEDPEFT_RESULTS")
    # str(Path("s3://b/x")) is "s3:/b/x": the scheme survives a trip through Path, the slashes do not
    match = _URI.match(str(raw)) if raw is not None else None
    if match and match.group(1).lower() != "file":
        if "?" in match.group(2):
            # The search appends folders to the location (f"{storage}/tune", ".../train/<trial>"),
            # which would land inside the query, and the leaderboard's checkpoint URIs would lose it;
            # pyarrow, and so Ray, read the same settings from the environment instead.
            raise UsageError(
                f"{raw}: a results URI takes no query parameters; give the storage's settings in the environment "
                "of every node, where Ray's storage reads them too (for S3 and S3-compatible servers: "
                "AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
            )
        return f"{match.group(1).lower()}://{match.group(2).rstrip('/')}", None
    if match:  # file:///path
        raw = "/" + match.group(2)
    path = results_dir(raw)
    return str(path), path


#: what a local results folder must take before Ray starts: a search's manifest, Tune's state, first checkpoints
RESULTS_PROBE_BYTES = 1 << 20


def check_results_folder(path: Path | None) -> None:
    """Refuses, before Ray starts, a local results folder that a search could not write to.

    A search's first write to its results folder (the manifest) comes after Ray has started, and
    with the leaderboard in another database nothing before it writes there: a read-only folder or
    a full disk would show only then. A probe file of ``RESULTS_PROBE_BYTES``, written, synced and
    removed, finds both now. ``path`` None (cloud storage) is not probed.

    Raises:
        UsageError: the path is a file, not a folder (exit code 2).
        MedpeftError: the folder cannot be created or written (read-only, full, no permission).
    """
    import tempfile

    if path is None:
        return
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path}: not a folder; --results (or MEDPEFT_RESULTS) names the folder a search writes to")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".medpeft-write-probe-") as probe:
            probe.write(bytes(RESULTS_PROBE_BYTES))
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise MedpeftError(f"{path}: the results folder cannot be written ({exc.strerror or exc})") from None


def run_search(
    config: SearchConfig,
    *,
    results: str | Path | None = None,
    address: str | None = None,
    db_url: str | None = None,
    console: Any = None,
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
    if results_path is not None:
        results_path.mkdir(parents=True, exist_ok=True)
    elif not (db_url or os.environ.get("MEDPEFT_DB")):
        raise MedpeftError(
            f"{storage}: with results on cloud storage, give a leaderboard database that the machine running "
            "the search can reach: --db postgresql://user@host/db (or MEDPEFT_DB)"
        )
    db_url = db_url or default_db_url(results_path)
    LeaderboardStore(db_url)  # fails now, not after the first trial, if the database is unusable
    facts = facts or preflight(config)
    reporter = SearchReporter(console)
    reporter.search_starts(config, facts)

    # Tune's own tables and Optuna's per-study log lines would drown the per-trial progress lines.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _connect(address)
    plan, capacity = _plan_resources(config, existing_cluster=bool(address))
    reporter.cluster(config, plan, capacity, storage)
    if resume:
        manifest = SearchManifest.load(storage, config.experiment_name)
        manifest.attempt += 1  # fences off whatever the interrupted run left writing
    else:
        from medpeft_ray.search.forecast import recorded_forecast
        from medpeft_ray.search.manifest import load_dry_run_forecast

        # the leaderboard's epoch times of the same setting, else the last `search --dry-run`'s timing
        forecast = recorded_forecast(config, facts, plan, db_url) or load_dry_run_forecast(storage, config.experiment_name)
        manifest = SearchManifest(config.experiment_name, config.model_dump(mode="json"), forecast=forecast)
    manifest.save(storage)
    from medpeft_ray.search.callbacks import SearchTimeline

    run = SearchRun(config, plan, storage, facts, db_url, reporter, manifest, timeline=SearchTimeline())
    reporter.watch(config.search.metric, config.search.resolved_mode, plan.concurrency, run.timeline)
    executor_stats, pool, ended_well = None, None, False
    try:
        if config.resources.warm_executors:
            pool = _take_executors(run)
            run.dispatcher = (pool.dispatcher, pool.name)
        else:
            from medpeft_ray.search.pools import release_executors

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
            from medpeft_ray.search.pools import return_executors

            # kept warm for this process's next search; after a failure, ended (trials may be mid-way)
            executor_stats = return_executors(pool, config.experiment_name, keep=ended_well)
        if capacity.autoscaling:
            release_resource_requests()
    return SearchResult(config.experiment_name, time.time() - started, summaries, results_path or storage, db_url,
                        slots=plan.concurrency, executors=executor_stats, timeline=run.timeline)


def _record_actual_costs(run: "SearchRun", records: list[Any], wall_s: float) -> None:
    """What the search cost, beside its forecast in the manifest (the report shows the two side by side)."""
    from medpeft_ray.search.forecast import actual_costs, devices_per_trial

    run.manifest.actual = actual_costs(records, wall_s, devices_per_trial(run.config, run.plan))
    run.manifest.save(run.storage)


def run_grid(cells: list[Any], *, console: Any = None, **options: Any) -> list[SearchResult]:
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
    all_facts = [preflight(cell.config) for cell in cells]
    results = []
    for cell, facts in zip(cells, all_facts):
        if console is not None:
            console.print(f"\n[bold]grid cell {'/'.join(cell.entries)}[/bold] ({len(results) + 1} of {len(cells)})")
        results.append(run_search(cell.config, console=console, facts=facts, **options))
    return results


def _take_executors(run: "SearchRun") -> Any:
    """The search's executors, one per trial slot, ready before Tune starts: this process's warm
    ones where they fit, else new ones (an ExecutorPool)."""
    import ray

    from medpeft_ray.search.executor_spec import ExecutorSpec
    from medpeft_ray.search.pools import return_executors, take_executors

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


def _run_studies(run: "SearchRun") -> list[Any]:
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
    results: dict[float, list[Any]] = {}
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


def _run_study(run: "SearchRun", index: int, tail: threading.Event) -> list[Any]:
    """The study of one label ratio (restored if it was interrupted); sets ``tail`` once it starts no more trials."""
    from ray import tune

    from medpeft_ray.search.trial import run_trial

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
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=trial_plan), run.plan.driver)
    study_path = f"{run.storage}/tune/{config.run_name(label_ratio)}"
    if label_ratio in manifest.studies_started and tune.Tuner.can_restore(study_path):
        run.reporter.resuming(label_ratio)
        # finished trials stay finished; trials that were running restart from their last checkpoint;
        # the searcher comes back with its Optuna study, the leaderboard callback with its database
        tuner = tune.Tuner.restore(study_path, trainable=trainable, resume_unfinished=True, resume_errored=False)
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
        import optuna

        front = optuna.load_study(study_name=study_name, storage=optuna_storage(run.db_url)).best_trials
        run.reporter.pareto_front(label_ratio, metrics, front)
    if share.spent:
        run.reporter.budget_spent(label_ratio, share.spent, share.started)
    return trials


def _trial_plan(run: "SearchRun", label_ratio: float) -> Any:
    """What every trial of ``label_ratio``'s study shares."""
    from medpeft_ray.search.trial import TrialPlan

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


def _new_tuner(run: "SearchRun", index: int, trainable: Any, study_name: str, num_samples: int, share: Any,
               tail: threading.Event) -> Any:
    """A fresh Tune run of one study: Optuna searcher (warm-started, budgeted, gated on executors) and scheduler."""
    from ray import tune

    from medpeft_ray.search.budget import BudgetedSearch
    from medpeft_ray.search.callbacks import CheckpointRetention, LeaderboardCallback, StudyTail
    from medpeft_ray.search.dispatcher import WAITING_PER_EXECUTOR
    from medpeft_ray.search.tune_side import ExecutorCallback, ExecutorGate
    from medpeft_ray.search.trial import trial_folder
    from medpeft_ray.search.optuna_states import EpochStatesSearch
    from medpeft_ray.search.space import SpaceSampler, make_sampler, make_scheduler
    from medpeft_ray.search.warm_start import warm_start_points

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
            callbacks=[LeaderboardCallback(config, label_ratio, run.db_url, run.reporter, run.timeline),
                       StudyTail(num_samples, share, tail),
                       *([ExecutorCallback(dispatcher[1], experiment),
                          # after the row is written: it names the best epoch's checkpoint
                          CheckpointRetention(config, functools.partial(trial_folder, f"{run.storage}/train", experiment))]
                         if dispatcher is not None else [])],
            verbose=0,
        ),
    )


def _confirm(run: "SearchRun", label_ratio: float, trials: list[Any], trial_plan: Any, study_name: str) -> None:
    """Re-trains the study's best configurations with several seeds and records which one is chosen."""
    from ray import tune

    from medpeft_ray.search.callbacks import LeaderboardCallback
    from medpeft_ray.search.confirm import choose, confirm_study, describe, record_confirmation
    from medpeft_ray.search.tune_side import ExecutorCallback
    from medpeft_ray.search.trial import confirm_trial

    settings = run.config.search
    confirm = settings.confirm
    assert confirm is not None
    top = [t.record for t in trials if t.record.status != "failed"][: confirm.top_k]
    trainable = tune.with_resources(tune.with_parameters(confirm_trial, plan=trial_plan), run.plan.driver)
    name = run.config.run_name(label_ratio, confirmation=True)
    # each seed is a leaderboard row of its own (role "confirmation"): views show mean and spread
    callbacks = [LeaderboardCallback(run.config, label_ratio, run.db_url, role="confirmation"),
                 *([ExecutorCallback(run.dispatcher[1], name)] if run.dispatcher is not None else [])]
    confirmed = confirm_study(run.config, label_ratio, top, trainable, run.plan.concurrency, run.storage, callbacks)
    chosen = choose(confirmed, settings.resolved_mode)
    with run.lock:
        run.manifest.confirmations[f"{label_ratio:g}"] = record_confirmation(study_name, run.db_url, confirmed, chosen)
    run.reporter.confirmed(label_ratio, len(top), confirm.seeds, describe(confirmed, chosen, settings.metric))


def _finish_study(manifest: SearchManifest, storage: str, label_ratio: float) -> None:
    manifest.studies_done.append(label_ratio)
    manifest.save(storage)


def _recorded_trials(config: SearchConfig, label_ratio: float, db_url: str, manifest: SearchManifest) -> list[Any]:
    """This run's trials of one label ratio as the leaderboard has them, best first."""
    from datetime import datetime, timezone

    from medpeft_ray.leaderboard import TrialRecord
    from medpeft_ray.metrics import get_metric
    from medpeft_ray.search.callbacks import TrialSummary

    since = datetime.fromtimestamp(int(manifest.started_at), timezone.utc)
    rows = LeaderboardStore(db_url).query(
        experiment=config.experiment_name, label_ratio=label_ratio, since=since, role="search",
        metric=config.search.metric, ascending=get_metric(config.search.metric).ascending,
    )
    return [TrialSummary(TrialRecord.from_row(row), row["params"]) for row in rows.to_dict(orient="records")]
