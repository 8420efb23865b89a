"""The YAML ``space`` as an Optuna define-by-run function, and the Optuna sampler.

Define-by-run (a function that calls ``trial.suggest_*``) rather than a static dict, so that a
parameter can depend on another one (conditional spaces: a method's options searched only when
that method is chosen).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from medpeft_ray.config import CategoricalDistribution, Distribution, FloatDistribution, IntDistribution, SearchSettings

if TYPE_CHECKING:
    import optuna


class SpaceSampler:
    """Callable ``(optuna.Trial) -> None`` that suggests every searched parameter.

    A class rather than a closure so Tune can pickle it into the searcher's checkpoint.
    """

    def __init__(self, distributions: dict[str, Distribution]) -> None:
        self.distributions = dict(distributions)

    def __call__(self, trial: "optuna.Trial") -> dict[str, Any] | None:
        for name, dist in self.distributions.items():
            if isinstance(dist, FloatDistribution):
                trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)
            elif isinstance(dist, IntDistribution):
                trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
            elif isinstance(dist, CategoricalDistribution):
                trial.suggest_categorical(name, dist.choices)
        return None


def make_sampler(settings: SearchSettings) -> "optuna.samplers.BaseSampler":
    """The Optuna sampler named by ``search.sampler``, seeded."""
    import optuna

    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=settings.seed)
    # TPE models the space from its own history after a few random trials; with small budgets
    # waiting for Optuna's default 10 would make the whole search random.
    startup = max(2, min(10, settings.num_samples // 3))
    return optuna.samplers.TPESampler(seed=settings.seed, multivariate=True, n_startup_trials=startup)
