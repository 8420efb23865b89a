"""The recipe of a trial's kind: :class:`TrialRecipe` for classifiers, :class:`GenerationRecipe` for diffusion U-Nets.

Every place that trains (a cold trial's worker, a warm executor, ``train --config``) makes its
recipe here, so which recipe trains a trial is decided once, by the trial's backbone family.
"""

from __future__ import annotations

import time
from typing import Any

from medpeft_ray.config import TrialConfig
from medpeft_ray.train.engine import ReportFn, WorkerContext
from medpeft_ray.train.generation import GenerationRecipe
from medpeft_ray.train.recipe import TrialRecipe


def make_recipe(trial: TrialConfig, ctx: WorkerContext, control_group: Any = None) -> TrialRecipe:
    """A fresh recipe for trials like ``trial`` on this worker."""
    kind = GenerationRecipe if trial.generation else TrialRecipe
    return kind(ctx, control_group)


def run_training(trial: TrialConfig, ctx: WorkerContext, report: ReportFn, evaluate_test: bool = False,
                 history: list[dict[str, Any]] | None = None, predictions_to: str | None = None) -> dict[str, Any]:
    """Trains one trial on a fresh recipe (a cold trial, a test, ``train --config``); see :meth:`TrialRecipe.run`
    (``history``: the epochs recorded before ``ctx.resume_from``; ``predictions_to``: where the
    per-image predictions are kept)."""
    started = {**(ctx.started or {})}
    started.setdefault("recipe_setup", time.time())
    recipe = make_recipe(trial, ctx)
    started["deepspeed_import"] = time.time()
    return recipe.run(trial, report, evaluate_test=evaluate_test, resume_from=ctx.resume_from,
                      dataset_key=ctx.dataset_key, started=started, history=history, predictions_to=predictions_to)
