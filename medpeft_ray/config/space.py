"""The searched hyperparameters of one search, built once from its config.

A search chooses among one or more methods; each has its own parameters (its default space less
the options the YAML fixes, plus the YAML's ``space``), and parameters shared by all methods (an
unprefixed ``lr``). One method is the case of a single choice: nothing chooses it, and its
parameters need no prefix. With several, ``method`` is itself searched and a method's own
parameter is named ``<method>.<field>``, so that Optuna's storage, its samplers and the
leaderboard see each method's parameters only in the trials that chose it.

:class:`SearchSpace` owns that naming (the only place that makes or reads ``<method>.<field>``),
the parsed distributions, how a sampled point becomes a :class:`TrialConfig`, the grid, which
values a point may take, and how a recorded trial maps onto this search's names (warm start).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Protocol, Sequence

from medpeft_ray.config.distributions import (
    DISTRIBUTIONS,
    CategoricalDistribution,
    Distribution,
    FloatDistribution,
    IntDistribution,
    distribution_contains,
    grid_points,
)
from medpeft_ray.config.sections import (
    METHOD_PARAM,
    SEARCHABLE_TRAIN_FIELDS,
    DatasetConfig,
    MethodConfig,
    ModelConfig,
    SearchSettings,
    TrainConfig,
)
from medpeft_ray.config.trial import TrialConfig, TrialFid
from medpeft_ray.methods.registry import get_method
from medpeft_ray.models.families import require_family


class SearchedConfig(Protocol):
    """What a search space reads of its search's config (``SearchConfig``, which builds the space and
    so is not imported here)."""

    @property
    def experiment_name(self) -> str: ...
    dataset: DatasetConfig
    model: ModelConfig
    method: MethodConfig
    train: TrainConfig
    search: SearchSettings
    space: dict[str, dict[str, Any]] | None


class Suggests(Protocol):
    """What define-by-run needs of an Optuna trial (``optuna.Trial``); no Optuna import here."""

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False) -> float: ...
    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...
    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...


def scope_of(name: str, methods: Sequence[str]) -> tuple[str | None, str]:
    """(method, field) of a searched parameter's name among ``methods``; method is None for a shared one.

    Only a search of several methods scopes names: with one, ``lora.rank`` would be no name at all.
    """
    scope, sep, field = name.partition(".")
    if sep and len(methods) > 1 and scope in methods:
        return scope, field
    return None, name


def suggest(trial: Suggests, distributions: dict[str, Distribution], methods: Sequence[str]) -> str | None:
    """Suggests every parameter of ``distributions`` on ``trial``; returns the chosen method (several methods).

    ``method`` comes first in ``distributions`` when several are searched; a parameter of a method
    the trial did not choose is not suggested at all.
    """
    chosen = None
    for name, dist in distributions.items():
        scope, _ = scope_of(name, methods)
        if scope is not None and scope != chosen:
            continue  # a parameter of a method this trial did not choose
        if name == METHOD_PARAM and len(methods) > 1:
            chosen = trial.suggest_categorical(name, dist.choices)  # type: ignore[union-attr]
        elif isinstance(dist, FloatDistribution):
            trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)
        elif isinstance(dist, IntDistribution):
            trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
        elif isinstance(dist, CategoricalDistribution):
            trial.suggest_categorical(name, dist.choices)
    return chosen


class SearchSpace:
    """The searched parameters of ``config`` (a validated :class:`SearchConfig`: ``config.search_space``)."""

    def __init__(self, config: SearchedConfig) -> None:
        self.config = config
        self.methods: list[str] = config.method.names
        self.family: str = require_family(config.model.backbone).name

    @property
    def several_methods(self) -> bool:
        """The method is itself searched (``method``), and method parameters are scoped."""
        return len(self.methods) > 1

    # -- names --------------------------------------------------------------------------------

    def param_name(self, method: str, field: str) -> str:
        """The searched name of ``method``'s own parameter ``field``."""
        return f"{method}.{field}" if self.several_methods else field

    def scope(self, name: str) -> tuple[str | None, str]:
        """(method, field) of a searched name; method is None for a parameter shared by all methods."""
        return scope_of(name, self.methods)

    # -- the space ----------------------------------------------------------------------------

    @cached_property
    def raw(self) -> dict[str, dict[str, Any]]:
        """The searched parameters as the YAML writes distributions (before they are parsed).

        Each method contributes its default space less the options the YAML fixes; the YAML's
        ``space`` adds to and overrides these, and an unprefixed name (``lr``) searched with several
        methods is one parameter shared by all, replacing their own ranges of it. With one method,
        a YAML ``space`` replaces the default space entirely.
        """
        config = self.config
        if not self.several_methods and config.space is not None:
            return config.space
        space: dict[str, dict[str, Any]] = {}
        for method in self.methods:
            fixed = config.method.options_for(method)
            try:
                default = get_method(method).space_for(self.family, config.train.optimizer)
            except KeyError:  # an unknown method: reported by validation
                continue
            space.update({self.param_name(method, name): dist for name, dist in default.items() if name not in fixed})
        for name, dist in (config.space or {}).items():
            if self.scope(name)[0] is None:
                for method in self.methods:
                    space.pop(self.param_name(method, name), None)
            space[name] = dist
        return space

    @cached_property
    def distributions(self) -> dict[str, Distribution]:
        """The searched parameters, parsed (after validation); ``method`` first when several are searched."""
        parsed = {name: DISTRIBUTIONS[d["type"]].model_validate(d) for name, d in self.raw.items()}
        if self.several_methods:
            return {METHOD_PARAM: CategoricalDistribution(type="categorical", choices=self.methods), **parsed}  # type: ignore[dict-item]
        return parsed  # type: ignore[return-value]

    def suggest(self, trial: Suggests) -> str | None:
        """Define-by-run: suggests this space's parameters on an Optuna trial."""
        return suggest(trial, self.distributions, self.methods)

    def grid(self, space_key: str = "space") -> dict[str, list[Any]]:
        """Each searched parameter's values for ``search.sampler: grid``."""
        return grid_points(self.distributions, space_key)

    def first_point(self, method: str) -> dict[str, Any]:
        """Every parameter at its first choice or lower bound, with ``method`` chosen.

        Pre-flight applies each method at this point, to catch options that do not fit the
        backbone (a block index past its depth) before any trial starts.
        """
        point = {name: dist.choices[0] if isinstance(dist, CategoricalDistribution) else dist.low
                 for name, dist in self.distributions.items()}
        return {**point, METHOD_PARAM: method}

    def within(self, point: dict[str, Any]) -> dict[str, Any]:
        """The part of ``point`` this space searches, at values its distributions can take."""
        dists = self.distributions
        return {name: value for name, value in point.items() if name in dists and distribution_contains(dists[name], value)}

    def point_from_record(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """A recorded trial's (method, sampled params) in this search's parameter names.

        A trial of a one-method search recorded ``rank``; of a several-method search ``lora.rank``
        and ``method``: either becomes ``rank`` here with one method, ``lora.rank`` with several.
        A method this search does not try gives no point.
        """
        if method not in self.methods:
            return {}
        point: dict[str, Any] = {METHOD_PARAM: method} if self.several_methods else {}
        prefix = f"{method}."
        for name, value in params.items():
            if name == METHOD_PARAM:
                continue
            field = name[len(prefix):] if name.startswith(prefix) else name
            scoped = self.param_name(method, field)
            point[scoped if scoped in self.raw else field] = value
        return point

    # -- trials -------------------------------------------------------------------------------

    def trial_config(self, label_ratio: float, sampled: dict[str, Any]) -> TrialConfig:
        """The complete configuration of one trial: the fixed settings with ``sampled`` applied.

        Raises:
            KeyError: a sampled name that is neither a method option nor a searchable train field.
        """
        config = self.config
        chosen = str(sampled.get(METHOD_PARAM, self.methods[0]))
        method_fields = get_method(chosen).options.model_fields
        method_options = config.method.options_for(chosen)
        train = {**config.train.model_dump(), "epochs": config.train.epochs_for(label_ratio)}
        for name, value in sampled.items():
            if name == METHOD_PARAM:
                continue
            scope, field = self.scope(name)
            if scope is not None and scope != chosen:
                continue  # another method's parameter
            if field in method_fields and (scope is not None or not self.several_methods):
                method_options[field] = value
            elif field in SEARCHABLE_TRAIN_FIELDS:
                train[field] = value
            else:
                raise KeyError(f"sampled parameter {name!r} is neither a method option nor a train field")
        epochs = config.train.epochs_for(label_ratio)
        search = config.search
        fid = None
        if require_family(config.model.backbone).task == "generation":
            fid = TrialFid(**search.fid.model_dump(), weights=search.fid_weights, epochs=search.fid_epochs(epochs))
        return TrialConfig(
            experiment=config.experiment_name,
            label_ratio=label_ratio,
            dataset=config.dataset.model_copy(update={"label_ratios": [label_ratio]}),
            model=config.model,
            method=MethodConfig(name=chosen, options=method_options),
            train=TrainConfig.model_validate(train),
            metric=config.search.metric,
            fid=fid,
        )
