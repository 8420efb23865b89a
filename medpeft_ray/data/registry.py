"""The registry of dataset formats, and ``load_splits``: the one door from a config to arrays."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict

from medpeft_ray.data.base import DatasetSplits


class DatasetOptions(BaseModel):
    """Base of every dataset's ``dataset.options``: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


LoadFn = Callable[[Path | None, int, Any, int], DatasetSplits]


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset format: ``load(root, image_size, options, seed) -> DatasetSplits``."""

    name: str
    load: LoadFn
    options: type[DatasetOptions]
    needs_root: bool
    task: Literal["multilabel", "multiclass"]


_DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(
    name: str, *, options: type[DatasetOptions], needs_root: bool, task: Literal["multilabel", "multiclass"]
) -> Callable[[LoadFn], LoadFn]:
    def decorate(load: LoadFn) -> LoadFn:
        if name in _DATASETS:
            raise ValueError(f"dataset {name!r} is registered twice")
        _DATASETS[name] = DatasetSpec(name, load, options, needs_root, task)
        return load

    return decorate


def get_dataset(name: str) -> DatasetSpec:
    """The spec of ``name``; an unknown name raises ``KeyError`` listing the known ones."""
    try:
        return _DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(_DATASETS))}") from None


def list_datasets() -> list[str]:
    return sorted(_DATASETS)
