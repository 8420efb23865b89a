"""Reading search and trial YAML files: one-line errors naming the file and the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

from medpeft_ray.config.checks import check_search, check_training, checked_dataset, checked_methods, checked_model
from medpeft_ray.config.search_file import SearchConfig
from medpeft_ray.config.sections import ResourcesConfig, TrainConfig
from medpeft_ray.config.trial import TrialConfig
from medpeft_ray.errors import ConfigError
from medpeft_ray.schema import parse_section

T = TypeVar("T")


def load_search_config(path: str | Path, experiment: str | None = None, require_files: bool = True) -> SearchConfig:
    """Reads and validates a search-space YAML; raises :class:`ConfigError` naming file and key.

    ``experiment`` replaces the YAML's experiment name (validated like it). ``require_files=False``
    accepts a dataset folder, checkpoint or FID weights not (yet) on this machine (see
    :func:`~medpeft_ray.config.checks.check_search`).
    """
    path = Path(path)

    def load() -> SearchConfig:
        raw = read_yaml(path)
        if experiment is not None and isinstance(raw, dict):
            raw = {**raw, "experiment": experiment}
        return _validate_search(raw, path, require_files)

    return _with_file(path.name, load)


def load_trial_config(path: str | Path) -> TrialConfig:
    """Reads a single-trial YAML (``medpeft-ray best --out``, or a hand-written one) and validates it.

    The file holds one :class:`TrialConfig` (experiment, label_ratio, dataset, model, method,
    train); the checks a search runs on these sections run on it, so the same bad key, path or
    option gives the same one-line error. Resources are the defaults (``train`` runs one process).
    """
    path = Path(path)

    def load() -> TrialConfig:
        raw = read_yaml(path)
        if not isinstance(raw, dict):
            raise ConfigError("", f"must be a mapping of sections, got {type(raw).__name__}")
        trial = parse_section(TrialConfig, raw, "")
        dataset = checked_dataset(trial.dataset, path.parent)
        model = checked_model(trial.model, path.parent)
        _, options = checked_methods(trial.method, trial.model.backbone)
        check_training(trial.train, ResourcesConfig())
        return trial.model_copy(update={
            "dataset": dataset.model_copy(update={"label_ratios": [trial.label_ratio]}),
            "model": model,
            "method": trial.method.model_copy(update={"options": options[trial.method.name].model_dump(exclude_unset=True)}),
            "train": TrainConfig.model_validate(trial.train.model_dump()),
        })

    return _with_file(path.name, load)


def validate_search_dict(raw: Any, source: str = "<config>", base_dir: Path | None = None,
                         require_files: bool = True) -> SearchConfig:
    """Validates an already-parsed mapping (from a YAML file or a test)."""
    return _with_file(source, lambda: _validate_search(raw, base_dir, require_files))


def _with_file(file: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except ConfigError as err:
        raise err.with_file(err.file or file) from None


def read_yaml(path: Path) -> Any:
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


def _validate_search(raw: Any, source: Path | None, require_files: bool = True) -> SearchConfig:
    if not isinstance(raw, dict):
        raise ConfigError("", f"must be a mapping of sections, got {type(raw).__name__}")
    config = parse_section(SearchConfig, raw, "")
    base_dir = source.parent if source is not None and source.suffix else source
    if config.experiment is None and source is not None and source.suffix:
        config = config.model_copy(update={"experiment": source.stem})
    return check_search(config, base_dir, require_files)
