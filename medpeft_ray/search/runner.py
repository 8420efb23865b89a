"""The search driver: pre-flight checks, then one Ray Tune study per label ratio.

Each study is a ``Tuner`` over :func:`medpeft_ray.search.trial.run_trial` with ``OptunaSearch``
(define-by-run, seeded) and ASHA on epochs. Finished trials go to the leaderboard as they end.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medpeft_ray.config import CategoricalDistribution, SearchConfig
from medpeft_ray.errors import ConfigError, MedpeftError
from medpeft_ray.leaderboard import LeaderboardStore, default_db_url, results_dir

#: A custom resource that trial drivers (the small Tune trainables) ask for, so they never take
#: CPU from training workers. Ray started by medpeft-ray declares it; a cluster whose head
#: declares it too keeps every trial driver on the head. Elsewhere drivers take 0.01 CPU.
DRIVER_RESOURCE = "medpeft_driver"
DRIVER_SLOTS = 10_000


@dataclass
class SearchResult:
    """What a finished search returns: its leaderboard rows and timings."""

    experiment: str
    wall_time_s: float
    trials: list[Any]  # TrialSummary, best first per label ratio
    results_dir: Path
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
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    else:
        ray.init(
            resources={DRIVER_RESOURCE: DRIVER_SLOTS},
            log_to_driver=bool(os.environ.get("MEDPEFT_WORKER_LOGS")),
            logging_level=logging.WARNING,
        )


def _plan_resources(config: SearchConfig) -> tuple[dict[str, float], dict[str, float], bool, int]:
    """(driver resources, per-worker resources, use_gpu, concurrency) for this cluster."""
    import ray

    cluster = ray.cluster_resources()
    res = config.resources
    gpus = res.gpus_per_worker
    if gpus == "auto":
        gpus = 1.0 if cluster.get("GPU", 0) > 0 else 0.0
    per_worker = {"CPU": float(res.cpus_per_worker)}
    if gpus > 0:
        per_worker["GPU"] = float(gpus)
    need = {k: v * res.workers_per_trial for k, v in per_worker.items()}
    driver = {"CPU": 0.0, DRIVER_RESOURCE: 1.0} if cluster.get(DRIVER_RESOURCE) else {"CPU": 0.01}
    fits = []
    for name, amount in need.items():
        have = cluster.get(name, 0.0) - driver.get(name, 0.0)
        if amount > have:
            raise MedpeftError(
                f"resources: a trial needs {amount:g} {name} ({res.workers_per_trial} workers x "
                f"{per_worker[name]:g}), but the cluster has {cluster.get(name, 0.0):g}; lower "
                "resources.workers_per_trial / cpus_per_worker / gpus_per_worker or add nodes"
            )
        fits.append(math.floor((cluster.get(name, 0.0) + 1e-9) / (amount + driver.get(name, 0.0))))
    concurrency = config.search.max_concurrent or max(1, min([*fits, config.search.num_samples]))
    return driver, per_worker, gpus > 0, concurrency


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
        results: results folder (default ``$MEDPEFT_RESULTS`` or ``./medpeft-results``).
        address: Ray cluster address (``auto`` for the cluster this machine belongs to);
            None starts a local Ray.
        db_url: leaderboard database (default: SQLite in the results folder, or ``$MEDPEFT_DB``).
        console: a ``rich.console.Console`` for progress lines, or None for silence.
    """
    started = time.time()
    results_path = results_dir(results)
    results_path.mkdir(parents=True, exist_ok=True)
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
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from medpeft_ray.search.callbacks import LeaderboardCallback
    from medpeft_ray.search.space import SpaceSampler, make_sampler
    from medpeft_ray.search.trial import TrialPlan, run_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _connect(address)
    driver, per_worker, use_gpu, concurrency = _plan_resources(config)
    if console is not None:
        where = f"{int(per_worker.get('GPU', 0) * config.resources.workers_per_trial)} GPU(s)" if use_gpu else "CPU"
        console.print(
            f"Ray cluster {ray.cluster_resources().get('CPU', 0):g} CPUs / {ray.cluster_resources().get('GPU', 0):g} GPUs; "
            f"{concurrency} trial(s) at a time, {config.resources.workers_per_trial} worker(s) each on {where}; "
            f"results in {results_path}"
        )

    settings = config.search
    summaries: list[Any] = []
    for label_ratio in config.dataset.label_ratios:
        plan = TrialPlan(
            search=config.model_dump(mode="json"),
            label_ratio=label_ratio,
            num_workers=config.resources.workers_per_trial,
            use_gpu=use_gpu,
            resources_per_worker=per_worker,
            storage_path=str(results_path / "train"),
            dataset_key=facts["dataset_key"],
        )
        searcher = OptunaSearch(
            space=SpaceSampler(config.distributions()),
            metric=settings.metric,
            mode=settings.resolved_mode,
            sampler=make_sampler(settings),
            study_name=f"{config.experiment}-ratio{label_ratio:g}",
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
            tune.with_resources(tune.with_parameters(run_trial, plan=plan), driver),
            tune_config=tune.TuneConfig(
                metric=settings.metric,
                mode=settings.resolved_mode,
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=settings.num_samples,
                max_concurrent_trials=concurrency,
            ),
            run_config=tune.RunConfig(
                name=f"{config.experiment}-ratio{label_ratio:g}",
                storage_path=str(results_path / "tune"),
                callbacks=[recorder],
                verbose=0,
            ),
        )
        tuner.fit()
        summaries.extend(sorted(recorder.finished, key=lambda s: _rank_key(getattr(s.record, settings.metric), settings.resolved_mode)))
    return SearchResult(config.experiment or "search", time.time() - started, summaries, results_path, db_url)


def _rank_key(value: float | None, mode: str) -> float:
    if value is None or not math.isfinite(value):
        return math.inf
    return -value if mode == "max" else value
