"""The search forecast: the scheduler's expected epochs, its arithmetic, and ``search --dry-run``."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import yaml
from conftest import tiny_search
from typer.testing import CliRunner

from medpeft_ray.config import validate_search_dict
from medpeft_ray.config.sections import SchedulerConfig
from medpeft_ray.search.forecast import (
    HIGH_FACTOR,
    LOW_FACTOR,
    MethodTiming,
    StartupFigures,
    expected_epochs,
    forecast,
    forecast_lines,
    halving_epochs_per_trial,
    halving_milestones,
    recorded_forecast,
    startup_figures,
    study_trials,
)


def test_asha_expected_epochs_by_hand() -> None:
    # grace 1, rf 2, max_t 4: all 8 trials train epoch 1, 4 go on to epoch 2, 2 train epochs 3-4
    scheduler = SchedulerConfig(type="asha", grace_period=1, reduction_factor=2)
    assert halving_milestones(1, 2, 4) == [1, 2, 4]
    assert expected_epochs(scheduler, 8, 4) == (8 * 1 + 4 * 1 + 2 * 2, "expected")


def test_asha_rungs_that_miss_max_t() -> None:
    # rf 3 on 4 epochs: rungs 1 and 3; a third go on to 3, a ninth to 4
    assert halving_milestones(1, 3, 4) == [1, 3]
    assert halving_epochs_per_trial(1, 3, 4) == pytest.approx(1 + 2 / 3 + 1 / 9)
    # a grace period past max_t is max_t (as make_scheduler clips it): one rung, at the end
    assert halving_epochs_per_trial(6, 2, 4) == 4


@pytest.mark.parametrize("grace, rf, max_t, brackets", [(1, 2, 4, 1), (1, 3, 10, 1), (2, 2, 20, 3), (1, 2.5, 7, 2)])
def test_milestones_are_rays(grace: int, rf: float, max_t: int, brackets: int) -> None:
    from ray.tune.schedulers import AsyncHyperBandScheduler

    ray_scheduler = AsyncHyperBandScheduler(time_attr="training_iteration", max_t=max_t, grace_period=grace,
                                            reduction_factor=rf, brackets=brackets, metric="m", mode="max")
    for s, bracket in enumerate(ray_scheduler._brackets):
        assert halving_milestones(grace, rf, max_t, s) == sorted(math.ceil(m - 1e-9) for m, _ in bracket._rungs)


def test_other_schedulers_expected_epochs() -> None:
    assert expected_epochs(SchedulerConfig(type="none"), 8, 4) == (32.0, "expected")
    assert expected_epochs(SchedulerConfig(type="median", grace_period=1), 8, 4) == (32.0, "at most")
    # hyperband, 2 brackets: bracket 0 rungs 1, 2, 4 (2 epochs a trial), bracket 1 rungs 2, 4 (3 epochs),
    # trials placed in proportion to e^3 and e^2
    epochs, reading = expected_epochs(SchedulerConfig(type="hyperband", grace_period=1, reduction_factor=2, brackets=2), 8, 4)
    w0, w1 = math.exp(0), math.exp(-1)
    assert epochs == pytest.approx(8 * (2 * w0 + 3 * w1) / (w0 + w1)) and reading == "expected"


def test_max_trials_caps_the_studies() -> None:
    config = validate_search_dict(tiny_search(dataset={"label_ratios": [0.1, 0.5, 1.0]},
                                              search={"num_samples": 4, "max_trials": 5}), "tiny.yaml")
    assert study_trials(config) == [2, 2, 1]  # ceil(5/3), ceil(3/2), the one left
    assert study_trials(validate_search_dict(tiny_search(), "tiny.yaml")) == [2]


def _facts(train_images: dict[float, int], val: int) -> dict:
    return {"train_images_per_ratio": train_images, "images": {"train": max(train_images.values()), "val": val, "test": 0}}


def test_forecast_arithmetic() -> None:
    config = validate_search_dict(tiny_search(), "tiny.yaml")  # 2 trials of 2 epochs, batch 8, no stopping
    timing = MethodTiming("lora", train_step_s=[0.09, 0.1, 0.11], eval_batch_s=[0.05], micro_batch=8, eval_batch=128)
    result = forecast(config, _facts({1.0: 40}, val=20), [timing], StartupFigures(1.0, 45.0), concurrency=2)
    (study,) = result.studies
    assert (study.trials, study.max_epochs, study.epochs) == (2, 2, 4.0)
    assert (study.train_steps_per_epoch, study.eval_batches_per_epoch) == (5, 1)  # 40 / 8, 20 / 128
    assert study.epoch_s == pytest.approx(5 * 0.1 + 0.05)
    trial_seconds = 4 * 0.55 + 2 * 1.0
    assert study.trial_seconds == pytest.approx(trial_seconds)
    assert study.wall_s == pytest.approx(trial_seconds / 2)
    # the steps' spread (0.9x..1.1x) is narrower than the fixed factors
    assert (study.wall_low_s, study.wall_high_s) == pytest.approx((trial_seconds / 2 * LOW_FACTOR, trial_seconds / 2 * HIGH_FACTOR))
    assert result.device_hours == pytest.approx((trial_seconds + 45.0 * 2) / 3600)
    assert result.wall_s[0] == pytest.approx(45.0 + trial_seconds / 2)
    assert result.to_dict()["total"]["trials"] == 2
    assert result.to_dict()["total"]["cost"] is None and "cost" not in forecast_lines(result)[-1]
    # a device-hour price in the YAML turns the device-hours into money
    priced = validate_search_dict(tiny_search(resources={"device_hour_price": 2.5}), "tiny.yaml")
    result = forecast(priced, _facts({1.0: 40}, val=20), [timing], StartupFigures(1.0, 45.0), concurrency=2)
    assert result.to_dict()["total"]["cost"] == pytest.approx(2.5 * result.device_hours)
    assert forecast_lines(result)[-1].endswith(f"; cost {2.5 * result.device_hours:,.2f} at 2.5 per device-hour")


def test_forecast_with_two_workers_and_two_methods() -> None:
    config = validate_search_dict(tiny_search(method={"name": ["lora", "bitfit"], "options": {"lora": {"rank": 2}}},
                                              resources={"workers_per_trial": 2},
                                              search={"scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
                                                      "num_samples": 8}, train={"epochs": 4}), "tiny.yaml")
    slow = MethodTiming("lora", train_step_s=[0.2, 0.4], eval_batch_s=[0.1], micro_batch=4, eval_batch=128)
    fast = MethodTiming("bitfit", train_step_s=[0.1], eval_batch_s=[0.1], micro_batch=4, eval_batch=128)
    result = forecast(config, _facts({1.0: 41}, val=300), [slow, fast], StartupFigures(0.5, 10.0), concurrency=4,
                      devices_per_trial=2)
    (study,) = result.studies
    # each worker: 20 images at micro-batch 4 -> 5 steps; 150 validation images -> 2 batches of 128
    assert (study.train_steps_per_epoch, study.eval_batches_per_epoch) == (5, 2)
    epoch_s = ((5 * 0.3 + 0.2) + (5 * 0.1 + 0.2)) / 2  # the methods share the trials
    assert study.epochs == 16.0
    assert study.trial_seconds == pytest.approx(16 * epoch_s + 8 * 0.5)
    assert study.device_hours == pytest.approx(study.trial_seconds * 2 / 3600)
    # lora's steps spread 0.67x..1.33x of their median: the fixed factors are still wider
    assert study.wall_high_s == pytest.approx(study.wall_s * HIGH_FACTOR)


def test_startup_figures_default_without_a_leaderboard(tmp_path: Path) -> None:
    config = validate_search_dict(tiny_search(), "tiny.yaml")
    figures = startup_figures(config, f"sqlite:///{tmp_path / 'none' / 'leaderboard.db'}")
    assert figures == StartupFigures()
    assert not (tmp_path / "none").exists()  # reading creates no leaderboard


def test_startup_figures_from_the_leaderboard(tmp_path: Path) -> None:
    from medpeft_ray.leaderboard import LeaderboardStore, TrialRecord

    config = validate_search_dict(tiny_search(), "tiny.yaml")
    url = f"sqlite:///{tmp_path / 'leaderboard.db'}"
    store = LeaderboardStore(url)
    for i, startup in enumerate([30.0, 0.5, 0.7, 0.6]):
        store.record(TrialRecord("old", f"t{i}", "synthetic", 1.0, "lora", "vit_tiny_patch16_224", "completed", {},
                                 startup_s=startup))
    store.record(TrialRecord("old", "other", "synthetic", 1.0, "lora", "resnet18", "completed", {}, startup_s=99.0))
    figures = startup_figures(config, url)
    assert figures.per_trial_s == pytest.approx(0.65)  # the median of the backbone's four
    assert figures.executor_setup_s == pytest.approx(30.0 - 0.65)
    assert "4 earlier" in figures.source


def test_cli_dry_run_starts_no_ray(tmp_path: Path, ray_starts: list[str | None]) -> None:
    from medpeft_ray.cli import app

    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(tiny_search(dataset={"label_ratios": [0.5, 1.0]})))
    results = tmp_path / "results"
    out = CliRunner().invoke(app, ["search", "--space", str(space), "--dry-run", "--results", str(results)])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert any(line.startswith("label ratio 0.5: 2 trials") for line in lines), out.output
    assert any(line.startswith("label ratio 1: 2 trials") for line in lines), out.output
    assert any(line.startswith("total: 4 trials, 8.0 epochs") for line in lines), out.output
    assert any("ms per training step" in line for line in lines), out.output
    assert not ray_starts
    # nothing but the forecast, where the search of this experiment finds it
    assert [p.relative_to(results) for p in results.rglob("*") if p.is_file()] == [Path("searches/tiny.forecast.json")]
    from medpeft_ray.search.manifest import load_dry_run_forecast

    kept = load_dry_run_forecast(str(results), "tiny")
    assert kept["total"]["trials"] == 4 and kept["source"] == "timed" and "forecast kept in" in out.output


def test_cli_dry_run_refuses_resume(tmp_path: Path) -> None:
    from medpeft_ray.cli import app

    out = CliRunner().invoke(app, ["search", "--resume", "tiny", "--dry-run", "--results", str(tmp_path)])
    assert out.exit_code == 2 and "--dry-run forecasts a new search" in out.output


def _record_trials(url: str, rows: list[tuple[float, str, int, float, int]], prefix: str = "t") -> None:
    """Leaderboard rows of earlier tiny trials: (label ratio, method, epochs run, training seconds, batch size)."""
    from medpeft_ray.leaderboard import LeaderboardStore, TrialRecord

    store = LeaderboardStore(url)
    for i, (ratio, method, epochs, seconds, batch) in enumerate(rows):
        config = {"dataset": {"image_size": 32}, "train": {"batch_size": batch}}
        store.record(TrialRecord("old", f"{prefix}{i}", "synthetic", ratio, method, "vit_tiny_patch16_224", "completed", config,
                                 epochs_run=epochs, train_time_s=seconds, startup_s=1.0))


def test_recorded_forecast_from_the_leaderboard(tmp_path: Path) -> None:
    from medpeft_ray.search.cluster import ResourcePlan

    config = validate_search_dict(tiny_search(dataset={"label_ratios": [0.5, 1.0]}), "tiny.yaml")
    facts = _facts({0.5: 20, 1.0: 40}, val=20)
    plan = ResourcePlan({"CPU": 0.01}, {"CPU": 1.0}, False, 2)
    url = f"sqlite:///{tmp_path / 'leaderboard.db'}"
    _record_trials(url, [(1.0, "lora", 2, 6.0, 8), (1.0, "lora", 1, 5.0, 8), (1.0, "lora", 4, 40.0, 8),
                         (1.0, "bitfit", 1, 99.0, 8),  # another method
                         (1.0, "lora", 1, 99.0, 16)])  # another batch size
    assert recorded_forecast(config, facts, plan, url) is None  # nothing recorded at label ratio 0.5
    _record_trials(url, [(0.5, "lora", 2, 2.0, 8)], prefix="later")
    stored = recorded_forecast(config, facts, plan, url)
    assert stored is not None and stored["source"] == "leaderboard"
    by_ratio = {s["label_ratio"]: s for s in stored["studies"]}
    assert by_ratio[1.0]["epoch_s"] == pytest.approx(5.0)  # median of 3, 5 and 10 s per epoch
    assert by_ratio[0.5]["epoch_s"] == pytest.approx(1.0)
    assert stored["total"]["trials"] == 4


def test_manifest_keeps_the_forecast(tmp_path: Path) -> None:
    from medpeft_ray.search.manifest import SearchManifest

    SearchManifest("tiny", {}, forecast={"total": {"trials": 4}}).save(str(tmp_path))
    assert SearchManifest.load(str(tmp_path), "tiny").forecast == {"total": {"trials": 4}}
    SearchManifest("older", {}).save(str(tmp_path))
    assert SearchManifest.load(str(tmp_path), "older").forecast is None



def test_actual_costs_are_in_the_forecasts_terms() -> None:
    from types import SimpleNamespace

    from medpeft_ray.leaderboard.report_html import costs_html
    from medpeft_ray.search.forecast import actual_costs

    records = [SimpleNamespace(train_time_s=1790.0, startup_s=10.0, epochs_run=4),
               SimpleNamespace(train_time_s=899.0, startup_s=1.0, epochs_run=1),
               SimpleNamespace(train_time_s=None, startup_s=None, epochs_run=None)]  # failed before it ran
    actual = actual_costs(records, wall_s=2000.0, devices_per_trial=2.0)
    assert actual == {"trials": 3, "epochs": 5, "device_hours": 1.5, "wall_s": 2000.0}
    page = costs_html([{"experiment": "s", "actual": actual,
                        "forecast": {"total": {"trials": 3, "epochs": 6.0, "device_hours": 1.25, "wall_s": 1800.0,
                                               "wall_low_s": 1260.0, "wall_high_s": 2700.0}}},
                       {"experiment": "new", "actual": actual, "forecast": None}])
    assert "<td>s</td><td>3</td><td>3</td><td>6</td><td>5</td><td>1.250</td><td>1.500</td>" in page
    assert "<td>1800 (1260..2700)</td><td>2000</td>" in page
    assert "<td>new</td><td>–</td><td>3</td>" in page  # no forecast: the leaderboard had no epoch times
    assert costs_html([]) == ""


# ----------------------------------------------------------------------------------------------
# Generation searches: noise-prediction steps, the fixed validation loss, FID samplings at the rungs
# ----------------------------------------------------------------------------------------------


def _generation_search(**sections: dict) -> dict:
    """A tiny generation search: the tiny pipeline at 32 px, few patients, two methods, 2 epochs."""
    config: dict = {
        "experiment": "gen",
        "task": "generation",
        "dataset": {"name": "synthetic", "label_ratios": [1.0], "image_size": 32,
                    "options": {"num_patients": 20, "num_classes": 3}},
        "model": {"backbone": "unet_tiny"},
        "method": {"name": ["lora", "bitfit"], "options": {"lora": {"rank": 2, "dropout": 0.0}}},
        "train": {"epochs": 2, "batch_size": 8, "augment": "none", "lr": 1e-3},
        "search": {"num_samples": 2, "seed": 0, "scheduler": {"type": "none"}, "fid": {"images": 4, "steps": 2}},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "gpus_per_worker": 0},
    }
    for name, value in sections.items():
        config[name] = {**config[name], **value}
    return config


@pytest.mark.parametrize("grace, rf, max_t, bracket",
                         [(1, 2, 4, 0), (1, 3, 10, 0), (2, 2, 20, 1), (1, 1.5, 4, 0), (1, 1.2, 5, 0)])
def test_epoch_shares_add_up_to_the_expected_epochs(grace: int, rf: float, max_t: int, bracket: int) -> None:
    from medpeft_ray.search.forecast import halving_epoch_shares

    shares = halving_epoch_shares(grace, rf, max_t, bracket)
    assert len(shares) == max_t and shares[0] == 1.0
    assert sum(shares) == pytest.approx(halving_epochs_per_trial(grace, rf, max_t, bracket))


def test_expected_fid_runs_by_hand() -> None:
    from medpeft_ray.search.forecast import expected_fid_runs

    asha = SchedulerConfig(type="asha", grace_period=1, reduction_factor=2)
    # rungs 1, 2, 4: all 8 trials sample at epoch 1, 4 of them at epoch 2, 2 at epoch 4
    # (a trial stopped at a rung has paid for that rung's FID)
    assert expected_fid_runs(asha, 8, 4, [1, 2, 4]) == pytest.approx(8 + 4 + 2)
    assert expected_fid_runs(asha, 8, 4, [4]) == pytest.approx(2)
    assert expected_fid_runs(SchedulerConfig(type="none"), 8, 4, [1, 2, 3, 4]) == 32
    assert expected_fid_runs(SchedulerConfig(type="median", grace_period=2), 8, 4, [2, 3, 4]) == 24
    # hyperband, 2 brackets: bracket 0 reaches epoch 4 with 1/4 of its trials, bracket 1 (rungs 2, 4) with 1/2
    hyperband = SchedulerConfig(type="hyperband", grace_period=1, reduction_factor=2, brackets=2)
    w0, w1 = math.exp(0), math.exp(-1)
    assert expected_fid_runs(hyperband, 8, 4, [4]) == pytest.approx(8 * (0.25 * w0 + 0.5 * w1) / (w0 + w1))


def test_sampling_seconds_fit_a_fixed_and_a_per_image_part() -> None:
    timing = MethodTiming("lora", [0.1], [0.05], 8, 128, sample_s=[0.3, 0.32, 0.6, 0.6],
                          sample_prompts=[2, 2, 8, 8])
    # medians 0.31 s (2 prompts) and 0.6 s (8): 0.29/6 s per image, the rest fixed per sampling call
    per_image = 0.29 / 6
    fixed = 0.31 - 2 * per_image
    assert timing.sampling_s(16, 128) == pytest.approx(fixed + 16 * per_image)
    assert timing.sampling_s(16, 8) == pytest.approx(2 * fixed + 16 * per_image)  # two calls of 8 prompts
    one_size = MethodTiming("lora", [0.1], [0.05], 8, 128, sample_s=[0.3], sample_prompts=[2])
    assert one_size.sampling_s(16, 128) == pytest.approx(2.4)  # that run scaled by the images
    assert MethodTiming("lora", [0.1], [0.05], 8, 128).sampling_s(16, 128) == 0.0  # a classifier's: none


def test_generation_forecast_adds_fid_samplings_at_their_epochs() -> None:
    timing = MethodTiming("lora", [0.1], [0.05], 8, 128, sample_s=[2.0], sample_prompts=[4])  # 2 s for the 4 images
    facts = _facts({1.0: 40}, val=20)
    by_epochs = {}
    for at in ("rungs", "every_epoch"):
        raw = _generation_search(search={"fid": {"images": 4, "steps": 2, "at": at}})
        config = validate_search_dict(raw, "gen.yaml")
        result = forecast(config, facts, [timing], StartupFigures(1.0, 45.0), concurrency=1)
        (study,) = result.studies
        assert study.epoch_s == pytest.approx(5 * 0.1 + 0.05)  # training and the validation loss, as a classifier's
        assert study.fid_s == pytest.approx(2.0) and study.fid_runs == 2 * len(study.fid_epochs)
        assert study.trial_seconds == pytest.approx(4 * study.epoch_s + study.fid_runs * 2.0 + 2 * 1.0)
        by_epochs[tuple(study.fid_epochs)] = study.trial_seconds
        lines = forecast_lines(result)
        assert "2.00 s per FID sampling (4 images, 2 steps)" in lines[0], lines
        assert f"({study.fid_runs:.1f} samplings expected, 2.00 s each)" in lines[1], lines
    # no scheduler: FID at the last epoch only, or at every epoch (two more samplings)
    assert by_epochs[(1, 2)] == pytest.approx(by_epochs[(2,)] + 2 * 2.0)
    # a classification search's forecast has no FID in it
    plain = forecast(validate_search_dict(tiny_search(), "tiny.yaml"), facts, [timing], StartupFigures(), concurrency=1)
    assert plain.studies[0].fid_runs == 0 and not any("FID" in line for line in forecast_lines(plain))


@pytest.mark.slow
def test_cli_dry_run_of_a_generation_search(tmp_path: Path) -> None:
    from medpeft_ray.cli import app
    from medpeft_ray.search.manifest import load_dry_run_forecast

    raw = _generation_search()
    space = tmp_path / "gen.yaml"
    space.write_text(yaml.safe_dump(raw))
    results = tmp_path / "results"
    out = CliRunner().invoke(app, ["search", "--space", str(space), "--dry-run", "--results", str(results)])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    for method in ("lora", "bitfit"):
        assert any(f"  {method}: " in line and "per FID sampling (4 images, 2 steps)" in line
                   for line in lines), out.output
    assert any(line.startswith("label ratio 1: 2 trials") and "FID at epoch 2 (2.0 samplings" in line
               for line in lines), out.output
    kept = load_dry_run_forecast(str(results), "gen")
    timings = [MethodTiming(**t) for t in kept["timings"]]
    assert [t.method for t in timings] == ["lora", "bitfit"]
    for t in timings:
        assert t.train_median_s > 0 and t.eval_median_s > 0 and t.sampling_s(4, 128) > 0, t
        assert sorted(set(t.sample_prompts)) == [2, 4]  # SAMPLE_PROMPTS, at most the 4 FID images
    study = kept["studies"][0]
    assert study["fid_epochs"] == [2] and study["fid_s"] > 0
    # the same timings with FID at every epoch, and over more epochs: each further FID epoch costs more
    facts = {"train_images_per_ratio": {1.0: study["train_steps_per_epoch"] * 8}, "images": {"val": 8}}
    trial_seconds = []
    for epochs, at in ((2, "rungs"), (2, "every_epoch"), (4, "every_epoch")):
        raw = _generation_search(train={"epochs": epochs}, search={"fid": {"images": 4, "steps": 2, "at": at}})
        config = validate_search_dict(raw, "gen.yaml")
        (made,) = forecast(config, facts, timings, StartupFigures(), concurrency=1).studies
        assert len(made.fid_epochs) == (epochs if at == "every_epoch" else 1)
        trial_seconds.append(made.trial_seconds / made.trials)
    assert trial_seconds[0] < trial_seconds[1] < trial_seconds[2]
    assert trial_seconds[1] - trial_seconds[0] == pytest.approx(statistics.mean(t.sampling_s(4, 128) for t in timings))


@pytest.mark.slow
def test_dry_run_forecasts_each_cell_of_a_grid(tmp_path: Path, ray_starts: list[str | None]) -> None:
    from medpeft_ray.config.grid import load_grid
    from medpeft_ray.search.forecast.dry_run import dry_run
    from medpeft_ray.search.manifest import load_dry_run_forecast

    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**tiny_search(), "experiment": "study"}))
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"grid": {"base": "base.yaml", "axes": {"ratio": {
        "half": {"dataset": {"label_ratios": [0.5]}}, "all": {"dataset": {"label_ratios": [1.0]}}}}}}, sort_keys=False))
    results = tmp_path / "results"
    lines = list(dry_run(load_grid(grid), results=results))
    # each cell: its name first, then its forecast, then where it is kept
    assert [line.heading for line in lines if line.heading] == ["study-half", "study-all"]
    assert str(lines[0]) == "study-half: forecast (dry run: no Ray, no trial)"
    assert sum(str(line).startswith("total: 2 trials") for line in lines) == 2
    assert str(lines[-1]).startswith("forecast kept in ")
    assert load_dry_run_forecast(str(results), "study-all")["total"]["trials"] == 2
    assert not ray_starts
