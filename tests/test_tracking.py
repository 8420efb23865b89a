"""The ``tracking`` section and its pre-flight: each refusal one line naming the key (and the URI),
before any Ray work, against the real MLflow and W&B packages (a package is made missing by
blocking its import, a folder read-only by a read-only mount)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_search

from medpeft_ray.config import validate_search_dict
from medpeft_ray.errors import ConfigError, MedpeftError
from medpeft_ray.search.tracking import check_tracking, resolve_targets, wandb_credentials_found
from medpeft_ray.search.tracking_callback import epoch_metrics


def _config(**tracking: Any) -> Any:
    return validate_search_dict({**tiny_search(), "tracking": tracking}, "tiny.yaml")


@pytest.fixture
def no_wandb_login(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No W&B credentials from this machine: no key in the environment, an empty home (no ~/.netrc)."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_BASE_URL", "MLFLOW_TRACKING_URI",
                 "WANDB_PROJECT", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))


def test_the_section_is_strict_and_its_defaults_follow_the_search(tmp_path: Path, no_wandb_login: None,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    assert _config().tracking.mlflow is None and _config().tracking.wandb is None
    assert resolve_targets(_config(), tmp_path) is None  # no section: nothing tracked
    with pytest.raises(ConfigError) as typo:
        _config(mlflow={"tracking_url": "http://x"})
    assert str(typo.value).startswith("tiny.yaml: tracking.mlflow.tracking_url: unknown key (did you mean "
                                      "'tracking_uri'?)")
    with pytest.raises(ConfigError) as mode:
        _config(wandb={"mode": "disabled"})
    assert str(mode.value) == "tiny.yaml: tracking.wandb.mode: must be one of 'online' or 'offline' (got 'disabled')"

    monkeypatch.chdir(tmp_path)
    targets = resolve_targets(_config(mlflow={}, wandb={"mode": "offline"}), tmp_path / "results")
    assert targets is not None and targets.mlflow is not None and targets.wandb is not None
    # the MLflow experiment and the W&B project are the search's; the store and W&B's files in the results folder
    assert targets.mlflow.experiment == "tiny" and targets.wandb.project == "tiny"
    assert targets.mlflow.tracking_uri == f"sqlite:///{tmp_path / 'results' / 'mlflow' / 'mlflow.db'}"
    assert targets.mlflow.artifact_location == (tmp_path / "results" / "mlflow" / "artifacts").as_uri()
    assert targets.wandb.dir == tmp_path / "results"
    # a relative folder is made absolute when the file is read: a resume elsewhere finds the same one
    relative = _config(mlflow={"tracking_uri": "file:runs", "experiment": "other"}, wandb={"dir": "wb"})
    assert relative.tracking.mlflow.tracking_uri == str(tmp_path / "runs")
    assert relative.tracking.wandb.dir == tmp_path / "wb"
    assert resolve_targets(relative, None).mlflow.experiment == "other"  # type: ignore[union-attr]
    served = resolve_targets(_config(mlflow={"tracking_uri": "http://127.0.0.1:5000"}), tmp_path)
    assert served.mlflow.tracking_uri == "http://127.0.0.1:5000" and served.mlflow.artifact_location is None  # type: ignore[union-attr]
    with pytest.raises(ConfigError) as cloud:
        resolve_targets(_config(mlflow={}), None)  # results on s3://: no folder for the default store
    assert str(cloud.value).startswith("tracking.mlflow.tracking_uri: required with results on cloud storage")


def test_epoch_metrics_are_the_numeric_values_less_tunes_bookkeeping() -> None:
    result = {"epoch": 2, "val_auroc": 0.75, "val_loss": 0.5, "val_f1": float("nan"), "train_loss": 0.25,
              "training_iteration": 2, "time_total_s": 3.0, "timestamp": 1700000000, "first_step_at": 1.5e9,
              "details": "{}", "done": False, "resumed_from_epoch": 1, "startup": {"a": 1}, "pid": 7}
    assert epoch_metrics(result) == {"epoch": 2.0, "val_auroc": 0.75, "val_loss": 0.5, "train_loss": 0.25}


@pytest.mark.parametrize("package", ["mlflow", "wandb"])
def test_a_missing_package_is_one_line_naming_the_extra(package: str, tmp_path: Path, no_wandb_login: None,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # `import mlflow` now fails as if it were not installed
    config = _config(**{package: {"mode": "offline"} if package == "wandb" else {}})
    with pytest.raises(ConfigError) as missing:
        check_tracking(config, tmp_path)
    assert str(missing.value) == (f"tracking.{package}: the {package} package is not installed; "
                                  f"pip install 'medpeft-ray[{package}]'")
    assert missing.value.exit_code == 2


def test_unusable_mlflow_stores_are_one_line_naming_the_key_and_uri(tmp_path: Path, no_wandb_login: None) -> None:
    nowhere = f"sqlite:///{tmp_path / 'nowhere' / 'mlflow.db'}"
    with pytest.raises(MedpeftError) as missing_folder:
        check_tracking(_config(mlflow={"tracking_uri": nowhere}), tmp_path)
    assert str(missing_folder.value) == (f"tracking.mlflow.tracking_uri: {nowhere}: the database's folder "
                                         f"{tmp_path / 'nowhere'} does not exist")

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = f"http://127.0.0.1:{port}"
    with pytest.raises(MedpeftError) as down:
        check_tracking(_config(mlflow={"tracking_uri": server}), tmp_path)
    assert str(down.value) == f"tracking.mlflow.tracking_uri: {server}: cannot be used (Connection refused)"

    file = tmp_path / "a-file"
    file.write_text("not a folder")
    with pytest.raises(MedpeftError) as not_folder:
        check_tracking(_config(mlflow={"tracking_uri": str(file)}), tmp_path)
    assert str(not_folder.value) == (f"tracking.mlflow.tracking_uri: {file}: the folder {file} cannot be written "
                                     "(File exists)")


def _sh(*command: str) -> bool:
    return subprocess.run(command, capture_output=True, check=False).returncode == 0


def test_a_read_only_folder_is_one_line_for_mlflow_and_wandb(tmp_path: Path, no_wandb_login: None) -> None:
    """Tests run as root, whom chmod does not stop: a read-only bind mount does (as a read-only share)."""
    folder = tmp_path / "shared"
    folder.mkdir()
    if not _sh("mount", "--bind", str(folder), str(folder)):
        pytest.skip("a read-only bind mount is not permitted here, and root ignores chmod")
    try:
        if not _sh("mount", "-o", "remount,bind,ro", str(folder)):
            pytest.skip("a read-only bind mount is not permitted here, and root ignores chmod")
        with pytest.raises(MedpeftError) as mlflow:
            check_tracking(_config(mlflow={"tracking_uri": str(folder)}), tmp_path)
        assert str(mlflow.value) == (f"tracking.mlflow.tracking_uri: {folder}: the folder {folder} cannot be written "
                                     "(Read-only file system)")
        with pytest.raises(MedpeftError) as wandb:
            check_tracking(_config(wandb={"mode": "offline", "dir": str(folder / "wb")}), tmp_path)
        assert str(wandb.value) == (f"tracking.wandb.dir: {folder / 'wb'}: the folder {folder / 'wb'} cannot be "
                                    "written (Read-only file system)")
    finally:
        if not _sh("umount", str(folder)):
            _sh("umount", "-l", str(folder))


def test_wandb_online_without_credentials_suggests_offline(tmp_path: Path, no_wandb_login: None,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as no_login:
        check_tracking(_config(wandb={"project": "p"}), tmp_path)
    message = str(no_login.value)
    assert message.startswith("tracking.wandb.mode: online needs W&B credentials and none were found")
    assert "use mode: offline" in message and "\n" not in message
    assert check_tracking(_config(wandb={"mode": "offline"}), tmp_path) is not None  # offline needs none

    # `wandb login` writes a netrc entry for W&B's host; a key in the environment does as well
    (Path.home() / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "a" * 40 + "\n")
    assert wandb_credentials_found()
    (Path.home() / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "b" * 40)
    assert check_tracking(_config(wandb={}), tmp_path) is not None


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Any:
    """A real MLflow server on a free local port (its store an SQLite file), stopped afterwards."""
    import os
    import signal
    import time

    import requests

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--default-artifact-root", str(tmp_path / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 120
    try:
        while True:
            assert server.poll() is None, "the MLflow server exited"
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.time() < deadline, "the MLflow server did not answer within 120 s"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


@pytest.mark.slow
def test_a_server_gets_each_epoch_once_when_a_resumed_search_finds_its_runs_again(
    mlflow_server: str, tmp_path: Path, no_wandb_login: None
) -> None:
    """Over HTTP: the pre-flight passes; a second destination, knowing only the keys (a resumed
    search's new process), finds the study's and the trial's runs and the epochs they hold."""
    from mlflow.tracking import MlflowClient

    from medpeft_ray.search.tracking_destinations import MlflowDestination, RunInfo

    targets = check_tracking(_config(mlflow={"tracking_uri": mlflow_server, "experiment": "served"}), tmp_path)
    assert targets is not None and targets.mlflow is not None
    study = RunInfo(key="tiny-ratio1-x", name="tiny-ratio1-x", params={"num_samples": 2}, tags={"role": "study"})
    trial = RunInfo(key="tiny-ratio1-x/t1", name="t1", params={"lr": 0.01, "lora.rank": 8},
                    tags={"role": "search", "label_ratio": "1"})
    first = MlflowDestination(targets.mlflow)
    first.open_study(study)
    assert first.open_trial("t1", trial) == 0
    for epoch in (1, 2):
        first.log_epoch("t1", epoch, {"epoch": epoch, "val_auroc": 0.5 + epoch / 10})

    resumed = MlflowDestination(targets.mlflow)
    resumed.open_study(study)
    assert resumed.parent_id == first.parent_id
    assert resumed.open_trial("t1", trial) == 2  # the caller logs epochs after the second only
    resumed.log_epoch("t1", 3, {"epoch": 3, "val_auroc": 0.8})
    resumed.close_trial("t1", {"status": "completed", "epochs_run": 3, "best_epoch": 3, "best_val_auroc": 0.8})
    resumed.end_study()

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("served").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["t1", "tiny-ratio1-x"]
    (run,) = [r for r in runs if r.info.run_name == "t1"]
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.01", "lora.rank": "8"}
    assert run.data.tags["mlflow.parentRunId"] == first.parent_id and run.data.tags["status"] == "completed"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_auroc"))
    assert history == [(1, pytest.approx(0.6)), (2, pytest.approx(0.7)), (3, pytest.approx(0.8))]


@pytest.mark.slow
def test_an_offline_wandb_run_resumed_goes_on_after_the_epochs_its_earlier_files_hold(tmp_path: Path) -> None:
    """Offline, W&B starts every session of a run at step 0 and knows nothing of the earlier ones:
    the destination reads their files (W&B's own reader) and the caller logs later epochs only. W&B
    refuses a second init of a run its service still streams: the unfinished one is finished first."""
    from medpeft_ray.search.tracking_destinations import RunInfo, WandbDestination, WandbTarget, read_wandb_file

    target = WandbTarget(project="p", entity=None, mode="offline", dir=tmp_path, log_adapter=False)
    study = RunInfo(key="tiny-ratio1-x", name="tiny-ratio1-x", params={}, tags={"role": "study"})
    trial = RunInfo(key="tiny-ratio1-x/t1", name="t1", params={"lr": 0.01},
                    tags={"role": "search", "method": "lora", "label_ratio": "1", "trial_id": "t1"})
    first = WandbDestination(target)
    first.open_study(study)
    assert first.open_trial("t1", trial) == 0
    for epoch in (1, 2):
        first.log_epoch("t1", epoch, {"epoch": epoch, "val_auroc": 0.5 + epoch / 10})
    # the search is interrupted and resumed in this process (a notebook): the first destination is
    # dropped with its run unfinished, and a new one, knowing only the keys, takes the trial on
    del first
    resumed = WandbDestination(target)
    resumed.open_study(study)
    assert resumed.open_trial("t1", trial) == 2
    resumed.log_epoch("t1", 3, {"epoch": 3, "val_auroc": 0.8})
    resumed.close_trial("t1", {"status": "completed", "epochs_run": 3, "best_epoch": 3, "best_val_auroc": 0.8})

    files = sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and len({f.name for f in files}) == 1  # two sessions of one run
    records = [r for f in files for r in read_wandb_file(f)]
    steps = [(r["history"]["item"]["_step"], r["history"]["item"]["val_auroc"]) for r in records
             if r["type"] == "history"]
    assert steps == [(1, pytest.approx(0.6)), (2, pytest.approx(0.7)), (3, pytest.approx(0.8))]
    assert len({r["run"]["run_id"] for r in records if r["type"] == "run"}) == 1
    assert all(r["run"]["run_group"] == "tiny-ratio1-x" for r in records if r["type"] == "run")
