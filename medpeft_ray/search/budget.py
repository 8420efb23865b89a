"""Search budgets: ``search.time_budget_s`` and ``search.max_trials`` over all label ratios.

A spent budget stops *new* trials only: the searcher tells Tune it is finished, trials already
running train to their end (or to their scheduler's stop) and are recorded as usual, so the
leaderboard holds every trial that started. Each label ratio's study gets an even share of what
is left when it starts; what a study does not use passes on to the next one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from ray.tune.search import Searcher


@dataclass
class SearchBudget:
    """What is left of a search's budgets (None: unlimited); the time runs from ``started_at``
    (a resumed search keeps its first start, so its deadline does not move)."""

    time_s: float | None = None
    trials: int | None = None
    started_at: float = field(default_factory=time.time)
    trials_started: int = 0

    def share(self, studies_left: int) -> "StudyBudget":
        """The next study's share: an even split of the time and trials left over the studies left."""
        deadline = None
        if self.time_s is not None:
            remaining = max(0.0, self.started_at + self.time_s - time.time())
            deadline = time.time() + remaining / max(1, studies_left)
        trials = None
        if self.trials is not None:
            trials = math.ceil(max(0, self.trials - self.trials_started) / max(1, studies_left))
        return StudyBudget(deadline, trials, self)


@dataclass
class StudyBudget:
    """One study's share of the search budget."""

    deadline: float | None
    trials: int | None
    search: SearchBudget
    started: int = 0
    #: why the study stopped starting trials, once it did ("" while within budget)
    spent: str = ""

    def allows_another(self) -> bool:
        if self.deadline is not None and time.time() >= self.deadline:
            self.spent = self.spent or "time budget"
        elif self.trials is not None and self.started >= self.trials:
            self.spent = self.spent or "trial budget"
        return not self.spent

    def count_start(self) -> None:
        self.started += 1
        self.search.trials_started += 1


class ForwardingSearcher(Searcher):
    """A Tune searcher that hands everything to the searcher it wraps; subclasses change what they must."""

    def __init__(self, searcher: Searcher) -> None:
        self.searcher = searcher
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.searcher.set_max_concurrency(max_concurrent)

    def suggest(self, trial_id: str) -> dict | None:
        return self.searcher.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def add_evaluated_point(self, *args: Any, **kwargs: Any) -> None:
        self.searcher.add_evaluated_point(*args, **kwargs)

    # Tune saves each wrapper's own state and the innermost searcher's separately (as it does for
    # its ConcurrencyLimiter): a wrapper's part is what get_state returns.
    def get_state(self) -> dict:
        return {}

    def set_state(self, state: dict) -> None:
        pass


class BudgetedSearch(ForwardingSearcher):
    """Wraps a Tune searcher; once the study's budget is spent it suggests nothing more (FINISHED)."""

    def __init__(self, searcher: Searcher, budget: StudyBudget) -> None:
        super().__init__(searcher)
        self.budget = budget

    def suggest(self, trial_id: str) -> dict | None:
        if not self.budget.allows_another():
            return Searcher.FINISHED
        suggestion = self.searcher.suggest(trial_id)
        if suggestion not in (None, Searcher.FINISHED):
            self.budget.count_start()
        return suggestion

    def get_state(self) -> dict:
        return {"budget": self.budget}

    def set_state(self, state: dict) -> None:
        self.budget = state["budget"]
