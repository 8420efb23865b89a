"""``medpeft-ray search --space FILE --dry-run``: pre-flight, timed steps and the forecast, for each search.

:func:`dry_run` is what the command runs: for a search file, or each cell of a grid file, the
search's own pre-flight, then :func:`timed_forecast` (no Ray, no trial), the forecast kept in the
search's manifest; it yields the lines the command prints as they come.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from medpeft_ray.search.cluster import DRIVER_RESOURCE, DRIVER_SLOTS, ClusterCapacity, plan_resources
from medpeft_ray.search.forecast.estimate import SearchForecast, devices_per_trial, forecast
from medpeft_ray.search.forecast.lines import forecast_lines
from medpeft_ray.search.forecast.recorded import startup_figures
from medpeft_ray.search.forecast.timing import time_steps
from medpeft_ray.search.manifest import save_dry_run_forecast
from medpeft_ray.search.preflight import preflight
from medpeft_ray.search.tracking import check_tracking
from medpeft_ray.storage import default_db_url, results_location

if TYPE_CHECKING:
    from medpeft_ray.config import SearchConfig
    from medpeft_ray.config.grid import GridCell


@dataclass(frozen=True)
class DryRunLine:
    """One line of the dry run's output: ``heading`` (a search's name, on its first line) then ``text``."""

    text: str
    heading: str = ""

    def __str__(self) -> str:
        return self.heading + self.text


def dry_run(searches: SearchConfig | list[GridCell], *, results: str | Path | None = None,
            db_url: str | None = None) -> Iterator[DryRunLine]:
    """Forecasts a search, or each search of a grid (its cells), and keeps each forecast where the search
    will record it; yields the lines to show, each as soon as it is known (timing takes a while).

    Starts no Ray and no trial.

    Raises:
        MedpeftError: a search's pre-flight refuses it (as the search would, before starting Ray).
    """
    for search in searches if isinstance(searches, list) else [searches]:
        config = getattr(search, "config", search)  # a grid's cell, or the search itself
        name = config.experiment_name
        yield DryRunLine(": forecast (dry run: no Ray, no trial)", heading=name)
        check_tracking(config, results_location(results)[1])  # as the search does: MLflow and W&B usable
        facts = preflight(config)  # exactly what the search would check before Ray
        made = timed_forecast(config, facts, results=results, db_url=db_url)
        for line in forecast_lines(made):
            yield DryRunLine(line)
        # the search then keeps it in its manifest, beside what it took
        storage, _ = results_location(results)
        kept = save_dry_run_forecast(storage, name, made.to_dict())
        yield DryRunLine(f"forecast kept in {kept} (the search of {name} records it)")


def timed_forecast(config: SearchConfig, facts: dict[str, Any], *, results: str | Path | None = None,
                   db_url: str | None = None) -> SearchForecast:
    """Times each method's steps here and forecasts the search; ``facts``: the config's pre-flight.

    Starts no Ray and writes nothing to the results folder (the leaderboard is only read, if there is one).
    """
    plan = plan_resources(config, local_capacity())
    # as run_search finds its leaderboard (a cloud results URI names no local file: defaults)
    db_url = db_url or default_db_url(results)
    startup = startup_figures(config, db_url)
    threads = max(1, int(plan.per_worker.get("CPU", 1)))
    timings = time_steps(config, facts, plan.use_gpu, threads)
    return forecast(config, facts, timings, startup, plan.concurrency, devices_per_trial(config, plan))


def local_capacity() -> ClusterCapacity:
    """What a local Ray would hold, read without starting one: Ray's own defaults are the CPU
    count of this process and the GPUs torch sees."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ClusterCapacity({"CPU": float(cpus), "GPU": float(gpus), DRIVER_RESOURCE: float(DRIVER_SLOTS)})
