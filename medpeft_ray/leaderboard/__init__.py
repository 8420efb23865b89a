"""The best-config leaderboard: the results store and its queries."""

from medpeft_ray.leaderboard.store import LeaderboardStore, TrialRecord, default_db_url, results_dir

__all__ = ["LeaderboardStore", "TrialRecord", "default_db_url", "results_dir"]
