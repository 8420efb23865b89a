"""The leaderboard by filter: the store's matching rows handed to a view in one call.

``LeaderboardStore(url).compare(dataset="nih")`` is ``views.compare(store.query(dataset="nih"))``.
It sits above both :mod:`~medpeft_ray.leaderboard.store` (rows, no ranking) and
:mod:`~medpeft_ray.leaderboard.views` (DataFrames, no database), neither of which imports the other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import medpeft_ray.leaderboard.views as views
from medpeft_ray.errors import MedpeftError
from medpeft_ray.leaderboard.store import TrialStore

if TYPE_CHECKING:
    import pandas as pd

#: The keyword filters every view takes (those of ``TrialStore.query``).
FILTERS = ("experiment", "dataset", "label_ratio", "method", "backbone", "status", "role", "since", "until")


def describe_filters(filters: dict[str, Any]) -> str:
    """``{"dataset": "nih", "label_ratio": 0.01}`` as ``dataset 'nih', label ratio 0.01``."""
    parts = []
    for key, value in filters.items():
        if value is None:
            continue
        if key == "label_ratio":
            parts.append(f"label ratio {value:g}")
        elif isinstance(value, str):
            parts.append(f"{key} {value!r}")
        elif isinstance(value, (list, tuple)):
            parts.append(f"{key} {', '.join(map(repr, value))}")
        else:
            parts.append(f"{key} {value}")
    return ", ".join(parts)


class LeaderboardStore(TrialStore):
    """The store, and each view of :mod:`~medpeft_ray.leaderboard.views` over the rows matching ``filters``."""

    def best(self, *, metric: str = "val_auroc", **filters: Any) -> "pd.DataFrame":
        """The single best trial matching ``filters`` (a one-row DataFrame); raises when none matches."""
        frame = self.rows(filters)
        what = describe_filters(filters)
        try:
            return views.best(frame, metric=metric, what=f"the trials matching {what}" if what else "the leaderboard")
        except MedpeftError as exc:
            if len(frame):
                raise
            raise MedpeftError(f"{exc}; {self.describe()}") from None

    def best_per_group(self, by: Sequence[str], *, metric: str = "val_auroc", **filters: Any) -> "pd.DataFrame":
        """The best trial of each group of ``by`` columns (e.g. ``["method"]``), best first."""
        return views.best_per_group(self.rows(filters), by, metric=metric)

    def compare(self, *, by: str = "method", metric: str = "val_auroc", **filters: Any) -> "pd.DataFrame":
        """Methods (or ``by``) as rows, (dataset, label ratio) as columns, best metric per cell, mean rank."""
        return views.compare(self.rows(filters), by=by, metric=metric)

    def pareto(self, *, metric: str = "val_auroc", **filters: Any) -> "pd.DataFrame":
        """Per (dataset, label ratio), the trials not beaten on both ``metric`` and trainable parameters."""
        return views.pareto(self.rows(filters), metric=metric)

    def progress(self, *, metric: str = "val_auroc", **filters: Any) -> "pd.DataFrame":
        """Best-so-far ``metric`` against cumulative trial time and epochs, per study."""
        return views.progress(self.rows(filters), metric=metric)

    def importance(self, *, metric: str = "val_auroc", **filters: Any) -> "pd.DataFrame":
        """How strongly each searched hyperparameter goes with ``metric``, per method."""
        return views.importance(self.rows(filters), metric=metric)

    def rows(self, filters: dict[str, Any]) -> "pd.DataFrame":
        """The rows matching ``filters``, in the store's order; a filter :data:`FILTERS` lacks is a TypeError."""
        unknown = set(filters) - set(FILTERS)
        if unknown:
            raise TypeError(f"unknown filter(s): {', '.join(sorted(unknown))}")
        return self.query(**filters)
