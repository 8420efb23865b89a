"""The best-config leaderboard: the results store, its views, terminal tables and reports.

A trial's exports (its config YAML, its adapter) rebuild the model: :mod:`medpeft_ray.train.export`.
"""

from medpeft_ray.leaderboard.board import LeaderboardStore
from medpeft_ray.leaderboard.store import (
    SCHEMA_VERSION,
    TrialRecord,
    TrialStore,
    default_db_url,
    optuna_storage,
    results_dir,
)

__all__ = ["SCHEMA_VERSION", "LeaderboardStore", "TrialRecord", "TrialStore", "default_db_url", "optuna_storage",
           "results_dir"]
