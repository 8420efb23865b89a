"""The best-config leaderboard: the results store, its views, terminal tables and reports.

A trial's exports (its config YAML, its adapter) rebuild the model: :mod:`medpeft_ray.train.export`.
"""

from medpeft_ray.leaderboard.board import LeaderboardStore
from medpeft_ray.leaderboard.store import (
    SCHEMA_VERSION,
    TrialRecord,
    TrialStore,
    optuna_storage,
)

__all__ = ["SCHEMA_VERSION", "LeaderboardStore", "TrialRecord", "TrialStore", "optuna_storage"]
