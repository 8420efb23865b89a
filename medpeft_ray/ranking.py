"""Which way is better: the one definition the search, the leaderboard and its views rank by.

Kept free of heavy imports so that the config, the store and the views can all import it.
"""

from __future__ import annotations

from typing import Literal

from medpeft_ray.errors import UsageError

Direction = Literal["max", "min"]

#: The quality metrics a search optimises and the leaderboard ranks trials by, with their direction.
METRIC_DIRECTION: dict[str, Direction] = {"val_auroc": "max", "val_loss": "min"}
#: Cost columns: a leaderboard sorted by one of them shows the cheapest first.
COST_COLUMNS = frozenset({"wall_time_s", "startup_s", "train_time_s", "trainable_params", "total_params",
                          "skipped_images"})


def metric_mode(metric: str) -> Direction:
    """``max`` or ``min``: how ``metric`` ranks trials; only quality metrics rank trials against each other.

    Raises:
        UsageError: ``metric`` is not one of :data:`METRIC_DIRECTION`.
    """
    if metric not in METRIC_DIRECTION:
        raise UsageError(f"cannot rank trials by {metric!r}; metrics: {', '.join(METRIC_DIRECTION)}")
    return METRIC_DIRECTION[metric]


def lower_is_better(column: str) -> bool:
    """Whether a leaderboard sorted by ``column`` puts the smallest first (losses, times, parameter counts)."""
    return METRIC_DIRECTION.get(column) == "min" or column in COST_COLUMNS
