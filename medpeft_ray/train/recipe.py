"""The training recipe of one worker: set up once, then per trial build, train, evaluate, save, load.

A :class:`TrialRecipe` lives as long as its worker process. What every trial of a search shares
stays resident in it: the imports, the decoded dataset (and its tensors), and each backbone's
*pristine* pre-trained weights, read from disk once. Each trial then builds its own model from a
copy of those weights (nothing a trial changes reaches the pristine copy or the next trial), its
own optimizer and DeepSpeed engine, trains, evaluates and checkpoints per epoch, and frees
everything it allocated when it ends, is stopped or fails.

The same recipe runs a cold trial (``run_training``: a fresh recipe, one trial), a warm executor's
trials (:mod:`medpeft_ray.search.executor_worker`) and ``medpeft-ray train --config``, so a configuration
gives the same numbers whichever way it runs.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from medpeft_ray.data import load_splits, train_subset_index
from medpeft_ray.errors import TrialFailed
from medpeft_ray.evaluation.predictions import SplitPredictions
from medpeft_ray.methods import count_parameters, method_lr_scales, prepare_model
from medpeft_ray.metrics import METRICS, Predictions, metric_values, prediction_details
from medpeft_ray.models import build_backbone
from medpeft_ray.models.normalisation import input_statistics
from medpeft_ray.train.checkpoint import load_deepspeed_state, save_trial_checkpoint
from medpeft_ray.train.engine import (
    Batches,
    WorkerContext,
    augment_processes,
    build_optimizer,
    deepspeed_config,
    evaluate,
    load_deepspeed,
    mean_over_ranks,
    set_determinism,
    warmup_cosine,
)
from medpeft_ray.train.precision import compute_dtype, fit_buffers
from medpeft_ray.train.run import CheckpointOf, EpochScores, Recipe, Resumed, TestScores

if TYPE_CHECKING:
    from medpeft_ray.config import TrialConfig

log = logging.getLogger(__name__)

#: The seed of a backbone's random initialisation when no checkpoint is given: fixed, so that like
#: pre-trained weights the frozen backbone is the same in every trial (seeds vary the head, the
#: method's parameters, the data order and augmentation).
BACKBONE_INIT_SEED = 0
#: pristine backbones a worker keeps (a search uses one; a second covers a change of backbone)
MAX_PRISTINE_BACKBONES = 2


class TrialStopped(Exception):
    """The trial was stopped from outside (the scheduler ended it); it ends without a result."""


@dataclass
class _TrialState:
    """Everything one trial allocated on this worker (freed as a whole when it ends)."""

    engine: Any
    train_batches: Batches
    val_batches: Batches
    data: Any
    #: the training images of the trial's label ratio: rows of the dataset's train split
    train_rows: np.ndarray
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    dtype: torch.dtype
    micro_batch: int
    shard_size: int
    trainable_params: int
    total_params: int
    start_epoch: int = 0
    marks: dict[str, float] = field(default_factory=dict)

    @property
    def train_images(self) -> int:
        return len(self.train_rows)


class TrialRecipe(Recipe):
    """One worker's trainer of trials; keeps imports, data and pristine backbones between trials.

    Args:
        ctx: this worker's rank, world size and device (``resume_from``, ``started`` and
            ``dataset_key`` of ``ctx`` are per trial and given to :meth:`run` instead).
        control_group: a CPU process group over the trial's ranks, on which the ranks agree to stop
            (None with one rank).
    """

    def __init__(self, ctx: WorkerContext, control_group: Any = None) -> None:
        self.ctx = ctx
        self.use_gpu = ctx.device.type == "cuda"
        self._deepspeed = load_deepspeed(self.use_gpu)  # once per worker, not per trial
        self.control_group = control_group
        self._splits: dict[str, Any] = {}
        self._pristine: OrderedDict[tuple[Any, ...], torch.nn.Module] = OrderedDict()
        self.trials_run = 0

    # -- set-up that trials share ------------------------------------------------------------
    def dataset(self, trial: TrialConfig, key: dict[str, Any] | None) -> Any:
        """The trial's dataset splits, decoded once per worker (from the decode-once cache)."""
        ds = trial.dataset
        cache_key = dataset_identity(trial)
        if cache_key not in self._splits:
            self._splits.clear()
            self._splits[cache_key] = load_splits(ds.name, ds.root, ds.image_size, ds.options, ds.seed, key=key)
        return self._splits[cache_key]

    def batches(self, trial: TrialConfig, split: Any, rows: np.ndarray | None = None, train: bool = False) -> Batches:
        """Batches of ``split`` (its ``rows``, or all) for one trial: they read the split's images
        where they are (the cache's map, shared by the node's workers), never a copy of the split."""
        augment = trial.train.augment if train else "none"
        processes = augment_processes(augment, self.use_gpu, torch.get_num_threads()) if train else 0
        return Batches(split.images, split.labels, self.ctx.device, *_statistics(trial), augment, rows=rows,
                       augment_processes=processes)

    def pristine_backbone(self, trial: TrialConfig, num_classes: int) -> torch.nn.Module:
        """The backbone with its pre-trained weights, loaded from disk once per worker.

        It never trains: each trial copies its weights (:meth:`build_model`). Without a checkpoint
        its random weights come from :data:`BACKBONE_INIT_SEED`.
        """
        model_cfg = trial.model
        checkpoint = Path(model_cfg.checkpoint) if model_cfg.checkpoint else None
        stamp = (checkpoint.stat().st_size, checkpoint.stat().st_mtime_ns) if checkpoint and checkpoint.is_file() else None
        key = (model_cfg.backbone, num_classes, trial.dataset.image_size, str(checkpoint), stamp)
        if key in self._pristine:
            self._pristine.move_to_end(key)
            return self._pristine[key]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(BACKBONE_INIT_SEED)
            model = build_backbone(model_cfg.backbone, num_classes, trial.dataset.image_size, checkpoint=checkpoint)
        model.requires_grad_(False).eval()
        if self.use_gpu and trial.train.deepspeed.zero_stage < 3 and trial.train.deepspeed.offload_param == "none":
            model = model.to(self.ctx.device)  # copied on the device, per trial, in milliseconds
        self._pristine[key] = model
        while len(self._pristine) > MAX_PRISTINE_BACKBONES:
            self._pristine.popitem(last=False)
        return model

    def warm_up(self, trial: TrialConfig, dataset_key: dict[str, Any] | None) -> None:
        """Everything a trial like ``trial`` needs before its first step, done once: the dataset and
        its tensors, the pristine backbone, and the method's imports (a model is built and dropped)."""
        data = self.dataset(trial, dataset_key)
        self.train_rows(trial, data)
        with torch.random.fork_rng(devices=[]):  # leaves the trials' random streams as they were
            self.build_model(trial, data.num_classes)
        gc.collect()

    # -- per trial ---------------------------------------------------------------------------
    def build_model(self, trial: TrialConfig, num_classes: int) -> torch.nn.Module:
        """A fresh model for ``trial``: the pristine weights copied, a new head, the method applied.

        The skeleton is made on the meta device (no initialisation work) with the trial's own
        drop-path rate, then every parameter and buffer is copied from the pristine backbone.
        Call after :func:`set_determinism`: the head and the method's parameters draw from the
        trial's seed.
        """
        pristine = self.pristine_backbone(trial, num_classes)
        with torch.device("meta"):
            model = build_backbone(trial.model.backbone, num_classes, trial.dataset.image_size, drop_path=trial.train.drop_path)
        model = model.to_empty(device=self.ctx.device)
        source = dict(pristine.named_parameters())
        source.update(pristine.named_buffers())
        with torch.no_grad():
            for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
                if name not in source:
                    raise RuntimeError(f"{trial.model.backbone}: {name} is not in the pre-trained backbone")
                tensor.copy_(source[name])
        reset_classifier(model)
        return prepare_model(model, trial.method.name, trial.method.options, trial.family)

    def build(self, trial: TrialConfig, dataset_key: dict[str, Any] | None, resume_from: Path | None) -> _TrialState:
        """Data, model, optimizer, schedule and DeepSpeed engine of one trial (resumed if asked)."""
        marks: dict[str, float] = {}
        set_determinism(trial.train.seed, trial.train.deterministic)
        data = self.dataset(trial, dataset_key)
        train_rows = self.train_rows(trial, data)
        train_batches = self.batches(trial, data.train, train_rows, train=True)
        val_batches = self.batches(trial, data.val)
        marks["data"] = time.time()

        model = self.build_model(trial, data.num_classes)
        trainable_params, total_params = count_parameters(model)
        marks["model"] = time.time()
        engine, micro_batch, shard_size = self.engine(trial, model, len(train_rows))
        dtype = compute_dtype(trial.train, self.use_gpu)
        state = _TrialState(
            engine=engine, train_batches=train_batches, val_batches=val_batches, data=data, train_rows=train_rows,
            loss_fn=make_loss(data, data.train.labels[train_rows]), dtype=dtype, micro_batch=micro_batch, shard_size=shard_size,
            trainable_params=trainable_params, total_params=total_params, marks=marks,
        )
        if resume_from is not None:
            state.start_epoch = self.load(state, resume_from)
        marks["deepspeed_init"] = time.time()
        return state

    def train_rows(self, trial: TrialConfig, data: Any) -> np.ndarray:
        """The trial's training images, as rows of the train split: the label ratio's subset, enough
        for every worker (an index, not a copy of the images)."""
        if data.skipped and self.ctx.rank == 0 and self.trials_run == 0:
            log.warning("%d unreadable image(s) skipped, e.g. %s", len(data.skipped), data.skipped[0])
        rows = train_subset_index(data, trial.label_ratio, trial.dataset.seed)
        if len(rows) < self.ctx.world_size:
            raise TrialFailed(f"{len(rows)} training images cannot feed {self.ctx.world_size} workers")
        return rows

    def engine(self, trial: TrialConfig, model: torch.nn.Module, train_images: int) -> tuple[Any, int, int]:
        """The trial's DeepSpeed engine (optimizer, warm-up and cosine schedule) around ``model``;
        returns it with the per-worker micro-batch and the images of each worker's shard."""
        ds_config = deepspeed_config(trial.train, self.ctx.world_size, self.use_gpu)
        micro_batch = ds_config["train_micro_batch_size_per_gpu"]
        shard_size = train_images // self.ctx.world_size
        steps_per_epoch = max(1, math.ceil(shard_size / micro_batch) // trial.train.deepspeed.gradient_accumulation_steps)
        fit_buffers(model, compute_dtype(trial.train, self.use_gpu), trial.method.name)
        optimizer = build_optimizer(model, trial.train, self.use_gpu, trial.family,
                                    method_lr_scales(trial.method.name, trial.method.options, trial.family))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(trial.train, steps_per_epoch))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # DeepSpeed's notes on CPU-only features
            engine, _, _, _ = self._deepspeed.initialize(
                model=model.to(self.ctx.device), optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
            )
        return engine, micro_batch, shard_size

    def load(self, state: _TrialState, directory: Path) -> int:
        """Restores weights, optimizer moments and lr schedule (each rank its shard); returns the epoch."""
        return int(load_deepspeed_state(directory, state.engine)["epoch"])

    def train_epoch(self, trial: TrialConfig, state: _TrialState, epoch: int, first_step: list[float]) -> float:
        """One epoch on this rank's stride of a shuffle shared by all ranks; returns the mean loss over ranks.

        Raises:
            TrialStopped: the trial was stopped from outside (checked before every step).
        """
        ctx, engine = self.ctx, state.engine
        engine.train()
        # Every rank draws the same permutation and takes its own stride of it.
        order_gen = torch.Generator().manual_seed(trial.train.seed * 1000 + epoch)
        # Augmentation and dropout draw from streams seeded by (seed, epoch, rank), so an epoch
        # trained after a resume draws exactly what it would have drawn without the interruption.
        epoch_seed = trial.train.seed * 1000 + epoch + 10**6 * (ctx.rank + 1)
        aug_gen = torch.Generator().manual_seed(epoch_seed)
        state.train_batches.reseed(epoch_seed)
        torch.manual_seed(epoch_seed)
        shard = torch.randperm(len(state.train_rows), generator=order_gen)[ctx.rank :: ctx.world_size][: state.shard_size]
        loss_sum = torch.zeros((), device=ctx.device)
        steps = 0
        chunks = [shard[start : start + state.micro_batch] for start in range(0, len(shard), state.micro_batch)]
        # the host side of the next batches (gather, RandAugment) is prepared while this step runs
        for x, y in state.train_batches.iterate(chunks, state.dtype, aug_gen):
            if self.stop_requested():
                raise TrialStopped()
            if not first_step:
                first_step.append(time.time())
            loss = state.loss_fn(engine(x), y)
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach()
            steps += 1
        return mean_over_ranks(loss_sum, steps, ctx.world_size)  # one sync per epoch, not per step

    def evaluate(self, trial: TrialConfig, state: _TrialState, batches: Batches, split: Any,
                 thresholds: np.ndarray | None = None) -> Predictions:
        """A split's predictions over every rank, for :func:`~medpeft_ray.metrics.metric_values` to score.

        ``split`` is the split's :class:`LabeledImages` (its subgroup attributes go with the predictions).
        """
        multilabel = state.data.task == "multilabel"
        return evaluate(state.engine, batches, state.dtype, state.loss_fn, multilabel, self.ctx,
                        trial.train.eval_batch_size, split.subgroups, thresholds)

    def save(self, trial: TrialConfig, state: _TrialState, directory: Path, metrics: dict[str, Any],
             per_class: list[float]) -> Path:
        """This rank's part of the epoch's checkpoint in ``directory`` (every rank calls it)."""
        record = {"epoch": metrics["epoch"], "metrics": metrics,
                  "val_auroc_per_class": dict(zip(state.data.class_names, per_class)), "trial": trial.model_dump(mode="json")}
        return save_trial_checkpoint(directory, state.engine, record, self.ctx.rank)

    def stop_requested(self) -> bool:
        """Whether the trial should stop now; all ranks agree (a stop seen by one rank stops all)."""
        stop = self.ctx.should_stop() if self.ctx.should_stop is not None else False
        if self.control_group is None or self.ctx.world_size == 1:
            return stop
        flag = torch.tensor([int(stop)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control_group)
        return bool(flag.item())

    # -- the run's hooks (the skeleton is :meth:`Recipe.run`) ------------------------------------
    def score_epoch(self, trial: TrialConfig, state: _TrialState, epoch: int, steps_time: float) -> EpochScores:
        """The validation split's metrics (from the metric registry), per class and per subgroup."""
        predictions = self.evaluate(trial, state, state.val_batches, state.data.val)
        return EpochScores(
            scores=metric_values(predictions), details=prediction_details(predictions, state.data.class_names),
            per_class=predictions.per_class_auroc,
            thresholds=predictions.decision_thresholds if predictions.multilabel else None,
            kept=SplitPredictions.of(predictions, "val", epoch + 1, state.data.val.groups, state.data.class_names),
        )

    def recorded_best(self, trial: TrialConfig, state: _TrialState, past: Resumed,
                      checkpoint_of: CheckpointOf | None) -> dict[str, Any] | None:
        """The best recorded epoch, with the thresholds chosen on its validation predictions (multi-label)."""
        best = past.best(trial, checkpoint_of, _SCORE_NAMES)
        if best is not None:
            thresholds = json.loads(best["details"]).get("thresholds") if state.data.task == "multilabel" else None
            best["thresholds"] = (np.array([thresholds[name] for name in state.data.class_names], dtype=np.float64)
                                  if thresholds else None)
        return best

    def test_scores(self, trial: TrialConfig, state: _TrialState, best: dict[str, Any]) -> TestScores:
        """The test split's metrics at the best epoch's decision thresholds (the test split chooses nothing)."""
        test_batches = self.batches(trial, state.data.test)
        test = self.evaluate(trial, state, test_batches, state.data.test, best["thresholds"])
        return TestScores(
            scores=metric_values(test, "test"), details=prediction_details(test, state.data.class_names, "test"),
            extra={"test_auroc_per_class": dict(zip(state.data.class_names, test.per_class_auroc))},
            kept=SplitPredictions.of(test, "test", best["epoch"], state.data.test.groups, state.data.class_names),
        )


#: the validation scores a classification epoch reports (what ``best_*`` repeats for the test epoch)
_SCORE_NAMES = tuple(metric.on_split("val") for metric in METRICS.values() if metric.compute is not None)


def _statistics(trial: TrialConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel mean and std the trial's backbone normalises its inputs with."""
    stats = input_statistics(trial.model)
    return stats.mean, stats.std


def dataset_identity(trial: TrialConfig) -> str:
    """What makes a trial's decoded dataset the same as another's (what a worker keeps per dataset is keyed by it)."""
    ds = trial.dataset
    return json.dumps([ds.name, str(ds.root), ds.image_size, ds.options, ds.seed], sort_keys=True, default=str)


def reset_classifier(model: torch.nn.Module) -> None:
    """A new task's head: truncated normal (std 2e-5) weights and zero bias, as MED-PEFT initialises it."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, torch.nn.Linear):
        torch.nn.init.trunc_normal_(head.weight, std=2e-5)
        if head.bias is not None:
            torch.nn.init.zeros_(head.bias)


def make_loss(data: Any, train_labels: np.ndarray) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """BCE-with-logits for multi-label data (unknown labels, NaN, left out), cross-entropy otherwise."""
    multilabel = data.task == "multilabel"
    # decided once per trial, so the common all-known case pays no masking (and no GPU sync)
    has_unknown = bool(np.isnan(train_labels).any() or np.isnan(data.val.labels).any())

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if multilabel:
            if not has_unknown:
                return F.binary_cross_entropy_with_logits(logits, target)
            known = ~torch.isnan(target)
            losses = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(target), reduction="none")
            return (losses * known).sum() / known.sum().clamp(min=1)
        return F.cross_entropy(logits, target.argmax(dim=1))

    return loss_fn
