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

- :mod:`.halving`: the scheduler's expected epochs and each study's trials (pure arithmetic);
- :mod:`.estimate`: the forecast's figures and :func:`forecast`, the arithmetic alone (step times
  in, forecast out); :mod:`.lines`: the forecast as text (:func:`forecast_lines`);
- :mod:`.recorded`: start-up and epoch times of earlier trials, from the leaderboard;
- :mod:`.timing`: timing the steps with the real recipe (imports the training floor);
- :mod:`.dry_run`: the command's loop over a search or a grid's cells (imported by itself, as
  it imports the search's pre-flight, which imports this package).
"""

from medpeft_ray.search.forecast.estimate import (
    DEFAULT_EXECUTOR_SETUP_S,
    DEFAULT_WARM_STARTUP_S,
    HIGH_FACTOR,
    LOW_FACTOR,
    MethodTiming,
    SearchForecast,
    StartupFigures,
    StudyForecast,
    actual_costs,
    devices_per_trial,
    forecast,
)
from medpeft_ray.search.forecast.halving import (
    expected_epochs,
    expected_fid_runs,
    halving_epoch_shares,
    halving_epochs_per_trial,
    halving_milestones,
    study_trials,
)
from medpeft_ray.search.forecast.lines import forecast_lines
from medpeft_ray.search.forecast.recorded import recorded_epoch_seconds, recorded_forecast, startup_figures

__all__ = [
    "DEFAULT_EXECUTOR_SETUP_S", "DEFAULT_WARM_STARTUP_S", "HIGH_FACTOR", "LOW_FACTOR", "MethodTiming", "SearchForecast",
    "StartupFigures", "StudyForecast", "actual_costs", "devices_per_trial", "expected_epochs", "expected_fid_runs",
    "forecast", "forecast_lines", "halving_epoch_shares", "halving_epochs_per_trial", "halving_milestones", "recorded_epoch_seconds",
    "recorded_forecast", "startup_figures", "study_trials",
]
