"""The workers of a warm executor: set up once, then train the trials the dispatcher hands out.

Every worker of an executor's Ray Train run runs :func:`executor_loop`: it imports, joins the
process group, builds the search's recipe and warms it up (the decode-once dataset, the pristine
pre-trained backbone), then asks the dispatcher (rank 0 asks, the ranks agree) for trial after
trial. Each trial reports again the epochs its record holds, resumes from its latest checkpoint
and publishes each epoch (checkpoint upload, record, report) on a thread while the next one trains.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from medpeft_ray.errors import TrialFailed
from medpeft_ray.fault_points import fault_point
from medpeft_ray.metrics import nan_metrics
from medpeft_ray.search.executor_spec import EXIT
from medpeft_ray.search.trial_checkpoints import FencedOut, TrialCheckpoints

if TYPE_CHECKING:
    from ray.actor import ActorHandle

    from medpeft_ray.train.assignment import TrialAssignment
    from medpeft_ray.train.engine import WorkerContext
    from medpeft_ray.train.recipe import TrialRecipe

# torch and the training modules are imported inside the functions: the executor's host actor
# imports this module only to hand executor_loop to Ray Train, and never trains

log = logging.getLogger(__name__)


def executor_loop(loop_config: dict[str, Any]) -> None:
    """Every worker of an executor: set up once, then train the trials the dispatcher hands out."""
    started_at = time.time()
    from medpeft_ray.train.engine import load_deepspeed

    # DeepSpeed picks its accelerator at import: decide before anything imports it
    load_deepspeed(on_gpu=bool(os.environ.get("CUDA_VISIBLE_DEVICES")))
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from medpeft_ray.train.engine import WorkerContext
    from medpeft_ray.train.recipes import make_recipe

    executor_id, dispatcher = loop_config["executor_id"], loop_config["dispatcher"]
    torch.set_num_threads(max(1, int(loop_config.get("threads", 1))))
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    # The ranks agree on what to do next and when to stop on a CPU group, so a GPU trial's
    # control messages never wait for the GPU.
    control = dist.new_group(backend="gloo") if world_size > 1 else None
    # the ranks' checkpoint uploads meet on a group of their own: they run beside training, whose
    # stop checks use ``control`` (two threads must never share one group's sequence of collectives)
    uploads = dist.new_group(backend="gloo") if world_size > 1 else None
    ctx = WorkerContext(rank=rank, world_size=world_size, device=ray.train.torch.get_device())
    # the recipe of the search's trials (classification or generation), from the trial it warms up with
    recipe = make_recipe(loop_config["warm_up"], ctx, control) if loop_config.get("warm_up") is not None else None
    setup_marks = {"executor_start": started_at, "executor_setup": time.time()}
    if loop_config.get("warm_up") is not None:
        try:
            recipe.warm_up(loop_config["warm_up"], loop_config.get("dataset_key"))
        except Exception as exc:  # noqa: BLE001  (a set-up that fails would fail again: exit, and say why)
            if rank == 0:
                ray.get(dispatcher.setup_failed.remote(executor_id, f"{type(exc).__name__}: {exc}"))
            log.error("executor %s could not set up:\n%s", executor_id, traceback.format_exc())
            return
        setup_marks["executor_warm_up"] = time.time()
    try:
        _serve_trials(recipe, ctx, dispatcher, executor_id, (control, uploads), setup_marks)
    except ray.exceptions.RayActorError:
        # the search's dispatcher died for good (its search ended, or its driver died): so does
        # this executor, rather than have Ray Train restart it over and over
        log.warning("executor %s: its search's dispatcher is gone; exiting", executor_id)


def _serve_trials(recipe: TrialRecipe | None, ctx: WorkerContext, dispatcher: ActorHandle, executor_id: str,
                  groups: tuple[Any, Any], setup_marks: dict[str, float]) -> None:
    """An executor's trials, one after another, until the dispatcher says to exit. ``groups``: the
    ranks' CPU process groups for control (what to do next, when to stop) and for uploads.

    Raises:
        ray.exceptions.RayActorError: the dispatcher died for good (the other ranks exit).
    """
    import torch.distributed as dist

    from medpeft_ray.train.recipes import make_recipe

    rank, world_size = ctx.rank, ctx.world_size
    control = groups[0]
    while True:
        gone: Exception | None = None
        assignment = None
        if rank == 0:
            try:
                assignment = ray.get(dispatcher.next_trial.remote(executor_id))
            except ray.exceptions.RayActorError as exc:
                assignment, gone = EXIT, exc
        if world_size > 1:
            box = [assignment]
            dist.broadcast_object_list(box, src=0, group=control)
            assignment = box[0]
        if assignment is None:
            continue
        if assignment == EXIT:
            if gone is not None:
                raise gone
            return
        # each trial its own stop signal: a finished trial's watcher may still answer late
        stop = threading.Event()
        if recipe is None:
            recipe = make_recipe(assignment.trial, ctx, control)
        recipe.ctx = dataclasses.replace(ctx, should_stop=stop.is_set)
        _run_assignment(recipe, assignment, dispatcher, executor_id, stop, groups, setup_marks)
        setup_marks = {}  # only the executor's first trial paid for its set-up


def _run_assignment(recipe: TrialRecipe, assignment: TrialAssignment, dispatcher: ActorHandle, executor_id: str,
                    stop: threading.Event, groups: tuple[Any, Any], setup_marks: dict[str, float]) -> None:
    """One trial on this worker: the recorded epochs reported again, then training from the latest
    checkpoint with per-epoch uploads, records and reports, then the final event.

    Every delivery of a trial (its first, a restart after a lost worker, a resumed search) reports
    the epochs its record holds before it trains on, so its driver (which drops the epochs it has
    seen) always has the whole trial; an epoch is recorded before it is reported, so none is
    reported that a later delivery would not find.
    """
    from medpeft_ray.train.recipe import TrialStopped

    ctx = recipe.ctx
    key = assignment.key
    trial = assignment.trial  # validated once where it was sampled
    assert assignment.checkpoint_uri is not None  # a warm trial's assignment names its folder
    # later runs of the search, later dispatchers (one restarted after it died), later deliveries win
    checkpoints = TrialCheckpoints(assignment.checkpoint_uri, trial.train.checkpoints_to_keep, trial.metric,
                                   trial.mode, assignment.fence)
    watcher = None
    if ctx.rank == 0:
        watcher = threading.Thread(target=_watch_end, args=(dispatcher, key, stop, executor_id), daemon=True)
        watcher.start()
    started = {**assignment.started, **setup_marks, "dispatch": assignment.dispatched_at or time.time()}
    evaluate_test = assignment.evaluate_test

    def post(kind: str, data: Any) -> None:
        if ctx.rank == 0:
            ray.get(dispatcher.post.remote(key, kind, data))

    def publish(metrics: dict[str, Any], directory: Path | None) -> None:
        """Uploads this rank's part of an epoch, then (rank 0, once every rank's part is in storage)
        records the epoch and reports it: on the publisher's thread, while the next epoch trains."""
        epoch = int(metrics["epoch"])
        fault_point("before_checkpoint", epoch)
        if directory is not None:
            checkpoints.upload(directory, epoch)
        if ctx.world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=groups[1])  # every rank's part is in storage before the record names it
        metrics = {**metrics, "checkpoint_path": checkpoints.uri(epoch)}
        if ctx.rank == 0:
            checkpoints.record(epoch, metrics.get(trial.metric) if directory is not None else None, metrics)
            fault_point("after_record", epoch)
            if not evaluate_test:
                post("epoch", metrics)

    publisher = EpochPublisher(publish)

    outcome: tuple[str, Any] | None = None
    history: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="medpeft-resume-") as tmp:
        try:
            history = _claim(checkpoints, ctx, groups[0])
            if not evaluate_test:
                for metrics in history:  # the driver drops those it has reported already
                    post("epoch", metrics)
            resume_from = checkpoints.download_latest(Path(tmp))
            try:
                final = recipe.run(trial, publisher.submit, evaluate_test=evaluate_test, resume_from=resume_from,
                                   dataset_key=assignment.dataset_key, started=started, history=history,
                                   checkpoint_of=lambda epoch: checkpoints.download(epoch, Path(tmp) / "best"),
                                   predictions_to=assignment.predictions_uri)
            except BaseException:
                publisher.close(failed=True)
                raise
            publisher.close()  # the last epoch is recorded and reported before the trial's end
            outcome = ("done", {k: v for k, v in final.items() if not isinstance(v, dict)})
        except (TrialStopped, FencedOut) as exc:
            outcome = None  # stopped by its driver, or a newer run of the search owns the trial now
            if isinstance(exc, FencedOut):
                log.warning("trial %s left to a newer run: %s", key, exc)
        except TrialFailed as exc:
            outcome = ("failed", str(exc))
            if not evaluate_test:
                # the failed epoch reaches Tune too, as a cold trial reports it (its metrics are NaN)
                last = max([int(m["epoch"]) for m in checkpoints.history] or [0])
                post("epoch", {"epoch": last + 1, **nan_metrics(), "train_loss": float("nan"), "failure": str(exc)})
        except ray.exceptions.RayActorError:
            raise  # the dispatcher died for good: nobody is left to tell
        except Exception as exc:  # noqa: BLE001  (the executor survives a trial's own error)
            outcome = ("failed", f"{type(exc).__name__}: {exc}")
            log.error("trial %s failed on %s:\n%s", key, executor_id, traceback.format_exc())
            if ctx.world_size > 1 or "CUDA error" in str(exc):
                # the other ranks may wait in a collective, or the GPU context is unusable: restart
                # the worker group (the dispatcher fails the trial, and hands out the next one)
                post(*outcome)
                raise
        if outcome is not None:
            if outcome[0] == "done":
                fault_point("before_done", int(outcome[1].get("epoch") or 0))
            post(*outcome)
        if ctx.rank == 0:
            ray.get(dispatcher.release.remote(executor_id, key))
    stop.set()  # ends this trial's watcher


class EpochPublisher:
    """Publishes a trial's epochs (checkpoint upload, record, report) on a thread of its own, one
    epoch at a time and in order, so that training goes on while an epoch's checkpoint uploads
    (a fully fine-tuned ViT-B's 1.4 GB to a bucket takes seconds to minutes).

    An epoch's files are moved out of the recipe's temporary folder before the recipe deletes it. The next epoch's :meth:`submit` and :meth:`close` wait for the epoch in
    flight and raise its error, if it had one, on the training thread. A worker lost meanwhile
    loses at most that epoch too: the trial resumes from the last recorded one, as it always does.
    """

    def __init__(self, publish: Callable[[dict[str, Any], Path | None], None]) -> None:
        self.publish = publish
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def submit(self, metrics: dict[str, Any], directory: Path | None) -> None:
        self.wait()
        staged = None
        if directory is not None:
            staged = Path(tempfile.mkdtemp(prefix="medpeft-upload-"))
            for part in directory.iterdir():
                shutil.move(part, staged / part.name)  # a rename where both are on one disk
        self.thread = threading.Thread(target=self._run, args=(dict(metrics), staged), name="medpeft-publish",
                                       daemon=True)
        self.thread.start()

    def _run(self, metrics: dict[str, Any], staged: Path | None) -> None:
        try:
            self.publish(metrics, staged)
        except BaseException as exc:  # noqa: BLE001  (raised on the training thread)
            self.error = exc
        finally:
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)

    def wait(self) -> None:
        """Waits for the epoch in flight; raises its error."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def close(self, failed: bool = False) -> None:
        """The trial's training ended: the epoch in flight is published and its error raised; or
        training ``failed`` (its own error goes on): the epoch in flight is left to finish."""
        if not failed:
            self.wait()
            return
        if self.thread is not None:
            self.thread.join(timeout=300)  # a rank lost in its barrier: let the other error go on
            self.thread, self.error = None, None


def _claim(checkpoints: TrialCheckpoints, ctx: WorkerContext, control: Any) -> list[dict[str, Any]]:
    """Rank 0 takes the trial's folder for this delivery; every rank gets the recorded epochs.

    Raises:
        FencedOut: on every rank, when a newer run of the search owns the folder.
    """
    box: list[Any] = [None]
    if ctx.rank == 0:
        try:
            box[0] = checkpoints.claim()
        except FencedOut as exc:
            box[0] = exc
    if ctx.world_size > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(box, src=0, group=control)
    if isinstance(box[0], FencedOut):
        raise box[0]
    checkpoints.history = list(box[0])
    return list(box[0])


def _watch_end(dispatcher: ActorHandle, key: str, stop: threading.Event, executor_id: str) -> None:
    """Sets ``stop`` once the trial was ended from outside (or once it finished here)."""
    while not stop.is_set():
        try:
            if ray.get(dispatcher.wait_end.remote(key, 5.0, executor_id)):
                stop.set()
        except Exception:  # noqa: BLE001  (the dispatcher is gone: the search is ending)
            stop.set()

