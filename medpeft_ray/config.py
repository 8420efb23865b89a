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
from medpeft_ray.models.backbones import backbone_family

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
        if backbone_family(name) is None:
            raise ValueError(f"{name!r} is not a supported timm ViT (vit_*, deit_*) or ResNet (resnet*) name")
        return name


class MethodConfig(_Strict):
    name: str = Field("lora", description="PEFT method (see `medpeft-ray methods`)")
    options: dict[str, Any] = Field(default_factory=dict, description="fixed method options")


class DeepSpeedConfig(_Strict):
    zero_stage: int = Field(0, ge=0, le=3, description="ZeRO stage")
    gradient_clipping: float = Field(1.0, ge=0, description="max gradient norm (0 = off)")
    gradient_accumulation_steps: int = Field(1, ge=1)


class TrainConfig(_Strict):
    epochs: int = Field(3, ge=1, description="epochs per trial (the ASHA budget)")
    batch_size: int = Field(32, ge=1, description="global batch size (split across a trial's workers)")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0, description="learning rate (absolute)")
    weight_decay: float = Field(0.05, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up, then cosine to min_lr")
    min_lr: float = Field(1e-6, ge=0)
    drop_path: float = Field(0.0, ge=0, lt=1)
    augment: Literal["crop_flip", "flip", "none"] = Field(
        "crop_flip", description="random-resized crop (scale 0.6-1) + horizontal flip, flip only, or none"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    eval_batch_size: int = Field(128, ge=1)
    seed: int = Field(0, description="seed of initialisation, shuffling and augmentation")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)

    @model_validator(mode="after")
    def _lr_floor(self) -> "TrainConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        return self


#: ``train`` fields a ``space`` may search; anything else in ``space`` must be a method option.
SEARCHABLE_TRAIN_FIELDS = ("lr", "weight_decay", "momentum", "warmup_epochs", "drop_path", "batch_size")


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
    type: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, ge=1, description="epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1)


class SearchSettings(_Strict):
    num_samples: int = Field(8, ge=1, description="trials per label ratio")
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int = 0
    metric: Literal["val_auroc", "val_loss"] = "val_auroc"
    mode: Literal["max", "min"] | None = Field(None, description="default: max for val_auroc, min for val_loss")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    max_concurrent: int | None = Field(None, ge=1, description="default: what the cluster's free resources allow")

    @property
    def resolved_mode(self) -> str:
        return self.mode or ("min" if self.metric == "val_loss" else "max")


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
        """The searched hyperparameters as parsed distributions (call after validation)."""
        return {name: _DISTRIBUTIONS[d["type"]].model_validate(d) for name, d in self.raw_space().items()}  # type: ignore[misc]

    def raw_space(self) -> dict[str, dict[str, Any]]:
        """The YAML's ``space``, or else the method's default space less the options the YAML fixes."""
        if self.space is not None:
            return self.space
        default = get_method(self.method.name).space_for(backbone_family(self.model.backbone) or "vit")
        return {name: dist for name, dist in default.items() if name not in self.method.options}

    def trial_config(self, label_ratio: float, sampled: dict[str, Any]) -> "TrialConfig":
        """The complete configuration of one trial: the fixed settings with ``sampled`` applied."""
        method_fields = get_method(self.method.name).options.model_fields
        method_options = dict(self.method.options)
        train = self.train.model_dump()
        for name, value in sampled.items():
            if name in method_fields:
                method_options[name] = value
            elif name in SEARCHABLE_TRAIN_FIELDS:
                train[name] = value
            else:
                raise KeyError(f"sampled parameter {name!r} is neither a method option nor a train field")
        return TrialConfig(
            experiment=self.experiment or "search",
            label_ratio=label_ratio,
            dataset=self.dataset.model_copy(update={"label_ratios": [label_ratio]}),
            model=self.model,
            method=MethodConfig(name=self.method.name, options=method_options),
            train=TrainConfig.model_validate(train),
        )


class TrialConfig(_Strict):
    """Everything one trial's workers need; the leaderboard stores it and ``train`` re-runs it."""

    experiment: str
    label_ratio: float = Field(gt=0, le=1)
    dataset: DatasetConfig
    model: ModelConfig
    method: MethodConfig
    train: TrainConfig

    @property
    def family(self) -> str:
        return backbone_family(self.model.backbone) or "vit"


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
        search = {**raw, "dataset": {**raw["dataset"], "label_ratios": [trial.label_ratio]}, "space": {}}
        del search["label_ratio"]
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
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(where, f"not valid YAML: {problem}", path.name) from None
    except UnicodeDecodeError:
        raise ConfigError("", "not a text file", path.name) from None


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

    # method: registered, applies to the backbone, valid options
    try:
        method_spec = get_method(config.method.name)
    except KeyError as exc:
        raise ConfigError("method.name", exc.args[0]) from None
    family = backbone_family(config.model.backbone)
    if family not in method_spec.families:
        raise ConfigError(
            "method.name",
            f"{config.method.name!r} does not apply to {family} backbones like {config.model.backbone!r}"
            f" (it applies to: {', '.join(sorted(method_spec.families))})",
        )
    method_options = parse_section(method_spec.options, config.method.options, "method.options")
    _check_family(method_options, family, "method.options")

    # space: every searched name is a method option or a searchable train field, with valid bounds
    space_key = "space" if config.space is not None else f"(default space of {config.method.name})"
    raw_space = config.raw_space()
    known = sorted(set(method_spec.options.model_fields) | set(SEARCHABLE_TRAIN_FIELDS))
    for name, raw in raw_space.items():
        key = f"{space_key}.{name}"
        if name in config.method.options:
            raise ConfigError(key, f"also fixed in method.options.{name}; search it or fix it, not both")
        if name not in known:
            raise ConfigError(key, f"not a searchable parameter{_did_you_mean(name, known)}; searchable: {', '.join(known)}")
        _check_distribution(name, raw, key, method_spec.options, method_options.model_dump(), config, family)

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
            "method": config.method.model_copy(update={"options": method_options.model_dump(exclude_unset=True)}),
        }
    )


def _check_family(options: MethodOptions, family: str | None, prefix: str) -> None:
    """The method's own checks of its options against the backbone family (targets, block sets)."""
    try:
        options.check_family(family or "vit")
    except ValueError as exc:
        field, sep, message = str(exc).partition(": ")
        if sep and field in type(options).model_fields:
            raise ConfigError(f"{prefix}.{field}", message) from None
        raise ConfigError(prefix, str(exc)) from None


def _check_distribution(
    name: str, raw: Any, key: str, method_options: type[BaseModel], fixed: dict[str, Any], config: SearchConfig,
    family: str | None,
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
                parsed.check_family(family or "vit")
            except ValueError as exc:
                raise ConfigError(f"{key}.{where}", str(exc).partition(": ")[2] or str(exc)) from None
        if name == "batch_size" and isinstance(value, int):
            _check_batch_divisible(value, config, f"{key}.{where}")


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
            parent = model
            for part in loc[:-1]:
                annotation = parent.model_fields.get(part)
                sub = getattr(annotation, "annotation", None) if annotation else None
                parent = sub if isinstance(sub, type) and issubclass(sub, BaseModel) else None  # type: ignore[assignment]
                if parent is None:
                    break
            known = sorted(parent.model_fields) if parent is not None else []
            hint = _did_you_mean(loc[-1], known) + (f"; known: {', '.join(known)}" if known else "")
            raise ConfigError(key, f"unknown key{hint}") from None
        raise ConfigError(key, _message(error)) from None


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
