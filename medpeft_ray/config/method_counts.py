"""The methods a search file or grid file configures, with their trainable parameters (``methods --space``).

A count needs the backbone, the image size, the number of classes and the method options: not the
dataset folder, the checkpoint or the FID weights, so the file is validated without them (a search
still refuses them missing, in its own validation). The classes are ``--num-classes``, else those
the dataset format fixes (HAM10000's 7, ``synthetic``'s ``num_classes``), else
:data:`DEFAULT_NUM_CLASSES`, and the result says which.

A grid file counts the methods of each of its cells: cells sharing a backbone, image size and class
count make one :class:`MethodCounts`, and a method configured alike in several cells is one row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medpeft_ray.config.grid import is_grid, load_grid
from medpeft_ray.config.loading import load_search_config, read_yaml
from medpeft_ray.config.search_file import SearchConfig
from medpeft_ray.data.registry import get_dataset
from medpeft_ray.methods import method_summaries

#: the classes a head is sized for when neither --num-classes nor the dataset format says (ChestX-ray14's 14)
DEFAULT_NUM_CLASSES = 14


@dataclass
class MethodCounts:
    """One model's methods with their parameter counts: a table of ``medpeft-ray methods``.

    ``rows`` are :func:`~medpeft_ray.methods.method_summaries`' rows, each with the ``experiments``
    that configure the method so (a grid's cells), ``num_classes`` and ``image_size``.
    """

    backbone: str
    image_size: int
    num_classes: int
    #: where the class count comes from, in words to follow it ("from --num-classes", "of the ham10000 format")
    classes_from: str
    #: what options the rows are counted under, in words ("default options", "options of lora.yaml")
    options_from: str
    rows: list[dict[str, Any]] = field(default_factory=list)


def default_method_counts(backbone: str, num_classes: int | None, image_size: int) -> MethodCounts:
    """Every method that applies to ``backbone``, under its default options."""
    classes, classes_from = (num_classes, "from --num-classes") if num_classes else (DEFAULT_NUM_CLASSES, "by default")
    counts = MethodCounts(backbone, image_size, classes, classes_from, "default options")
    counts.rows = [{**row, "num_classes": classes, "image_size": image_size, "experiments": []}
                   for row in method_summaries(backbone, classes, image_size)]
    return counts


def search_method_counts(path: Path, num_classes: int | None = None) -> list[MethodCounts]:
    """The methods of the search file or grid file ``path`` (each cell's, for a grid), counted.

    Raises:
        ConfigError: the file is not a valid search or grid file (naming file, cell and key), or
            timm does not know a backbone of it.
    """
    raw = read_yaml(path) if path.is_file() else None
    if is_grid(raw):
        configs = [cell.config for cell in load_grid(path, raw, require_files=False)]
        options_from = f"options of each of the {len(configs)} cells of {path.name}"
    else:
        configs = [load_search_config(path, require_files=False)]
        options_from = f"options of {path.name}"
    groups: dict[tuple[str, int, int], _Group] = {}
    for config in configs:
        classes, fixed_by = _classes(config, num_classes)
        group = groups.setdefault((config.model.backbone, config.dataset.image_size, classes), _Group())
        group.classes_from.setdefault(fixed_by, None)
        for name in config.method.names:
            options = config.method.options_for(name)
            key = json.dumps([name, options], sort_keys=True, default=str)
            group.methods.setdefault(key, (name, options, []))[2].append(config.experiment_name)
    made = []
    for (backbone, image_size, classes), group in groups.items():
        counts = MethodCounts(backbone, image_size, classes, group.said(), options_from)
        for name, options, experiments in group.methods.values():
            (row,) = method_summaries(backbone, classes, image_size, {name: options})
            counts.rows.append({**row, "num_classes": classes, "image_size": image_size, "experiments": experiments})
        made.append(counts)
    return made


@dataclass
class _Group:
    """The cells that share a backbone, image size and class count: where their classes come from, and
    their methods (by name and options: the experiments that configure each)."""

    #: (how, format) in first-seen order; how is "option" (--num-classes), "format" (it fixes the
    #: classes) or "files" (the default count: the format's files decide the real one)
    classes_from: dict[tuple[str, str], None] = field(default_factory=dict)
    methods: dict[str, tuple[str, dict[str, Any], list[str]]] = field(default_factory=dict)

    def said(self) -> str:
        """Where the classes come from, in words to follow the count."""
        formats = {how: [name for kind, name in self.classes_from if kind == how] for how in ("format", "files")}
        phrases = ["from --num-classes"] if any(how == "option" for how, _ in self.classes_from) else []
        if formats["format"]:
            phrases.append(f"of the {' and '.join(formats['format'])} format{'s' * (len(formats['format']) > 1)}")
        if formats["files"]:
            phrases.append(f"by default (the files of a {' or '.join(formats['files'])} dataset decide its classes: "
                           "give --num-classes)")
        return "; ".join(phrases)


def _classes(config: SearchConfig, num_classes: int | None) -> tuple[int, tuple[str, str]]:
    """The search's class count, and where it comes from (see :attr:`_Group.classes_from`)."""
    spec = get_dataset(config.dataset.name)
    if num_classes:
        return num_classes, ("option", spec.name)
    fixed = spec.fixed_classes(spec.options.model_validate(config.dataset.options))
    if fixed:
        return len(fixed), ("format", spec.name)
    return DEFAULT_NUM_CLASSES, ("files", spec.name)
