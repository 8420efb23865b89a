"""Configurations a study tries first: hand-given points and the leaderboard's best known ones.

``search.points_to_evaluate`` are tried in every study. With ``search.warm_start.from_leaderboard``,
each study also starts from the ``top_k`` best trials recorded for the same dataset, backbone and
method: at the same label ratio in earlier experiments, and at the label ratio nearest to it among
those this search has already finished (the best rank or lr at 10% labels is a good first guess at
1%). Only the searched parameters of a recorded trial are reused, and only where they fall inside
this search's ranges; Optuna then samples anything a point leaves out, and learns from the results
like from any other trial.
"""

from __future__ import annotations

import math
from typing import Any

from medpeft_ray.config import METHOD_PARAM, SearchConfig
from medpeft_ray.label_ratios import LABEL_RATIO_TOLERANCE
from medpeft_ray.leaderboard import LeaderboardStore
from medpeft_ray.metrics import get_metric


def warm_start_points(config: SearchConfig, label_ratio: float, db_url: str, searched_ratios: list[float]) -> list[dict[str, Any]]:
    """The points the study of ``label_ratio`` tries first, best known first, without duplicates."""
    space = config.search_space
    points: list[dict[str, Any]] = [dict(p) for p in config.search.points_to_evaluate]
    settings = config.search.warm_start
    if settings.from_leaderboard:
        for method, params in _best_known(config, label_ratio, db_url, searched_ratios):
            point = space.within(space.point_from_record(method, params if isinstance(params, dict) else {}))
            if point.keys() - {METHOD_PARAM}:
                points.append(point)
    unique: list[dict[str, Any]] = []
    for point in points:
        if point not in unique:
            unique.append(point)
    return unique


def _best_known(
    config: SearchConfig, label_ratio: float, db_url: str, searched_ratios: list[float]
) -> list[tuple[str, dict[str, Any]]]:
    """(method, sampled params) of the best recorded trials: same ratio (any earlier run), then the nearest searched ratio."""
    metric = config.search.metric
    rows = LeaderboardStore(db_url).query(dataset=config.dataset.row_name, backbone=config.model.backbone, role="search",
                                          metric=metric, ascending=get_metric(metric).ascending)
    if rows.empty:
        return []
    rows = rows[(rows["status"] != "failed") & rows[metric].notna() & rows["method"].isin(config.method.names)]
    k = config.search.warm_start.top_k
    same_ratio = rows[(rows["label_ratio"] - label_ratio).abs() < LABEL_RATIO_TOLERANCE].head(k)
    chosen = list(zip(same_ratio["method"], same_ratio["params"]))
    if searched_ratios:
        nearest = min(searched_ratios, key=lambda r: abs(math.log(r) - math.log(label_ratio)))
        same_nearest = (rows["label_ratio"] - nearest).abs() < LABEL_RATIO_TOLERANCE
        this_search = rows[(rows["experiment"] == config.experiment) & same_nearest]
        chosen += list(zip(this_search["method"].head(k), this_search["params"].head(k)))
    return chosen
