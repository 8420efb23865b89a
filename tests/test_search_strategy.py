"""How a search spends its trials: several methods with conditional spaces, samplers, schedulers,
budgets and warm starts (no Ray: Optuna studies in memory and the searcher wrapper directly)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import fill_results, leaderboard_row, tiny_search

from medpeft_ray.config import METHOD_PARAM, validate_search_dict
from medpeft_ray.errors import ConfigError
from medpeft_ray.search.budget import BudgetedSearch, SearchBudget
from medpeft_ray.search.space import SpaceSampler, make_sampler, make_scheduler
from medpeft_ray.search.warm_start import warm_start_points

TWO_METHODS = {
    "method": {"name": ["lora", "ssf"], "options": {"lora": {"alpha": 16, "targets": "q,v"}}},
    "space": None,
}


def _two_methods(**sections: Any) -> Any:
    raw = tiny_search(**TWO_METHODS)
    del raw["space"]
    for name, value in sections.items():
        raw[name] = {**raw.get(name, {}), **value} if isinstance(value, dict) else value
    return validate_search_dict(raw, "two.yaml")


def _run_study(config: Any, n: int, sampler: Any = None) -> list[dict[str, Any]]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions = config.distributions()
    study = optuna.create_study(
        direction="maximize",
        sampler=sampler or make_sampler(config.search, distributions, conditional=config.method.is_choice),
    )
    space = SpaceSampler(distributions, config.method.names if config.method.is_choice else None)
    seen = []
    for _ in range(n):
        trial = study.ask()
        space(trial)
        seen.append(dict(trial.params))
        study.tell(trial, float(len(seen) % 3))
    return seen


# -- several methods ---------------------------------------------------------------------------


def test_each_method_brings_its_own_ranges_named_after_it() -> None:
    config = _two_methods()
    names = list(config.distributions())
    assert names[0] == METHOD_PARAM and config.distributions()[METHOD_PARAM].choices == ["lora", "ssf"]
    assert {"lora.rank", "lora.lr", "ssf.lr"} <= set(names)
    assert "lora.alpha" not in names  # fixed in method.options.lora
    # a shared parameter replaces the methods' own ranges of it; a prefixed one overrides one method's
    shared = _two_methods(space={"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                                 "lora.rank": {"type": "categorical", "choices": [4, 8]}})
    assert "lr" in shared.distributions() and "lora.lr" not in shared.distributions()
    assert shared.distributions()["lora.rank"].choices == [4, 8]


def test_a_trial_gets_only_its_methods_parameters() -> None:
    config = _two_methods()
    lora = config.trial_config(0.5, {METHOD_PARAM: "lora", "lora.rank": 4, "lora.lr": 2e-3})
    assert lora.method.name == "lora" and lora.method.options["rank"] == 4 and lora.method.options["alpha"] == 16
    assert lora.train.lr == 2e-3
    ssf = config.trial_config(0.5, {METHOD_PARAM: "ssf", "ssf.lr": 5e-3})
    assert ssf.method.name == "ssf" and ssf.method.options == {} and ssf.train.lr == 5e-3


def test_conditional_space_suggests_a_methods_parameters_only_when_it_is_chosen() -> None:
    config = _two_methods(search={"sampler": "tpe", "num_samples": 24})
    seen = _run_study(config, 24)
    assert {p[METHOD_PARAM] for p in seen} == {"lora", "ssf"}
    for params in seen:
        others = {"lora", "ssf"} - {params[METHOD_PARAM]}
        assert not any(name.split(".")[0] in others for name in params), params
        config.trial_config(1.0, params)  # every suggestion makes a valid trial


@pytest.mark.parametrize("method,message", [
    ({"name": ["lora", "nosuch"], "options": {}}, "two.yaml: method.name.1: unknown method 'nosuch'"),
    ({"name": ["lora", "ssf"], "options": {"bitfit": {}}}, "two.yaml: method.options.bitfit: not one of the listed methods"),
    ({"name": ["lora", "ssf"], "options": {"lora": {"rnak": 2}}}, "two.yaml: method.options.lora.rnak: unknown key"),
    ({"name": ["lora", "lora"], "options": {}}, "two.yaml: method.name: lists a method twice"),
])
def test_bad_method_lists_name_the_key(method: dict, message: str) -> None:
    raw = tiny_search(method=method)
    del raw["space"]
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_search_dict(raw, "two.yaml")


@pytest.mark.parametrize("space,message", [
    ({"rank": {"type": "int", "low": 2, "high": 8}}, "space.rank: a method option: name the method it belongs to, e.g. lora.rank"),
    ({"lora.rnak": {"type": "int", "low": 2, "high": 8}}, "space.lora.rnak: not a searchable parameter (did you mean 'rank'?)"),
    ({"lora.alpha": {"type": "int", "low": 2, "high": 8}}, "space.lora.alpha: also fixed in method.options.lora.alpha"),
    ({"ssf.lr": {"type": "float", "low": 0, "high": 1, "log": True}}, "space.ssf.lr.low: must be > 0"),
])
def test_bad_conditional_spaces_name_the_key(space: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"two.yaml: {message}")):
        _two_methods(space=space)


def test_a_trial_yaml_holds_one_method() -> None:
    from medpeft_ray.config import TrialConfig

    config = _two_methods()
    trial = config.trial_config(1.0, {METHOD_PARAM: "ssf"}).model_dump(mode="json")
    trial["method"]["name"] = ["lora", "ssf"]
    with pytest.raises(ValueError, match="a trial trains one method"):
        TrialConfig.model_validate(trial)


# -- samplers and schedulers -------------------------------------------------------------------


@pytest.mark.parametrize("name,cls", [
    ("tpe", optuna.samplers.TPESampler), ("random", optuna.samplers.RandomSampler),
    ("cmaes", optuna.samplers.CmaEsSampler), ("gp", optuna.samplers.GPSampler),
])
def test_samplers_run_a_study(name: str, cls: type) -> None:
    config = validate_search_dict(tiny_search(search={"sampler": name, "num_samples": 6}), "t.yaml")
    sampler = make_sampler(config.search, config.distributions())
    assert isinstance(sampler, cls)
    seen = _run_study(config, 6, sampler)
    assert all(1e-3 <= p["lr"] <= 1e-2 for p in seen) and len({p["lr"] for p in seen}) == 6


def test_tpe_spreads_parallel_suggestions_over_the_running_trials() -> None:
    """With trials running (asked, not told), TPE counts them as poor points (constant liar)
    instead of sending every free slot to the same best-looking point."""
    config = validate_search_dict(tiny_search(
        method={"name": "lora", "options": {}}, space={"rank": {"type": "categorical", "choices": [1, 2, 3, 4, 5, 6]}},
        search={"sampler": "tpe", "num_samples": 12, "seed": 1}), "t.yaml")
    study = optuna.create_study(sampler=make_sampler(config.search, config.distributions()), direction="maximize")
    for _ in range(8):  # rank 6 is clearly best so far
        trial = study.ask()
        choice = trial.suggest_categorical("rank", [1, 2, 3, 4, 5, 6])
        study.tell(trial, float(choice == 6) + 0.01 * choice)
    running = [study.ask() for _ in range(4)]  # four slots free at once
    chosen = [t.suggest_categorical("rank", [1, 2, 3, 4, 5, 6]) for t in running]
    # without the liar all four land on the same rank; with it they spread
    assert len(set(chosen)) >= 3, chosen


def test_grid_tries_every_combination_exactly_once() -> None:
    raw = tiny_search(
        method={"name": "lora", "options": {}},
        space={"rank": {"type": "categorical", "choices": [2, 4, 8]},
               "lr": {"type": "float", "low": 1e-3, "high": 3e-3, "step": 1e-3}},
        search={"sampler": "grid", "num_samples": 9},
    )
    config = validate_search_dict(raw, "grid.yaml")
    seen = _run_study(config, 9, make_sampler(config.search, config.distributions()))
    assert sorted((p["rank"], round(p["lr"], 6)) for p in seen) == [
        (r, lr) for r in (2, 4, 8) for lr in (0.001, 0.002, 0.003)]
    with pytest.raises(ConfigError, match=re.escape("grid.yaml: search.num_samples: the grid has 9 point(s)")):
        validate_search_dict({**raw, "search": {**raw["search"], "num_samples": 8}}, "grid.yaml")


def test_schedulers() -> None:
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, MedianStoppingRule

    def scheduler(kind: str) -> Any:
        config = validate_search_dict(tiny_search(search={"scheduler": {"type": kind, "grace_period": 2}}), "t.yaml")
        return make_scheduler(config.search, epochs=8)

    asha, hyperband = scheduler("asha"), scheduler("hyperband")
    assert isinstance(asha, AsyncHyperBandScheduler) and len(asha._brackets) == 1
    assert isinstance(hyperband, AsyncHyperBandScheduler) and len(hyperband._brackets) == 3
    assert isinstance(scheduler("median"), MedianStoppingRule)
    assert type(scheduler("none")) is FIFOScheduler


def test_asha_stops_again_after_a_resume_what_it_had_stopped(tmp_path: Path) -> None:
    """Tune rebuilds a resumed study's scheduler from its first pickle; ASHA's rungs and stops come
    back from the state it saved, so a restored trial that reports its stopped rung again stops."""
    import pickle
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    config = validate_search_dict(tiny_search(search={"scheduler": {"type": "asha", "grace_period": 1,
                                                                    "reduction_factor": 2}}), "t.yaml")
    asha = make_scheduler(config.search, epochs=4, state_uri=str(tmp_path / "tune" / "scheduler_state.pkl"))
    first_pickle = pickle.dumps(asha)  # what Tune keeps with the study when it starts (tuner.pkl)
    trials = [SimpleNamespace(trial_id=f"t{i}", config={}) for i in range(3)]
    for trial in trials:
        asha.on_trial_add(None, trial)

    def report(scheduler: Any, trial: Any, epoch: int, value: float) -> str:
        return scheduler.on_trial_result(None, trial, {"training_iteration": epoch, "val_auroc": value})

    assert report(asha, trials[0], 1, 0.9) == TrialScheduler.CONTINUE
    assert report(asha, trials[1], 1, 0.95) == TrialScheduler.CONTINUE
    assert report(asha, trials[2], 1, 0.1) == TrialScheduler.STOP  # below the rung's cutoff
    # the driver dies before the stop is saved; the resumed study's scheduler is the first pickle
    resumed = pickle.loads(first_pickle)
    for trial in trials:  # Tune adds the restored trials again: each keeps its bracket
        resumed.on_trial_add(None, trial)
    assert report(resumed, trials[2], 1, 0.1) == TrialScheduler.STOP  # reported again: stopped again
    assert resumed._brackets[0]._rungs[-1][1] == asha._brackets[0]._rungs[-1][1]  # the same rung records
    # a trial Tune created after its last save is not restored: its records go, not counted twice
    orphan = SimpleNamespace(trial_id="t3", config={})
    asha.on_trial_add(None, orphan)
    report(asha, orphan, 1, 0.97)
    again = pickle.loads(first_pickle)
    for trial in trials:
        again.on_trial_add(None, trial)
    assert report(again, trials[2], 1, 0.1) == TrialScheduler.STOP
    assert set(again._brackets[0]._rungs[-1][1]) == {"t0", "t1", "t2"} and "t3" not in again._trial_info
    # without a saved state (a new study) nothing is read
    fresh = pickle.loads(pickle.dumps(make_scheduler(config.search, epochs=4)))
    assert fresh.stopped_at == {}


# -- budgets -----------------------------------------------------------------------------------


class _Counting:
    """A stand-in for OptunaSearch: suggests numbered configs."""

    metric, mode = "val_auroc", "max"

    def __init__(self) -> None:
        self.completed: list[str] = []

    def suggest(self, trial_id: str) -> dict[str, Any]:
        return {"lr": 1e-3, "id": trial_id}

    def on_trial_complete(self, trial_id: str, result: Any = None, error: bool = False) -> None:
        self.completed.append(trial_id)


def test_trial_budget_is_shared_out_over_label_ratios_and_then_finishes() -> None:
    from ray.tune.search import Searcher

    budget = SearchBudget(trials=5)
    first = budget.share(studies_left=2)
    assert first.trials == 3  # ceil(5 / 2)
    search = BudgetedSearch(_Counting(), first)  # type: ignore[arg-type]
    assert [search.suggest(f"t{i}") for i in range(4)][-1] == Searcher.FINISHED
    assert first.spent == "trial budget" and budget.trials_started == 3
    search.on_trial_complete("t0", {"val_auroc": 0.7})  # trials already running still report
    assert search.searcher.completed == ["t0"]
    second = budget.share(studies_left=1)
    assert second.trials == 2


def test_time_budget_stops_new_trials_once_spent() -> None:
    from ray.tune.search import Searcher

    budget = SearchBudget(time_s=0.2)
    share = budget.share(studies_left=1)
    search = BudgetedSearch(_Counting(), share)  # type: ignore[arg-type]
    assert search.suggest("a") != Searcher.FINISHED
    time.sleep(0.25)
    assert search.suggest("b") == Searcher.FINISHED and share.spent == "time budget"
    assert budget.share(studies_left=1).deadline <= time.time() + 1e-3  # nothing left for later studies


# -- warm start --------------------------------------------------------------------------------


def test_warm_start_from_points_and_the_leaderboard(tmp_path: Path) -> None:
    def row(trial: str, ratio: float, auroc: float | None, params: dict, method: str = "lora", experiment: str = "old") -> Any:
        return leaderboard_row(trial, method, ratio, auroc, experiment=experiment, params=params)

    results = fill_results(
        tmp_path,
        row("a", 0.5, 0.80, {"lr": 2e-3, "rank": 4}),
        row("b", 0.5, 0.90, {"lr": 4e-3, "rank": 8}),
        row("c", 0.5, 0.95, {"lr": 9.0, "rank": 8}),  # lr outside this search's range: rank kept alone
        row("d", 0.5, None, {"lr": 5e-3}),  # failed: never a warm start
        row("e", 1.0, 0.99, {"lr": 6e-3, "rank": 2}, experiment="tiny"),  # this search, neighbouring ratio
        row("f", 0.5, 0.99, {"lr": 7e-3}, method="ssf"),  # another method
    )
    db = f"sqlite:///{results / 'leaderboard.db'}"
    config = validate_search_dict(
        tiny_search(method={"name": "lora", "options": {}},
                    space={"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
                           "rank": {"type": "categorical", "choices": [2, 4, 8]}},
                    search={"points_to_evaluate": [{"lr": 1e-3}], "warm_start": {"from_leaderboard": True, "top_k": 2}}),
        "tiny.yaml",
    )
    points = warm_start_points(config, 0.5, db, searched_ratios=[1.0])
    assert points == [{"lr": 1e-3}, {"rank": 8}, {"lr": 4e-3, "rank": 8}, {"lr": 6e-3, "rank": 2}]
    # a search over two methods reads the same rows under its own parameter names
    two = _two_methods(search={"warm_start": {"from_leaderboard": True, "top_k": 1}})
    assert warm_start_points(two, 0.5, db, searched_ratios=[]) == [{METHOD_PARAM: "ssf", "ssf.lr": 7e-3}]


def test_shipped_methods_comparison_space() -> None:
    from medpeft_ray.config import load_search_config

    config = load_search_config(Path(__file__).parent.parent / "search_spaces" / "methods_compared.yaml")
    distributions = config.distributions()
    assert distributions[METHOD_PARAM].choices == ["lora", "ssf", "bitfit"]
    assert {"lora.rank", "lora.targets", "lora.lr", "ssf.lr", "bitfit.lr"} <= set(distributions)
    assert config.search.also_minimize == ["trainable_params"] and config.search.warm_start.from_leaderboard


def test_confirmation_chooses_by_mean_validation_never_by_test() -> None:
    from medpeft_ray.search.confirm import ConfirmedConfig, choose, describe

    steady = ConfirmedConfig("a", "lora", {"lora.rank": 8}, seeds=[0, 1, 2], val=[0.80, 0.81, 0.82], test=[0.70, 0.71, 0.72])
    lucky = ConfirmedConfig("b", "ssf", {"ssf.lr": 0.01}, seeds=[0, 1, 2], val=[0.90, 0.70, 0.71], test=[0.95, 0.95, 0.95])
    broken = ConfirmedConfig("c", "lora", {"lora.rank": 4}, errors=["TrialFailed: training loss is nan"])
    assert choose([steady, lucky, broken], "max") is steady  # 0.81 mean beats 0.77, whatever the test says
    assert choose([steady, lucky], "min") is lucky
    assert choose([broken], "max") is None
    summary = steady.summary()
    assert summary["val_mean"] == pytest.approx(0.81) and summary["val_std"] == pytest.approx(0.01)
    assert summary["test_mean"] == pytest.approx(0.71)
    lines = describe([steady, lucky, broken], steady, "val_auroc")
    assert lines[0].startswith(" * val_auroc 0.8100 +- 0.0100 over 3 seed(s)")
    assert "1 failed" in lines[2] and "chosen: trial a; test_auroc 0.7100 +- 0.0100" in lines[-1]
