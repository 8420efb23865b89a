"""Driver-side Tune callbacks: write each finished trial to the leaderboard, and show progress.

They run in the driver process, so every leaderboard write of a search comes from one process,
as soon as the trial ends (a driver killed later loses no finished trial).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune import Callback

from medpeft_ray.config import SearchConfig
from medpeft_ray.fault_points import fault_point
from medpeft_ray.leaderboard import LeaderboardStore, TrialRecord
from medpeft_ray.metrics import METRICS, best_first_key, better, names_on_split
from medpeft_ray.models.checkpoints import file_sha256
from medpeft_ray.search.progress import SearchReporter, format_params, format_value
from medpeft_ray.search.trial_checkpoints import TrialCheckpoints

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

    from medpeft_ray.search.tune_side import ExecutorHandouts

log = logging.getLogger(__name__)


@dataclass
class _TrialProgress:
    started_at: float  # when an executor took the trial (until then: when Tune started it)
    best: dict[str, Any] | None = None
    last: dict[str, Any] | None = None
    epochs_run: int = 0
    number: int = 0
    #: every validation metric per epoch ({"epoch": [...], "<metric>": [...]}): the row keeps only
    #: the best epoch's values in its columns, the report draws the learning curves from this
    curve: dict[str, list[Any]] = field(default_factory=dict)
    #: seconds the trial waited for an executor before one took it; None until one took it (or
    #: for a trial with no executor to wait for: a cold trial starts its own workers)
    waited_s: float | None = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a search started before curves (or waits) were kept, resumed now, unpickles progress without one
        self.__dict__.update({"curve": {}, "waited_s": None, **state})


@dataclass
class SearchTimeline:
    """When a search's trials ran: slot utilisation is their training time over the slot-seconds
    from the first trial's start to the last one's end."""

    first_start: float | None = None
    last_end: float | None = None
    train_s: float = 0.0
    trials: int = 0

    def note(self, started_at: float, ended_at: float, train_s: float | None) -> None:
        self.first_start = started_at if self.first_start is None else min(self.first_start, started_at)
        self.last_end = ended_at if self.last_end is None else max(self.last_end, ended_at)
        self.train_s += train_s or 0.0
        self.trials += 1

    def utilisation(self, slots: int) -> float | None:
        if self.first_start is None or self.last_end is None or self.last_end <= self.first_start:
            return None
        return self.train_s / (max(1, slots) * (self.last_end - self.first_start))


@dataclass
class TrialSummary:
    """What the search remembers of a finished trial (for its closing table and timings)."""

    record: TrialRecord
    params: dict[str, Any] = field(default_factory=dict)


def error_summary(text: str | None) -> str:
    """The one line of a trial's error trace that says what went wrong."""
    if not text:
        return "trial failed (no error recorded)"
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for pattern in (r"(?:TrialFailed|DataError|CheckpointError|MedpeftError|ConfigError): (.*)", r"^(\w*Error: .*)$"):
        for line in reversed(lines):
            match = re.search(pattern, line)
            if match:
                return match.group(1)[:500]
    return lines[-1][:500]


def _error_text(trial: Any) -> str | None:
    """The trial's error trace: Tune writes it to the trial's local folder at once and copies it
    to the results storage later, so the local file is read first."""
    local = getattr(trial, "error_file", None)
    if local and Path(local).is_file():
        return Path(local).read_text(errors="replace")
    return trial.get_error()


class StudyTail(Callback):
    """Sets ``tail`` once the study will start no more trials: all ``num_samples`` started, or its
    budget share is spent (the search then starts the next study beside this one's last trials)."""

    def __init__(self, num_samples: int, share: Any, tail: Any) -> None:
        self.num_samples, self.share, self.tail = num_samples, share, tail
        self.started = 0

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.started = max(self.started, len(trials))
        self._check()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._check()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._check()

    def _check(self) -> None:
        if self.tail is not None and (self.started >= self.num_samples or self.share.spent):
            self.tail.set()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "tail": None}  # an event of this process; a restored study has its own


def sampled_point(trial: Any, role: str) -> tuple[dict[str, Any], int | None, str | None]:
    """A Tune trial's sampled point, its seed where it overrides the config's (a confirmation's),
    and the search trial a confirmation re-trains (its config is ``{"point": ...}``)."""
    if role == "confirmation":
        point = trial.config["point"]
        return dict(point["params"]), int(point["seed"]), str(point["trial_id"])
    return dict(trial.config), None, None


class LeaderboardCallback(Callback):
    """Records each trial's best epoch, cost and config when the trial completes, stops or fails.

    ``role="confirmation"``: the trials re-train a search trial's configuration with another seed
    (:func:`medpeft_ray.search.confirm.confirm_study`); each reports once, at its end, its best
    validation epoch's values (``best_<metric>``) and that epoch's test-split values.

    With warm executors (``handouts``), a trial that Tune started waits for an executor: its line
    says so, and says ``started`` once an executor took it; its wall time runs from then (the
    wait is shown beside it).
    """

    def __init__(self, config: SearchConfig, label_ratio: float, db_url: str, console: SearchReporter | None = None,
                 timeline: SearchTimeline | None = None, role: str = "search",
                 handouts: ExecutorHandouts | None = None) -> None:
        self.config = config
        self.role = role
        self.timeline = timeline
        self.label_ratio = label_ratio
        self.db_url = db_url
        self.console = console  # the search's SearchReporter: the trials' lines and its live view
        self._store: LeaderboardStore | None = None
        self.metric = config.search.metric
        self.epochs = config.train.epochs_for(label_ratio)  # this study's budget
        self.progress: dict[str, _TrialProgress] = {}
        self.handouts = handouts  # when executors took the trials; None: cold trials, which wait for none
        self._waiting: dict[str, Trial] = {}  # trials Tune started that no executor has taken yet, by id
        #: trials an executor took before Tune's start of them reached this callback: id -> when
        self._taken: dict[str, float] = {}

    # -- Tune hooks ---------------------------------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # A trial restored with the search keeps its start and number; its executor reports its
        # recorded epochs again, which rebuild the curve and the best epoch (replacing, not adding).
        if trial.trial_id not in self.progress:
            self.progress[trial.trial_id] = _TrialProgress(started_at=time.time(), number=len(self.progress) + 1)
        params = dict(sorted(trial.config.items()))
        if self.handouts is None:
            self._say(trial, f"started  {self._params(trial)}", params=params)
            return
        self._waiting[trial.trial_id] = trial
        taken_at = self._taken.pop(trial.trial_id, None)
        if taken_at is not None:  # an executor took it at once
            self._taken_by_executor(trial, taken_at, params=params)
        else:
            self._say(trial, f"waiting for an executor  {self._params(trial)}", status="waiting", params=params)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        """Between Tune's steps: the trials that an executor took since the last step start."""
        if self.handouts is None:
            return
        for trial_id, taken_at in self.handouts.poll().items():
            trial = self._waiting.get(trial_id)
            if trial is not None:
                self._taken_by_executor(trial, taken_at)
            elif trial_id not in self.progress or self.progress[trial_id].waited_s is None:
                self._taken[trial_id] = taken_at  # Tune's start of it comes next

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if trial.trial_id in self._waiting:  # its first epoch came before the hand-out was heard of
            self._taken_by_executor(trial, float(result.get("dispatched_at") or time.time()))
        p = self._state(trial)
        p.last, p.epochs_run = result, int(result.get("epoch", p.epochs_run + 1))
        if self.role != "confirmation":  # a confirmation reports once, at its end: no curve to draw
            # a trial restored from its checkpoint reports again from there: its values replace the lost run's
            keep = sum(1 for epoch in p.curve.get("epoch", []) if epoch < p.epochs_run)
            for name in ("epoch", *METRICS):
                values = p.curve.setdefault(name, [])
                del values[keep:]
                values.append(p.epochs_run if name == "epoch" else result.get(name))
        value = result.get(self.metric)
        best = None if p.best is None else p.best.get(self.metric)
        if value is not None and better(value, best, self.config.search.resolved_mode):
            p.best = result
        shown = f"{self.metric}={format_value(value)}"
        stopping = self.config.search.stopping_metric
        if stopping != self.metric:  # FID is not there every epoch; the scheduler's metric is
            shown = (f"{stopping}={format_value(result.get(stopping))}"
                     + (f"  {self.metric}={format_value(value)}" if value is not None and value == value else ""))
        self._say(trial, f"epoch {p.epochs_run}/{self.epochs}  {shown}", value=value)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        p = self._state(trial)
        status = "completed" if p.epochs_run >= self.epochs else "stopped"
        self._waiting.pop(trial.trial_id, None)
        self._finish(trial, status, None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._waiting.pop(trial.trial_id, None)
        self._finish(trial, "failed", error_summary(_error_text(trial)))

    # Tune pickles its callbacks with the experiment state: the database engine and the console
    # are process-local and made again where needed, and the trials waiting for an executor are
    # started again (and wait again) when the study is restored.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None, "console": None, "timeline": None, "_waiting": {}, "_taken": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a callback pickled before waits were followed (a search resumed across an upgrade) has none
        self.__dict__.update({"handouts": None, "_waiting": {}, "_taken": {}, **state})

    # What Tune saves beside its experiment state and gives back to the restored callback: the
    # running trials' progress (their start, so that a row's wall time spans the interruption).
    def get_state(self) -> dict[str, Any] | None:
        return {"progress": dict(self.progress)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.progress.update(state.get("progress") or {})

    @property
    def store(self) -> LeaderboardStore:
        if self._store is None:
            self._store = LeaderboardStore(self.db_url)
        return self._store

    # -- helpers ------------------------------------------------------------------------------
    def _state(self, trial: Any) -> _TrialProgress:
        return self.progress.setdefault(trial.trial_id, _TrialProgress(started_at=time.time(), number=len(self.progress) + 1))

    def _params(self, trial: Any) -> str:
        return format_params(dict(sorted(trial.config.items())))

    def _taken_by_executor(self, trial: Any, taken_at: float, **event: Any) -> None:
        """An executor took the waiting ``trial`` at ``taken_at``: its line says it started, and its
        wall time runs from then (a trial that waited before, restored with the search, keeps its first start)."""
        self._waiting.pop(trial.trial_id, None)
        p = self._state(trial)
        if p.waited_s is None:
            p.waited_s = max(0.0, taken_at - p.started_at)
            p.started_at = max(p.started_at, taken_at)
        waited = f"  (waited {p.waited_s:.0f} s for an executor)" if p.waited_s >= 1 else ""
        self._say(trial, f"started  {self._params(trial)}{waited}", status="running", **event)

    def _say(self, trial: Any, message: str, **event: Any) -> None:
        """The trial's line, and its ``status`` / ``value`` / ``params`` for the reporter's live view."""
        if self.console is not None:
            self.console.trial(self.label_ratio, trial.trial_id, self._state(trial).number,
                               self.config.search.num_samples, message, **event)

    def _pretrained(self) -> dict[str, str | None]:
        """The row's ``checkpoint_file`` and ``checkpoint_sha256``: the pre-trained weights the trial started from.

        The hash was computed in the pre-flight step and is cached per (path, size, mtime).
        """
        path = self.config.model.checkpoint
        if path is None:
            return {"checkpoint_file": None, "checkpoint_sha256": None}
        try:
            sha256: str | None = file_sha256(path)
        except OSError:  # the file went away after the search started: its path is still worth keeping
            sha256 = None
        return {"checkpoint_file": str(path), "checkpoint_sha256": sha256}

    def _scores(self, best: dict[str, Any], curve: dict[str, list[Any]] | None = None) -> dict[str, Any]:
        """The row's metric columns and details from the result of its best epoch, with the
        per-epoch ``curve`` added to the details when there is one."""
        prefix = "best_" if self.role == "confirmation" else ""  # a confirmation reports its best epoch's as best_*
        details = best.get(f"{prefix}details")
        details = json.loads(details) if isinstance(details, str) else None
        if curve:
            details = {**(details or {}), "curve": curve}
        return {
            **{name: best.get(f"{prefix}{name}") for name in METRICS},
            **{name: best.get(name) for name in names_on_split("test")},
            "best_epoch": best.get("test_epoch" if self.role == "confirmation" else "epoch"),
            "details": details,
        }

    def _finish(self, trial: Any, status: str, error: str | None) -> None:
        p = self._state(trial)
        ended = time.time()
        best, last = p.best or {}, p.last or {}
        sampled, seed, source_trial = sampled_point(trial, self.role)
        first_step = last.get("first_step_at")
        trial_config = self.config.search_space.trial_config(self.label_ratio, sampled)
        record = TrialRecord(
            experiment=self.config.experiment_name,
            trial_id=trial.trial_id,
            dataset=self.config.dataset.row_name,
            label_ratio=self.label_ratio,
            method=trial_config.method.name,
            backbone=self.config.model.backbone,
            status=status,  # type: ignore[arg-type]
            config=trial_config.model_dump(mode="json"),
            params=sampled,
            **self._scores(best, p.curve),  # the best epoch's value of every metric
            epochs_run=p.epochs_run,
            trainable_params=last.get("trainable_params"),
            total_params=last.get("total_params"),
            wall_time_s=ended - p.started_at,
            # from the trial's start, or from when an executor took it if it waited for one
            startup_s=(first_step - max(p.started_at, last.get("dispatched_at") or 0.0)) if first_step else None,
            train_time_s=last.get("train_time_s"),
            skipped_images=last.get("skipped_images"),
            checkpoint=best.get("checkpoint_path"),
            predictions=best.get("predictions"),
            error=error,
            role=self.role,  # type: ignore[arg-type]
            seed=trial_config.train.seed if seed is None else seed,
            source_trial=source_trial,
            **self._pretrained(),
        )
        fault_point("before_row", record.epochs_run)
        self.store.record(record)
        if self.timeline is not None:
            self.timeline.note(p.started_at, ended, record.train_time_s)
        if status == "failed":
            self._say(trial, f"[red]failed[/red]: {error}", status="failed")
        else:
            startup = f", start-up {record.startup_s:.0f} s" if record.startup_s is not None else ""
            if p.waited_s is not None and p.waited_s >= 1:
                startup += f", waited {p.waited_s:.0f} s"  # the started line said what for
            self._say(
                trial,
                f"{status}: best {self.metric}={format_value(best.get(self.metric))} at epoch {record.best_epoch} "
                f"({record.wall_time_s:.0f} s{startup})",
                status=status, value=best.get(self.metric),
            )


class CheckpointRetention(Callback):
    """Keeps a study's checkpoints bounded: what a trial may still need, and the best trials' only.

    While a trial runs, its executor keeps its ``train.checkpoints_to_keep`` best epochs and its
    latest (to resume from). Once it ends it resumes no more: its latest goes unless it is among
    its best. Per method, only the ``search.checkpoint_trials`` best ended trials of the study keep
    any checkpoint; a trial pushed out of them by a better one loses its checkpoints (its row, the
    record of its epochs and its curve stay). A 1,000-trial search thus keeps tens of checkpoints,
    not thousands.

    Args:
        trial_folder: ``trial_folder(trial_id)``: the trial's folder in the results storage.
    """

    def __init__(self, config: SearchConfig, trial_folder: Any) -> None:
        self.trial_folder = trial_folder
        self.keep_trials = config.search.checkpoint_trials
        self.keep_epochs = config.train.checkpoints_to_keep
        self.metric, self.mode = config.search.metric, config.search.resolved_mode
        #: per method: (best value, trial id) of the ended trials that still keep checkpoints
        self.kept: dict[str, list[tuple[float | None, str]]] = {}

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended(trial.trial_id, str(trial.config.get("method", "")))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended(trial.trial_id, str(trial.config.get("method", "")))

    def ended(self, trial_id: str, method: str) -> None:
        try:
            checkpoints = TrialCheckpoints(self.trial_folder(trial_id), self.keep_epochs, self.metric, self.mode)
            entries = sorted(checkpoints.index(), key=lambda e: (best_first_key(e["value"], self.mode), e["epoch"]))
            best = entries[: self.keep_epochs]
            checkpoints.retain({entry["epoch"] for entry in best})
            if not self.keep_trials:
                return
            kept = self.kept.setdefault(method, [])
            kept.append((best[0]["value"] if best else None, trial_id))
            kept.sort(key=lambda item: best_first_key(item[0], self.mode))  # stable: the earlier trial wins a tie
            for _, dropped in kept[self.keep_trials:]:
                TrialCheckpoints(self.trial_folder(dropped), self.keep_epochs, self.metric, self.mode).retain(set())
            del kept[self.keep_trials:]
        except OSError as exc:  # the storage refused: the checkpoints stay, the search goes on
            log.warning("checkpoints of trial %s were not trimmed: %s", trial_id, exc)

    # what Tune saves with the study, so that a resumed search goes on ranking the trials that ended before
    def get_state(self) -> dict[str, Any] | None:
        return {"kept": self.kept}

    def set_state(self, state: dict[str, Any]) -> None:
        self.kept = {method: [tuple(item) for item in items] for method, items in (state.get("kept") or {}).items()}
