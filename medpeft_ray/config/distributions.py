"""Distributions of searched parameters (``space.<name>``), as the YAML writes them.

Parsed and checked here; :mod:`medpeft_ray.config.space` turns them into Optuna suggestions.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator

from medpeft_ray.errors import ConfigError
from medpeft_ray.schema import Strict


class FloatDistribution(Strict):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)


class IntDistribution(Strict):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)


class CategoricalDistribution(Strict):
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
DISTRIBUTIONS: dict[str, type[Strict]] = {
    "float": FloatDistribution,
    "int": IntDistribution,
    "categorical": CategoricalDistribution,
}


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
