"""The registry of dataset formats, and ``load_splits``: the one door from a config to arrays."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from pydantic import BaseModel, ConfigDict

from medpeft_ray.data.base import DatasetSplits
from medpeft_ray.data.layout import RootMarker, find_dataset_root


class DatasetOptions(BaseModel):
    """Base of every dataset's ``dataset.options``: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


LoadFn = Callable[[Path | None, int, Any, int], DatasetSplits]
#: what a format's dataset folder holds, given the parsed options (file names can be options)
MarkerFn = Callable[[Any], RootMarker]
#: the class names a format fixes, given the parsed options; None where they come from the dataset's files
ClassesFn = Callable[[Any], Sequence[str] | None]
#: the files a format's decoded splits are made from, given its dataset folder and the parsed options
InputsFn = Callable[[Path, Any], Sequence[Path]]
#: what leaderboard rows call the data, given the parsed options
RowNameFn = Callable[[Any], str]


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset format: ``load(root, image_size, options, seed) -> DatasetSplits``.

    Whether the data is multi-label or multi-class is the loaded splits' ``task``: some formats
    (``csv`` with a ``class_column``) only know it from their options.

    ``marker`` tells the format's dataset folder, so that a root given as the download folder
    that holds it works as well (:meth:`dataset_folder`). ``classes`` names the classes where the
    format (and its options) fix them, so that what depends on them alone, such as a classifier
    head's size, is known before the dataset is on disk (:meth:`fixed_classes`). ``inputs`` names the
    files the decoded splits are made from where the format reads a few known files of a folder
    that may hold many others (MedMNIST's one ``.npz`` of a folder holding every set): the
    decode-once cache is then keyed by those files alone, so a file added beside them does not
    decode the dataset again. None: every file under the dataset folder counts. ``row_name``
    names the data in leaderboard rows where one format holds several datasets (MedMNIST's
    ``dermamnist_224``): rows of different sets must never be compared as one task. None: the
    format's name.
    """

    name: str
    load: LoadFn
    options: type[DatasetOptions]
    needs_root: bool
    marker: MarkerFn | None = None
    classes: ClassesFn | None = None
    inputs: InputsFn | None = None
    row_name: RowNameFn | None = None

    def rows_name(self, options: Any) -> str:
        """What leaderboard rows call this format's data under ``options`` (parsed)."""
        return self.row_name(options) if self.row_name is not None else self.name

    def fixed_classes(self, options: Any) -> tuple[str, ...] | None:
        """The class names the format fixes under ``options`` (parsed), or None where its files decide them."""
        names = self.classes(options) if self.classes is not None else None
        return tuple(names) if names else None

    def dataset_folder(self, root: Path, options: Any) -> Path:
        """``root``, or the folder below it that holds this format's dataset (``options`` parsed).

        Raises:
            DataError: no folder under ``root`` holds the dataset, or several do (one line).
        """
        return find_dataset_root(root, self.marker(options), self.name) if self.marker is not None else root


_DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(
    name: str,
    *,
    options: type[DatasetOptions],
    needs_root: bool,
    marker: MarkerFn | None = None,
    classes: ClassesFn | None = None,
    inputs: InputsFn | None = None,
    row_name: RowNameFn | None = None,
) -> Callable[[LoadFn], LoadFn]:
    def decorate(load: LoadFn) -> LoadFn:
        if name in _DATASETS:
            raise ValueError(f"dataset {name!r} is registered twice")
        _DATASETS[name] = DatasetSpec(name, load, options, needs_root, marker, classes, inputs, row_name)
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
