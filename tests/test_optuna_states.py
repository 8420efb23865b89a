"""What Optuna is told of each trial (PRUNED, COMPLETE with the best epoch, FAIL; per-epoch values),
driven as Tune drives a searcher, beside the leaderboard callback; and `medpeft-ray dashboard`."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import optuna
import pytest
from typer.testing import CliRunner

from medpeft_ray.cli import app
from medpeft_ray.leaderboard import LeaderboardStore, optuna_storage
from medpeft_ray.search.callbacks import LeaderboardCallback
from medpeft_ray.search.optuna_states import EpochStatesSearch
from medpeft_ray.search.space import SpaceSampler

State = optuna.trial.TrialState
EPOCHS = 3


class FakeTrial:
    def __init__(self, trial_id: str, config: dict[str, Any]) -> None:
        self.trial_id, self.config = trial_id, config

    def get_error(self) -> str | None:
        return "ValueError: the trial broke" if self.trial_id == "broke" else None


def three_epochs(tiny_config: Any) -> Any:
    return tiny_config.model_copy(update={"train": tiny_config.train.model_copy(update={"epochs": EPOCHS})})


def searcher_for(config: Any, url: str, metric: Any, mode: Any) -> EpochStatesSearch:
    return EpochStatesSearch(space=SpaceSampler.of(config.search_space), metric=metric, mode=mode,
                             sampler=optuna.samplers.RandomSampler(seed=0), storage=optuna_storage(url),
                             study_name="s", epochs=config.train.epochs_for(1.0))


class Tune:
    """Hands results to the searcher and the leaderboard callback as Tune's controller does: a
    result that stops its trial reaches the searcher only through ``on_trial_complete``."""

    def __init__(self, searcher: EpochStatesSearch, callback: LeaderboardCallback) -> None:
        self.searcher, self.callback, self.trials = searcher, callback, {}

    def start(self, trial_id: str) -> None:
        trial = self.trials[trial_id] = FakeTrial(trial_id, self.searcher.suggest(trial_id))
        self.callback.on_trial_start(0, [], trial)

    def result(self, trial_id: str, epoch: int, stop: bool = False, **values: Any) -> None:
        result = {"epoch": epoch, "training_iteration": epoch, "trainable_params": 10, "train_time_s": 2.0 * epoch,
                  **values}
        if stop:
            self.searcher.on_trial_complete(trial_id, result=result)
        else:
            self.searcher.on_trial_result(trial_id, result)
        self.callback.on_trial_result(0, [], self.trials[trial_id], result)
        if stop:
            self.callback.on_trial_complete(0, [], self.trials[trial_id])

    def end(self, trial_id: str) -> None:  # the trainable returned: Tune passes its last result again
        self.searcher.on_trial_complete(trial_id, result=self.callback.progress[trial_id].last)
        self.callback.on_trial_complete(0, [], self.trials[trial_id])

    def error(self, trial_id: str) -> None:
        self.searcher.on_trial_complete(trial_id, error=True)
        self.callback.on_trial_error(0, [], self.trials[trial_id])


def told(url: str) -> dict[float, optuna.trial.FrozenTrial]:
    """The study's trials by their sampled lr."""
    return {t.params["lr"]: t for t in optuna.load_study(study_name="s", storage=optuna_storage(url)).trials}


def test_stopped_trials_are_pruned_completed_ones_told_their_best_epoch_like_the_leaderboard(
        tiny_config: Any, tmp_path: Path) -> None:
    config = three_epochs(tiny_config)
    url = f"sqlite:///{tmp_path / 'lb.db'}"
    searcher = searcher_for(config, url, "val_auroc", "max")
    tune = Tune(searcher, LeaderboardCallback(config, 1.0, url))
    for trial_id in ("done", "cut", "broke", "restarted"):
        tune.start(trial_id)
    tune.result("done", 1, val_auroc=0.6)
    tune.result("done", 2, val_auroc=0.8)
    tune.result("cut", 1, val_auroc=0.5)
    tune.result("broke", 1, val_auroc=0.4)
    tune.result("restarted", 1, val_auroc=0.7)
    tune.result("restarted", 2, val_auroc=0.75)

    # Tune saves the searcher with the experiment; a resumed search goes on from the saved one
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = searcher_for(config, url, "val_auroc", "max")
    restored.restore(str(tmp_path / "searcher.pkl"))
    tune.searcher = restored

    tune.result("done", 3, stop=True, val_auroc=0.7)  # ASHA stops a trial at max_t: its last epoch comes here
    tune.result("cut", 2, stop=True, val_auroc=0.55)  # ASHA stops it at a rung
    tune.error("broke")
    tune.result("restarted", 2, val_auroc=0.72)  # restored from its epoch 1 checkpoint, it reports epoch 2 again
    tune.result("restarted", 3, val_auroc=0.74)
    tune.end("restarted")

    rows = {r["trial_id"]: r for r in LeaderboardStore(url).query().to_dict(orient="records")}
    trials = told(url)
    assert {tid: r["status"] for tid, r in rows.items()} == {
        "done": "completed", "cut": "stopped", "broke": "failed", "restarted": "completed"}
    states = {tid: trials[r["params"]["lr"]].state for tid, r in rows.items()}
    assert states == {"done": State.COMPLETE, "cut": State.PRUNED, "broke": State.FAIL, "restarted": State.COMPLETE}

    def trial(tid: str) -> optuna.trial.FrozenTrial:
        return trials[rows[tid]["params"]["lr"]]

    # completed: the best epoch's value, the one the leaderboard row keeps (not the last epoch's 0.7)
    assert trial("done").value == rows["done"]["val_auroc"] == 0.8
    assert trial("done").intermediate_values == {1: 0.6, 2: 0.8, 3: 0.7}
    assert trial("restarted").value == rows["restarted"]["val_auroc"] == 0.75
    assert trial("restarted").intermediate_values == {1: 0.7, 2: 0.75, 3: 0.74}  # epoch 2 told once
    # stopped: every epoch it ran, the stopping one included; Optuna's value is its last epoch's
    assert trial("cut").intermediate_values == {1: 0.5, 2: 0.55} and trial("cut").value == 0.55
    assert trial("broke").value is None and trial("broke").intermediate_values == {1: 0.4}
    assert optuna.load_study(study_name="s", storage=optuna_storage(url)).best_value == 0.8
    # a second completion of a finished trial (Tune may send one) changes nothing
    restored.on_trial_complete("done", result={"epoch": 3, "val_auroc": 0.99})
    assert told(url)[rows["done"]["params"]["lr"]].value == 0.8


def test_a_minimised_metric_is_told_its_lowest_epoch(tiny_config: Any, tmp_path: Path) -> None:
    config = three_epochs(tiny_config)
    config = config.model_copy(update={"search": config.search.model_copy(update={"metric": "val_loss"})})
    url = f"sqlite:///{tmp_path / 'lb.db'}"
    tune = Tune(searcher_for(config, url, "val_loss", "min"), LeaderboardCallback(config, 1.0, url))
    tune.start("a")
    for epoch, loss in ((1, 0.9), (2, 0.4), (3, 0.6)):
        tune.result("a", epoch, stop=epoch == EPOCHS, val_loss=loss)
    (trial,) = told(url).values()
    assert trial.state == State.COMPLETE and trial.value == 0.4
    assert LeaderboardStore(url).query().iloc[0]["val_loss"] == 0.4


def test_multi_objective_trials_are_pruned_without_intermediate_values(tiny_config: Any, tmp_path: Path) -> None:
    """Optuna refuses intermediate values in multi-objective studies; stopped trials are still PRUNED,
    and completed ones are told the best epoch's metric and the row's cost."""
    config = three_epochs(tiny_config)
    url = f"sqlite:///{tmp_path / 'lb.db'}"
    searcher = searcher_for(config, url, ["val_auroc", "train_time_s"], ["max", "min"])
    tune = Tune(searcher, LeaderboardCallback(config, 1.0, url))
    tune.start("done")
    tune.start("cut")
    for epoch, auroc in ((1, 0.6), (2, 0.8), (3, 0.7)):
        tune.result("done", epoch, val_auroc=auroc)
    tune.end("done")
    tune.result("cut", 1, stop=True, val_auroc=0.9)

    rows = {r["trial_id"]: r for r in LeaderboardStore(url).query().to_dict(orient="records")}
    trials = told(url)
    done, cut = trials[rows["done"]["params"]["lr"]], trials[rows["cut"]["params"]["lr"]]
    assert done.state == State.COMPLETE and done.values == [0.8, rows["done"]["train_time_s"]] == [0.8, 6.0]
    assert cut.state == State.PRUNED and cut.values is None and cut.intermediate_values == {}
    assert rows["cut"]["status"] == "stopped"
    assert [t.number for t in optuna.load_study(study_name="s", storage=optuna_storage(url)).best_trials] == [done.number]


# -- medpeft-ray dashboard ---------------------------------------------------------------------

@pytest.fixture
def leaderboard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("MEDPEFT_DB", raising=False)
    results = tmp_path / "results"
    LeaderboardStore(f"sqlite:///{results / 'leaderboard.db'}").engine.dispose()
    return results


def fake_dashboard(monkeypatch: pytest.MonkeyPatch, raises: BaseException | None = None) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    def run_server(storage: Any, host: str = "localhost", port: int = 8080) -> None:
        optuna.get_all_study_names(storage)  # a storage Optuna can read, as the dashboard will
        calls.append({"url": storage.url, "host": host, "port": port})
        if raises is not None:
            raise raises

    module = types.ModuleType("optuna_dashboard")
    module.run_server = run_server  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "optuna_dashboard", module)
    return calls


def test_dashboard_without_the_extra_says_what_to_install(leaderboard: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # import fails as when it is not installed
    result = CliRunner().invoke(app, ["dashboard", "--results", str(leaderboard)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: optuna-dashboard is not installed: pip install 'medpeft-ray[dashboard]'"]


def test_dashboard_serves_the_leaderboard_database(leaderboard: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_dashboard(monkeypatch)
    result = CliRunner().invoke(app, ["dashboard", "--results", str(leaderboard)])
    assert result.exit_code == 0, result.output
    assert calls == [{"url": f"sqlite:///{leaderboard.resolve() / 'leaderboard.db'}", "host": "127.0.0.1", "port": 8080}]
    assert result.stdout.strip() == "optuna-dashboard on http://127.0.0.1:8080/ (Ctrl-C to stop)"

    url = f"sqlite:///{leaderboard / 'leaderboard.db'}"
    result = CliRunner().invoke(app, ["dashboard", "--db", url, "--host", "0.0.0.0", "--port", "8123"])
    assert result.exit_code == 0, result.output
    assert calls[1] == {"url": url, "host": "0.0.0.0", "port": 8123}
    assert "http://0.0.0.0:8123/" in result.stdout


def test_dashboard_errors_are_one_line(leaderboard: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dashboard(monkeypatch, raises=KeyboardInterrupt())
    assert CliRunner().invoke(app, ["dashboard", "--results", str(leaderboard)]).exit_code == 0  # Ctrl-C stops it

    fake_dashboard(monkeypatch, raises=OSError(98, "Address already in use"))
    result = CliRunner().invoke(app, ["dashboard", "--results", str(leaderboard), "--port", "8124"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --host 127.0.0.1 --port 8124: cannot listen there (Address already in use)"

    calls = fake_dashboard(monkeypatch)
    result = CliRunner().invoke(app, ["dashboard", "--results", str(tmp_path / "empty")])
    assert result.exit_code == 1 and "no leaderboard here yet" in result.stderr and calls == []


def test_a_resumed_grid_hands_out_the_points_asked_for_after_tunes_last_save_first(tmp_path: Path) -> None:
    """A driver killed after Optuna handed out a point but before Tune saved its state: the resumed
    searcher (Tune's saved copy) gives that running point to the next trial, so no grid point is
    skipped and none is run twice."""
    import pickle

    from conftest import tiny_search

    from medpeft_ray.config import validate_search_dict
    from medpeft_ray.search.space import make_sampler

    config = validate_search_dict(tiny_search(space={"lr": {"type": "categorical", "choices": [0.001, 0.002, 0.003]}},
                                              search={"sampler": "grid", "num_samples": 3}), "g.yaml")
    url = f"sqlite:///{tmp_path / 'board.db'}"
    LeaderboardStore(url)

    def searcher() -> EpochStatesSearch:
        return EpochStatesSearch(space=SpaceSampler.of(config.search_space), metric="val_auroc", mode="max",
                                 sampler=make_sampler(config.search, config.search_space.distributions),
                                 storage=optuna_storage(url), study_name="g", epochs=3)

    live = searcher()
    first = live.suggest("t0")["lr"]
    saved = pickle.dumps(live)  # Tune's experiment state: one trial known
    second = live.suggest("t1")["lr"]  # asked, then the driver dies before Tune saves again
    resumed = pickle.loads(saved)
    assert resumed.suggest("t1")["lr"] == second  # the running point, not a new one
    third = resumed.suggest("t2")["lr"]
    assert sorted([first, second, third]) == [0.001, 0.002, 0.003]
    study = optuna.load_study(study_name="g", storage=optuna_storage(url))
    assert len(study.trials) == 3
