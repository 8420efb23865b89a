"""Warm trial executors: the recipe's per-trial isolation, checkpoints in storage, the dispatcher."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_search

from medpeft_ray.config import validate_search_dict
from medpeft_ray.metrics import better
from medpeft_ray.search.dispatcher import TrialDispatcher
from medpeft_ray.search.executor_spec import EXIT, ExecutorSpec
from medpeft_ray.search.trial_checkpoints import TrialCheckpoints
from medpeft_ray.train.assignment import TrialAssignment
from medpeft_ray.train.engine import WorkerContext, ensure_process_group
from medpeft_ray.train.recipe import TrialRecipe
from medpeft_ray.train.recipes import run_training


def _trial(method: str = "lora", **train: Any) -> Any:
    options = {"rank": 2} if method == "lora" else {}
    config = validate_search_dict(
        tiny_search(method={"name": method, "options": options}, train={"epochs": 2, **train}), "tiny.yaml"
    )
    return config.trial_config(1.0, {"lr": 3e-3})


def _epochs(recipe: TrialRecipe | None, trial: Any) -> list[tuple[float, float, float]]:
    seen: list[tuple[float, float, float]] = []

    def report(metrics: dict[str, Any], directory: Path | None) -> None:
        seen.append((metrics["train_loss"], metrics["val_loss"], metrics["val_auroc"]))

    if recipe is None:
        run_training(trial, WorkerContext(0, 1, torch.device("cpu")), report)
    else:
        recipe.run(trial, report)
    return seen


@pytest.mark.slow
def test_a_warm_recipe_gives_the_numbers_of_a_cold_run_and_trials_leave_the_backbone_pristine() -> None:
    """The fourth trial on one recipe, after a full fine-tune and trials of other methods and seeds,
    trains exactly as the same configuration on a fresh recipe: nothing a trial changed survives it."""
    ensure_process_group("gloo")
    recipe = TrialRecipe(WorkerContext(0, 1, torch.device("cpu")))
    lora = _trial("lora")
    first = _epochs(recipe, lora)
    key = next(iter(recipe._pristine))
    pristine = {n: t.clone() for n, t in recipe._pristine[key].state_dict().items()}
    _epochs(recipe, _trial("full"))  # trains every backbone weight of its own copy
    _epochs(recipe, _trial("bitfit", seed=3))
    fourth = _epochs(recipe, lora)
    assert fourth == first  # exactly, not approximately
    assert fourth == _epochs(None, lora)  # and exactly what a cold run gives
    after = recipe._pristine[key].state_dict()
    assert all(torch.equal(after[n], t) for n, t in pristine.items())
    assert recipe.trials_run == 4 and len(recipe._pristine) == 1  # one backbone read, four trials


def test_the_best_epoch_follows_the_trials_metric_and_direction() -> None:
    assert better(0.5, None, "max") and better(0.6, 0.5, "max") and not better(0.4, 0.5, "max")
    assert better(0.4, 0.5, "min") and not better(0.6, 0.5, "min")
    assert not better(math.nan, None, "max") and not better(math.inf, 1.0, "min")
    config = validate_search_dict(tiny_search(search={"metric": "val_loss"}), "tiny.yaml")
    trial = config.trial_config(1.0, {"lr": 3e-3})
    assert (trial.metric, trial.mode) == ("val_loss", "min")
    ensure_process_group("gloo")
    final = run_training(trial, WorkerContext(0, 1, torch.device("cpu")), lambda m, d: None, evaluate_test=True)
    assert final["best_val_loss"] is not None and final["test_epoch"] in (1, 2)


def test_a_stop_request_ends_the_trial_before_its_next_step_and_frees_it() -> None:
    ensure_process_group("gloo")
    calls = {"n": 0}

    def stop_after_three() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    from medpeft_ray.train.recipe import TrialStopped

    recipe = TrialRecipe(WorkerContext(0, 1, torch.device("cpu"), should_stop=stop_after_three))
    reported: list[int] = []
    with pytest.raises(TrialStopped):
        recipe.run(_trial(), lambda m, d: reported.append(m["epoch"]))
    assert reported == [] and calls["n"] == 4 and recipe.trials_run == 1


def _fake_checkpoint(folder: Path, epoch: int, rank: int) -> Path:
    part = folder / f"rank{rank}-epoch{epoch}"
    (part / "deepspeed" / "epoch").mkdir(parents=True)
    (part / "deepspeed" / "epoch" / f"shard_rank{rank}.pt").write_text(f"{epoch}/{rank}")
    if rank == 0:
        (part / "state.json").write_text(json.dumps({"epoch": epoch}))
    return part


def test_trial_checkpoints_merge_ranks_keep_the_best_and_the_latest_and_resume_from_the_latest(tmp_path: Path) -> None:
    store = TrialCheckpoints(str(tmp_path / "storage" / "trial"), keep=2, metric="val_auroc", mode="max")
    for epoch, value in [(1, 0.6), (2, 0.9), (3, 0.7), (4, 0.5)]:
        for rank in (0, 1):  # every rank's part lands in the same folder
            store.upload(_fake_checkpoint(tmp_path / "local", epoch, rank), epoch)
        store.record(epoch, value)
    # the two best (epochs 2 and 3) and the latest (4) are kept, the rest deleted
    assert [e["epoch"] for e in store.index()] == [2, 3, 4]
    kept = sorted(p.name for p in (tmp_path / "storage" / "trial").iterdir() if p.is_dir())
    assert kept == ["checkpoint_000002", "checkpoint_000003", "checkpoint_000004"]
    latest = store.download_latest(tmp_path / "resume")
    assert latest is not None and json.loads((latest / "state.json").read_text()) == {"epoch": 4}
    assert sorted(p.name for p in (latest / "deepspeed" / "epoch").iterdir()) == ["shard_rank0.pt", "shard_rank1.pt"]
    # a NaN epoch is never among the best; lower is better for a loss
    losses = TrialCheckpoints(str(tmp_path / "loss"), keep=1, metric="val_loss", mode="min")
    for epoch, value in [(1, 0.3), (2, math.nan), (3, 0.4)]:
        losses.upload(_fake_checkpoint(tmp_path / "l", epoch, 0), epoch)
        losses.record(epoch, value)
    assert [e["epoch"] for e in losses.index()] == [1, 3]
    assert TrialCheckpoints(str(tmp_path / "none"), 2, "val_auroc", "max").download_latest(tmp_path / "x") is None


def test_a_local_record_is_replaced_whole_so_a_write_killed_midway_leaves_the_last_one(tmp_path: Path) -> None:
    store = TrialCheckpoints(str(tmp_path / "trial"), keep=2, metric="val_auroc", mode="max")
    store.upload(_fake_checkpoint(tmp_path / "local", 1, 0), 1)
    store.record(1, 0.5)
    # what a worker killed while writing the next record leaves: a partial file beside it
    (tmp_path / "trial" / ".trial_record.json.123.partial").write_text('{"fence": [0, 0], "checkpoints": [{"epoch": 1, "val')
    assert store.index() == [{"epoch": 1, "value": 0.5}]
    store.upload(_fake_checkpoint(tmp_path / "local", 2, 0), 2)
    store.record(2, 0.6)
    assert [e["epoch"] for e in store.index()] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "trial").iterdir()) == [
        ".trial_record.json.123.partial", "checkpoint_000001", "checkpoint_000002", "trial_record.json"]


def _dispatcher(max_failures_per_trial: int = 1, idle_exit_s: float = 60.0) -> TrialDispatcher:
    spec = ExecutorSpec(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1}, storage_path="/tmp",
                        experiment="t", max_executors=0, idle_exit_s=idle_exit_s)  # 0: the test plays the executors
    return TrialDispatcher(spec)


def test_the_dispatcher_hands_trials_out_in_order_and_relays_their_events() -> None:
    async def scenario() -> None:
        d = _dispatcher()
        await d.submit("s/a", TrialAssignment(trial="A", max_failures=1))
        await d.submit("s/b", TrialAssignment(trial="B", max_failures=1))
        first = await d.next_trial("e0", 0.1)
        second = await d.next_trial("e1", 0.1)
        assert first.trial == "A" and second.trial == "B"
        assert await d.next_trial("e2", 0.05) is None  # nothing left: the long poll times out
        await d.post("s/a", "epoch", {"epoch": 1})
        await d.post("s/a", "done", {"epoch": 2})
        assert await d.next_event("s/a", 0.1) == ("epoch", {"epoch": 1})
        assert await d.next_event("s/a", 0.1) == ("done", {"epoch": 2})
        assert await d.next_event("s/a", 0.01) is None
        await d.release("e0", "s/a")
        # a trial that Tune ended (ASHA) is seen by its executor's watcher, and its slot is freed
        assert not await d.wait_end("s/b", 0.01)
        await d.end_trial("s/b")
        assert await d.wait_end("s/b", 0.01)
        await d.release("e1", "s/b")
        stats = await d.stats()
        assert stats["executors"]["e0"]["trials_run"] == 1 and stats["executors"]["e1"]["trials_run"] == 1
        assert await d.free_slots() == 6  # three idle executors, each with room for one waiting trial
        # a trial ended while it waited in the queue never reaches an executor
        await d.submit("s/c", TrialAssignment(trial="C", max_failures=1))
        await d.end_trial("s/c")
        assert await d.next_trial("e0", 0.05) is None

    asyncio.run(scenario())


def test_the_dispatcher_lists_when_it_handed_each_trial_to_an_executor() -> None:
    """The search driver says a trial started when an executor takes it, not when Tune starts it."""
    async def scenario() -> None:
        d = _dispatcher()
        assert await d.handouts_since(0, 0.01) == (0, [])  # nothing handed out: the long poll times out
        await d.submit("s/a", TrialAssignment(trial="A", max_failures=1))
        await d.submit("s/b", TrialAssignment(trial="B", max_failures=1))
        waiting = asyncio.ensure_future(d.handouts_since(0, 5.0))
        await asyncio.sleep(0.01)
        assert not waiting.done()  # queued is not handed out
        first = await d.next_trial("e0", 0.1)
        cursor, handed = await asyncio.wait_for(waiting, 1.0)  # woken by the hand-out
        assert (cursor, handed) == (1, [("s/a", first.dispatched_at)])
        second = await d.next_trial("e1", 0.1)
        assert await d.handouts_since(cursor, 0.01) == (2, [("s/b", second.dispatched_at)])
        assert await d.handouts_since(7, 0.01) == (2, [("s/a", first.dispatched_at), ("s/b", second.dispatched_at)])

    asyncio.run(scenario())


def test_each_search_on_kept_executors_gets_its_own_statistics_and_settings() -> None:
    """A driver's next search reuses the executors (medpeft_ray.search.pools): each search counts
    only its own trials and busy time, says how many executors it found warm, and sets how many it
    wants and how long they may idle."""
    async def scenario() -> None:
        d = _dispatcher()
        assert await d.begin_search("first", 0, 30.0, "/tmp/first") == 0  # 0 wanted: the test plays the executors
        await d.submit("first/a", TrialAssignment(trial="A", max_failures=1))
        assert (await d.next_trial("e0", 0.1)).trial == "A"
        await d.release("e0", "first/a")
        assert await d.running_searches() == ["first"]
        first = await d.end_search("first")
        assert first["executors"]["e0"]["trials_run"] == 1 and first["executors_warm"] == 0
        assert await d.running_searches() == []
        assert await d.begin_search("second", 0, 5.0, "/tmp/second") == 1  # e0 is alive: found warm
        assert (d.spec.idle_exit_s, d.spec.storage_path) == (5.0, "/tmp/second")
        for key in ("second/a", "second/b"):
            await d.submit(key, TrialAssignment(trial=key, max_failures=1))
            assert (await d.next_trial("e0", 0.1)).trial == key
            await d.release("e0", key)
        second = await d.end_search("second")
        assert second["executors"]["e0"]["trials_run"] == 2 and second["executors_warm"] == 1
        assert second["executors_started"] == 0
        assert (await d.stats())["executors"]["e0"]["trials_run"] == 3  # the dispatcher's whole life

    asyncio.run(scenario())


def test_a_restarted_executor_gets_its_trial_back_until_the_trials_failure_budget_is_spent() -> None:
    async def scenario() -> None:
        d = _dispatcher()
        await d.submit("s/a", TrialAssignment(trial="A", max_failures=1))
        await d.submit("s/b", TrialAssignment(trial="B", max_failures=1))
        assert (await d.next_trial("e0", 0.1)).delivery == 1
        # the worker group died and came back: the same trial again, resumed from its checkpoint
        again = await d.next_trial("e0", 0.1)
        assert again.trial == "A" and again.delivery == 2
        # a second loss spends the budget (max_failures 1): the trial fails, the queue goes on
        third = await d.next_trial("e0", 0.1)
        assert third.trial == "B"
        assert await d.next_event("s/a", 0.1) == ("failed", "the trial's workers were lost 2 time(s) "
                                                            "(resources.max_failures: 1)")

    asyncio.run(scenario())


def test_a_restarted_dispatcher_takes_running_trials_back_from_their_executors_and_queued_ones_from_their_drivers() -> None:
    from medpeft_ray.search.dispatcher import ADOPT_GRACE_S

    async def scenario() -> None:
        spec = ExecutorSpec(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1}, storage_path="/tmp",
                            experiment="t", max_executors=0)
        d = TrialDispatcher(spec, restarted=True)  # what Ray starts after the first one died
        # e0 was training s/a: its watcher's next call claims it (the trial goes on, not stopped)
        assert not await d.wait_end("s/a", 0.01, "e0")
        await d.post("s/a", "epoch", {"epoch": 2})  # retried by Ray from the dead instance
        assert await d.next_event("s/a", 0.1) == ("epoch", {"epoch": 2})
        # s/b waited in the dead instance's queue: its driver is told to submit it again
        assert await d.next_event("s/b", 0.01) == ("unknown", None)
        await d.submit("s/b", TrialAssignment(trial="B", max_failures=1))
        # held while the executors come back, so that no trial is handed out twice
        assert await d.next_trial("e1", 0.05) is None
        d.restarted_at -= ADOPT_GRACE_S
        handed = await d.next_trial("e1", 0.1)
        assert handed.trial == "B" and handed.generation == d.generation
        # s/a's driver submits again too (its poll came before the claim): it stays e0's, not queued twice
        await d.submit("s/a", TrialAssignment(trial="A", max_failures=1))
        assert await d.next_trial("e2", 0.05) is None
        await d.post("s/a", "done", {"epoch": 3})
        await d.release("e0", "s/a")
        assert await d.next_event("s/a", 0.1) == ("done", {"epoch": 3})
        assert (await d.stats())["executors"]["e0"]["trials_run"] == 1

    asyncio.run(scenario())


def test_an_idle_executor_exits_and_all_exit_at_shutdown() -> None:
    async def scenario() -> None:
        d = _dispatcher(idle_exit_s=0.05)
        assert await d.next_trial("e0", 0.01) is None
        await asyncio.sleep(0.1)
        assert await d.next_trial("e0", 0.5) == EXIT  # its slot (and node) go back to the cluster
        closing = _dispatcher()
        await closing.shutdown(timeout_s=0.1)
        assert await closing.next_trial("e1", 1.0) == EXIT

    asyncio.run(scenario())


def test_the_trial_record_keeps_every_epoch_and_a_newer_run_fences_an_older_writer_out(tmp_path: Path) -> None:
    from medpeft_ray.search.trial_checkpoints import FencedOut

    uri = str(tmp_path / "trial")
    first = TrialCheckpoints(uri, keep=1, metric="val_auroc", mode="max", fence=(1, 5, 1))
    assert first.claim() == []
    for epoch, value in [(1, 0.6), (2, 0.9), (3, 0.7)]:
        first.upload(_fake_checkpoint(tmp_path / "local", epoch, 0), epoch)
        first.record(epoch, value, {"epoch": epoch, "val_auroc": value, "train_time_s": 10.0 * epoch})
    # retention keeps the best and the latest checkpoint; the record keeps every epoch's metrics
    assert [e["epoch"] for e in first.index()] == [2, 3]
    assert [m["val_auroc"] for m in first.read().epochs] == [0.6, 0.9, 0.7]

    # the trial delivered again within the run (a lost worker): the next delivery takes it over
    again = TrialCheckpoints(uri, keep=1, metric="val_auroc", mode="max", fence=(1, 5, 2))
    assert [m["epoch"] for m in again.claim()] == [1, 2, 3]
    # the search resumed: its run owns the folder from its claim on
    resumed = TrialCheckpoints(uri, keep=1, metric="val_auroc", mode="max", fence=(2, 9, 1))
    assert [m["train_time_s"] for m in resumed.claim()] == [10.0, 20.0, 30.0]
    assert resumed.read().fence == (2, 9, 1)
    # the older run's writers, still alive, can neither upload nor record, nor claim again
    stale_epoch = _fake_checkpoint(tmp_path / "stale", 4, 0)
    for stale in (first, again):
        with pytest.raises(FencedOut, match=r"belongs to a newer writer \(run, dispatcher, delivery \(2, 9, 1\)"):
            stale.upload(stale_epoch, 4)
        with pytest.raises(FencedOut):
            stale.record(4, 0.99, {"epoch": 4, "val_auroc": 0.99})
        with pytest.raises(FencedOut):
            stale.claim()
    assert not (tmp_path / "trial" / "checkpoint_000004").exists()
    assert [m["epoch"] for m in resumed.read().epochs] == [1, 2, 3]
    # recording an epoch again (a resume from an earlier checkpoint) replaces it and drops the later ones
    resumed.upload(_fake_checkpoint(tmp_path / "again", 3, 0), 3)
    resumed.record(3, 0.75, {"epoch": 3, "val_auroc": 0.75})
    assert [(m["epoch"], m["val_auroc"]) for m in resumed.read().epochs] == [(1, 0.6), (2, 0.9), (3, 0.75)]


def test_the_grid_sampler_survives_the_pickling_tune_does_to_its_searcher() -> None:
    import pickle

    import optuna

    from medpeft_ray.config import validate_search_dict
    from medpeft_ray.search.space import make_sampler

    config = validate_search_dict(tiny_search(space={"lr": {"type": "categorical", "choices": [0.001, 0.01]}},
                                              search={"sampler": "grid", "num_samples": 2}), "grid.yaml")
    sampler = pickle.loads(pickle.dumps(make_sampler(config.search, config.search_space.distributions)))
    study = optuna.create_study(sampler=sampler)
    seen = []
    for _ in range(2):  # ask-and-tell, as Tune's searcher does; the last tell must not stop anything
        trial = study.ask()
        seen.append(trial.suggest_categorical("lr", [0.001, 0.01]))
        study.tell(trial, 0.5)
    assert sorted(seen) == [0.001, 0.01]


def test_a_resumed_studys_trials_queue_in_the_order_tune_created_them() -> None:
    """Restored trials submit again in whatever order their drivers start; the scheduler's decisions
    depend on which reports first, so they queue by their number in their study (Tune's creation
    order, which each driver sends), and a resumed search hands none out until they have settled."""
    from medpeft_ray.search import dispatcher
    from medpeft_ray.search.trial import _trial_number

    assert _trial_number("/r/tune/tiny-ratio1/run_trial_119ba3c6_2_lr=0.0020_2026-12-07_12-49-27", "119ba3c6") == 2
    # each study's trainable is named after it (runner.study_trainable)
    assert _trial_number("/r/tune/tiny-ratio1/run_trial-tiny-ratio1_119ba3c6_3_lr=0.0020", "119ba3c6") == 3
    assert _trial_number("/r/tune/x/elsewhere", "119ba3c6") == 0

    async def scenario() -> None:
        d = _dispatcher()
        await d.begin_search("s", 0, 60.0, "/tmp/s", resumed=True)
        for key, number in (("s/c", 3), ("other/d", 1), ("s/a", 1)):
            await d.submit(key, TrialAssignment(trial=key, number=number, max_failures=1))
        # an executor that asks while the restored trials are still submitting gets nothing yet
        assert await d.next_trial("e0", 0.2) is None
        await d.submit("s/b", TrialAssignment(trial="s/b", number=2, max_failures=1))
        handed = [(await d.next_trial(f"e{i}", dispatcher.RESUME_SETTLE_S + 2)).trial for i in range(4)]
        assert handed == ["s/a", "s/b", "s/c", "other/d"]

    asyncio.run(scenario())


def test_a_study_keeps_the_checkpoints_of_its_best_trials_per_method_and_of_no_ended_trial_its_latest(
        tmp_path: Path) -> None:
    import functools

    from medpeft_ray.config import validate_search_dict
    from medpeft_ray.search.callbacks import CheckpointRetention
    from medpeft_ray.search.trial import trial_folder

    from conftest import tiny_search

    config = validate_search_dict(tiny_search(search={"checkpoint_trials": 2}, train={"checkpoints_to_keep": 1}), "t.yaml")
    folder = functools.partial(trial_folder, str(tmp_path / "train"), "tiny-ratio1")

    def train(trial_id: str, values: list[float]) -> TrialCheckpoints:
        store = TrialCheckpoints(folder(trial_id), keep=1, metric="val_auroc", mode="max")
        for epoch, value in enumerate(values, start=1):
            part = tmp_path / "part"
            part.mkdir(exist_ok=True)
            (part / "trainable.safetensors").write_bytes(b"w")
            store.upload(part, epoch)
            store.record(epoch, value, {"val_auroc": value})
        return store

    def kept(store: TrialCheckpoints) -> tuple[list[int], list[int]]:
        return [entry["epoch"] for entry in store.index()], store.stored_epochs()

    retention = CheckpointRetention(config, folder)
    a = train("a", [0.6, 0.8, 0.7])
    assert kept(a) == ([2, 3], [2, 3])  # running: its best and its latest (to resume from)
    retention.ended("a", "lora")
    assert kept(a) == ([2], [2])  # ended: it resumes no more
    b = train("b", [0.5, 0.55])
    retention.ended("b", "lora")
    other = train("other", [0.1])  # another method's trials rank among themselves
    retention.ended("other", "ssf")
    assert kept(b) == ([2], [2]) and kept(other) == ([1], [1])
    # a resumed search goes on with the ranking of the trials that ended before it
    restored = CheckpointRetention(config, folder)
    restored.set_state(retention.get_state())
    c = train("c", [0.9])
    restored.ended("c", "lora")
    assert kept(c) == ([1], [1]) and kept(a) == ([2], [2])
    assert kept(b) == ([], [])  # pushed out of the best two: no checkpoint, but every epoch's record
    assert [m["val_auroc"] for m in b.read().epochs] == [0.5, 0.55] and kept(other) == ([1], [1])


def test_an_epoch_publishes_while_the_next_trains_in_order_and_its_error_reaches_the_training_thread(
        tmp_path: Path) -> None:
    import threading

    from medpeft_ray.search.executor_worker import EpochPublisher

    release = threading.Event()
    release_second = threading.Event()  # epoch 2 publishes only once the test has looked
    seen: list[tuple[int, list[str], Path]] = []

    def publish(metrics: dict[str, Any], staged: Path) -> None:
        if metrics["epoch"] == 1:
            assert release.wait(60)  # the upload of epoch 1 is still going when epoch 2 trains
        if metrics["epoch"] == 2:
            assert release_second.wait(60)
        seen.append((metrics["epoch"], sorted(p.name for p in staged.iterdir()), staged))
        if metrics["epoch"] == 3:
            raise OSError("the bucket refused the upload")

    def epoch_folder(epoch: int) -> Path:
        folder = tmp_path / f"epoch{epoch}"
        folder.mkdir()
        (folder / "trainable.safetensors").write_text(str(epoch))
        return folder

    publisher = EpochPublisher(publish)
    first = epoch_folder(1)
    publisher.submit({"epoch": 1}, first)
    assert list(first.iterdir()) == []  # moved out: the recipe deletes its folder as the call returns
    assert seen == []  # submit returned while epoch 1 publishes: training goes on
    release.set()
    publisher.submit({"epoch": 2}, epoch_folder(2))  # waits for epoch 1 first: one at a time, in order
    assert [epoch for epoch, _, _ in seen] == [1]
    release_second.set()
    publisher.submit({"epoch": 3}, epoch_folder(3))
    with pytest.raises(OSError, match="refused"):
        publisher.close()  # the trial's end waits for its last epoch, and fails with it
    assert [(epoch, files) for epoch, files, _ in seen] == [(e, ["trainable.safetensors"]) for e in (1, 2, 3)]
    assert not any(staged.exists() for _, _, staged in seen)  # nothing left on the worker's disk
