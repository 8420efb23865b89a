"""Experiment tracking: a search's trials sent to MLflow and Weights & Biases as they run.

The YAML's ``tracking`` section names the destinations; this module resolves their defaults and
checks them before any Ray work (:func:`check_tracking`: the package installed, the store or
server reachable and writable, W&B credentials for online mode), each refusal one line naming
the key. :mod:`medpeft_ray.search.tracking_callback` sends the trials, through the clients of
:mod:`medpeft_ray.search.tracking_destinations`. Nothing here imports Ray: ``search --dry-run``
runs the same checks.
"""

from __future__ import annotations

import importlib
import netrc
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from medpeft_ray.config import SearchConfig
from medpeft_ray.errors import ConfigError, MedpeftError
from medpeft_ray.search.tracking_destinations import MlflowTarget, WandbTarget, mlflow_client, short_reason

# -- what to send where ----------------------------------------------------------------------


@dataclass(frozen=True)
class TrackingTargets:
    """Where a search's trials go; :func:`check_tracking` made it and found each one usable."""

    mlflow: MlflowTarget | None = None
    wandb: WandbTarget | None = None


def resolve_targets(config: SearchConfig, results_path: Path | None) -> TrackingTargets | None:
    """The destinations of ``config.tracking`` with their defaults filled in (None: no tracking).

    Raises:
        ConfigError: MLflow's default store would be in the results folder, which is cloud storage.
    """
    tracking = config.tracking
    mlflow = wandb = None
    if tracking.mlflow is not None:
        section = tracking.mlflow
        uri = section.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None and results_path is None:
            raise ConfigError("tracking.mlflow.tracking_uri", "required with results on cloud storage (an MLflow "
                              "server or database every run can reach), or set MLFLOW_TRACKING_URI")
        uri = uri or str(results_path / "mlflow")  # type: ignore[operator]  # not None: checked above
        mlflow = _mlflow_target(uri, section.experiment or config.experiment_name, section.log_adapter)
    if tracking.wandb is not None:
        section = tracking.wandb
        folder = section.dir or results_path or (Path(os.environ["WANDB_DIR"]) if os.environ.get("WANDB_DIR") else None)
        wandb = WandbTarget(project=section.project or os.environ.get("WANDB_PROJECT") or config.experiment_name,
                            entity=section.entity, mode=section.mode, dir=folder, log_adapter=section.log_adapter)
    return TrackingTargets(mlflow, wandb) if mlflow or wandb else None


def _mlflow_target(uri: str, experiment: str, log_adapter: bool) -> MlflowTarget:
    """A folder (a path or ``file:`` URI) holds an SQLite store: MLflow 3 refuses new work in its file
    store. A local SQLite store keeps its artifacts beside it, not in the working folder."""
    scheme = uri.partition(":")[0].lower() if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", uri) else ""
    if scheme in ("", "file"):
        folder = Path(uri.removeprefix("file://").removeprefix("file:")).expanduser().resolve()
        return MlflowTarget(f"sqlite:///{folder / 'mlflow.db'}", experiment, log_adapter, uri, folder,
                            (folder / "artifacts").as_uri())
    if scheme == "sqlite" and uri.startswith("sqlite:///") and not uri.startswith("sqlite:///:memory:"):
        database = Path(uri.removeprefix("sqlite:///"))
        folder = database.parent if database.is_absolute() else (Path.cwd() / database).parent
        return MlflowTarget(uri, experiment, log_adapter, uri, folder, (folder / "mlflow-artifacts").as_uri())
    return MlflowTarget(uri, experiment, log_adapter, uri)


# -- pre-flight --------------------------------------------------------------------------------


def check_tracking(config: SearchConfig, results_path: Path | None) -> TrackingTargets | None:
    """Pre-flight, before any Ray work: each destination's package is installed and its store or
    server can be reached and written; returns the resolved destinations (None: no tracking).

    Raises:
        ConfigError: a package is missing, or W&B online has no credentials (exit code 2).
        MedpeftError: a store or server cannot be reached or written (one line naming the key and URI).
    """
    targets = resolve_targets(config, results_path)
    if targets is None:
        return None
    if targets.mlflow is not None:
        _require_package("mlflow")
        _check_mlflow(targets.mlflow)
    if targets.wandb is not None:
        _require_package("wandb")
        _check_wandb(targets.wandb)
    return targets


def _require_package(name: str) -> None:
    """Imports ``name`` (the search imports it soon anyway): missing, or broken by another package's version."""
    try:
        importlib.import_module(name)
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == name:
            raise ConfigError(f"tracking.{name}", f"the {name} package is not installed; "
                              f"pip install 'medpeft-ray[{name}]'") from None
        raise ConfigError(f"tracking.{name}", f"the {name} package cannot be imported ({exc})") from None


def _probe_folder(folder: Path, key: str, named: str) -> None:
    """Creates ``folder`` if needed and writes a file there: a missing parent, a read-only mount or
    a full disk shows now, not at the first trial."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".medpeft-write-probe-"):
            pass
    except OSError as exc:
        raise MedpeftError(f"{key}: {named}: the folder {folder} cannot be written ({exc.strerror or exc})") from None


def _check_mlflow(target: MlflowTarget) -> None:
    key = "tracking.mlflow.tracking_uri"
    if target.folder is not None:
        if target.named.startswith("sqlite:") and not target.folder.is_dir():
            raise MedpeftError(f"{key}: {target.named}: the database's folder {target.folder} does not exist")
        _probe_folder(target.folder, key, target.named)
    try:
        with _quick_mlflow_requests():
            mlflow_client(target.tracking_uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001  (MLflow, SQLAlchemy and requests each raise their own)
        raise MedpeftError(f"{key}: {target.named}: cannot be used ({short_reason(exc)})") from None


@contextmanager
def _quick_mlflow_requests() -> Iterator[None]:
    """One try of 10 s instead of MLflow's 7 retries of 120 s: a server that is down says so at once."""
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    before = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _check_wandb(target: WandbTarget) -> None:
    if target.dir is not None:
        _probe_folder(target.dir, "tracking.wandb.dir", str(target.dir))
    if target.mode == "online" and not wandb_credentials_found():
        raise ConfigError("tracking.wandb.mode", "online needs W&B credentials and none were found (no "
                          "WANDB_API_KEY, no `wandb login` in ~/.netrc); on a machine without them use mode: offline "
                          "and `wandb sync` the runs later")


def wandb_credentials_found() -> bool:
    """An API key in the environment, an identity token file, or a netrc login for W&B's host (what
    ``wandb login`` writes). Not verified with the server: that needs the network a search may lack."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or ""
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else [os.path.expanduser("~/.netrc"),
                                                                        os.path.expanduser("~/_netrc")]
    for path in candidates:
        try:
            if netrc.netrc(path).authenticators(host):
                return True
        except (OSError, netrc.NetrcParseError):
            continue
    return False
