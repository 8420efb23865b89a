"""The best-config leaderboard: the results store, its views, exports and reports."""

from medpeft_ray.leaderboard.store import (
    SCHEMA_VERSION,
    LeaderboardStore,
    TrialRecord,
    default_db_url,
    optuna_storage,
    results_dir,
)

__all__ = ["SCHEMA_VERSION", "LeaderboardStore", "TrialRecord", "default_db_url", "optuna_storage", "results_dir"]
