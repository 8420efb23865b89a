"""The driver-side leaderboard callback, with stand-in Tune trial objects (no Ray cluster)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from medpeft_ray.leaderboard import LeaderboardStore
from medpeft_ray.search.callbacks import LeaderboardCallback, error_summary

TRACE = """Traceback (most recent call last):
  File "ray/train/v2/...", line 1, in fit
ray.train.v2.api.exceptions.TrainingFailedError: Training failed due to worker errors:
  File "medpeft_ray/train/engine.py", line 250, in run_training
medpeft_ray.errors.TrialFailed: training loss is nan in epoch 2 (lr 10); trial stopped
"""


class FakeTrial:
    def __init__(self, trial_id: str, config: dict[str, Any], error: str | None = None) -> None:
        self.trial_id, self.config, self._error = trial_id, config, error

    def get_error(self) -> str | None:
        return self._error


def test_error_summary_finds_the_reason() -> None:
    assert error_summary(TRACE) == "training loss is nan in epoch 2 (lr 10); trial stopped"
    assert error_summary("boom\nValueError: bad thing") == "ValueError: bad thing"
    assert error_summary(None) == "trial failed (no error recorded)"


def test_best_epoch_completed_stopped_and_failed_rows(tiny_config: Any, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lb.db'}"
    callback = LeaderboardCallback(tiny_config, 1.0, url)
    good, early, bad = FakeTrial("a", {"lr": 3e-3}), FakeTrial("b", {"lr": 1e-3}), FakeTrial("c", {"lr": 9e-3}, TRACE)
    for trial in (good, early, bad):
        callback.on_trial_start(0, [], trial)
    base = {"trainable_params": 10, "total_params": 100, "train_time_s": 2.0, "first_step_at": 1e18, "skipped_images": 2}
    for epoch, auroc in ((1, 0.7), (2, 0.65)):  # the best epoch is the first
        callback.on_trial_result(0, [], good, {**base, "epoch": epoch, "val_auroc": auroc, "val_loss": 0.5,
                                               "checkpoint_path": f"/ckpt/{epoch}"})
    callback.on_trial_result(0, [], early, {**base, "epoch": 1, "val_auroc": float("nan"), "val_loss": 0.6})
    callback.on_trial_complete(0, [], good)
    callback.on_trial_complete(0, [], early)
    callback.on_trial_error(0, [], bad)

    rows = {r["trial_id"]: r for r in LeaderboardStore(url).query().to_dict(orient="records")}
    assert rows["a"]["status"] == "completed" and rows["a"]["val_auroc"] == 0.7 and rows["a"]["best_epoch"] == 1
    assert rows["a"]["checkpoint"] == "/ckpt/1" and rows["a"]["epochs_run"] == 2 and rows["a"]["skipped_images"] == 2
    assert rows["a"]["config"]["train"]["lr"] == 3e-3 and rows["a"]["params"] == {"lr": 3e-3}
    assert rows["b"]["status"] == "stopped" and math.isnan(rows["b"]["val_auroc"])  # NULL: a NaN metric is no metric
    assert rows["c"]["status"] == "failed" and "loss is nan" in rows["c"]["error"]


def test_callback_pickles_without_engine(tiny_config: Any, tmp_path: Path) -> None:
    import pickle

    callback = LeaderboardCallback(tiny_config, 1.0, f"sqlite:///{tmp_path / 'lb.db'}", console=object())
    callback.store  # noqa: B018  (opens the engine)
    clone = pickle.loads(pickle.dumps(callback))
    assert clone.console is None and clone.store.url == callback.db_url


def test_rows_record_the_pretrained_checkpoint(tiny_config: Any, tmp_path: Path) -> None:
    import hashlib

    weights = tmp_path / "mae.pth"
    weights.write_bytes(b"pre-trained weights")
    config = tiny_config.model_copy(update={"model": tiny_config.model.model_copy(update={"checkpoint": weights})})
    url = f"sqlite:///{tmp_path / 'lb.db'}"
    for cfg, trial_id in ((config, "with"), (tiny_config, "without")):
        callback = LeaderboardCallback(cfg, 1.0, url)
        trial = FakeTrial(trial_id, {"lr": 3e-3})
        callback.on_trial_start(0, [], trial)
        callback.on_trial_result(0, [], trial, {"epoch": 2, "val_auroc": 0.7, "val_loss": 0.5})
        callback.on_trial_complete(0, [], trial)
    rows = LeaderboardStore(url).query().set_index("trial_id")
    assert rows.loc["with", "checkpoint_file"] == str(weights)
    assert rows.loc["with", "checkpoint_sha256"] == hashlib.sha256(b"pre-trained weights").hexdigest()
    assert rows.loc["without", ["checkpoint_file", "checkpoint_sha256"]].isna().all()


def test_best_epoch_follows_a_minimised_metric(tiny_config: Any, tmp_path: Path) -> None:
    search = tiny_config.search.model_copy(update={"metric": "val_loss"})
    url = f"sqlite:///{tmp_path / 'lb.db'}"
    callback = LeaderboardCallback(tiny_config.model_copy(update={"search": search}), 1.0, url)
    trial = FakeTrial("a", {"lr": 3e-3})
    callback.on_trial_start(0, [], trial)
    for epoch, auroc, loss in ((1, 0.8, 0.6), (2, 0.7, 0.4)):  # best AUROC at epoch 1, best loss at epoch 2
        callback.on_trial_result(0, [], trial, {"epoch": epoch, "val_auroc": auroc, "val_loss": loss})
    callback.on_trial_complete(0, [], trial)
    row = LeaderboardStore(url).query().iloc[0]
    assert row["best_epoch"] == 2 and row["val_loss"] == 0.4 and row["val_auroc"] == 0.7


class FakeHandouts:
    """Stands in for ExecutorHandouts: the hand-outs the test makes, given at the next poll."""

    def __init__(self) -> None:
        self.taken: dict[str, float] = {}

    def poll(self) -> dict[str, float]:
        taken, self.taken = self.taken, {}
        return taken


class Lines:
    """Stands in for the SearchReporter: the trials' lines and their live-view status."""

    def __init__(self) -> None:
        self.said: list[tuple[str, str]] = []

    def trial(self, label_ratio: float, trial_id: str, number: int, total: int, message: str, *,
              status: str = "running", **event: Any) -> None:
        self.said.append((f"trial {number}/{total} {message}", status))


def test_a_trial_waits_for_an_executor_and_its_wall_time_runs_from_when_one_took_it(
        tiny_config: Any, tmp_path: Path, monkeypatch: Any) -> None:
    import medpeft_ray.search.callbacks as callbacks

    now = [1000.0]
    monkeypatch.setattr(callbacks, "time", type("Clock", (), {"time": staticmethod(lambda: now[0])}))
    url = f"sqlite:///{tmp_path / 'lb.db'}"
    lines, handouts = Lines(), FakeHandouts()
    callback = LeaderboardCallback(tiny_config, 1.0, url, lines, handouts=handouts)  # type: ignore[arg-type]
    first, second = FakeTrial("a", {"lr": 3e-3}), FakeTrial("b", {"lr": 1e-3})
    handouts.taken["a"] = 1000.0  # taken at once: a started trial, no wait to speak of
    callback.on_step_end(0, [])
    callback.on_trial_start(0, [], first)
    callback.on_trial_start(0, [], second)  # Tune started it beside the first: it waits for the executor
    assert lines.said == [("trial 1/2 started  lr=0.003", "running"),
                          ("trial 2/2 waiting for an executor  lr=0.001", "waiting")]
    now[0] = 1040.0
    callback.on_step_end(0, [])  # nothing taken yet: still waiting
    callback.on_trial_result(0, [], first, {"epoch": 2, "val_auroc": 0.7, "val_loss": 0.5})
    callback.on_trial_complete(0, [], first)
    handouts.taken["b"] = 1040.0
    callback.on_step_end(0, [])
    assert lines.said[-1] == ("trial 2/2 started  lr=0.001  (waited 40 s for an executor)", "running")
    now[0] = 1070.0
    callback.on_trial_result(0, [], second, {"epoch": 2, "val_auroc": 0.6, "val_loss": 0.5})
    callback.on_trial_complete(0, [], second)
    assert lines.said[-1][0] == ("trial 2/2 completed: best val_auroc=0.6 at epoch 2 "
                                 "(30 s, waited 40 s)")
    walls = LeaderboardStore(url).query().set_index("trial_id")["wall_time_s"]
    assert (walls["a"], walls["b"]) == (40.0, 30.0)  # from when the executor took each


def test_a_trials_first_epoch_starts_it_when_its_hand_out_was_not_heard_of(tiny_config: Any, tmp_path: Path) -> None:
    lines = Lines()
    callback = LeaderboardCallback(tiny_config, 1.0, f"sqlite:///{tmp_path / 'lb.db'}", lines,  # type: ignore[arg-type]
                                   handouts=FakeHandouts())
    trial = FakeTrial("a", {"lr": 3e-3})
    callback.on_trial_start(0, [], trial)
    callback.on_trial_result(0, [], trial, {"epoch": 1, "val_auroc": 0.7, "val_loss": 0.5, "dispatched_at": 1e9})
    assert [status for _, status in lines.said] == ["waiting", "running", "running"]
    assert lines.said[1][0].startswith("trial 1/2 started  lr=0.003") and lines.said[2][0].startswith("trial 1/2 epoch 1")
