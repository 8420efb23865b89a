"""What a running search writes down so that ``medpeft-ray search --resume NAME`` can finish it.

``<results>/searches/<experiment>.json`` holds the validated config, the run's stamp (which names
its Optuna studies), the label ratios whose studies started and those that finished. Tune keeps
each study's own state (trials, searcher, scheduler) under ``<results>/tune/``, Ray Train each
trial's checkpoints under ``<results>/train/``, and Optuna each study's history in the leaderboard's
database: a resumed search restores the unfinished study from them, restarts its interrupted
trials from their last checkpoints, and runs the studies that never started.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.fs

from medpeft_ray.errors import MedpeftError
from medpeft_ray.storage import filesystem as _filesystem  # what Tune and Ray Train use too

MANIFEST_DIR = "searches"


@dataclass
class SearchManifest:
    experiment: str
    config: dict[str, Any]  # the validated SearchConfig, as JSON
    run_stamp: str = field(default_factory=lambda: time.strftime("%Y%m%d-%H%M%S"))
    started_at: float = field(default_factory=time.time)
    studies_started: list[float] = field(default_factory=list)
    studies_done: list[float] = field(default_factory=list)
    #: per label ratio (as text): the confirmation of its best configurations (search.confirm)
    confirmations: dict[str, Any] = field(default_factory=dict)
    #: what the search was expected to cost when it started (forecast.recorded_forecast), or None
    #: when the leaderboard held no epoch times to forecast from
    forecast: dict[str, Any] | None = None
    #: what it did cost, in the forecast's terms (forecast.actual_costs), once it has finished
    actual: dict[str, Any] | None = None
    finished: bool = False
    #: which run of the search this is: 1, then one more per ``--resume``. A trial's folder belongs
    #: to the latest run that delivered it; writers of an older run stop rather than write there.
    attempt: int = 1

    def save(self, storage: str) -> None:
        _write_text(_location(storage, self.experiment), json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, storage: str, experiment: str) -> "SearchManifest":
        """The manifest of the last search named ``experiment`` in ``storage``; MedpeftError if there is none."""
        text = _read_text(_location(storage, experiment))
        if text is None:
            known = sorted(name.removesuffix(".json") for name in _list(f"{storage}/{MANIFEST_DIR}"))
            raise MedpeftError(
                f"{storage}: no search named {experiment!r} to resume"
                + (f" (searches here: {', '.join(known)})" if known else " (no search has run with these results)")
            )
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError) as exc:
            raise MedpeftError(f"{_location(storage, experiment)}: not a search manifest ({exc})") from None


def save_dry_run_forecast(storage: str, experiment: str, forecast: dict[str, Any]) -> str:
    """Keeps a dry run's forecast where the search of ``experiment`` finds it; returns its location."""
    location = f"{storage}/{MANIFEST_DIR}/{experiment}.forecast.json"
    _write_text(location, json.dumps(forecast, indent=1))
    return location


def load_dry_run_forecast(storage: str, experiment: str) -> dict[str, Any] | None:
    """The last dry run's forecast of ``experiment`` in ``storage``, or None."""
    text = _read_text(f"{storage}/{MANIFEST_DIR}/{experiment}.forecast.json")
    try:
        return json.loads(text) if text is not None else None
    except ValueError:  # a damaged file is no forecast; the search goes on without one
        return None


def _location(storage: str, experiment: str) -> str:
    return f"{storage}/{MANIFEST_DIR}/{experiment}.json"


def _write_text(uri: str, text: str) -> None:
    fs, path = _filesystem(uri)
    directory, _, name = path.rpartition("/")
    fs.create_dir(directory, recursive=True)
    partial = f"{directory}/.{name}.partial"
    with fs.open_output_stream(partial) as out:  # written whole, then moved: a kill leaves the old one
        out.write(text.encode())
    fs.move(partial, path)


def _read_text(uri: str) -> str | None:
    fs, path = _filesystem(uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def _list(uri: str) -> list[str]:
    fs, path = _filesystem(uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.Directory:
        return []
    return [info.base_name for info in fs.get_file_info(pyarrow.fs.FileSelector(path)) if info.base_name.endswith(".json")]
