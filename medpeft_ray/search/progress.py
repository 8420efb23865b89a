"""What a search tells the person running it: one object, so the driver never asks whether anyone listens.

The CLI hands a :class:`SearchReporter` its ``rich`` console; a library caller or a test gets a
silent one. Trials' own lines (waiting for an executor, started, epoch, finished) come from the
leaderboard callback, which speaks through the same reporter (:meth:`SearchReporter.trial`).

On an interactive terminal the reporter also keeps a live panel below the scrolling lines: per
study a bar of its trials (done, running, waiting, stopped, failed), the best value of the search
metric so far with its parameters, elapsed and estimated time left, and the slots' utilisation,
each line no wider than the terminal (80 columns included). Anywhere else
(a log file, CI, ``ray job logs``) it prints the same lines and nothing else, since cursor movements
would only garble a file.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from rich.console import Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from medpeft_ray.metrics import better

if TYPE_CHECKING:
    from rich.console import Console

    from medpeft_ray.config import SearchConfig
    from medpeft_ray.search.cluster import ClusterCapacity, ResourcePlan


class Timeline(Protocol):
    """When the search's trials ran (``medpeft_ray.search.callbacks.SearchTimeline``): their slot utilisation."""

    def utilisation(self, slots: int) -> float | None: ...


#: the study bar's widest and narrowest: it gives way to the counts beside it on a narrow terminal
BAR_WIDTH, MIN_BAR_WIDTH = 20, 5


def format_value(value: Any) -> str:
    """A metric or parameter value as progress lines show it."""
    return f"{value:.3g}" if isinstance(value, float) else f"{value}"


def format_params(params: dict[str, Any]) -> str:
    """``k=v`` pairs of sampled parameters, floats to three significant digits."""
    return " ".join(f"{k}={format_value(v)}" for k, v in params.items())


def format_duration(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour on."""
    minutes, secs = divmod(round(max(0.0, seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass
class _LiveTrial:
    number: int
    started_at: float  # when an executor took it (until then, when it began waiting for one)
    params: dict[str, Any] = field(default_factory=dict)
    status: str = "running"  # or waiting (for an executor) first; then completed, stopped or failed
    ended_at: float | None = None

    @property
    def unfinished(self) -> bool:
        return self.status in ("running", "waiting")


@dataclass
class _LiveStudy:
    label_ratio: float
    num_samples: int
    started_at: float
    ended_at: float | None = None
    trials: dict[str, _LiveTrial] = field(default_factory=dict)
    best: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)

    def count(self, status: str) -> int:
        return sum(1 for t in self.trials.values() if t.status == status)

    def finished(self) -> int:
        return sum(1 for t in self.trials.values() if not t.unfinished)

    def time_left(self, now: float, slots: int) -> float | None:
        """Seconds until the study's last trial ends, if its trials keep taking as long as the finished
        ones took: the work of the trials not started (a trial waiting for an executor has not) and the
        rest of the running ones, over the slots. None before any trial has finished (nothing to go by)."""
        finished = [t.ended_at - t.started_at for t in self.trials.values() if t.ended_at is not None]
        if not finished:
            return None
        mean = sum(finished) / len(finished)
        not_started = max(0, self.num_samples - len(self.trials)) + self.count("waiting")
        running = sum(max(0.0, mean - (now - t.started_at)) for t in self.trials.values()
                      if t.ended_at is None and t.status == "running")
        return (not_started * mean + running) / max(1, slots)


class SearchReporter:
    """Progress lines of one search; silent without a console."""

    def __init__(self, console: Console | None = None, clock: Callable[[], float] = time.time) -> None:
        self.console = console
        self.clock = clock  # the live view's times (a test gives a clock of its own)
        #: whether the live panel is drawn: a terminal that can move its cursor (rich's
        #: ``is_terminal`` also honours FORCE_COLOR and TTY_COMPATIBLE)
        self.live_view = bool(console is not None and console.is_terminal and not console.is_dumb_terminal)
        self.metric, self.mode, self.slots, self.timeline = None, "max", 1, None
        self.storage: str | None = None
        self._studies: dict[float, _LiveStudy] = {}
        # study threads report trials while rich's refresh thread draws the panel; the live display
        # has a lock of its own, never taken under this one (drawing takes the console's lock, then
        # this one)
        self._lock = threading.Lock()
        self._live_lock = threading.Lock()
        self._live: Any = None
        self._quiet = False  # after an interruption: the leaving process's last trial events are not shown

    def say(self, text: str, **options: Any) -> None:
        if self.console is not None:
            self.console.print(text, **options)

    def ratio(self, label_ratio: float, text: str) -> None:
        """A line about the study of one label ratio, marked with it."""
        self.say(f"[dim]\\[ratio {label_ratio:g}][/dim] {text}", highlight=False, soft_wrap=True)

    # -- before trials ------------------------------------------------------------------------

    def search_starts(self, config: "SearchConfig", facts: dict[str, Any]) -> None:
        self.say(
            f"[bold]{config.experiment}[/bold]: {' | '.join(config.method.names)} on {config.model.backbone} "
            f"({_describe_trainable(facts)} of {facts['total_params']:,} parameters train), "
            f"dataset {config.dataset.name} {facts['images']}, {facts['classes']} classes; "
            f"label ratios {config.dataset.label_ratios} x {config.search.num_samples} trials"
        )
        if "normalisation" in facts:
            images = "RGB" if facts.get("channels") == 3 else "grey"
            self.say(f"{images} images, normalised with {facts['normalisation']}", soft_wrap=True, highlight=False)
        if facts["skipped"]:
            self.say(
                f"[yellow]{len(facts['skipped'])} unreadable image(s) skipped[/yellow] (dataset.options.skip_unreadable), "
                f"e.g. {facts['skipped'][0]}",
                soft_wrap=True,
            )

    def cluster(self, config: "SearchConfig", plan: "ResourcePlan", capacity: "ClusterCapacity", storage: str) -> None:
        self.storage = storage
        self.say(
            f"Ray cluster {_describe_capacity(capacity)}; {plan.concurrency} trial(s) at a time, "
            f"{config.resources.workers_per_trial} worker(s) each on {_describe_worker(plan)}; results in {storage}",
            soft_wrap=True,
        )
        if plan.note:
            self.say(f"[yellow]{plan.note}[/yellow]", soft_wrap=True)

    def cold_trials(self) -> None:
        self.say("[yellow]resources.warm_executors is off: every trial starts its own Ray Train run (cold)[/yellow]")

    def executors_ready(self, ready: int, wanted: int, seconds: float, warm: int = 0) -> None:
        kept = f", {min(warm, ready)} kept warm from this process's last search" if warm else ""
        self.say(f"{ready} of {wanted} executor(s) ready in {seconds:.0f} s "
                 f"(imports, data and the pre-trained backbone loaded once{kept})", highlight=False)

    # -- studies ------------------------------------------------------------------------------

    def not_searched(self, label_ratio: float, spent: str | None) -> None:
        self.say(f"[yellow]ratio {label_ratio:g}: not searched, the search's {spent or 'budget'} is spent[/yellow]")

    def resuming(self, label_ratio: float) -> None:
        self.ratio(label_ratio, "resuming the interrupted study")

    def trying_first(self, label_ratio: float, points: list[dict[str, Any]]) -> None:
        if points:
            self.ratio(label_ratio, "trying first: " + "; ".join(format_params(p) for p in points))

    def confirmed(self, label_ratio: float, top: int, seeds: int, lines: list[str]) -> None:
        self.say(f"[bold]ratio {label_ratio:g}: top {top} confirmed with {seeds} seeds[/bold]")
        for line in lines:
            self.say(line, highlight=False, soft_wrap=True)

    def pareto_front(self, label_ratio: float, metrics: list[str], front: list[Any]) -> None:
        """The study's Pareto front (Optuna's ``best_trials``), by the second objective."""
        self.say(f"[bold]ratio {label_ratio:g}: Pareto front of {' vs '.join(metrics)}[/bold] ({len(front)} trial(s))")
        for trial in sorted(front, key=lambda t: t.values[1]):
            values = ", ".join(f"{m}={v:.4g}" for m, v in zip(metrics, trial.values))
            self.say(f"  {values}  ({format_params(trial.params)})", highlight=False, soft_wrap=True)

    def budget_spent(self, label_ratio: float, spent: str, started: int) -> None:
        self.say(f"[yellow]ratio {label_ratio:g}: {spent} spent after {started} trial(s); "
                 "no new trials started, the running ones finished[/yellow]")

    @property
    def listening(self) -> bool:
        """Whether anything is shown (work done only to be shown can be skipped otherwise)."""
        return self.console is not None

    # -- trials and the live view -------------------------------------------------------------

    def watch(self, metric: str, mode: str, slots: int, timeline: Timeline | None = None) -> None:
        """What the live view ranks by (the search metric and its direction), the trial slots, and the
        search's ``SearchTimeline`` (its slot utilisation)."""
        self.metric, self.mode, self.slots, self.timeline = metric, mode, max(1, slots), timeline

    def study_starts(self, label_ratio: float, num_samples: int) -> None:
        """The study of ``label_ratio`` starts (or resumes) with ``num_samples`` trials: a bar of its own."""
        with self._lock:
            study = self._studies.get(label_ratio)
            if study is None:
                self._studies[label_ratio] = _LiveStudy(label_ratio, num_samples, self.clock())
            else:  # resumed, or its trials reported before: the budget's number holds
                study.num_samples, study.ended_at = num_samples, None
        self._start_live()

    def study_ends(self, label_ratio: float) -> None:
        with self._lock:
            study = self._studies.get(label_ratio)
            if study is not None:
                study.ended_at = self.clock()

    def trial(self, label_ratio: float, trial_id: str, number: int, total: int, message: str, *,
              status: str = "running", value: float | None = None, params: dict[str, Any] | None = None) -> None:
        """One event of a trial: its line (``[ratio r] trial n/N message``) and its state in the live view.

        ``status`` is ``waiting`` (for an executor) until an executor takes the trial, then ``running``
        until it ends ``completed``, ``stopped`` or ``failed``; the live view counts its time from when
        it runs. ``value`` is a value of the search metric it reached; ``params`` its sampled point
        (given when it starts).
        """
        with self._lock:
            now = self.clock()
            study = self._studies.get(label_ratio)
            if study is None:  # a study the driver did not announce (a library caller's own Tuner)
                study = self._studies[label_ratio] = _LiveStudy(label_ratio, total, now)
            state = study.trials.get(trial_id)
            if state is None:
                state = study.trials[trial_id] = _LiveTrial(number, now, status=status)
            if state.status == "waiting" and status == "running":
                state.started_at = now  # an executor took it: its time runs from now
            if params is not None:
                state.params = params
            state.status = status
            if status != "running" and state.ended_at is None:
                state.ended_at = now
            if value is not None and better(value, study.best, self.mode):
                study.best, study.best_params = value, state.params
            if self._quiet:
                return
        self._start_live()
        self.say(f"[dim]\\[ratio {label_ratio:g}][/dim] trial {number}/{total} {message}", highlight=False)

    def interrupted(self) -> None:
        """Ctrl-C: the live view stops, and what the search saved is said; then it stays silent."""
        with self._lock:
            self._quiet = True
        self.close()
        with self._lock:
            studies = list(self._studies.values())
        finished = sum(s.finished() for s in studies)
        running = sum(len(s.trials) - s.finished() for s in studies)  # those waiting for an executor too
        per_study = "; ".join(f"ratio {s.label_ratio:g}: {_counts(s, with_running=False)}" for s in studies
                              if s.finished())
        text = f"saved: {finished} finished trial(s) in the leaderboard" + (f" ({per_study})" if per_study else "")
        if running:
            text += f"; {running} running trial(s) start again from their last checkpoint when resumed"
        if self.storage:
            text += f"; the studies' state (Tune, Optuna) in {self.storage}"
        self.say(f"[yellow]{text}[/yellow]", highlight=False, soft_wrap=True)

    def close(self) -> None:
        """Stops the live view, leaving its last frame on the screen."""
        with self._live_lock:
            live, self._live = self._live, None
            if live is not None:
                live.stop()

    def _start_live(self) -> None:
        if not self.live_view or self._live is not None or self._quiet:
            return
        with self._live_lock:
            if self._live is None and not self._quiet:
                # console.print while it runs prints above the panel (so do stray writes to stdout)
                # and draws the panel again below the line: drawn from the state of that moment,
                # not the last refresh's, so a line and the panel under it agree
                self._live = Live(_Drawn(self.panel), console=self.console, refresh_per_second=2)
                self._live.start()

    def panel(self) -> Group:
        """The live view as it looks now: per study two lines (its bar and counts; its times and best
        value), then the slots' line, none wider than the console (a long one ends in an ellipsis)."""
        with self._lock:
            now = self.clock()
            width = self.console.width if self.console is not None else 80
            lines: list[Any] = []
            for study in self._studies.values():
                end = study.ended_at if study.ended_at is not None else now
                times = f"{format_duration(end - study.started_at)} elapsed"
                if study.ended_at is not None:
                    times += ", finished"
                else:
                    left = study.time_left(now, self.slots)
                    times += ", left: " + ("estimated after the first trial" if left is None else f"~{format_duration(left)}")
                best = (f"best {self.metric or 'metric'} {format_value(study.best)}"
                        + (f" ({format_params(study.best_params)})" if study.best_params else "")
                        if study.best is not None else "best: none yet")
                label, counts = f"ratio {study.label_ratio:g}", _counts(study)
                bar_width = max(MIN_BAR_WIDTH, min(BAR_WIDTH, width - len(label) - len(counts) - 2))
                heading = Table.grid(padding=(0, 1))
                heading.add_column(no_wrap=True)
                heading.add_column(width=bar_width, no_wrap=True)
                heading.add_column(no_wrap=True, overflow="ellipsis")
                heading.add_row(Text(label, style="bold"),
                                ProgressBar(total=max(1, study.num_samples), completed=study.finished(), width=bar_width),
                                Text(counts))
                lines += [heading, Text(f"  {times} · {best}", no_wrap=True, overflow="ellipsis")]
            running = sum(s.count("running") for s in self._studies.values())
            waiting = sum(s.count("waiting") for s in self._studies.values())
            slots = f"{self.slots} slot(s), {running} trial(s) running"
            if waiting:
                slots += f", {waiting} waiting for an executor"
            utilisation = self.timeline.utilisation(self.slots) if self.timeline is not None else None
            if utilisation is not None:
                slots += f", utilisation {utilisation:.0%} (training time over slot-seconds so far)"
            lines.append(Text(slots, style="dim", no_wrap=True, overflow="ellipsis"))
            return Group(*lines)


class _Drawn:
    """A renderable made anew each time it is drawn."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make

    def __rich__(self) -> Any:
        return self.make()


def _counts(study: _LiveStudy, with_running: bool = True) -> str:
    """``2/4 done, 1 running, 1 waiting, 1 stopped, 0 failed``: done is completed (every epoch run);
    waiting (for an executor) is said only when a trial waits."""
    parts = [f"{study.count('completed')}/{study.num_samples} done"]
    if with_running:
        parts.append(f"{study.count('running')} running")
        if study.count("waiting"):
            parts.append(f"{study.count('waiting')} waiting")
    parts += [f"{study.count('stopped')} stopped", f"{study.count('failed')} failed"]
    return ", ".join(parts)


def _describe_trainable(facts: dict[str, Any]) -> str:
    by_method = facts["trainable_params_by_method"]
    if len(by_method) == 1:
        return f"{facts['trainable_params']:,}"
    return ", ".join(f"{method} {count:,}" for method, count in by_method.items())


def _describe_capacity(capacity: "ClusterCapacity") -> str:
    def amounts(resources: dict[str, float]) -> str:
        return f"{resources.get('CPU', 0):g} CPUs / {resources.get('GPU', 0):g} GPUs"

    text = amounts(capacity.now)
    if capacity.most is not None:
        text += f", autoscaling up to {amounts(capacity.most)} (from {capacity.source})"
    elif capacity.autoscaling:
        text += ", autoscaling"
    return text


def _describe_worker(plan: "ResourcePlan") -> str:
    parts = [f"{plan.per_worker['GPU']:g} GPU" if plan.use_gpu else "CPU"]
    parts += [f"{amount:g} {name}" for name, amount in plan.per_worker.items() if name not in ("CPU", "GPU")]
    return " + ".join(parts)
