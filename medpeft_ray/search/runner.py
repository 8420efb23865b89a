"""The search driver: pre-flight checks, then one Ray Tune study per label ratio.

Each study is a ``Tuner`` over :func:`medpeft_ray.search.trial.run_trial` with ``OptunaSearch``
(define-by-run, seeded) and ASHA on epochs. Finished trials go to the leaderboard as they end.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medpeft_ray.config import CategoricalDistribution, SearchConfig
from medpeft_ray.errors import ConfigError, MedpeftError
from medpeft_ray.leaderboard import LeaderboardStore, default_db_url, optuna_storage, results_dir
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


def preflight(config: SearchConfig) -> dict[str, Any]:
    """Checks what needs torch before any Ray work: backbone name, data, method on the backbone.

    Builds the dataset's decode-once cache on this machine (later trials here only read it) and
    the model on the meta device (no memory, no weights), with the method applied.

    Returns:
        facts for the progress line (classes, images per split and ratio, trainable params) and
        the dataset's cache key, which trials reuse instead of walking the dataset again.
    """
    import torch

    from medpeft_ray.data import dataset_key, load_splits, train_subset_index
    from medpeft_ray.methods import count_parameters, prepare_model
    from medpeft_ray.models import build_backbone
    from medpeft_ray.models.backbones import check_backbone_name

    backbone = config.model.backbone
    try:
        check_backbone_name(backbone)
    except ConfigError as exc:
        raise exc.with_file(config.experiment or "") from None

    ds = config.dataset
    key = dataset_key(ds.name, ds.root, ds.image_size, ds.options, ds.seed)
    splits = load_splits(ds.name, ds.root, ds.image_size, ds.options, ds.seed, key=key)
    for name in ("train", "val"):
        if len(getattr(splits, name)) == 0:
            raise MedpeftError(f"{ds.root or ds.name}: the {name} split has no images")
    images_per_ratio = {r: len(train_subset_index(splits, r, ds.seed)) for r in ds.label_ratios}

    # The method is applied with the first value of each searched option, to catch options that
    # do not fit this backbone (a block index past its depth, say) before trials start.
    representative = {
        name: dist.choices[0] if isinstance(dist, CategoricalDistribution) else dist.low
        for name, dist in config.distributions().items()
    }
    trial = config.trial_config(ds.label_ratios[0], representative)
    with torch.device("meta"):
        model = build_backbone(backbone, splits.num_classes, ds.image_size, drop_path=trial.train.drop_path)
        try:
            model = prepare_model(model, trial.method.name, trial.method.options, trial.family)
        except ValueError as exc:
            raise ConfigError("method.options", str(exc), config.experiment) from None
    trainable, total = count_parameters(model)
    return {
        "classes": splits.num_classes,
        "images": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "train_images_per_ratio": images_per_ratio,
        "trainable_params": trainable,
        "total_params": total,
        "dataset_key": key,
        "skipped": list(splits.skipped),
    }


def _connect(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
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
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except ConnectionError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MedpeftError(f"--address {address}: no Ray cluster to join ({reason}); {hint}") from None
    else:
        ray.init(
            resources={DRIVER_RESOURCE: DRIVER_SLOTS},
            log_to_driver=bool(os.environ.get("MEDPEFT_WORKER_LOGS")),
            logging_level=logging.WARNING,
        )


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
    """
    raw = results if results is not None else os.environ.get("MEDPEFT_RESULTS")
    # str(Path("s3://b/x")) is "s3:/b/x": the scheme survives a trip through Path, the slashes do not
    match = _URI.match(str(raw)) if raw is not None else None
    if match and match.group(1).lower() != "file":
        return f"{match.group(1).lower()}://{match.group(2).rstrip('/')}", None
    if match:  # file:///path
        raw = "/" + match.group(2)
    path = results_dir(raw)
    return str(path), path


def run_search(
    config: SearchConfig,
    *,
    results: str | Path | None = None,
    address: str | None = None,
    db_url: str | None = None,
    console: Any = None,
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
    """
    started = time.time()
    storage, results_path = results_location(results)
    if results_path is not None:
        results_path.mkdir(parents=True, exist_ok=True)
    elif not (db_url or os.environ.get("MEDPEFT_DB")):
        raise MedpeftError(
            f"{storage}: with results on cloud storage, give a leaderboard database that the machine running "
            "the search can reach: --db postgresql://user@host/db (or MEDPEFT_DB)"
        )
    db_url = db_url or default_db_url(results_path)
    LeaderboardStore(db_url)  # fails now, not after the first trial, if the database is unusable
    facts = preflight(config)
    if console is not None:
        console.print(
            f"[bold]{config.experiment}[/bold]: {config.method.name} on {config.model.backbone} "
            f"({facts['trainable_params']:,} of {facts['total_params']:,} parameters train), "
            f"dataset {config.dataset.name} {facts['images']}, {facts['classes']} classes; "
            f"label ratios {config.dataset.label_ratios} x {config.search.num_samples} trials"
        )
        if facts["skipped"]:
            console.print(
                f"[yellow]{len(facts['skipped'])} unreadable image(s) skipped[/yellow] (dataset.options.skip_unreadable), "
                f"e.g. {facts['skipped'][0]}",
                soft_wrap=True,
            )

    # Tune's own tables and Optuna's per-study log lines would drown the per-trial progress lines.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _connect(address)
    plan, capacity = _plan_resources(config, existing_cluster=bool(address))
    if console is not None:
        console.print(
            f"Ray cluster {_describe(capacity)}; {plan.concurrency} trial(s) at a time, "
            f"{config.resources.workers_per_trial} worker(s) each on {_describe_worker(plan)}; results in {storage}",
            soft_wrap=True,
        )
        if plan.note:
            console.print(f"[yellow]{plan.note}[/yellow]", soft_wrap=True)
    try:
        summaries = _run_studies(config, plan, storage, facts, db_url, console)
    finally:
        if capacity.autoscaling:
            release_resource_requests()
    return SearchResult(config.experiment or "search", time.time() - started, summaries, results_path or storage, db_url)


def _describe(capacity: ClusterCapacity) -> str:
    def amounts(resources: dict[str, float]) -> str:
        return f"{resources.get('CPU', 0):g} CPUs / {resources.get('GPU', 0):g} GPUs"

    text = amounts(capacity.now)
    if capacity.most is not None:
        text += f", autoscaling up to {amounts(capacity.most)} (from {capacity.source})"
    elif capacity.autoscaling:
        text += ", autoscaling"
    return text


def _describe_worker(plan: ResourcePlan) -> str:
    parts = [f"{plan.per_worker['GPU']:g} GPU" if plan.use_gpu else "CPU"]
    parts += [f"{amount:g} {name}" for name, amount in plan.per_worker.items() if name not in ("CPU", "GPU")]
    return " + ".join(parts)


def _run_studies(
    config: SearchConfig, plan: ResourcePlan, storage: str, facts: dict[str, Any], db_url: str, console: Any
) -> list[Any]:
    """One Tune study per label ratio; returns the finished trials, best first per ratio."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from medpeft_ray.search.callbacks import LeaderboardCallback
    from medpeft_ray.search.space import SpaceSampler, make_sampler
    from medpeft_ray.search.trial import TrialPlan, run_trial

    settings = config.search
    summaries: list[Any] = []
    run_stamp = time.strftime("%Y%m%d-%H%M%S")
    for label_ratio in config.dataset.label_ratios:
        trial_plan = TrialPlan(
            search=config.model_dump(mode="json"),
            label_ratio=label_ratio,
            num_workers=config.resources.workers_per_trial,
            use_gpu=plan.use_gpu,
            resources_per_worker=plan.per_worker,
            storage_path=f"{storage}/train",
            dataset_key=facts["dataset_key"],
            max_failures=config.resources.max_failures,
            worker_start_timeout_s=config.resources.worker_start_timeout_s,
        )
        searcher = OptunaSearch(
            space=SpaceSampler(config.distributions()),
            metric=settings.metric,
            mode=settings.resolved_mode,
            sampler=make_sampler(settings),
            # Optuna's study lives in the leaderboard's database (optuna-dashboard opens it); one
            # study per run, so a re-run of an experiment starts a fresh history
            storage=optuna_storage(db_url),
            study_name=f"{config.experiment}-ratio{label_ratio:g}-{run_stamp}",
        )
        if settings.scheduler.type == "asha":
            scheduler: Any = ASHAScheduler(
                time_attr="training_iteration",
                max_t=config.train.epochs,
                grace_period=min(settings.scheduler.grace_period, config.train.epochs),
                reduction_factor=settings.scheduler.reduction_factor,
            )
        else:
            scheduler = FIFOScheduler()
        recorder = LeaderboardCallback(config, label_ratio, db_url, console)
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(run_trial, plan=trial_plan), plan.driver),
            tune_config=tune.TuneConfig(
                metric=settings.metric,
                mode=settings.resolved_mode,
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=settings.num_samples,
                max_concurrent_trials=plan.concurrency,
            ),
            run_config=tune.RunConfig(
                name=f"{config.experiment}-ratio{label_ratio:g}",
                storage_path=f"{storage}/tune",
                callbacks=[recorder],
                verbose=0,
            ),
        )
        tuner.fit()
        summaries.extend(sorted(recorder.finished, key=lambda s: _rank_key(getattr(s.record, settings.metric), settings.resolved_mode)))
    return summaries


def _rank_key(value: float | None, mode: str) -> float:
    if value is None or not math.isfinite(value):
        return math.inf
    return -value if mode == "max" else value
