"""Test-wide settings: nothing downloads, and the decode-once cache lives in a temporary folder."""

from __future__ import annotations

import os
import tempfile

# Set before anything imports huggingface_hub/timm/Ray, so that workers started by tests inherit it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MEDPEFT_CACHE", tempfile.mkdtemp(prefix="medpeft-test-cache-"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every real Ray test is slow too, so ``-m "not slow"`` leaves them out."""
    for item in items:
        if item.get_closest_marker("ray") is not None:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test decodes into a cache folder of its own (subprocesses it starts inherit it)."""
    monkeypatch.setenv("MEDPEFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def tiny_search(**sections: Any) -> dict[str, Any]:
    """A search config small enough for a CPU test: 32 px synthetic images, a tiny ViT, 2 epochs."""
    config: dict[str, Any] = {
        "experiment": "tiny",
        "dataset": {"name": "synthetic", "label_ratios": [1.0], "image_size": 32,
                    "options": {"num_patients": 40, "num_classes": 3}},
        "model": {"backbone": "vit_tiny_patch16_224"},
        "method": {"name": "lora", "options": {"rank": 2}},
        "space": {"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
        "train": {"epochs": 2, "batch_size": 8, "augment": "flip"},
        "search": {"num_samples": 2, "seed": 0, "scheduler": {"type": "none"}},
        # executors stay warm between tests for longer than a user's default minute
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "gpus_per_worker": 0, "executor_idle_s": 300},
    }
    for name, value in sections.items():
        config[name] = {**config[name], **value} if isinstance(value, dict) else value
    return config


@pytest.fixture
def tiny_config() -> Any:
    from medpeft_ray.config import validate_search_dict

    return validate_search_dict(tiny_search(), "tiny.yaml")


def all_images(splits: Any) -> list[tuple[Any, Any, Any]]:
    """(image, labels, group) of every image of every split."""
    return [(im, lab, g) for s in (splits.train, splits.val, splits.test) for im, lab, g in zip(s.images, s.labels, s.groups)]


@pytest.fixture(scope="session")
def _ray_for_the_run():  # type: ignore[no-untyped-def]
    yield
    import ray

    from medpeft_ray.search.pools import release_executors

    release_executors()
    ray.shutdown()


@pytest.fixture
def ray_session(_ray_for_the_run: None) -> None:
    """One local Ray for every in-process search of the test run (``run_search`` connects to it),
    started by the first test that asks (again after a test that needed its own cluster).

    Searches keep their executors warm for the next one that fits (as any driver does), so the
    run pays for executors about once per resource shape; each test still gets its own results
    folder and leaderboard. Nothing a search leaves in an executor may change another's numbers:
    ``test_executors_e2e`` checks that a search on kept executors equals one on fresh executors.
    """
    import ray

    from medpeft_ray.search.cluster import DRIVER_RESOURCE

    if not ray.is_initialized():
        ray.init(num_cpus=2, resources={DRIVER_RESOURCE: 100}, log_to_driver=False, include_dashboard=True)


@pytest.fixture
def ray_starts(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """The Ray addresses this test's searches joined or started Ray with (None: a local Ray); a
    search refused before Ray leaves it empty (the test run's own Ray may be up meanwhile)."""
    from medpeft_ray.search import ray_session

    calls: list[str | None] = []
    connect = ray_session.connect

    def recorded(address: str | None) -> None:
        calls.append(address)
        connect(address)

    monkeypatch.setattr(ray_session, "connect", recorded)
    return calls


@dataclass
class CliRun:
    """What ``medpeft-ray <args>`` did when run in this process (:func:`cli_in_process`)."""

    returncode: int
    stdout: str
    stderr: str


def cli_in_process(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                   cwd: Path | None = None) -> CliRun:
    """Runs the real entry point (``medpeft_ray.cli.main``, argv and all) in this process: no
    interpreter start or imports to pay, and a search joins the test run's Ray (the ``ray_session``
    fixture) and its warm executors. A test about the process itself (a kill, Ray's own output)
    runs ``python -m medpeft_ray.cli`` instead."""
    import sys

    from medpeft_ray import cli

    if cwd is not None:
        monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["medpeft-ray", *map(str, args)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.main()
    out, err = capsys.readouterr()
    code = info.value.code
    return CliRun(code if isinstance(code, int) else 0 if code is None else 1, out, err)


def load_shipped_space(path: Path, tmp_path: Path) -> Any:
    """A shipped search-space YAML, validated; placeholder data and checkpoint paths (a preset's
    ``/data/...``) are pointed at an empty folder and an empty checkpoint in ``tmp_path``."""
    import torch
    import yaml

    from medpeft_ray.config import validate_search_dict

    raw = yaml.safe_load(path.read_text())
    root = raw.get("dataset", {}).get("root")
    if root is not None and not Path(root).is_dir():
        raw["dataset"]["root"] = str(tmp_path / "data")
        (tmp_path / "data").mkdir(exist_ok=True)
    checkpoint = raw.get("model", {}).get("checkpoint")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raw["model"]["checkpoint"] = str(tmp_path / "weights.pth")
        torch.save({"model": {}}, tmp_path / "weights.pth")
    return validate_search_dict(raw, path.name, path.parent)


@pytest.fixture
def no_results_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No leaderboard or results location from the environment, and a fresh working folder, so a
    CLI command without ``--results`` cannot reach a real ``./medpeft-results``."""
    monkeypatch.delenv("MEDPEFT_DB", raising=False)
    monkeypatch.delenv("MEDPEFT_RESULTS", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)


def shipped_presets_in(tmp_path: Path) -> Path:
    """The shipped ``search_spaces/`` copied to ``tmp_path``, each placeholder ``/data/...`` path made
    real there (an empty folder, or an empty checkpoint for a weights file), so presets validate."""
    import re

    import torch

    spaces = Path(__file__).resolve().parent.parent / "search_spaces"
    target = tmp_path / "search_spaces"
    target.mkdir()
    data = tmp_path / "data"
    for path in spaces.glob("*.yaml"):
        text = path.read_text()
        for placeholder in set(re.findall(r"/data/[\w./-]+", text)):
            real = data / placeholder.removeprefix("/data/")
            if real.suffix in (".pth", ".pt", ".bin", ".safetensors"):
                real.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"model": {}}, real)
            else:
                real.mkdir(parents=True, exist_ok=True)
        (target / path.name).write_text(text.replace("/data/", f"{data}/"))
    return target


def leaderboard_row(trial_id: str, method: str, label_ratio: float, val_auroc: float | None, **overrides: Any) -> Any:
    """A leaderboard row for store tests: a completed trial, or a failed one when ``val_auroc`` is None."""
    from medpeft_ray.leaderboard import TrialRecord

    values: dict[str, Any] = dict(
        experiment=f"{method}-search", trial_id=trial_id, dataset="synthetic", label_ratio=label_ratio, method=method,
        backbone="vit_tiny_patch16_224", status="completed" if val_auroc is not None else "failed",
        config={"method": {"name": method}}, params={}, val_auroc=val_auroc,
        val_loss=None if val_auroc is None else 1.0 - val_auroc, best_epoch=1, epochs_run=1,
        trainable_params=1000, total_params=5_000_000, wall_time_s=10.0,
    )
    values.update(overrides)
    return TrialRecord(**values)


def fill_results(results: Path, *records: Any) -> Path:
    """Writes ``records`` to the leaderboard of the results folder ``results``."""
    from medpeft_ray.leaderboard import LeaderboardStore

    store = LeaderboardStore(f"sqlite:///{results / 'leaderboard.db'}")
    for record in records:
        store.record(record)
    store.engine.dispose()
    return results


PG_ADDRESS = ("127.0.0.1", 5432)


@pytest.fixture
def pg_schema() -> Any:
    """A fresh schema in the PostgreSQL database ``test`` (user postgres), dropped with everything in it
    afterwards; the test skips, saying why, where no server answers."""
    import uuid

    psycopg = pytest.importorskip("psycopg", reason="psycopg (3) is not installed")
    host, port = PG_ADDRESS
    try:
        conn = psycopg.connect(host=host, port=port, user="postgres", dbname="test", connect_timeout=3, autocommit=True)
    except psycopg.Error as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        pytest.skip(f"no PostgreSQL server answers at {host}:{port} as user postgres ({first_line})")
    name = f"medpeft_test_{uuid.uuid4().hex[:12]}"
    conn.execute(f'CREATE SCHEMA "{name}"')
    try:
        yield name
    finally:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        conn.close()


def checkpointed_epochs(train_dir: Path, run_part: str = "") -> list[int]:
    """Epochs checkpointed in full (every rank's part) by trials whose folder name contains ``run_part``:
    a warm executor's trial record (``trial_record.json``), or a cold trial's Ray Train snapshot."""
    import json

    epochs: list[int] = []
    for index in train_dir.glob(f"*{run_part}*/trial_record.json"):
        try:
            epochs += [entry["epoch"] for entry in json.loads(index.read_text())["checkpoints"]]
        except ValueError:
            pass  # being written
    for snapshot in train_dir.glob(f"*{run_part}*/checkpoint_manager_snapshot.json"):
        try:
            epochs += [c["metrics"]["epoch"] for c in json.loads(snapshot.read_text())["checkpoint_results"]]
        except (ValueError, KeyError):
            pass  # being written
    return epochs


def schema_tables(url: str, schema: str) -> set[str]:
    """The tables of ``schema`` in the PostgreSQL database at ``url``."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            query = sa.text("SELECT table_name FROM information_schema.tables WHERE table_schema = :s")
            return set(conn.execute(query, {"s": schema}).scalars())
    finally:
        engine.dispose()


def leaderboard_rows(results: Path) -> list[dict[str, Any]]:
    """The rows of the SQLite leaderboard in the results folder ``results`` (none if it has none yet)."""
    from medpeft_ray.leaderboard import LeaderboardStore

    if not (results / "leaderboard.db").is_file():
        return []
    store = LeaderboardStore(f"sqlite:///{results / 'leaderboard.db'}", create=False)
    try:
        return store.query().to_dict(orient="records")
    finally:
        store.engine.dispose()
