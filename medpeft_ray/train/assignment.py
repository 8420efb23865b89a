"""One trial as it travels to the workers that train it: the same typed assignment for warm and cold trials.

The Tune trial builds a :class:`TrialAssignment` (``medpeft_ray.search.trial``). A warm trial hands
it to the search's dispatcher, which stamps each delivery to an executor
(:meth:`TrialAssignment.delivered`) and passes it on to the executor's workers; a cold trial
passes it to its own Ray Train run as the single value of ``train_loop_config``
(:data:`ASSIGNMENT_KEY`), read by :func:`medpeft_ray.train.worker.train_loop_per_worker`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medpeft_ray.config import TrialConfig

#: the one key of a cold trial's ``train_loop_config``: its :class:`TrialAssignment`
ASSIGNMENT_KEY = "assignment"


@dataclass(frozen=True)
class TrialAssignment:
    """What the workers of one trial need to train it, warm or cold."""

    trial: TrialConfig  # validated once where it was sampled, never again
    #: after training, score the best validation epoch on the test split (a confirmation run, which
    #: reports once, at its end, instead of every epoch)
    evaluate_test: bool = False
    dataset_key: dict[str, Any] | None = None  # the decode-once cache key, computed once by the search driver
    #: the trial's start-up marks so far (its process's start, its function's), for the start-up breakdown
    started: dict[str, float] = field(default_factory=dict)

    #: where the trial keeps its per-image predictions (the ``predictions`` folder in its results
    #: folder, :mod:`medpeft_ray.evaluation.predictions`); None: not kept
    predictions_uri: str | None = None

    # -- a cold trial's only ----------------------------------------------------------------------
    #: torch threads per worker: a cold trial's workers set them per trial (a warm executor's
    #: workers set theirs once, when the executor sets up)
    threads: int = 1

    # -- a warm trial's only: a cold trial's Ray Train run keeps its own checkpoints and counts its
    # -- own restarts (its FailureConfig), and is never queued --------------------------------------
    #: the trial's folder in the results storage (its checkpoints and record)
    checkpoint_uri: str | None = None
    #: Tune's creation order in the study: a resumed study's trials queue at the dispatcher in this order
    number: int = 0
    #: deliveries after lost workers or a lost executor, at most (``resources.max_failures``; -1: no limit)
    max_failures: int = 0
    attempt: int = 1  # the run of the search (1, then +1 per resume): the first part of the trial folder's fence

    # -- stamped by the dispatcher at each delivery to an executor ---------------------------------
    key: str = ""  # the trial's name at the dispatcher (unique over the studies of a search)
    delivery: int = 0  # 1 for the first delivery, +1 for each after a lost worker or executor
    generation: int = 0  # the dispatcher's start (a restarted dispatcher's is later)
    dispatched_at: float | None = None  # when an executor took the trial

    def delivered(self, key: str, delivery: int, generation: int) -> TrialAssignment:
        """This assignment as handed to an executor now: its ``delivery``-th delivery by the
        dispatcher of ``generation``."""
        return dataclasses.replace(self, key=key, delivery=delivery, generation=generation, dispatched_at=time.time())

    @property
    def fence(self) -> tuple[int, int, int]:
        """(attempt, generation, delivery): a later run of the search, a later dispatcher and a later
        delivery own the trial's folder (see ``TrialCheckpoints``)."""
        return (self.attempt, self.generation, self.delivery)
