"""What the parts of the warm executors share: an executor's spec and the names of the dispatcher's protocol.

The warm executors (see :mod:`medpeft_ray.search.dispatcher` for their life cycle) are four
process roles, one module each: the trial checkpoints in storage
(:mod:`~medpeft_ray.search.trial_checkpoints`), the executor's workers
(:mod:`~medpeft_ray.search.executor_worker`), the detached actor that hosts each executor's Ray
Train run (:mod:`~medpeft_ray.search.executor_host`), the dispatcher actor
(:mod:`~medpeft_ray.search.dispatcher`) and the Tune side (:mod:`~medpeft_ray.search.tune_side`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medpeft_ray.config import TrialConfig

#: what ``TrialDispatcher.next_trial`` answers an executor that should exit
EXIT = "exit"
#: the Ray namespace of the dispatchers and executor hosts: a search's dispatcher is found by name from any driver
NAMESPACE = "medpeft"


@dataclass(frozen=True)
class ExecutorSpec:
    """What an executor holds: its workers and their resources (a trial fits one with the same)."""

    num_workers: int
    use_gpu: bool
    resources_per_worker: dict[str, float]
    storage_path: str  # where the executors' own Ray Train runs keep their (tiny) state
    experiment: str
    max_executors: int
    threads: int = 1
    worker_start_timeout_s: float = 1800.0
    idle_exit_s: float = 60.0
    #: a trial configuration of the search that executors build once while they set up, so that
    #: the first trial, too, finds the data, the pristine backbone and the method's imports ready
    warm_up: TrialConfig | None = None
    #: names this set of executors (their detached host actors), apart from another search's of the same experiment
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    #: the resources each executor's host asks for (:attr:`medpeft_ray.search.cluster.ResourcePlan.executor_host`):
    #: where the host, its Ray Train controller and their helpers live
    host_resources: dict[str, float] = field(default_factory=dict)

    def fits(self, num_workers: int, use_gpu: bool, resources_per_worker: dict[str, float]) -> bool:
        return (num_workers, use_gpu, dict(resources_per_worker)) == (self.num_workers, self.use_gpu,
                                                                      dict(self.resources_per_worker))
