"""Timing a few real steps of each method on this machine: the dry run's step times.

The trial's model is built by the trial's own recipe (:func:`~medpeft_ray.train.recipes.make_recipe`:
pristine backbone, method at its first point, DeepSpeed engine) at the trial's per-worker
micro-batch, on the real (cached) data; then a few training micro-steps, evaluation batches and,
for a generation search, samplings with FID scoring are timed.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from medpeft_ray.models.normalisation import input_statistics
from medpeft_ray.search.forecast.estimate import MethodTiming
from medpeft_ray.train.engine import Batches, WorkerContext, ensure_process_group, evaluate
from medpeft_ray.train.generation import Encoded, GenerationRecipe
from medpeft_ray.train.recipes import make_recipe

if TYPE_CHECKING:
    from medpeft_ray.config import SearchConfig

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
    # only a generation search loads diffusers (see GenerationRecipe.frozen)
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
    one_batch = Batches(state.data.val.images, state.data.val.labels, device, stats.mean, stats.std,
                        rows=np.arange(size))
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
