"""The forecast's figures and their arithmetic: step times, epochs and start-up in; trials,
device-hours and wall time per study out (:func:`forecast`: no timing, no I/O).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from medpeft_ray.errors import MedpeftError
from medpeft_ray.label_ratios import same_label_ratio
from medpeft_ray.search.forecast.halving import expected_epochs, expected_fid_runs, study_trials

if TYPE_CHECKING:
    from medpeft_ray.config import SearchConfig
    from medpeft_ray.search.cluster import ResourcePlan

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
        return {**asdict(self), "total": {"trials": self.trials, "epochs": self.epochs,
                                          "device_hours": self.device_hours,
                                          "wall_s": point, "wall_low_s": low, "wall_high_s": high, "cost": cost}}


def forecast(config: SearchConfig, facts: dict[str, Any], timings: list[MethodTiming], startup: StartupFigures,
             concurrency: int, devices_per_trial: float = 1.0, epoch_seconds: dict[float, float] | None = None,
             device: str | None = None) -> SearchForecast:
    """The forecast from its inputs: no timing, no I/O.

    ``facts``: :func:`~medpeft_ray.search.preflight.preflight`'s (training images per ratio,
    validation images). Several methods share a study's trials evenly (Optuna's choice is not
    known in advance), so an epoch costs the mean of the methods' epochs. ``epoch_seconds``: an
    epoch's seconds per label ratio as recorded
    (:func:`~medpeft_ray.search.forecast.recorded.recorded_epoch_seconds`), instead of
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
    for key, count in per_ratio.items():
        if same_label_ratio(float(key), ratio):
            return int(count)
    raise KeyError(f"pre-flight counted no training images at label ratio {ratio:g}")


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
