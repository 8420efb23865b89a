"""The tracking destinations a search's :class:`~medpeft_ray.search.tracking.TrackingCallback` writes to:
MLflow and Weights & Biases, each through its own client in the search driver.

Both find a run again by its key (a study, or a study's trial) instead of remembering it: an
MLflow run carries the tag ``medpeft.run_key``, a W&B run's id is made from the key. Opening a
trial's run returns the last epoch the run already holds, so that a resumed trial's epochs told
again are not logged twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medpeft_ray.errors import MedpeftError

#: the tag (MLflow) and the seed of the id (W&B) that find a study's or a trial's run again
RUN_KEY_TAG = "medpeft.run_key"


@dataclass(frozen=True)
class MlflowTarget:
    """``tracking.mlflow`` resolved: the URI MLflow is given, and what the user named."""

    tracking_uri: str  # a folder becomes sqlite:///<folder>/mlflow.db
    experiment: str
    log_adapter: bool
    named: str  # the URI as given (or defaulted), for messages
    folder: Path | None = None  # a local store's folder (the database's), which must be writable
    artifact_location: str | None = None  # beside a local store; a server keeps its own default


@dataclass(frozen=True)
class WandbTarget:
    """``tracking.wandb`` resolved."""

    project: str
    entity: str | None
    mode: str
    dir: Path | None
    log_adapter: bool


@dataclass(frozen=True)
class RunInfo:
    """A run's key (finds it again), name, parameters and tags."""

    key: str
    name: str
    params: dict[str, Any]
    tags: dict[str, str]


def short_reason(exc: BaseException) -> str:
    """A short reason from a long client error: the OS's words where there are some."""
    text = str(exc)
    found = re.search(r"\[Errno -?\d+\] ([^'\"\)\]]+)", text)
    if found:
        return found.group(1).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


# -- MLflow ---------------------------------------------------------------------------------------


def mlflow_client(uri: str) -> Any:
    # mlflow is an optional extra that takes seconds to import: only a search that tracks pays for it
    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..."
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


class MlflowDestination:
    """A study's parent run and its trials' nested runs in one MLflow experiment."""

    name = "mlflow"

    def __init__(self, target: MlflowTarget) -> None:
        self.target = target
        self.experiment_id: str | None = None
        self.study: RunInfo | None = None
        self.parent_id: str | None = None
        self.runs: dict[str, str] = {}  # trial id -> run id
        self._client: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = mlflow_client(self.target.tracking_uri)
        return self._client

    def state(self) -> dict[str, Any]:
        return {"experiment_id": self.experiment_id, "parent_id": self.parent_id, "runs": dict(self.runs)}

    def restore(self, state: dict[str, Any]) -> None:
        self.experiment_id = state.get("experiment_id") or self.experiment_id
        self.parent_id = state.get("parent_id") or self.parent_id
        self.runs.update(state.get("runs") or {})

    def open_study(self, study: RunInfo) -> None:
        self.study = study
        self.experiment_id = self._experiment()
        self.parent_id = self._find(study.key) or self._create(study, {})

    def open_trial(self, trial_id: str, run: RunInfo) -> int:
        """Finds or makes the trial's run; returns the last epoch it holds (0 for a new one)."""
        from mlflow.entities import RunTag

        if self.parent_id is None and self.study is not None:  # the study's run failed at set-up: once more
            self.open_study(self.study)
        run_id = self.runs.get(trial_id) or self._find(run.key)
        if run_id is None:
            self.runs[trial_id] = self._create(run, {"mlflow.parentRunId": self.parent_id} if self.parent_id else {})
            return 0
        self.runs[trial_id] = run_id
        self.client.update_run(run_id, status="RUNNING")  # a resumed trial's run is running again
        # the tags as this run of the trial has them (a confirmation run again has a new Tune trial id)
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in run.tags.items()])
        return max((m.step for m in self.client.get_metric_history(run_id, "epoch")), default=0)

    def log_epoch(self, trial_id: str, epoch: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.runs[trial_id], metrics=[Metric(k, v, now, epoch) for k, v in metrics.items()])

    def close_trial(self, trial_id: str, summary: dict[str, Any]) -> None:
        from mlflow.entities import Metric, RunTag

        run_id = self.runs[trial_id]
        now = int(time.time() * 1000)
        best_epoch = summary.get("best_epoch")
        best = [Metric(k, float(v), now, best_epoch or 0) for k, v in summary.items()
                if k.startswith("best_") and k != "best_epoch" and isinstance(v, (int, float))]
        tags = [RunTag("status", summary["status"]), RunTag("epochs_run", str(summary["epochs_run"])),
                *([RunTag("best_epoch", str(best_epoch))] if best_epoch is not None else [])]
        self.client.log_batch(run_id, metrics=best, tags=tags)
        self.client.set_terminated(run_id, "FAILED" if summary["status"] == "failed" else "FINISHED")

    def log_adapter(self, trial_id: str, key: str, folder: Path) -> None:
        run_id = self.runs.get(trial_id) or self._find(key)
        if run_id is None:
            raise MedpeftError(f"no run of trial {trial_id} in MLflow experiment {self.target.experiment!r}")
        self.client.log_artifacts(run_id, str(folder), artifact_path="adapter")

    def end_study(self) -> None:
        if self.parent_id is not None:
            self.client.set_terminated(self.parent_id, "FINISHED")

    def _experiment(self) -> str:
        found = self.client.get_experiment_by_name(self.target.experiment)
        if found is not None:
            return found.experiment_id
        return self.client.create_experiment(self.target.experiment, artifact_location=self.target.artifact_location)

    def _find(self, key: str) -> str | None:
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'",
                                       max_results=1)
        return runs[0].info.run_id if runs else None

    def _create(self, run: RunInfo, extra_tags: dict[str, str]) -> str:
        from mlflow.entities import Param

        created = self.client.create_run(self.experiment_id, run_name=run.name,
                                         tags={**run.tags, **extra_tags, RUN_KEY_TAG: run.key})
        run_id = created.info.run_id
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in sorted(run.params.items())])
        return run_id


# -- Weights & Biases -------------------------------------------------------------------------------


#: this process's unfinished W&B runs by id: W&B refuses a second init of a run id its service still
#: streams, as a search interrupted and resumed in one process (a notebook) would ask
_LIVE_WANDB_RUNS: dict[str, Any] = {}


def _finish(live: Any, exit_code: int = 0) -> None:
    _LIVE_WANDB_RUNS.pop(live.id, None)
    live.finish(exit_code=exit_code)


def wandb_run_id(key: str) -> str:
    """A W&B run id made from a run's key: the same trial of the same study, the same W&B run."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]


class WandbDestination:
    """A study's trials as W&B runs of one group; each run live in the driver while its trial runs."""

    name = "wandb"

    def __init__(self, target: WandbTarget) -> None:
        self.target = target
        self.study: RunInfo | None = None
        self.runs: dict[str, Any] = {}  # trial id -> the live wandb Run of this process
        self.infos: dict[str, RunInfo] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "runs": {}}

    def state(self) -> dict[str, Any]:
        return {}  # the runs' ids come from their keys

    def restore(self, state: dict[str, Any]) -> None:
        pass

    def open_study(self, study: RunInfo) -> None:
        self.study = study  # W&B has no parent runs: the study is the runs' group

    def open_trial(self, trial_id: str, run: RunInfo) -> int:
        """Inits (or resumes) the trial's run; returns the last epoch it holds: 0 for a new run, -1
        where W&B cannot say (an offline run whose earlier files cannot be read)."""
        self.infos[trial_id] = run
        live = self._init(run)
        self.runs[trial_id] = live
        if self.target.mode == "online":  # the server said where the run stands
            return max(live.starting_step - 1, 0) if live.resumed else 0
        # offline, W&B knows nothing of earlier sessions (resumed is False, the step starts at 0); their
        # files say what they hold. A session killed outright holds less than it was given: W&B's
        # service writes its buffer at the run's end, so those epochs are logged again, once.
        return offline_last_step(self._wandb_dir(), live.id, exclude=Path(live.dir).parent)

    def log_epoch(self, trial_id: str, epoch: int, metrics: dict[str, float]) -> None:
        self.runs[trial_id].log(metrics, step=epoch)

    def close_trial(self, trial_id: str, summary: dict[str, Any]) -> None:
        live = self.runs.pop(trial_id)
        live.summary.update({k: v for k, v in summary.items() if v is not None})
        _finish(live, exit_code=1 if summary["status"] == "failed" else 0)

    def log_adapter(self, trial_id: str, key: str, folder: Path) -> None:
        import wandb

        # the trial's run (finished when its trial ended) resumed for the artifact
        live = self._init(self.infos.get(trial_id) or RunInfo(key=key, name=trial_id, params={}, tags={}))
        artifact = wandb.Artifact(f"adapter-{live.id}", type="model", metadata={"trial_id": trial_id})
        artifact.add_dir(str(folder))
        live.log_artifact(artifact)
        _finish(live)

    def end_study(self) -> None:
        for trial_id in list(self.runs):  # trials Tune never ended (an interrupted study): their runs stop here
            _finish(self.runs.pop(trial_id))

    def _wandb_dir(self) -> Path:
        return (self.target.dir or Path.cwd()) / "wandb"

    def _init(self, run: RunInfo) -> Any:
        # wandb is an optional extra that takes a second to import: only a search that tracks pays for it
        import wandb

        if self.target.dir is not None:
            self.target.dir.mkdir(parents=True, exist_ok=True)
        # the driver's console is the search's progress: W&B's own lines (an artifact's files) stay out of it
        wandb.setup(settings=wandb.Settings(silent=True))
        study = self.study.key if self.study is not None else run.tags.get("study")
        run_id = wandb_run_id(run.key)
        stale = _LIVE_WANDB_RUNS.get(run_id)
        if stale is not None:  # finished first: its epochs are then in its files, where a resume reads them
            _finish(stale)
        live = wandb.init(
            project=self.target.project, entity=self.target.entity, mode=self.target.mode,
            dir=str(self.target.dir) if self.target.dir is not None else None,
            id=run_id, resume="allow", reinit="create_new", name=run.name, group=study,
            allow_val_change=True,  # a confirmation run again has a new Tune trial id
            job_type=run.tags.get("role"), config={**run.params, **run.tags},
            tags=[f"{name}={run.tags[name]}" for name in ("role", "method", "label_ratio") if name in run.tags],
            # W&B neither prints to nor captures the driver's console, and starts no system monitor or
            # git probe for a process that only relays results
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True,
                                    disable_code=True, save_code=False, x_save_requirements=False),
        )
        _LIVE_WANDB_RUNS[run_id] = live
        return live


def offline_last_step(wandb_dir: Path, run_id: str, exclude: Path | None = None) -> int:
    """The last step the earlier offline sessions of W&B run ``run_id`` logged, read with W&B's own
    reader (``wandb leet inspect``); -1 where they cannot be read."""
    last = 0
    for path in sorted(wandb_dir.glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        if exclude is not None and path.parent == exclude:
            continue
        summary = read_wandb_file(path, summary=True)
        if summary is None:
            return -1
        last = max(last, int(summary.get("step") or 0))
    return last


def read_wandb_file(path: Path, summary: bool = False) -> Any:
    """The records of a ``.wandb`` file (one dict each), or with ``summary`` its run's summary, as W&B's
    own reader gives them; None where it cannot (no such reader in this W&B, or the file is unreadable)."""
    wandb_cli = shutil.which("wandb", path=os.path.dirname(sys.executable)) or shutil.which("wandb")
    if wandb_cli is None:
        return None
    command = [wandb_cli, "leet", "inspect", "--json", *(["--summary"] if summary else []), str(path)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
        if summary:
            return json.loads(done.stdout)
        return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
