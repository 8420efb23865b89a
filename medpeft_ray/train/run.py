"""What every recipe does with one trial, whatever it trains: :meth:`Recipe.run`, the skeleton.

Build the trial, then per epoch: train, refuse a NaN loss, score the validation split, put the
epoch's metrics together (with the start-up breakdown on the first), report them with a
checkpoint, and keep the best epoch's weights; at the end, score the best epoch on the test split.
A recipe fills in what differs between kinds of trials through the hooks below (:meth:`build`,
:meth:`before_epochs`, :meth:`train_epoch`, :meth:`score_epoch`, :meth:`save`, :meth:`recorded_best`,
:meth:`test_scores`):
:class:`~medpeft_ray.train.recipe.TrialRecipe` for classifiers,
:class:`~medpeft_ray.train.generation.GenerationRecipe` for diffusion U-Nets.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import psutil  # a Ray dependency
import torch
from safetensors.torch import load_file

from medpeft_ray.errors import TrialFailed
from medpeft_ray.evaluation.predictions import SplitPredictions, write_predictions
from medpeft_ray.metrics import better, finite_or_none
from medpeft_ray.train.checkpoint import WEIGHTS_FILE, load_trainable_state, trainable_state
from medpeft_ray.train.engine import startup_breakdown

if TYPE_CHECKING:
    import numpy as np

    from medpeft_ray.config import TrialConfig
    from medpeft_ray.train.engine import ReportFn, WorkerContext

log = logging.getLogger(__name__)

#: ``checkpoint_of(epoch)``: the local folder of a kept checkpoint of the trial being resumed
CheckpointOf = Callable[[int], Path]


@dataclass
class EpochScores:
    """What a recipe's validation of one epoch gives the skeleton.

    Args:
        scores: the validation metrics (``val_*``), in the order they are reported; ``best_*`` repeats them
            for the best epoch.
        details: per class, per subgroup or per sample facts, reported as JSON text (``details``).
        extra: metrics only this kind of trial reports, placed after ``train_time_s``.
        per_class: per-class validation AUROC the checkpoint records (empty where there are no classes).
        thresholds: the decision thresholds the test split is scored with if this epoch is the best.
        kept: the per-image predictions kept if this epoch is the best (None: this kind of trial has none).
    """

    scores: dict[str, Any]
    details: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    per_class: list[float] = field(default_factory=list)
    thresholds: np.ndarray | None = None
    kept: SplitPredictions | None = None


@dataclass
class TestScores:
    """The best epoch scored on the test split: its metrics (``test_*``), the details added under
    ``best_details["test"]``, metrics reported after ``best_details``, and the per-image predictions
    kept (None: this kind of trial has none)."""

    __test__ = False  # not a pytest class

    scores: dict[str, Any]
    details: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    kept: SplitPredictions | None = None


class Recipe(ABC):
    """The epoch loop of a trial (:meth:`run`) around a kind of trial's hooks.

    A subclass sets ``ctx`` (this worker's rank, world size and device) and ``use_gpu``; the state
    its :meth:`build` returns has ``engine``, ``data`` (``skipped``, ``test``), ``start_epoch``,
    ``marks``, ``trainable_params``, ``total_params`` and ``train_images``.
    """

    ctx: WorkerContext
    use_gpu: bool
    trials_run: int = 0

    # -- the hooks ---------------------------------------------------------------------------
    def check(self, trial: TrialConfig) -> None:
        """Refuses a trial this recipe cannot train, before anything is built (every trial passes here)."""

    @abstractmethod
    def build(self, trial: TrialConfig, dataset_key: dict[str, Any] | None, resume_from: Path | None) -> Any:
        """The trial's state: data, model, optimizer and engine (resumed from ``resume_from`` if given)."""

    def before_epochs(self, trial: TrialConfig, state: Any) -> None:
        """What the epochs need beyond the built state, made once before the first (nothing, by default)."""

    @abstractmethod
    def train_epoch(self, trial: TrialConfig, state: Any, epoch: int, first_step: list[float]) -> float:
        """One epoch of training; returns the mean loss over ranks (appends the first step's time to ``first_step``)."""

    @abstractmethod
    def score_epoch(self, trial: TrialConfig, state: Any, epoch: int, steps_time: float) -> EpochScores:
        """The epoch's validation (``steps_time``: the seconds its training steps took)."""

    @abstractmethod
    def save(self, trial: TrialConfig, state: Any, directory: Path, metrics: dict[str, Any],
             per_class: list[float]) -> Path:
        """This rank's part of the epoch's checkpoint in ``directory`` (every rank calls it)."""

    @abstractmethod
    def recorded_best(self, trial: TrialConfig, state: Any, past: Resumed,
                      checkpoint_of: CheckpointOf | None) -> dict[str, Any] | None:
        """The best of a resumed trial's recorded epochs, as :meth:`run` keeps a best epoch (None: none yet)."""

    @abstractmethod
    def test_scores(self, trial: TrialConfig, state: Any, best: dict[str, Any]) -> TestScores:
        """The best epoch (its weights already loaded) scored on the test split."""

    # -- a whole trial -----------------------------------------------------------------------
    def run(
        self,
        trial: TrialConfig,
        report: ReportFn,
        *,
        evaluate_test: bool = False,
        resume_from: Path | None = None,
        dataset_key: dict[str, Any] | None = None,
        started: dict[str, float] | None = None,
        history: list[dict[str, Any]] | None = None,
        checkpoint_of: CheckpointOf | None = None,
        predictions_to: str | None = None,
    ) -> dict[str, Any]:
        """Trains one trial; ``report(metrics, checkpoint_dir)`` is called every epoch; returns the last metrics.

        The best epoch is the one with the best ``trial.metric`` (in ``trial.mode``). With
        ``evaluate_test``, that epoch is evaluated on the test split at the end (``test_*``,
        ``test_epoch``, and that epoch's validation scores as ``best_*``); the test split never
        takes part in choosing it.

        A resumed trial (``resume_from``) gives the metrics its earlier epochs reported
        (``history``) and ``checkpoint_of(epoch)``, a kept checkpoint's folder: its training time
        goes on from theirs, its best epoch may be one of them, and with nothing left to train it
        returns its last recorded epoch's metrics.

        With ``predictions_to`` (a folder or storage URI), rank 0 keeps there the per-image
        predictions of the best validation epoch so far (``val.npz``, written before that epoch is
        reported) and of the test split (``test.npz``); the metrics name the folder (``predictions``)
        from the first file on (:mod:`medpeft_ray.evaluation.predictions`).

        Raises:
            TrialFailed: the loss became NaN or infinite (every rank raises it together), or the
                recipe cannot train the trial.
            TrialStopped: the trial was stopped from outside.
        """
        self.check(trial)
        started_at = time.time()
        started = {**(started or {}), "recipe": started_at}
        state: Any = None
        if self.use_gpu:
            torch.cuda.reset_peak_memory_stats(self.ctx.device)
        try:
            state = self.build(trial, dataset_key, resume_from)
            self.before_epochs(trial, state)
            first_step: list[float] = []
            past = Resumed(history, state.start_epoch)
            train_time = past.train_time_s
            metrics: dict[str, Any] = past.last_metrics
            # the best epoch: its metric value, number, weights, scores and details
            best = self.recorded_best(trial, state, past, checkpoint_of) if evaluate_test else None
            kept = _KeptPredictions(predictions_to if self.ctx.rank == 0 else None, past.best_value(trial))
            for epoch in range(state.start_epoch, trial.train.epochs):
                epoch_start = time.time()
                train_loss = self.train_epoch(trial, state, epoch, first_step)
                if not math.isfinite(train_loss):
                    raise TrialFailed(f"training loss is {train_loss} in epoch {epoch + 1} "
                                      f"(lr {trial.train.lr:g}); trial stopped")
                scored = self.score_epoch(trial, state, epoch, time.time() - epoch_start)
                # training and evaluation, the same for every kind of trial
                epoch_time = time.time() - epoch_start
                train_time += epoch_time
                metrics = {
                    "epoch": epoch + 1, **scored.scores, "train_loss": train_loss,
                    "trainable_params": state.trainable_params, "total_params": state.total_params,
                    "train_images": state.train_images, "skipped_images": len(state.data.skipped),
                    "epoch_time_s": epoch_time, "train_time_s": train_time, **scored.extra,
                    "worker_started_at": started_at,
                    # as JSON text: one result value, not hundreds of columns
                    "details": json.dumps(finite_or_none(scored.details)),
                    "first_step_at": first_step[0] if first_step else None, "resumed_from_epoch": state.start_epoch,
                    **self.memory(),
                }
                if "dispatch" in started:  # when a warm executor took the trial (it may have waited for one)
                    metrics["dispatched_at"] = started["dispatch"]
                if epoch == state.start_epoch:
                    metrics["startup"] = startup_breakdown(started, state.marks, metrics["first_step_at"])
                value = metrics[trial.metric]
                metrics.update(kept.epoch_scored(value, trial.mode, scored.kept))
                with tempfile.TemporaryDirectory(prefix="medpeft-ckpt-") as tmp:
                    report(metrics, self.save(trial, state, Path(tmp), metrics, scored.per_class))
                if evaluate_test and better(value, None if best is None else best["value"], trial.mode):
                    best = {"value": value, "epoch": epoch + 1, "weights": trainable_state(state.engine.module),
                            "scores": scored.scores, "details": metrics["details"], "thresholds": scored.thresholds}
            if evaluate_test and best is not None and len(state.data.test):
                load_trainable_state(state.engine.module, best["weights"])
                test = self.test_scores(trial, state, best)
                details = {**json.loads(best["details"]), "test": test.details}
                metrics = {**metrics, **test.scores, "test_epoch": best["epoch"],
                           **{f"best_{name}": value for name, value in best["scores"].items()},
                           "best_details": json.dumps(finite_or_none(details)), **test.extra,
                           **kept.write(test.kept)}
            return metrics
        finally:
            self.trials_run += 1
            self.release(state)
            state = None

    # -- what every trial does ---------------------------------------------------------------
    def memory(self) -> dict[str, float]:
        """This worker's resident memory and (on GPUs) the trial's peak GPU memory, in MiB."""
        usage = {"worker_rss_mb": psutil.Process().memory_info().rss / 2**20}
        if self.use_gpu:
            usage["gpu_memory_mb"] = torch.cuda.max_memory_allocated(self.ctx.device) / 2**20
            usage["gpu_reserved_mb"] = torch.cuda.memory_reserved(self.ctx.device) / 2**20
        return usage

    def release(self, state: Any) -> None:
        """Frees what a trial allocated (its model, optimizer and engine); the shared set-up stays."""
        if state is not None:
            destroy = getattr(state.engine, "destroy", None)
            if callable(destroy):
                try:
                    destroy()  # removes ZeRO-3's hooks and buffers
                except Exception as exc:  # noqa: BLE001  (best effort: the memory goes below anyway)
                    log.debug("engine.destroy failed: %s", exc)
            state.engine = None
        gc.collect()
        if self.use_gpu:
            torch.cuda.empty_cache()


class _KeptPredictions:
    """Where a trial's per-image predictions go (None: not kept on this rank) and the best
    validation value whose predictions are there."""

    def __init__(self, folder: str | None, best_value: float | None) -> None:
        self.folder, self.best_value = folder, best_value

    def epoch_scored(self, value: float, mode: str, predictions: SplitPredictions | None) -> dict[str, Any]:
        """Keeps an epoch's validation predictions if it is the best so far; the metrics to add."""
        if better(value, self.best_value, mode):
            self.best_value = value
            return self.write(predictions)
        return {"predictions": self.folder} if self.folder and self.best_value is not None else {}

    def write(self, predictions: SplitPredictions | None) -> dict[str, Any]:
        if self.folder is None or predictions is None:
            return {}
        try:
            write_predictions(self.folder, predictions)
        except OSError as exc:  # a full disk, a lost bucket: a row must not point at a missing file
            raise TrialFailed(f"cannot write the {predictions.split} predictions to {self.folder} ({exc})") from None
        return {"predictions": self.folder}


class Resumed:
    """What a resumed trial takes over from the epochs it recorded before (none for a fresh trial).

    Args:
        history: every recorded epoch's metrics, oldest first (the trial record's).
        start_epoch: the epoch of the checkpoint the trial resumed from; later records are dropped.
    """

    def __init__(self, history: list[dict[str, Any]] | None, start_epoch: int) -> None:
        self.epochs = [dict(m) for m in history or [] if int(m["epoch"]) <= start_epoch]

    @property
    def train_time_s(self) -> float:
        return float(self.epochs[-1].get("train_time_s") or 0.0) if self.epochs else 0.0

    @property
    def last_metrics(self) -> dict[str, Any]:
        return dict(self.epochs[-1]) if self.epochs else {}

    def best_entry(self, trial: TrialConfig) -> dict[str, Any] | None:
        """The recorded epoch with the best ``trial.metric`` (None before any finite value)."""
        chosen: dict[str, Any] | None = None
        for entry in self.epochs:
            value = entry.get(trial.metric)
            if value is not None and better(value, None if chosen is None else chosen[trial.metric], trial.mode):
                chosen = entry
        return chosen

    def best_value(self, trial: TrialConfig) -> float | None:
        """The best recorded value of ``trial.metric`` (None before any finite one)."""
        chosen = self.best_entry(trial)
        return None if chosen is None else chosen[trial.metric]

    def best(self, trial: TrialConfig, checkpoint_of: CheckpointOf | None,
             score_names: tuple[str, ...]) -> dict[str, Any] | None:
        """The best recorded epoch as :meth:`Recipe.run` keeps it (value, epoch, weights, scores,
        details), its weights read from its checkpoint; None before any finite value.

        Raises:
            TrialFailed: that epoch's checkpoint is gone (retention keeps the best: it should not be).
        """
        chosen = self.best_entry(trial)
        if chosen is None:
            return None
        epoch = int(chosen["epoch"])
        if checkpoint_of is None:  # scoring a later epoch on the test split instead would be wrong, silently
            raise TrialFailed(f"resumed after epoch {self.epochs[-1]['epoch']}, the trial's best epoch {epoch} "
                              "has no checkpoint to score on the test split; run it again")
        try:
            weights = load_file(str(checkpoint_of(epoch) / WEIGHTS_FILE))
        except (OSError, FileNotFoundError) as exc:
            raise TrialFailed(f"the checkpoint of best epoch {epoch} cannot be read to resume the trial "
                              f"({exc})") from None
        return {"value": chosen[trial.metric], "epoch": epoch, "weights": weights,
                "scores": {name: chosen.get(name) for name in score_names}, "details": chosen.get("details") or "{}"}
