"""What a search tells the person running it: one object, so the driver never asks whether anyone listens.

The CLI hands a :class:`SearchReporter` its ``rich`` console; a library caller or a test gets a
silent one. Trials' own lines (started, epoch, finished) come from the leaderboard callback,
which speaks through the same reporter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medpeft_ray.config import SearchConfig
    from medpeft_ray.search.cluster import ClusterCapacity, ResourcePlan


def format_value(value: Any) -> str:
    """A metric or parameter value as progress lines show it."""
    return f"{value:.3g}" if isinstance(value, float) else f"{value}"


def format_params(params: dict[str, Any]) -> str:
    """``k=v`` pairs of sampled parameters, floats to three significant digits."""
    return " ".join(f"{k}={format_value(v)}" for k, v in params.items())


class SearchReporter:
    """Progress lines of one search; silent without a console."""

    def __init__(self, console: Any = None) -> None:
        self.console = console

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
        if facts["skipped"]:
            self.say(
                f"[yellow]{len(facts['skipped'])} unreadable image(s) skipped[/yellow] (dataset.options.skip_unreadable), "
                f"e.g. {facts['skipped'][0]}",
                soft_wrap=True,
            )

    def cluster(self, config: "SearchConfig", plan: "ResourcePlan", capacity: "ClusterCapacity", storage: str) -> None:
        self.say(
            f"Ray cluster {_describe_capacity(capacity)}; {plan.concurrency} trial(s) at a time, "
            f"{config.resources.workers_per_trial} worker(s) each on {_describe_worker(plan)}; results in {storage}",
            soft_wrap=True,
        )
        if plan.note:
            self.say(f"[yellow]{plan.note}[/yellow]", soft_wrap=True)

    def cold_trials(self) -> None:
        self.say("[yellow]resources.warm_executors is off: every trial starts its own Ray Train run (cold)[/yellow]")

    def executors_ready(self, ready: int, wanted: int, seconds: float) -> None:
        self.say(f"{ready} of {wanted} executor(s) ready in {seconds:.0f} s "
                 "(imports, data and the pre-trained backbone loaded once)", highlight=False)

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
