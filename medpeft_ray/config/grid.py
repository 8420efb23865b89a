"""A grid file: a study's whole experiment grid as one set of searches, validated before any runs.

A grid names a ``base`` search file and ``axes``; each axis maps names to overrides (partial
search YAML). Every combination of one entry per axis is one search: the overrides deep-merged
over the base, in axis order, named ``<base experiment>-<entry>-<entry>...``::

    grid:
      base: dutt_ham10000.yaml            # a search file, relative to this one
      axes:
        backbone:
          vit_b: {model: {backbone: vit_base_patch16_224}}
          vit_l: {model: {backbone: vit_large_patch16_224}}
        method:
          lora: {method: {name: lora}}
          full: {method: {_replace: true, name: full}}   # not the base's LoRA options

Every cell is validated as a search file is (one line naming the grid file, the cell and the key)
before any of them starts, so a typo in the last cell does not surface hours into the first.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from medpeft_ray.config.loading import read_yaml, validate_search_dict
from medpeft_ray.config.search_file import SearchConfig
from medpeft_ray.errors import ConfigError
from medpeft_ray.schema import Strict, parse_section

#: the top-level key that makes a YAML a grid file instead of a search file
GRID_KEY = "grid"


class GridSection(Strict):
    base: Path = Field(description="the search file every cell starts from (relative to the grid file)")
    axes: dict[str, dict[str, dict[str, Any]]] = Field(
        min_length=1, description="axis -> {entry name: overrides}; one search per combination of entries"
    )


@dataclass(frozen=True)
class GridCell:
    """One search of a grid: its entries' names (one per axis) and its validated config."""

    entries: tuple[str, ...]
    config: SearchConfig


def is_grid(raw: Any) -> bool:
    """Whether a parsed YAML is a grid file."""
    return isinstance(raw, dict) and GRID_KEY in raw


#: in an override mapping, ``_replace: true`` replaces the base's mapping instead of merging into it
#: (a ``full`` cell must not inherit LoRA's ``method.options`` from a LoRA base)
REPLACE_KEY = "_replace"


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied: mappings merged key by key, anything else replaced."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and value.get(REPLACE_KEY):
            merged[key] = {k: v for k, v in value.items() if k != REPLACE_KEY}
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_grid(path: str | Path, raw: Any = None, require_files: bool = True) -> list[GridCell]:
    """Every cell of the grid file ``path``, validated; raises :class:`ConfigError` naming file, cell and key.

    ``require_files=False`` validates the cells as ``load_search_config`` does with it.
    """
    path = Path(path)
    raw = read_yaml(path) if raw is None else raw
    if set(raw) != {GRID_KEY}:
        extra = ", ".join(sorted(set(raw) - {GRID_KEY}))
        raise ConfigError(extra, f"a grid file holds only `{GRID_KEY}` (put settings in its base or its axes)", path.name)
    try:
        grid = parse_section(GridSection, raw[GRID_KEY], GRID_KEY)
    except ConfigError as err:
        raise err.with_file(path.name) from None
    base_path = grid.base if grid.base.is_absolute() else path.parent / grid.base
    if not base_path.is_file():
        raise ConfigError(f"{GRID_KEY}.base", f"file not found: {base_path}", path.name)
    base = read_yaml(base_path)
    if not isinstance(base, dict) or is_grid(base):
        raise ConfigError(f"{GRID_KEY}.base", f"{base_path.name} must be a search file", path.name)
    prefix = base.get("experiment") or base_path.stem
    cells = []
    for combination in itertools.product(*(axis.items() for axis in grid.axes.values())):
        names = tuple(name for name, _ in combination)
        data = base
        for _, overrides in combination:
            data = deep_merge(data, overrides)
        data = {**data, "experiment": "-".join((prefix, *names))}
        source = f"{path.name} (cell {'/'.join(names)})"
        cells.append(GridCell(names, validate_search_dict(data, source, base_path.parent, require_files)))
    experiments = [cell.config.experiment_name for cell in cells]
    if len(set(experiments)) != len(experiments):
        raise ConfigError(f"{GRID_KEY}.axes", "two cells have the same experiment name; give entries distinct names",
                          path.name)
    return cells
