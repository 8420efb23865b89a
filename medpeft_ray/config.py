"""The search-space YAML: typed schema, validation with messages that name the key, trial configs.

``load_search_config(path)`` validates the whole file (structure, ranges, method and dataset
options, searched parameters, paths) without importing torch or Ray, and raises
:class:`ConfigError` as ``<file>: <key.path>: <message>``. A search turns it into one
:class:`TrialConfig` per trial, which is all a worker ever sees.
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medpeft_ray.data.registry import get_dataset
from medpeft_ray.errors import ConfigError
from medpeft_ray.methods.registry import MethodOptions, get_method
from medpeft_ray.models.families import require_family
from medpeft_ray.ranking import METRIC_DIRECTION

# Importing the packages registers the built-in methods and datasets.
import medpeft_ray.data  # noqa: E402,F401  isort: skip
import medpeft_ray.methods  # noqa: E402,F401  isort: skip


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------------------------
# Sections shared by the search YAML and a single trial
# ----------------------------------------------------------------------------------------------


class DatasetConfig(_Strict):
    name: str = Field("synthetic", description="dataset format (synthetic, folder, ...)")
    root: Path | None = Field(None, description="dataset folder as downloaded from its publisher")
    label_ratios: list[float] = Field(
        default_factory=lambda: [1.0], min_length=1, description="fractions of the training labels to use"
    )
    image_size: int = Field(224, ge=16, le=1024, description="input side in pixels")
    seed: int = Field(0, description="seed of splits and label-ratio subsets")
    options: dict[str, Any] = Field(default_factory=dict, description="format-specific options")

    @field_validator("label_ratios")
    @classmethod
    def _ratios(cls, ratios: list[float]) -> list[float]:
        for r in ratios:
            if not 0.0 < r <= 1.0:
                raise ValueError(f"every label ratio must be in (0, 1], got {r}")
        if len(set(ratios)) != len(ratios):
            raise ValueError("label ratios must be distinct")
        return ratios


class ModelConfig(_Strict):
    backbone: str = Field("vit_base_patch16_224", description="timm model name")
    checkpoint: Path | None = Field(None, description="local pre-trained weights (.pth/.safetensors)")
    # Grey-level normalisation the backbone was pre-trained with (MRM: 0.4978/0.2449, MAE: 0.4785/0.2834).
    mean: float = Field(0.5, ge=0, le=1, description="grey-level mean for input normalisation")
    std: float = Field(0.25, gt=0, le=1, description="grey-level std for input normalisation")

    @field_validator("backbone")
    @classmethod
    def _family(cls, name: str) -> str:
        require_family(name)  # ValueError naming what the families cover
        return name


#: the searched parameter that chooses the method when ``method.name`` lists several
METHOD_PARAM = "method"


class MethodConfig(_Strict):
    name: str | list[str] = Field(
        "lora", description="PEFT method (see `medpeft-ray methods`), or a list of methods to choose among"
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="fixed method options; with several methods, per method: {lora: {alpha: 32}}"
    )

    @field_validator("name")
    @classmethod
    def _names(cls, name: str | list[str]) -> str | list[str]:
        if isinstance(name, list):
            if not name:
                raise ValueError("must name at least one method")
            if len(set(name)) != len(name):
                raise ValueError("lists a method twice")
            if len(name) == 1:
                return name[0]
        return name

    @property
    def names(self) -> list[str]:
        return [self.name] if isinstance(self.name, str) else list(self.name)

    @property
    def is_choice(self) -> bool:
        """Several methods: the method is itself a searched categorical (``method``)."""
        return isinstance(self.name, list)

    def options_for(self, method: str) -> dict[str, Any]:
        """The fixed options of ``method``."""
        return dict(self.options.get(method) or {}) if self.is_choice else dict(self.options)


class DeepSpeedConfig(_Strict):
    zero_stage: int = Field(0, ge=0, le=3, description="ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters")
    offload_optimizer: Literal["none", "cpu"] = Field(
        "none", description="keep optimizer state (and its step) in CPU memory; needs zero_stage >= 1"
    )
    offload_param: Literal["none", "cpu"] = Field("none", description="keep parameters in CPU memory; needs zero_stage 3")
    gradient_clipping: float = Field(1.0, ge=0, description="max gradient norm (0 = off)")
    gradient_accumulation_steps: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> "DeepSpeedConfig":
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ValueError("offload_optimizer: needs zero_stage 1, 2 or 3 (ZeRO owns the state it offloads)")
        if self.offload_param != "none" and self.zero_stage != 3:
            raise ValueError("offload_param: needs zero_stage 3 (only stage 3 partitions parameters)")
        return self


class TrainConfig(_Strict):
    epochs: int = Field(3, ge=1, description="epochs per trial (the ASHA budget)")
    batch_size: int = Field(32, ge=1, description="global batch size (split across a trial's workers)")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0, description="learning rate (absolute)")
    weight_decay: float = Field(0.05, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up, then cosine to min_lr")
    min_lr: float = Field(1e-6, ge=0)
    layer_decay: float = Field(
        1.0, gt=0, le=1, description="layer-wise lr decay: block i of L trains at lr x decay^(L - i) (MAE recipe: 0.65)"
    )
    drop_path: float = Field(0.0, ge=0, lt=1)
    augment: Literal["crop_flip", "randaug", "flip", "none"] = Field(
        "crop_flip",
        description="crop_flip: random-resized crop (scale 0.6-1) + horizontal flip (SGD recipe); randaug: that plus "
        "RandAugment m9-mstd0.5 and random erasing 0.25 (AdamW/MAE recipe); flip only; or none",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    eval_batch_size: int = Field(128, ge=1)
    seed: int = Field(0, description="seed of initialisation, shuffling and augmentation")
    deterministic: bool = Field(
        False, description="deterministic kernels only (torch.use_deterministic_algorithms): same seed, same numbers, slower on GPU"
    )
    checkpoints_to_keep: int = Field(2, ge=1, description="per trial: the best epochs' checkpoints kept in storage")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)

    @model_validator(mode="after")
    def _lr_floor(self) -> "TrainConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        return self


#: ``train`` fields a ``space`` may search; anything else in ``space`` must be a method option.
SEARCHABLE_TRAIN_FIELDS = ("lr", "weight_decay", "momentum", "warmup_epochs", "layer_decay", "drop_path", "batch_size")


# ----------------------------------------------------------------------------------------------
# Search-only sections
# ----------------------------------------------------------------------------------------------


class FloatDistribution(_Strict):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)


class IntDistribution(_Strict):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)


class CategoricalDistribution(_Strict):
    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1)

    @field_validator("choices")
    @classmethod
    def _plain(cls, choices: list[Any]) -> list[Any]:
        # Optuna stores categorical choices as JSON scalars; lists are joined by the user instead.
        for c in choices:
            if not (c is None or isinstance(c, (bool, int, float, str))):
                raise ValueError(f"choices must be numbers, strings, booleans or null, got {c!r}")
        return choices


Distribution = FloatDistribution | IntDistribution | CategoricalDistribution
_DISTRIBUTIONS: dict[str, type[_Strict]] = {
    "float": FloatDistribution,
    "int": IntDistribution,
    "categorical": CategoricalDistribution,
}


class SchedulerConfig(_Strict):
    type: Literal["asha", "hyperband", "median", "none"] = Field(
        "asha",
        description="asha: successive halving at epoch rungs; hyperband: asynchronous HyperBand (several ASHA "
        "brackets of different aggressiveness); median: stop a trial below the median of others at the same epoch; none",
    )
    grace_period: int = Field(1, ge=1, description="epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="asha/hyperband: 1/reduction_factor of trials go on at each rung")
    brackets: int = Field(3, ge=1, description="hyperband: number of brackets")
    min_samples: int = Field(3, ge=1, description="median: trials that must have reached an epoch before any is stopped there")


class ConfirmConfig(_Strict):
    """Re-training each study's best configurations with several seeds before one is chosen."""

    top_k: int = Field(3, ge=1, description="the study's best configurations re-trained")
    seeds: int = Field(3, ge=2, description="seeds each is trained with: train.seed, train.seed + 1, ...")


class WarmStartConfig(_Strict):
    """Seeding each study with configurations that did well before (tried first, then TPE goes on)."""

    from_leaderboard: bool = Field(
        False,
        description="the best configs of this dataset and backbone at the same label ratio in earlier experiments, "
        "and of this search's already searched (neighbouring) label ratios",
    )
    top_k: int = Field(2, ge=1, description="configurations taken from each source")


class SearchSettings(_Strict):
    num_samples: int = Field(8, ge=1, description="trials per label ratio")
    sampler: Literal["tpe", "random", "cmaes", "gp", "grid"] = Field(
        "tpe", description="tpe (multivariate), random, cmaes, gp (Gaussian process), grid (every combination)"
    )
    seed: int = 0
    metric: Literal["val_auroc", "val_loss"] = "val_auroc"
    mode: Literal["max", "min"] | None = Field(
        None, description="the metric's direction (max for val_auroc, min for val_loss); may be given, not changed"
    )
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    max_concurrent: int | None = Field(None, ge=1, description="default: what the cluster's free resources allow")
    also_minimize: list[Literal["trainable_params", "train_time_s"]] = Field(
        default_factory=list,
        description="further objectives, minimised while the metric is optimised (multi-objective: Optuna keeps the "
        "Pareto front); trainable_params, or train_time_s (seconds of training per worker: GPU-seconds on GPUs)",
    )
    time_budget_s: float | None = Field(
        None, gt=0, description="wall time after which no new trial starts (split evenly over the label ratios)"
    )
    max_trials: int | None = Field(None, ge=1, description="trials over all label ratios (split evenly over them)")
    points_to_evaluate: list[dict[str, Any]] = Field(
        default_factory=list, description="configurations every study tries first, e.g. [{lr: 0.003, rank: 8}]"
    )
    warm_start: "WarmStartConfig" = Field(default_factory=lambda: WarmStartConfig())
    confirm: ConfirmConfig | None = Field(
        None, description="re-train the top_k configurations with several seeds and choose by their mean; test-score the choice"
    )

    @property
    def resolved_mode(self) -> str:
        """The metric's direction: the one the leaderboard, confirmation and checkpoint retention rank by."""
        return METRIC_DIRECTION[self.metric]

    @property
    def objectives(self) -> tuple[list[str], list[str]]:
        """(metrics, modes) Optuna optimises: the metric, then each ``also_minimize``."""
        return [self.metric, *self.also_minimize], [self.resolved_mode, *["min"] * len(self.also_minimize)]

    @model_validator(mode="after")
    def _objectives(self) -> "SearchSettings":
        if len(set(self.also_minimize)) != len(self.also_minimize):
            raise ValueError("also_minimize: lists an objective twice")
        if self.also_minimize and self.sampler == "cmaes":
            raise ValueError("sampler: cmaes optimises one objective; use tpe, random, gp or grid with also_minimize")
        direction = METRIC_DIRECTION[self.metric]
        if self.mode is not None and self.mode != direction:
            # the leaderboard, `best` and confirmation rank by the metric's own direction; a search
            # optimising the other way would pick the worst trials as its best
            raise ValueError(f"mode: {self.metric} is {'maximised' if direction == 'max' else 'minimised'} "
                             f"(mode {direction}); got {self.mode}")
        return self


#: Ray's own resources, which ``custom_per_worker`` must not name (they have keys or are not per worker).
_BUILTIN_RESOURCES = {
    "CPU": "set it with resources.cpus_per_worker",
    "GPU": "set it with resources.gpus_per_worker",
    "memory": "not a per-worker request here; pick a node type with enough memory",
    "object_store_memory": "not a per-worker request here; pick a node type with enough memory",
}


class ResourcesConfig(_Strict):
    workers_per_trial: int = Field(1, ge=1, description="data-parallel workers of one trial")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float | Literal["auto"] = Field(
        "auto", description="GPUs per worker; fractions share a GPU; auto: 1 if the cluster has or can add GPUs, else 0"
    )

    custom_per_worker: dict[str, Annotated[float, Field(gt=0, allow_inf_nan=False)]] = Field(
        default_factory=dict,
        description="other Ray resources each worker asks for, e.g. {'accelerator_type:A100': 0.001} to pin a GPU model",
    )
    max_failures: int = Field(
        2, ge=-1, description="restarts of a trial from its last checkpoint after a lost worker or node (-1: no limit)"
    )
    worker_start_timeout_s: float = Field(
        1800.0, gt=0, description="how long each start of a trial's workers may wait for resources (new nodes)"
    )
    warm_executors: bool = Field(
        True, description="train trials on long-lived executors that keep imports, data and the pre-trained backbone "
        "loaded (false: every trial is a cold Ray Train run of its own)"
    )
    executor_idle_s: float = Field(
        60.0, gt=0, description="an executor with no trial for this long exits, giving its resources (and node) back"
    )

    @field_validator("gpus_per_worker")
    @classmethod
    def _gpus(cls, value: float | str) -> float | str:
        if isinstance(value, float) and (value < 0 or (value > 1 and not value.is_integer())):
            raise ValueError("must be 'auto', a fraction in [0, 1] or a whole number of GPUs")
        return value


class SearchConfig(_Strict):
    """The whole search-space YAML."""

    experiment: str | None = Field(None, description="name of the search (default: the YAML file's stem)")
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    space: dict[str, dict[str, Any]] | None = Field(
        None, description="searched hyperparameters (default: the method's default ranges)"
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    search: SearchSettings = Field(default_factory=SearchSettings)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, name: str | None) -> str | None:
        if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name):
            raise ValueError("must be 1-100 letters, digits, '_', '.' or '-' (it names folders)")
        return name

    def distributions(self) -> dict[str, Distribution]:
        """The searched hyperparameters as parsed distributions (call after validation).

        With several methods, ``method`` comes first: the other parameters depend on it.
        """
        parsed = {name: _DISTRIBUTIONS[d["type"]].model_validate(d) for name, d in self.raw_space().items()}
        if self.method.is_choice:
            return {METHOD_PARAM: CategoricalDistribution(type="categorical", choices=self.method.names), **parsed}  # type: ignore[dict-item]
        return parsed  # type: ignore[return-value]

    def raw_space(self) -> dict[str, dict[str, Any]]:
        """The searched parameters as raw distributions.

        One method: the YAML's ``space``, or else the method's default space less the options the
        YAML fixes. Several methods: each method's default space, its parameters named
        ``<method>.<name>`` and searched only when that method is chosen, less fixed options; the
        YAML's ``space`` adds to and overrides these, and an unprefixed name (``lr``) is one
        parameter shared by all methods, replacing their own ranges of it.
        """
        family = require_family(self.model.backbone).name
        if not self.method.is_choice:
            if self.space is not None:
                return self.space
            default = get_method(self.method.name).space_for(family)
            return {name: dist for name, dist in default.items() if name not in self.method.options}
        space: dict[str, dict[str, Any]] = {}
        for method in self.method.names:
            fixed = self.method.options_for(method)
            try:
                default = get_method(method).space_for(family)
            except KeyError:  # an unknown method: reported by validation
                continue
            space.update({f"{method}.{name}": dist for name, dist in default.items() if name not in fixed})
        for name, dist in (self.space or {}).items():
            if "." not in name:
                for method in self.method.names:
                    space.pop(f"{method}.{name}", None)
            space[name] = dist
        return space

    def split_param(self, name: str) -> tuple[str | None, str]:
        """(method, field) of a searched parameter's name; method is None for a shared one."""
        scope, sep, field = name.partition(".")
        if sep and self.method.is_choice and scope in self.method.names:
            return scope, field
        return None, name

    def trial_config(self, label_ratio: float, sampled: dict[str, Any]) -> "TrialConfig":
        """The complete configuration of one trial: the fixed settings with ``sampled`` applied."""
        chosen = str(sampled.get(METHOD_PARAM, self.method.names[0]))
        method_fields = get_method(chosen).options.model_fields
        method_options = self.method.options_for(chosen)
        train = self.train.model_dump()
        for name, value in sampled.items():
            if name == METHOD_PARAM:
                continue
            scope, field = self.split_param(name)
            if scope is not None and scope != chosen:
                continue  # another method's parameter
            if field in method_fields and (scope is not None or not self.method.is_choice):
                method_options[field] = value
            elif field in SEARCHABLE_TRAIN_FIELDS:
                train[field] = value
            else:
                raise KeyError(f"sampled parameter {name!r} is neither a method option nor a train field")
        return TrialConfig(
            experiment=self.experiment or "search",
            label_ratio=label_ratio,
            dataset=self.dataset.model_copy(update={"label_ratios": [label_ratio]}),
            model=self.model,
            method=MethodConfig(name=chosen, options=method_options),
            train=TrainConfig.model_validate(train),
            metric=self.search.metric,
        )


class TrialConfig(_Strict):
    """Everything one trial's workers need; the leaderboard stores it and ``train`` re-runs it."""

    experiment: str
    label_ratio: float = Field(gt=0, le=1)
    dataset: DatasetConfig
    model: ModelConfig
    method: MethodConfig
    train: TrainConfig
    metric: Literal["val_auroc", "val_loss"] = Field(
        "val_auroc", description="the validation metric that picks the trial's best epoch (the search's search.metric)"
    )

    @field_validator("method")
    @classmethod
    def _one_method(cls, method: MethodConfig) -> MethodConfig:
        if method.is_choice:
            raise ValueError("name: a trial trains one method, not a list")
        return method

    @property
    def family(self) -> str:
        return require_family(self.model.backbone).name

    @property
    def mode(self) -> str:
        """``max`` or ``min``: which way ``metric`` is better."""
        return METRIC_DIRECTION[self.metric]


# ----------------------------------------------------------------------------------------------
# Loading and validation
# ----------------------------------------------------------------------------------------------


def load_search_config(path: str | Path, experiment: str | None = None) -> SearchConfig:
    """Reads and validates a search-space YAML; raises :class:`ConfigError` naming file and key.

    ``experiment`` replaces the YAML's experiment name (validated like it).
    """
    path = Path(path)

    def load() -> SearchConfig:
        raw = _read_yaml(path)
        if experiment is not None and isinstance(raw, dict):
            raw = {**raw, "experiment": experiment}
        return _validate_search(raw, path)

    return _with_file(path.name, load)


def load_trial_config(path: str | Path) -> TrialConfig:
    """Reads a single-trial YAML (``medpeft-ray best --out``, or a hand-written one) and validates it.

    The file holds one :class:`TrialConfig` (experiment, label_ratio, dataset, model, method,
    train); it is checked like a search YAML with nothing searched, so the same bad key, path or
    option gives the same one-line error.
    """
    path = Path(path)

    def load() -> TrialConfig:
        raw = _read_yaml(path)
        if not isinstance(raw, dict):
            raise ConfigError("", f"must be a mapping of sections, got {type(raw).__name__}")
        trial = parse_section(TrialConfig, raw, "")
        search = {**raw, "dataset": {**raw["dataset"], "label_ratios": [trial.label_ratio]}, "space": {},
                  "search": {"metric": trial.metric}}
        for key in ("label_ratio", "metric"):
            search.pop(key, None)
        return _validate_search(search, path).trial_config(trial.label_ratio, {})

    return _with_file(path.name, load)


def validate_search_dict(raw: Any, source: str = "<config>", base_dir: Path | None = None) -> SearchConfig:
    """Validates an already-parsed mapping (from a YAML file or a test)."""
    return _with_file(source, lambda: _validate_search(raw, base_dir))


def _with_file(file: str, fn: Any) -> Any:
    try:
        return fn()
    except ConfigError as err:
        raise err.with_file(err.file or file) from None


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError("", "file not found", str(path))
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(where, f"not valid YAML: {problem}", path.name) from None
    except UnicodeDecodeError:
        raise ConfigError("", "not a text file", path.name) from None
    if raw is None:
        # an empty file is a mistake (a failed copy, the wrong file), not a request for every default
        raise ConfigError("", "no settings: the file is empty or holds only comments", path.name)
    return raw


def _validate_search(raw: Any, source: Path | None) -> SearchConfig:
    if not isinstance(raw, dict):
        raise ConfigError("", f"must be a mapping of sections, got {type(raw).__name__}")
    config = parse_section(SearchConfig, raw, "")
    base_dir = source.parent if source is not None and source.suffix else source
    if config.experiment is None and source is not None and source.suffix:
        config = config.model_copy(update={"experiment": source.stem})
    return _check_semantics(config, base_dir)


def _check_semantics(config: SearchConfig, base_dir: Path | None) -> SearchConfig:
    """Checks that span sections: registry names, options, searched parameters, files."""
    # dataset: a registered format, its options, its root
    try:
        dataset_spec = get_dataset(config.dataset.name)
    except KeyError as exc:
        raise ConfigError("dataset.name", exc.args[0]) from None
    dataset_options = parse_section(dataset_spec.options, config.dataset.options, "dataset.options").model_dump()
    root = config.dataset.root
    if dataset_spec.needs_root and root is None:
        raise ConfigError("dataset.root", f"required for dataset {config.dataset.name!r}")
    if root is not None:
        root = _resolve(root, base_dir)
        if not root.is_dir():
            raise ConfigError("dataset.root", f"directory not found: {root}")
    checkpoint = config.model.checkpoint
    if checkpoint is not None:
        checkpoint = _resolve(checkpoint, base_dir)
        if not checkpoint.is_file():
            raise ConfigError("model.checkpoint", f"file not found: {checkpoint}")

    # methods: registered, apply to the backbone, valid options
    family = require_family(config.model.backbone).name
    methods = config.method.names
    if config.method.is_choice:
        for name in config.method.options:
            if name not in methods:
                raise ConfigError(f"method.options.{name}", f"not one of the listed methods ({', '.join(methods)}); "
                                  "with several methods, options are given per method: {lora: {alpha: 32}}")
    specs: dict[str, Any] = {}
    checked_options: dict[str, MethodOptions] = {}
    for index, method in enumerate(methods):
        name_key = f"method.name.{index}" if config.method.is_choice else "method.name"
        options_key = f"method.options.{method}" if config.method.is_choice else "method.options"
        try:
            specs[method] = get_method(method)
        except KeyError as exc:
            raise ConfigError(name_key, exc.args[0]) from None
        if family not in specs[method].families:
            raise ConfigError(
                name_key,
                f"{method!r} does not apply to {family} backbones like {config.model.backbone!r}"
                f" (it applies to: {', '.join(sorted(specs[method].families))})",
            )
        checked_options[method] = parse_section(specs[method].options, config.method.options_for(method), options_key)
        _check_family(checked_options[method], family, options_key)

    # space: every searched name is a method option or a searchable train field, with valid bounds
    space_key = "space" if config.space is not None else f"(default space of {', '.join(methods)})"
    for name, raw in config.raw_space().items():
        key = f"{space_key}.{name}"
        scope, field = config.split_param(name)
        method = scope or methods[0]
        fixed = config.method.options_for(method)
        if config.method.is_choice and scope is None:
            known = sorted(SEARCHABLE_TRAIN_FIELDS)
            if field in set().union(*(spec.options.model_fields for spec in specs.values())) and field not in known:
                raise ConfigError(key, f"a method option: name the method it belongs to, e.g. {methods[0]}.{field}")
        else:
            known = sorted(set(specs[method].options.model_fields) | set(SEARCHABLE_TRAIN_FIELDS))
        if field in fixed:
            prefix = f"method.options.{method}" if config.method.is_choice else "method.options"
            raise ConfigError(key, f"also fixed in {prefix}.{field}; search it or fix it, not both")
        if field not in known:
            raise ConfigError(key, f"not a searchable parameter{_did_you_mean(field, known)}; searchable: {', '.join(known)}")
        _check_distribution(field, raw, key, specs[method].options, checked_options[method].model_dump(), config, family)

    distributions = config.distributions()
    for i, point in enumerate(config.search.points_to_evaluate):
        for name, value in point.items():
            key = f"search.points_to_evaluate.{i}.{name}"
            if name not in distributions:
                raise ConfigError(key, f"not a searched parameter{_did_you_mean(name, sorted(distributions))}")
            if not distribution_contains(distributions[name], value):
                raise ConfigError(key, f"{value!r} is outside the searched range of {name}")

    if config.search.sampler == "grid":
        if config.method.is_choice:
            raise ConfigError("search.sampler", "a grid searches one method at a time (its spaces would be conditional)")
        if config.search.points_to_evaluate or config.search.warm_start.from_leaderboard:
            raise ConfigError("search.sampler", "a grid tries every point already; drop points_to_evaluate and warm_start")
        size = math.prod(len(values) for values in grid_points(config.distributions(), space_key).values())
        if config.search.num_samples != size:
            raise ConfigError(
                "search.num_samples",
                f"the grid has {size} point(s) (the product of the searched choices); set num_samples to {size}",
            )

    # resources and batch size
    for name in config.resources.custom_per_worker:
        if name in _BUILTIN_RESOURCES:
            raise ConfigError(f"resources.custom_per_worker.{name}", _BUILTIN_RESOURCES[name])
    _check_batch_divisible(config.train.batch_size, config, "train.batch_size")
    if config.train.precision == "fp16" and config.resources.gpus_per_worker == 0:
        raise ConfigError("train.precision", "fp16 needs GPUs; use fp32 or bf16 on CPU")

    return config.model_copy(
        update={
            "dataset": config.dataset.model_copy(update={"root": root, "options": dataset_options}),
            "model": config.model.model_copy(update={"checkpoint": checkpoint}),
            "method": config.method.model_copy(update={"options": _checked_options(config.method, checked_options)}),
        }
    )


def _checked_options(method: MethodConfig, checked: dict[str, MethodOptions]) -> dict[str, Any]:
    """The validated fixed options, in the YAML's layout (per method when there are several)."""
    if method.is_choice:
        return {name: checked[name].model_dump(exclude_unset=True) for name in method.names if method.options.get(name)}
    return checked[method.names[0]].model_dump(exclude_unset=True)


def _check_family(options: MethodOptions, family: str, prefix: str) -> None:
    """The method's own checks of its options against the backbone family (targets, block sets)."""
    try:
        options.check_family(family)
    except ValueError as exc:
        field, sep, message = str(exc).partition(": ")
        if sep and field in type(options).model_fields:
            raise ConfigError(f"{prefix}.{field}", message) from None
        raise ConfigError(prefix, str(exc)) from None


def _check_distribution(
    name: str, raw: Any, key: str, method_options: type[BaseModel], fixed: dict[str, Any], config: SearchConfig,
    family: str,
) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(key, "must be a mapping like {type: float, low: 1e-4, high: 1e-2, log: true}")
    kind = raw.get("type")
    if kind not in _DISTRIBUTIONS:
        raise ConfigError(f"{key}.type", f"must be one of {', '.join(_DISTRIBUTIONS)}, got {kind!r}")
    dist = parse_section(_DISTRIBUTIONS[kind], raw, key)
    if isinstance(dist, (FloatDistribution, IntDistribution)):
        if dist.low > dist.high:
            raise ConfigError(f"{key}.high", f"must be >= low ({dist.low})")
        if dist.log and dist.low <= 0:
            raise ConfigError(f"{key}.low", "must be > 0 for a log-scale distribution")
        if isinstance(dist, IntDistribution) and dist.log and dist.step != 1:
            raise ConfigError(f"{key}.step", "must be 1 for a log-scale int distribution")
        if isinstance(dist, FloatDistribution) and dist.log and dist.step is not None:
            raise ConfigError(f"{key}.step", "cannot be combined with log: true (Optuna samples log scales continuously)")
        values = {"low": dist.low, "high": dist.high}
        if name == "batch_size" and isinstance(dist, IntDistribution) and dist.step != 1:
            # every sampled value is low + k * step: a divisible low and step keep them all divisible
            _check_batch_divisible(dist.step, config, f"{key}.step")
    else:
        values = {f"choices.{i}": c for i, c in enumerate(dist.choices)}
    # Every bound and choice must itself be a valid value of the parameter it searches.
    for where, value in values.items():
        # each value is checked together with the YAML's other settings (min_lr against a searched lr)
        if name in SEARCHABLE_TRAIN_FIELDS:
            target, data = TrainConfig, {**config.train.model_dump(), name: value}
        else:
            target, data = method_options, {**fixed, name: value}
        try:
            parsed = target.model_validate(data)
        except ValidationError as exc:
            errors = [e for e in exc.errors() if e["loc"][:1] == (name,)] or exc.errors()
            raise ConfigError(f"{key}.{where}", _message(errors[0])) from None
        if isinstance(parsed, MethodOptions):
            try:
                parsed.check_family(family)
            except ValueError as exc:
                raise ConfigError(f"{key}.{where}", str(exc).partition(": ")[2] or str(exc)) from None
        if name == "batch_size" and isinstance(value, int):
            _check_batch_divisible(value, config, f"{key}.{where}")


def distribution_contains(dist: Distribution, value: Any) -> bool:
    """Whether ``value`` is a value ``dist`` can take (a warm-start point must be one)."""
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(dist, IntDistribution) and not float(value).is_integer():
        return False
    return dist.low <= value <= dist.high


def grid_points(distributions: dict[str, Distribution], space_key: str = "space") -> dict[str, list[Any]]:
    """Each searched parameter's grid values (``search.sampler: grid``); raises ConfigError for a continuous one."""
    grid: dict[str, list[Any]] = {}
    for name, dist in distributions.items():
        if isinstance(dist, CategoricalDistribution):
            grid[name] = list(dist.choices)
        elif isinstance(dist, IntDistribution) and not dist.log:
            grid[name] = list(range(dist.low, dist.high + 1, dist.step))
        elif isinstance(dist, FloatDistribution) and dist.step is not None:
            count = int(math.floor((dist.high - dist.low) / dist.step + 1e-9)) + 1
            grid[name] = [round(dist.low + i * dist.step, 12) for i in range(count)]
        else:
            raise ConfigError(
                f"{space_key}.{name}", "a grid needs listed values: use choices, or an int or float range with a step (not log)"
            )
    return grid


def _check_batch_divisible(batch_size: int, config: SearchConfig, key: str) -> None:
    per_step = config.resources.workers_per_trial * config.train.deepspeed.gradient_accumulation_steps
    if batch_size % per_step:
        raise ConfigError(
            key,
            f"{batch_size} is not divisible by resources.workers_per_trial x "
            f"train.deepspeed.gradient_accumulation_steps ({per_step})",
        )


def _resolve(path: Path, base_dir: Path | None) -> Path:
    path = path.expanduser()
    if not path.is_absolute() and base_dir is not None and not path.exists() and (base_dir / path).exists():
        return (base_dir / path).resolve()
    return path.resolve()


def parse_section(model: type[BaseModel], raw: Any, prefix: str) -> Any:
    """Validates ``raw`` with ``model``; raises :class:`ConfigError` naming ``prefix.key`` on the first error."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = [str(part) for part in error["loc"]]
        key = ".".join(p for p in [prefix, *loc] if p)
        if error["type"] == "extra_forbidden":
            parent = _section_model(model, loc[:-1])
            known = sorted(parent.model_fields) if parent is not None else []
            hint = _did_you_mean(loc[-1], known) + (f"; known: {', '.join(known)}" if known else "")
            raise ConfigError(key, f"unknown key{hint}") from None
        message = _message(error)
        if error["type"] == "value_error":
            # a section's own check names the key it is about ("offload_param: needs zero_stage 3")
            field, sep, rest = message.partition(": ")
            section = _section_model(model, loc)
            if sep and section is not None and field in section.model_fields:
                key, message = f"{key}.{field}" if key else field, rest
        raise ConfigError(key, message) from None


def _section_model(model: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    """The pydantic model of the section at ``loc`` inside ``model`` (None past a plain field)."""
    parent: type[BaseModel] | None = model
    for part in loc:
        annotation = parent.model_fields.get(part) if parent is not None else None
        sub = getattr(annotation, "annotation", None) if annotation else None
        parent = sub if isinstance(sub, type) and issubclass(sub, BaseModel) else None
        if parent is None:
            break
    return parent


def _message(error: dict[str, Any]) -> str:
    """A short, user-facing message for one pydantic error."""
    kind, ctx, value = error["type"], error.get("ctx", {}), error.get("input")
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"must be {bounds[kind]} {limit} (got {value!r})"
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')} (got {value!r})"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be an integer (got {value!r})"
    if kind in ("float_type", "float_parsing"):
        return f"must be a number (got {value!r})"
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false (got {value!r})"
    if kind in ("list_type", "dict_type", "model_type", "model_attributes_type"):
        wanted = "a list" if kind == "list_type" else "a mapping"
        return f"must be {wanted} (got {type(value).__name__})"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} item(s)"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if isinstance(value, float) and math.isnan(value):
        return "must not be NaN"
    return f"{error['msg']} (got {value!r})"


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def dump_yaml(data: dict[str, Any]) -> str:
    """YAML text of a config dict (paths as strings), in the sections' natural order."""
    return yaml.safe_dump(data, sort_keys=False)
