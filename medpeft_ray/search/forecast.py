"""What a search will cost before it runs: ``medpeft-ray search --space FILE --dry-run``.

The dry run (after the config's pre-flight, as a search runs it) starts no Ray and no trial,
and times a few real training and evaluation steps of each method on this machine's device: the
trial's model is built by the real :class:`~medpeft_ray.train.recipe.TrialRecipe` (pristine
backbone, method at its first point, DeepSpeed engine) at the trial's per-worker micro-batch, on
the real (cached) data. A generation search (``task: generation``) is timed with its own recipe
(:class:`~medpeft_ray.train.generation.GenerationRecipe`): noise-prediction micro-steps, batches of
the fixed validation loss, and sampling with FID scoring for a few prompts, scaled to
``search.fid.images`` and paid at the epochs FID is computed at. From the step times, the
label-ratio subset sizes, the scheduler's expected epochs and the start-up figures it forecasts per
study and in total: trials, epochs, device-hours and wall time at the planned concurrency, as a range.

:func:`forecast` is the arithmetic alone (step times in, forecast out); :func:`dry_run` gathers
its inputs.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from medpeft_ray.config import SearchConfig
from medpeft_ray.config.sections import SchedulerConfig
from medpeft_ray.errors import MedpeftError
from medpeft_ray.search.cluster import DRIVER_RESOURCE, DRIVER_SLOTS, ClusterCapacity, ResourcePlan, plan_resources

#: untimed steps first: the first steps allocate memory, build kernels and fill caches
WARMUP_STEPS = 2
#: timed optimizer micro-steps and evaluation batches per method
TIMED_STEPS = 5
TIMED_EVAL_BATCHES = 3
#: prompts of the timed sampling runs of a generation method (sampling and FID scoring), each run
#: twice after one untimed run: a sampling call costs a fixed part (the pipeline, the scheduler's
#: steps at any batch) and a part per image, so two sizes give both (one size scaled by the images
#: alone overestimates a 16-image run from 2 prompts about threefold on 2 CPU cores)
SAMPLE_PROMPTS = (2, 8)
SAMPLE_RUNS = 2
#: A warm trial's start-up (dispatch, model copy with the method applied, DeepSpeed's engine):
#: README "Trial start-up" measured 0.4 s for the README's search on 2 cores with
#: bench/trial_overhead.py; 1 s leaves room for larger backbones.
DEFAULT_WARM_STARTUP_S = 1.0
#: The executors' one-off set-up before the first trial (Ray Train workers, imports, data,
#: backbone): README "Trial start-up" measured 40-50 s for two executors on 2 cores.
DEFAULT_EXECUTOR_SETUP_S = 45.0
#: The wall-time range around the point estimate. Asynchronous ASHA promotes more trials than
#: synchronous halving while its rungs are still filling, slots idle at a study's tail, and a few
#: timed steps miss slow spells of a shared machine (high); a study's tail overlaps the next
#: study's start (low).
LOW_FACTOR = 0.7
HIGH_FACTOR = 1.5


# ----------------------------------------------------------------------------------------------
# The scheduler's epochs
# ----------------------------------------------------------------------------------------------


def halving_milestones(grace: int, reduction_factor: float, max_t: int, bracket: int = 0) -> list[int]:
    """The epochs at which an ASHA bracket may stop a trial, as Ray's ``_Bracket`` places them.

    Ray's rungs are ``grace * rf ** (k + s)`` for ``k < int(log(max_t / grace) / log(rf) - s + 1)``
    (``s`` the bracket); a rung is checked once a trial reports that many epochs, so a fractional
    rung counts at the next whole epoch.
    """
    grace = min(grace, max_t)
    count = int(math.log(max_t / grace) / math.log(reduction_factor) - bracket + 1)
    return [min(max_t, math.ceil(grace * reduction_factor ** (k + bracket) - 1e-9)) for k in range(max(0, count))]


def halving_epochs_per_trial(grace: int, reduction_factor: float, max_t: int, bracket: int = 0) -> float:
    """Expected epochs of one trial under successive halving with these rungs.

    Every trial trains to the first rung m_0; past rung k only the best 1/rf go on, so a share
    rf^-(k+1) of the trials trains from m_k to m_{k+1} (the last segment ending at max_t):

        E = m_0 + sum_{k=1..K-1} (m_k - m_{k-1}) * rf^-k + (max_t - m_{K-1}) * rf^-K

    E.g. grace 1, rf 2, max_t 4: rungs 1, 2, 4 and E = 1 + 1/2 + 2/4 = 2 epochs. With no rung
    (K = 0) nothing stops: E = max_t.
    """
    rungs = halving_milestones(grace, reduction_factor, max_t, bracket)
    if not rungs:
        return float(max_t)
    epochs = float(rungs[0])
    for k in range(1, len(rungs)):
        epochs += (rungs[k] - rungs[k - 1]) * reduction_factor ** -k
    return epochs + (max_t - rungs[-1]) * reduction_factor ** -len(rungs)


def expected_epochs(scheduler: SchedulerConfig, trials: int, max_t: int) -> tuple[float, str]:
    """(epochs all ``trials`` of a study train in total, how that figure reads: "expected" or "at most").

    asha: successive halving (:func:`halving_epochs_per_trial`). hyperband: Ray puts a trial in
    bracket s with probability proportional to e^(rungs of s); the expectation over brackets.
    median: the rule stops a trial only when it falls below the others' median, which no trial
    has to, so trials x max_t is an upper bound. none: trials x max_t.
    """
    if scheduler.type == "asha":
        return trials * halving_epochs_per_trial(scheduler.grace_period, scheduler.reduction_factor, max_t), "expected"
    if scheduler.type == "hyperband":
        brackets = range(scheduler.brackets)
        sizes = [len(halving_milestones(scheduler.grace_period, scheduler.reduction_factor, max_t, s)) for s in brackets]
        weights = [math.exp(size - max(sizes)) for size in sizes]
        per_trial = sum(w * halving_epochs_per_trial(scheduler.grace_period, scheduler.reduction_factor, max_t, s)
                        for w, s in zip(weights, brackets)) / sum(weights)
        return trials * per_trial, "expected"
    if scheduler.type == "median":
        return float(trials * max_t), "at most"
    return float(trials * max_t), "expected"


def halving_epoch_shares(grace: int, reduction_factor: float, max_t: int, bracket: int = 0) -> list[float]:
    """The share of a bracket's trials that trains each epoch 1..max_t under successive halving.

    As :func:`halving_epochs_per_trial` (whose sum this is): every trial trains to the first rung,
    a share rf^-k the epochs after rung k, up to max_t. A trial stopped at a rung has trained that
    epoch, so pays for what is done there (a generation trial's FID).
    """
    rungs = halving_milestones(grace, reduction_factor, max_t, bracket)
    shares = []
    for epoch in range(1, max_t + 1):
        passed = sum(1 for rung in rungs if rung < epoch)  # rungs decided before this epoch
        shares.append(float(reduction_factor ** -passed))
    return shares


def expected_fid_runs(scheduler: SchedulerConfig, trials: int, max_t: int, fid_epochs: list[int]) -> float:
    """Expected FID samplings of all ``trials`` of a study: each trial samples at the ``fid_epochs`` it reaches.

    The shares of trials reaching each epoch as :func:`expected_epochs` counts them (hyperband:
    weighted over the brackets); median and none: every trial reaches every epoch (for median an
    upper bound, as its epochs are).
    """
    epochs = [e for e in fid_epochs if 1 <= e <= max_t]
    if scheduler.type == "asha":
        shares = halving_epoch_shares(scheduler.grace_period, scheduler.reduction_factor, max_t)
    elif scheduler.type == "hyperband":
        grace, rf, brackets = scheduler.grace_period, scheduler.reduction_factor, range(scheduler.brackets)
        sizes = [len(halving_milestones(grace, rf, max_t, s)) for s in brackets]
        weights = [math.exp(size - max(sizes)) for size in sizes]  # as expected_epochs weighs the brackets
        per_bracket = [halving_epoch_shares(grace, rf, max_t, s) for s in brackets]
        shares = [sum(w * b[i] for w, b in zip(weights, per_bracket)) / sum(weights) for i in range(max_t)]
    else:
        shares = [1.0] * max_t
    return trials * sum(shares[e - 1] for e in epochs)


def study_trials(config: SearchConfig) -> list[int]:
    """Trials of each label ratio's study: ``num_samples``, capped by its share of ``search.max_trials``.

    As :class:`~medpeft_ray.search.budget.SearchBudget` shares them out: each study gets an even
    split of the trials left over the studies left, and is taken to use all of its share.
    """
    settings = config.search
    ratios = config.dataset.label_ratios
    left = settings.max_trials
    counts = []
    for index in range(len(ratios)):
        trials = settings.num_samples
        if left is not None:
            trials = min(trials, math.ceil(max(0, left) / (len(ratios) - index)))
            left -= trials
        counts.append(trials)
    return counts


# ----------------------------------------------------------------------------------------------
# The forecast
# ----------------------------------------------------------------------------------------------


@dataclass
class MethodTiming:
    """One method's timed steps on this machine (seconds)."""

    method: str
    train_step_s: list[float]  # each optimizer micro-step: forward, loss, backward, DeepSpeed step
    eval_batch_s: list[float]  # each evaluation batch
    micro_batch: int
    eval_batch: int
    device: str = "cpu"
    #: generation: each timed sampling run (sampling the first prompts and scoring their FID), and its prompts
    sample_s: list[float] = field(default_factory=list)
    sample_prompts: list[int] = field(default_factory=list)

    @property
    def train_median_s(self) -> float:
        return statistics.median(self.train_step_s)

    @property
    def eval_median_s(self) -> float:
        return statistics.median(self.eval_batch_s)

    def sampling_s(self, images: int, batch: int) -> float:
        """Seconds to sample and FID-score ``images`` prompts in chunks of ``batch`` (0 without timed runs).

        The runs' medians per size fit a line ``fixed + per_image * n`` per chunk (both at least
        0): ``chunks * fixed + images * per_image``. With one size only: that run scaled by the images.
        """
        by_size: dict[int, list[float]] = {}
        for prompts, seconds in zip(self.sample_prompts, self.sample_s):
            by_size.setdefault(prompts, []).append(seconds)
        if not by_size or images <= 0:
            return 0.0
        sizes = sorted(by_size)
        if len(sizes) == 1:
            return statistics.median(by_size[sizes[0]]) * images / sizes[0]
        small, large = sizes[0], sizes[-1]
        t_small, t_large = statistics.median(by_size[small]), statistics.median(by_size[large])
        per_image = max(0.0, (t_large - t_small) / (large - small))
        fixed = max(0.0, t_small - per_image * small)
        return math.ceil(images / max(1, batch)) * fixed + images * per_image

    def spread(self) -> tuple[float, float]:
        """(fastest, slowest) train step over the median: how steady the timing was."""
        median = self.train_median_s
        return min(self.train_step_s) / median, max(self.train_step_s) / median


@dataclass
class StartupFigures:
    """Start-up costs: per warm trial, and the executors' one-off set-up; where they come from."""

    per_trial_s: float = DEFAULT_WARM_STARTUP_S
    executor_setup_s: float = DEFAULT_EXECUTOR_SETUP_S
    source: str = "defaults"


@dataclass
class StudyForecast:
    label_ratio: float
    trials: int
    max_epochs: int  # epochs of a trial that is never stopped
    epochs: float  # all trials together, as the scheduler is expected to run them
    epochs_reading: str  # "expected" or "at most"
    train_steps_per_epoch: int
    eval_batches_per_epoch: int
    epoch_s: float  # one epoch of one trial: training + evaluation (mean over the methods)
    trial_seconds: float  # all trials' training, evaluation, FID sampling and start-up, in trial-seconds
    device_hours: float
    wall_s: float
    wall_low_s: float
    wall_high_s: float
    #: generation: the epochs a trial samples and scores FID at, the samplings all trials are
    #: expected to run, and one sampling's seconds (mean over the methods)
    fid_epochs: list[int] = field(default_factory=list)
    fid_runs: float = 0.0
    fid_s: float = 0.0


@dataclass
class SearchForecast:
    experiment: str
    concurrency: int
    devices_per_trial: float
    device: str
    startup: StartupFigures
    timings: list[MethodTiming]
    #: where the step times come from: "timed" on this machine, or the "leaderboard"'s epoch times
    source: str = "timed"
    studies: list[StudyForecast] = field(default_factory=list)
    #: resources.device_hour_price: what a device-hour costs (None: not given)
    price: float | None = None
    created_at: float = field(default_factory=time.time)
    #: generation: search.fid's images and DDIM steps per FID sampling (None: a classification search)
    fid_images: int | None = None
    fid_steps: int | None = None

    @property
    def trials(self) -> int:
        return sum(s.trials for s in self.studies)

    @property
    def epochs(self) -> float:
        return sum(s.epochs for s in self.studies)

    @property
    def device_hours(self) -> float:
        # the executors hold their devices while they set up, once per search
        setup = self.startup.executor_setup_s * self.concurrency * self.devices_per_trial / 3600
        return sum(s.device_hours for s in self.studies) + setup

    @property
    def wall_s(self) -> tuple[float, float, float]:
        """(point, low, high) wall time of the whole search: studies one after another, after the set-up."""
        setup = self.startup.executor_setup_s
        return (setup + sum(s.wall_s for s in self.studies), setup + sum(s.wall_low_s for s in self.studies),
                setup + sum(s.wall_high_s for s in self.studies))

    def to_dict(self) -> dict[str, Any]:
        point, low, high = self.wall_s
        cost = None if self.price is None else self.price * self.device_hours
        return {**asdict(self), "total": {"trials": self.trials, "epochs": self.epochs, "device_hours": self.device_hours,
                                          "wall_s": point, "wall_low_s": low, "wall_high_s": high, "cost": cost}}

    def lines(self) -> list[str]:
        """The forecast as text: the step times, one line per study, one total line."""
        out = []
        for t in self.timings:
            fast, slow = t.spread()
            sampling = ""
            if self.fid_images is not None and t.sample_s:
                sampling = (f"{t.sampling_s(self.fid_images, t.eval_batch):.2f} s per FID sampling "
                            f"({self.fid_images} images, {self.fid_steps} steps); ")
            out.append(f"  {t.method}: {1000 * t.train_median_s:.1f} ms per training step (micro-batch {t.micro_batch}), "
                       f"{1000 * t.eval_median_s:.1f} ms per evaluation batch ({t.eval_batch}); {sampling}"
                       f"steps {fast:.2f}x..{slow:.2f}x of the median")
        for s in self.studies:
            fid = ""
            if s.fid_epochs:
                fid = (f"FID at epoch{'s' if len(s.fid_epochs) > 1 else ''} {', '.join(map(str, s.fid_epochs))} "
                       f"({s.fid_runs:.1f} samplings {s.epochs_reading}, {s.fid_s:.2f} s each), ")
            out.append(
                f"label ratio {s.label_ratio:g}: {s.trials} trials, {s.epochs:.1f} epochs {s.epochs_reading} "
                f"(of {s.trials * s.max_epochs} without stopping), {s.train_steps_per_epoch} steps + "
                f"{s.eval_batches_per_epoch} eval batches per epoch ({s.epoch_s:.1f} s), {fid}"
                f"{self.startup.per_trial_s:.1f} s start-up per trial; {s.device_hours:.3f} device-hours, "
                f"wall {_duration(s.wall_s)} ({_duration(s.wall_low_s)}..{_duration(s.wall_high_s)})"
            )
        point, low, high = self.wall_s
        out.append(
            f"total: {self.trials} trials, {self.epochs:.1f} epochs, executor set-up "
            f"{self.startup.executor_setup_s:.0f} s once; {self.device_hours:.3f} device-hours "
            f"({self.devices_per_trial:g} {self.device} per trial), wall {_duration(point)} "
            f"({_duration(low)}..{_duration(high)}) at {self.concurrency} concurrent trial(s)"
            + ("" if self.price is None else
               f"; cost {self.price * self.device_hours:,.2f} at {self.price:g} per device-hour")
        )
        return out


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def forecast(config: SearchConfig, facts: dict[str, Any], timings: list[MethodTiming], startup: StartupFigures,
             concurrency: int, devices_per_trial: float = 1.0, epoch_seconds: dict[float, float] | None = None,
             device: str | None = None) -> SearchForecast:
    """The forecast from its inputs: no timing, no I/O.

    ``facts``: :func:`~medpeft_ray.search.runner.preflight`'s (training images per ratio,
    validation images). Several methods share a study's trials evenly (Optuna's choice is not
    known in advance), so an epoch costs the mean of the methods' epochs. ``epoch_seconds``: an
    epoch's seconds per label ratio as recorded (:func:`recorded_epoch_seconds`), instead of
    ``timings``. A generation search adds its FID samplings (:attr:`MethodTiming.sampling_s` of
    ``search.fid.images``) at the epochs ``search.fid_epochs`` names, as many as the scheduler
    lets trials reach (:func:`expected_fid_runs`); recorded epoch times come with none.
    """
    if not timings and epoch_seconds is None:
        raise MedpeftError("a forecast needs the step times of at least one method, or recorded epoch times")
    res, train = config.resources, config.train
    world = res.workers_per_trial
    accumulation = train.deepspeed.gradient_accumulation_steps
    micro_batch = max(1, train.batch_size // (world * accumulation))  # as deepspeed_config
    val_shard = math.ceil(facts["images"]["val"] / world)
    eval_batches = math.ceil(val_shard / train.eval_batch_size)
    device = device or timings[0].device
    generation = config.task == "generation"
    fid = config.search.fid
    result = SearchForecast(config.experiment_name, concurrency, devices_per_trial, device, startup, timings,
                            price=res.device_hour_price, fid_images=fid.images if generation else None,
                            fid_steps=fid.steps if generation else None)
    # one FID sampling: sampled in chunks of the evaluation batch, as the recipe's generate does
    fid_s = 0.0
    if generation and timings:
        fid_s = statistics.mean(t.sampling_s(fid.images, train.eval_batch_size) for t in timings)
    # how steady the timed steps were (recorded epoch times come with no spread of their own)
    fast = min((t.spread()[0] for t in timings), default=1.0)
    slow = max((t.spread()[1] for t in timings), default=1.0)
    for ratio, trials in zip(config.dataset.label_ratios, study_trials(config)):
        images = _images_at(facts["train_images_per_ratio"], ratio)
        # the recipe's loop: each rank runs ceil(shard / micro-batch) micro-steps per epoch
        steps = math.ceil((images // world) / micro_batch)
        if epoch_seconds is not None:
            epoch_s = epoch_seconds[ratio]
        else:
            epoch_s = statistics.mean(steps * t.train_median_s + eval_batches * t.eval_median_s for t in timings)
        max_t = train.epochs_for(ratio)
        epochs, reading = expected_epochs(config.search.scheduler, trials, max_t)
        fid_epochs = config.search.fid_epochs(max_t) if generation else []
        fid_runs = expected_fid_runs(config.search.scheduler, trials, max_t, fid_epochs) if fid_epochs else 0.0
        trial_seconds = epochs * epoch_s + fid_runs * fid_s + trials * startup.per_trial_s
        wall = trial_seconds / max(1, min(concurrency, trials)) if trials else 0.0
        result.studies.append(StudyForecast(
            label_ratio=ratio, trials=trials, max_epochs=max_t, epochs=epochs, epochs_reading=reading,
            train_steps_per_epoch=steps, eval_batches_per_epoch=eval_batches, epoch_s=epoch_s,
            trial_seconds=trial_seconds, device_hours=trial_seconds * devices_per_trial / 3600, wall_s=wall,
            # the wider of the fixed factors and the steps' own spread
            wall_low_s=wall * min(LOW_FACTOR, fast), wall_high_s=wall * max(HIGH_FACTOR, slow),
            fid_epochs=fid_epochs, fid_runs=fid_runs, fid_s=fid_s,
        ))
    return result


def _images_at(per_ratio: dict[Any, int], ratio: float) -> int:
    from medpeft_ray.label_ratios import same_label_ratio

    for key, count in per_ratio.items():
        if same_label_ratio(float(key), ratio):
            return int(count)
    raise KeyError(f"pre-flight counted no training images at label ratio {ratio:g}")


# ----------------------------------------------------------------------------------------------
# The inputs: concurrency, start-up, step times
# ----------------------------------------------------------------------------------------------


def local_capacity() -> ClusterCapacity:
    """What a local Ray would hold, read without starting one: Ray's own defaults are the CPU
    count of this process and the GPUs torch sees."""
    import torch

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ClusterCapacity({"CPU": float(cpus), "GPU": float(gpus), DRIVER_RESOURCE: float(DRIVER_SLOTS)})


def startup_figures(config: SearchConfig, db_url: str | None) -> StartupFigures:
    """Start-up figures of earlier trials of the same backbone in the leaderboard, else the defaults.

    The median ``startup_s`` is a typical (warm) trial's; the first trial on an executor also pays
    the executor's set-up, so the largest one over the median stands for that set-up.
    """
    import sqlalchemy as sa

    from medpeft_ray.leaderboard import LeaderboardStore

    if db_url is None:
        return StartupFigures()
    try:
        rows = LeaderboardStore(db_url, create=False).query(backbone=config.model.backbone, role="search")
    except (MedpeftError, sa.exc.SQLAlchemyError, OSError):  # no leaderboard yet, or none readable
        return StartupFigures()
    startups = [float(s) for s in rows["startup_s"].dropna()] if "startup_s" in rows else []
    if len(startups) < 2:
        return StartupFigures()
    typical = statistics.median(startups)
    return StartupFigures(typical, max(0.0, max(startups) - typical),
                          f"{len(startups)} earlier {config.model.backbone} trials in the leaderboard")


def time_steps(config: SearchConfig, facts: dict[str, Any], use_gpu: bool, threads: int,
               steps: int = TIMED_STEPS, eval_batches: int = TIMED_EVAL_BATCHES) -> list[MethodTiming]:
    """Times each method's training micro-steps and evaluation batches with the real recipe pieces.

    One process stands for one of a trial's workers: a world of one at the trial's per-worker
    micro-batch, with the trial's CPU threads. The model is each method at its first point
    (as pre-flight applies it), at the largest label ratio (the most images to draw batches from).
    The recipe is the trial's own (:func:`~medpeft_ray.train.recipes.make_recipe`): a generation
    method's steps are noise-prediction steps, its evaluation batches the fixed validation loss's,
    and it also times sampling with FID scoring (:func:`_time_generation`).
    """
    import torch

    from medpeft_ray.train.engine import WorkerContext, ensure_process_group
    from medpeft_ray.train.generation import GenerationRecipe
    from medpeft_ray.train.recipes import make_recipe

    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    ensure_process_group("nccl" if use_gpu else "gloo")  # DeepSpeed needs one, even for one process

    def sync() -> None:
        if use_gpu:
            torch.cuda.synchronize(device)

    space, workers = config.search_space, config.resources.workers_per_trial
    ratio = max(config.dataset.label_ratios)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    timings = []
    try:
        recipe = None
        for method in space.methods:
            trial = space.trial_config(ratio, space.first_point(method))
            per_worker = max(1, trial.train.batch_size // workers)
            trial = trial.model_copy(update={"train": trial.train.model_copy(update={"batch_size": per_worker})})
            if recipe is None:  # one recipe for all methods, as an executor keeps one for its trials
                recipe = make_recipe(trial, WorkerContext(0, 1, device))
            generation = isinstance(recipe, GenerationRecipe)
            timer = _time_generation if generation else _time_classification
            with _quiet_progress_bars() if generation else contextlib.nullcontext():
                state = recipe.build(trial, facts.get("dataset_key"), None)
                try:
                    timings.append(timer(recipe, trial, state, sync, steps, eval_batches))
                finally:
                    recipe.release(state)
    finally:
        torch.set_num_threads(previous_threads)
    return timings


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """transformers' and diffusers' progress bars off (the pipeline's parts loaded, or written once): the
    forecast's lines are the output; on again after, where they were on."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    were = [(module, module.is_progress_bar_enabled()) for module in (transformers_logging, diffusers_logging)]
    for module, _ in were:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, enabled in were:
            if enabled:
                module.enable_progress_bar()


def _time_classification(recipe: Any, trial: Any, state: Any, sync: Any, steps: int, eval_batches: int) -> MethodTiming:
    """A classifier's micro-steps (the body of ``TrialRecipe.train_epoch``'s loop) and evaluation batches."""
    import numpy as np
    import torch

    from medpeft_ray.models.normalisation import input_statistics
    from medpeft_ray.train.engine import Batches, evaluate

    engine, micro, device = state.engine, state.micro_batch, recipe.ctx.device
    engine.train()
    generator = torch.Generator().manual_seed(trial.train.seed)
    order = torch.randperm(len(state.train_rows), generator=generator)
    train_s = []
    # the body of TrialRecipe.train_epoch's loop, for a few steps instead of a whole epoch
    for step in range(WARMUP_STEPS + steps):
        index = order[(torch.arange(micro) + step * micro) % len(order)]
        started = time.perf_counter()
        x, y = state.train_batches.get(index, state.dtype, generator)
        loss = state.loss_fn(engine(x), y)
        engine.backward(loss)
        engine.step()
        sync()
        if step >= WARMUP_STEPS:
            train_s.append(time.perf_counter() - started)
    size = min(trial.train.eval_batch_size, len(state.data.val))
    stats = input_statistics(trial.model)
    one_batch = Batches(state.data.val.images, state.data.val.labels, device, stats.mean, stats.std, rows=np.arange(size))
    multilabel = state.data.task == "multilabel"
    eval_s = []
    for batch in range(1 + eval_batches):  # the first one untimed, as for training
        started = time.perf_counter()
        evaluate(engine, one_batch, state.dtype, state.loss_fn, multilabel, recipe.ctx, size)
        sync()
        if batch:
            eval_s.append(time.perf_counter() - started)
    return MethodTiming(trial.method.name, train_s, eval_s, micro, trial.train.eval_batch_size, device.type)


def _time_generation(recipe: Any, trial: Any, state: Any, sync: Any, steps: int, eval_batches: int) -> MethodTiming:
    """A diffusion U-Net's noise-prediction micro-steps, fixed validation-loss batches and FID samplings.

    Training: the body of ``GenerationRecipe.train_epoch``'s loop (noise, latent draw and timesteps,
    ``noise_loss``, backward, step). Evaluation: ``fixed_loss`` on one evaluation batch of the
    validation split. Sampling: ``score`` (DDIM sampling of the first validation prompts with the
    trial's steps, then their FID against the validation images) for :data:`SAMPLE_PROMPTS`
    prompts, :data:`SAMPLE_RUNS` times each after an untimed run, which also makes the FID
    reference as a worker's warm-up does.
    """
    import torch

    from medpeft_ray.train.generation import Encoded

    engine, micro, device = state.engine, state.micro_batch, recipe.ctx.device
    engine.train()
    order_gen = torch.Generator().manual_seed(trial.train.seed)
    noise_gen = torch.Generator().manual_seed(trial.train.seed + 1)
    order = torch.randperm(len(state.train), generator=order_gen)
    timesteps = state.noise_scheduler.config.num_train_timesteps
    shape = tuple(state.train.latent_mean.shape[1:])
    train_s = []
    for step in range(WARMUP_STEPS + steps):
        index = order[(torch.arange(micro) + step * micro) % len(order)]
        started = time.perf_counter()
        noise = torch.randn((len(index), *shape), generator=noise_gen)
        latent_noise = torch.randn((len(index), *shape), generator=noise_gen)
        t = torch.randint(0, timesteps, (len(index),), generator=noise_gen)
        loss = recipe.noise_loss(state, state.train, index, noise, t, latent_noise)
        engine.backward(loss)
        engine.step()
        sync()
        if step >= WARMUP_STEPS:
            train_s.append(time.perf_counter() - started)
    val = state.val
    size = min(trial.train.eval_batch_size, len(val))
    one_batch = Encoded(val.latent_mean[:size], val.latent_std[:size], val.text[:size], val.captions[:size],
                        val.images[:size])
    eval_s = []
    for batch in range(1 + eval_batches):  # the first one untimed, as for training
        started = time.perf_counter()
        recipe.fixed_loss(trial, state, one_batch, "val")
        sync()
        if batch:
            eval_s.append(time.perf_counter() - started)
    sample_s: list[float] = []
    sample_prompts: list[int] = []
    if trial.fid is not None:
        largest = min(trial.fid.images, trial.train.eval_batch_size, len(val))
        sizes = sorted({min(n, largest) for n in SAMPLE_PROMPTS})
        for run, prompts in enumerate([sizes[0], *(n for n in sizes for _ in range(SAMPLE_RUNS))]):
            fewer = trial.model_copy(update={"fid": trial.fid.model_copy(update={"images": prompts})})
            started = time.perf_counter()
            recipe.score(fewer, state, val, "val")
            sync()
            if run:  # the first run untimed
                sample_s.append(time.perf_counter() - started)
                sample_prompts.append(prompts)
    return MethodTiming(trial.method.name, train_s, eval_s, micro, trial.train.eval_batch_size, device.type,
                        sample_s=sample_s, sample_prompts=sample_prompts)


def recorded_epoch_seconds(config: SearchConfig, db_url: str | None) -> dict[float, float]:
    """An epoch's seconds (training + evaluation) per label ratio, from earlier trials in the leaderboard.

    The trials counted ran this dataset, backbone, image size and batch size at that label ratio,
    with one of this search's methods (``train_time_s / epochs_run``: their median). Rows do not
    say which device they ran on; the dry run times this machine's instead.
    """
    import sqlalchemy as sa

    from medpeft_ray.label_ratios import same_label_ratio
    from medpeft_ray.leaderboard import LeaderboardStore

    if db_url is None:
        return {}
    try:
        rows = LeaderboardStore(db_url, create=False).query(backbone=config.model.backbone, dataset=config.dataset.name,
                                                            role="search")
    except (MedpeftError, sa.exc.SQLAlchemyError, OSError):  # no leaderboard yet, or none readable
        return {}
    per_epoch: dict[float, list[float]] = {}
    for row in rows.to_dict(orient="records"):
        trial = row.get("config") or {}
        epochs, seconds = _number(row.get("epochs_run")), _number(row.get("train_time_s"))
        if (row.get("method") not in config.search_space.methods or not epochs or seconds is None
                or trial.get("dataset", {}).get("image_size") != config.dataset.image_size
                or trial.get("train", {}).get("batch_size") != config.train.batch_size):
            continue
        for ratio in config.dataset.label_ratios:
            if same_label_ratio(float(row["label_ratio"]), ratio):
                per_epoch.setdefault(ratio, []).append(seconds / epochs)
    return {ratio: statistics.median(values) for ratio, values in per_epoch.items()}


def _number(value: Any) -> float | None:
    """A leaderboard cell as a number; None for a missing one (None or NaN)."""
    if value is None:
        return None
    number = float(value)
    return None if math.isnan(number) else number


def recorded_forecast(config: SearchConfig, facts: dict[str, Any], plan: ResourcePlan,
                      db_url: str | None) -> dict[str, Any] | None:
    """The forecast a search stores in its manifest, without timing anything: epoch times and
    start-up figures from the leaderboard; None when it holds no epoch time for some label ratio.

    A search does not time steps itself: that would put DeepSpeed and, on GPUs, a CUDA context
    into the driver process; ``search --dry-run`` is the timed forecast.
    """
    epoch_seconds = recorded_epoch_seconds(config, db_url)
    if any(ratio not in epoch_seconds for ratio in config.dataset.label_ratios):
        return None
    result = forecast(config, facts, [], startup_figures(config, db_url), plan.concurrency, devices_per_trial(config, plan),
                      epoch_seconds=epoch_seconds, device="cuda" if plan.use_gpu else "cpu")
    result.source = "leaderboard"
    return result.to_dict()


def dry_run(config: SearchConfig, facts: dict[str, Any], *, results: str | Path | None = None,
            db_url: str | None = None) -> SearchForecast:
    """Times each method's steps here and forecasts the search; ``facts``: the config's pre-flight.

    Starts no Ray and writes nothing to the results folder (the leaderboard is only read, if there is one).
    """
    from medpeft_ray.storage import default_db_url

    plan = plan_resources(config, local_capacity())
    # as run_search finds its leaderboard (a cloud results URI names no local file: defaults)
    db_url = db_url or default_db_url(results)
    startup = startup_figures(config, db_url)
    threads = max(1, int(plan.per_worker.get("CPU", 1)))
    timings = time_steps(config, facts, plan.use_gpu, threads)
    return forecast(config, facts, timings, startup, plan.concurrency, devices_per_trial(config, plan))


def devices_per_trial(config: SearchConfig, plan: ResourcePlan) -> float:
    """Devices a trial holds: its workers' GPUs, or on CPUs one per worker."""
    return config.resources.workers_per_trial * (plan.per_worker.get("GPU", 1.0) if plan.use_gpu else 1.0)


def actual_costs(records: list[Any], wall_s: float, devices_per_trial: float) -> dict[str, Any]:
    """A finished search's trials, epochs, device-hours and wall time, in the forecast's ``total`` terms.

    Device-hours count each trial's training, evaluation and start-up on its devices, as the
    forecast's trial-seconds do (a trial's wall time would also count its waits for Tune and for
    a free executor); the executors' one-off set-up is in the wall time only.
    """
    trial_seconds = sum((r.train_time_s or 0.0) + (r.startup_s or 0.0) for r in records)
    return {"trials": len(records), "epochs": sum(r.epochs_run or 0 for r in records),
            "device_hours": trial_seconds * devices_per_trial / 3600, "wall_s": wall_s}
