"""Checks that span sections of a search YAML: registry names, method options, the space, files.

Each check names the key it is about; a search file runs all of them, a trial file (``train
--config``) the ones that apply to one trial.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from medpeft_ray.config.distributions import DISTRIBUTIONS, FloatDistribution, IntDistribution, distribution_contains
from medpeft_ray.config.search_file import SearchConfig
from medpeft_ray.config.sections import (
    BUILTIN_RESOURCES,
    SEARCHABLE_TRAIN_FIELDS,
    DatasetConfig,
    MethodConfig,
    ModelConfig,
    ResourcesConfig,
    TrainConfig,
)
from medpeft_ray.config.space import SearchSpace
from medpeft_ray.data.registry import get_dataset
from medpeft_ray.errors import ConfigError
from medpeft_ray.label_ratios import same_label_ratio
from medpeft_ray.metrics import METRICS
from medpeft_ray.methods.registry import MethodOptions, MethodSpec, get_method
from medpeft_ray.models.families import require_family
from medpeft_ray.schema import did_you_mean, error_message, parse_section


def check_search(config: SearchConfig, base_dir: Path | None, require_files: bool = True) -> SearchConfig:
    """The search with every cross-section check passed, its paths resolved and its options parsed.

    ``require_files=False`` leaves out the checks that the dataset folder, the checkpoint and the FID
    weights exist: what depends on the configuration alone (a parameter count) needs none of them.
    """
    dataset = checked_dataset(config.dataset, base_dir, require_files)
    model = checked_model(config.model, base_dir, require_files)
    _check_task(config)
    search = config.search
    if search.fid_weights is not None:
        weights = _resolve(search.fid_weights, base_dir)
        if require_files and not weights.is_file():
            raise ConfigError("search.fid_weights", f"file not found: {weights}")
        search = search.model_copy(update={"fid_weights": weights})
    space = config.search_space
    specs, options = checked_methods(config.method, config.model.backbone)
    _check_space(config, space, specs, options)
    _check_points(config, space)
    _check_grid(config, space)
    check_training(config.train, config.resources)
    _check_epochs(config)
    return config.model_copy(update={
        "dataset": dataset, "model": model, "search": search,
        "method": config.method.model_copy(update={"options": _options_as_written(config.method, options)}),
    })


def checked_dataset(dataset: DatasetConfig, base_dir: Path | None, require_files: bool = True) -> DatasetConfig:
    """A registered format, its parsed options, its root resolved against the YAML's folder (and, with
    ``require_files``, present)."""
    try:
        spec = get_dataset(dataset.name)
    except KeyError as exc:
        raise ConfigError("dataset.name", exc.args[0]) from None
    options = parse_section(spec.options, dataset.options, "dataset.options").model_dump()
    root = dataset.root
    if spec.needs_root and root is None:
        raise ConfigError("dataset.root", f"required for dataset {dataset.name!r}")
    if root is not None:
        root = _resolve(root, base_dir)
        if require_files and not root.is_dir():
            raise ConfigError("dataset.root", f"directory not found: {root}")
    return dataset.model_copy(update={"root": root, "options": options})


def checked_model(model: ModelConfig, base_dir: Path | None, require_files: bool = True) -> ModelConfig:
    """The checkpoint path resolved and (with ``require_files``) present; its content is checked in
    pre-flight, where torch is."""
    checkpoint = _resolve(model.checkpoint, base_dir) if model.checkpoint is not None else None
    if checkpoint is not None and require_files:
        if require_family(model.backbone).task == "generation":  # a diffusers pipeline folder
            if not checkpoint.is_dir():
                raise ConfigError("model.checkpoint", f"pipeline folder not found: {checkpoint} (a diffusion U-Net "
                                  "is read from a folder in the diffusers layout)")
        elif not checkpoint.is_file():
            raise ConfigError("model.checkpoint", f"file not found: {checkpoint}")
    return model.model_copy(update={"checkpoint": checkpoint})


#: train settings a generation trial does not use, with the value it needs
_GENERATION_TRAIN = {"augment": "none", "layer_decay": 1.0, "drop_path": 0.0}


def _check_task(config: SearchConfig) -> None:
    """The backbone is of the search's task, and what a generation search does not use is left at rest."""
    family = require_family(config.model.backbone)
    if family.task != config.task:
        backbones = "a diffusion U-Net (unet_tiny, unet_sd15)" if config.task == "generation" else "a timm classifier"
        raise ConfigError("model.backbone", f"{config.model.backbone!r} is a {family.task} backbone; task "
                          f"{config.task} needs {backbones}" + ("" if config.task == "generation" else
                                                               " (or set task: generation)"))
    def fits(metric: Any) -> bool:
        return ("generation" in metric.tasks) if config.task == "generation" else bool(metric.tasks - {"generation"})

    if not fits(METRICS[config.search.metric]):
        raise ConfigError("search.metric", f"{config.search.metric} is not a {config.task} metric (these are: "
                          f"{', '.join(m.name for m in METRICS.values() if fits(m))})")
    if config.task != "generation":
        return
    for name, needed in _GENERATION_TRAIN.items():
        if getattr(config.train, name) != needed:
            raise ConfigError(f"train.{name}", f"a generation search trains on the images as they are: set {needed} "
                              f"(got {getattr(config.train, name)!r})")
    for name in ("layer_decay", "drop_path"):
        if name in (config.space or {}):
            raise ConfigError(f"space.{name}", "not used by a generation search (a diffusion U-Net has no layer decay "
                              "or drop path here)")


def checked_methods(method: MethodConfig, backbone: str) -> tuple[dict[str, MethodSpec], dict[str, MethodOptions]]:
    """Each named method registered, applying to the backbone's family, with valid fixed options."""
    family = require_family(backbone).name
    methods = method.names
    if method.is_choice:
        for name in method.options:
            if name not in methods:
                raise ConfigError(f"method.options.{name}", f"not one of the listed methods ({', '.join(methods)}); "
                                  "with several methods, options are given per method: {lora: {alpha: 32}}")
    specs: dict[str, MethodSpec] = {}
    options: dict[str, MethodOptions] = {}
    for index, name in enumerate(methods):
        try:
            specs[name] = get_method(name)
        except KeyError as exc:
            raise ConfigError(method.name_key(index), exc.args[0]) from None
        if family not in specs[name].families:
            raise ConfigError(
                method.name_key(index),
                f"{name!r} does not apply to {family} backbones like {backbone!r}"
                f" (it applies to: {', '.join(sorted(specs[name].families))})",
            )
        options[name] = parse_section(specs[name].options, method.options_for(name), method.options_key(name))
        _check_family(options[name], family, method.options_key(name))
    return specs, options


def check_training(train: TrainConfig, resources: ResourcesConfig) -> None:
    """Resources Ray owns, a batch that splits across workers and steps, a precision the device has."""
    for name in resources.custom_per_worker:
        if name in BUILTIN_RESOURCES:
            raise ConfigError(f"resources.custom_per_worker.{name}", BUILTIN_RESOURCES[name])
    _check_batch_divisible(train.batch_size, train, resources, "train.batch_size")
    if train.precision == "fp16" and resources.gpus_per_worker == 0:
        raise ConfigError("train.precision", "fp16 needs GPUs; use fp32 or bf16 on CPU")


def _check_space(
    config: SearchConfig, space: SearchSpace, specs: dict[str, MethodSpec], options: dict[str, MethodOptions]
) -> None:
    """Every searched name is a method option or a searchable train field, with valid bounds."""
    methods = space.methods
    space_key = _space_key(config)
    for name, raw in space.raw.items():
        key = f"{space_key}.{name}"
        scope, field = space.scope(name)
        method = scope or methods[0]
        fixed = config.method.options_for(method)
        if space.several_methods and scope is None:
            known = sorted(SEARCHABLE_TRAIN_FIELDS)
            if field in set().union(*(spec.options.model_fields for spec in specs.values())) and field not in known:
                raise ConfigError(key, f"a method option: name the method it belongs to, e.g. {methods[0]}.{field}")
        else:
            known = sorted(set(specs[method].options.model_fields) | set(SEARCHABLE_TRAIN_FIELDS))
        if field in fixed:
            raise ConfigError(key, f"also fixed in {config.method.options_key(method)}.{field}; search it or fix it, not both")
        if field not in known:
            raise ConfigError(key, f"not a searchable parameter{did_you_mean(field, known)}; searchable: {', '.join(known)}")
        _check_distribution(field, raw, key, specs[method].options, options[method].model_dump(), config, space.family)


def _check_points(config: SearchConfig, space: SearchSpace) -> None:
    """Every hand-given first point names searched parameters at values inside their ranges."""
    distributions = space.distributions
    for i, point in enumerate(config.search.points_to_evaluate):
        for name, value in point.items():
            key = f"search.points_to_evaluate.{i}.{name}"
            if name not in distributions:
                raise ConfigError(key, f"not a searched parameter{did_you_mean(name, sorted(distributions))}")
            if not distribution_contains(distributions[name], value):
                raise ConfigError(key, f"{value!r} is outside the searched range of {name}")


def _check_grid(config: SearchConfig, space: SearchSpace) -> None:
    """A grid search lists its values, searches one method and runs exactly its points."""
    if config.search.sampler != "grid":
        return
    if space.several_methods:
        raise ConfigError("search.sampler", "a grid searches one method at a time (its spaces would be conditional)")
    if config.search.points_to_evaluate or config.search.warm_start.from_leaderboard:
        raise ConfigError("search.sampler", "a grid tries every point already; drop points_to_evaluate and warm_start")
    size = math.prod(len(values) for values in space.grid(_space_key(config)).values())
    if config.search.num_samples != size:
        raise ConfigError(
            "search.num_samples",
            f"the grid has {size} point(s) (the product of the searched choices); set num_samples to {size}",
        )


def _check_epochs(config: SearchConfig) -> None:
    """Per-ratio epochs give a budget for each of the searched label ratios, and only for those."""
    epochs = config.train.epochs
    if not isinstance(epochs, dict):
        return
    ratios = config.dataset.label_ratios
    missing = [r for r in ratios if not any(same_label_ratio(r, k) for k in epochs)]
    if missing:
        raise ConfigError("train.epochs", f"no epochs for label ratio {', '.join(f'{r:g}' for r in missing)} "
                          f"(dataset.label_ratios: {', '.join(f'{r:g}' for r in ratios)})")
    extra = [k for k in epochs if not any(same_label_ratio(r, k) for r in ratios)]
    if extra:
        raise ConfigError("train.epochs", f"label ratio {', '.join(f'{r:g}' for r in extra)} is not searched "
                          f"(dataset.label_ratios: {', '.join(f'{r:g}' for r in ratios)})")


def _space_key(config: SearchConfig) -> str:
    """How errors name the searched parameters: the YAML's ``space``, or the methods' default space."""
    return "space" if config.space is not None else f"(default space of {', '.join(config.method.names)})"


def _options_as_written(method: MethodConfig, checked: dict[str, MethodOptions]) -> dict[str, Any]:
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
    """One searched parameter's distribution: well-formed, and every bound or choice a valid value."""
    if not isinstance(raw, dict):
        raise ConfigError(key, "must be a mapping like {type: float, low: 1e-4, high: 1e-2, log: true}")
    kind = raw.get("type")
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{key}.type", f"must be one of {', '.join(DISTRIBUTIONS)}, got {kind!r}")
    dist = parse_section(DISTRIBUTIONS[kind], raw, key)
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
            _check_batch_divisible(dist.step, config.train, config.resources, f"{key}.step")
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
            raise ConfigError(f"{key}.{where}", error_message(errors[0])) from None
        if isinstance(parsed, MethodOptions):
            try:
                parsed.check_family(family)
            except ValueError as exc:
                raise ConfigError(f"{key}.{where}", str(exc).partition(": ")[2] or str(exc)) from None
        if name == "batch_size" and isinstance(value, int):
            _check_batch_divisible(value, config.train, config.resources, f"{key}.{where}")


def _check_batch_divisible(batch_size: int, train: TrainConfig, resources: ResourcesConfig, key: str) -> None:
    per_step = resources.workers_per_trial * train.deepspeed.gradient_accumulation_steps
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
