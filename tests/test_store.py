"""The leaderboard store: rows, queries, upserts, bad databases, concurrent writers, PostgreSQL."""

from __future__ import annotations

import math
import multiprocessing
import os
import sqlite3
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import sqlalchemy as sa

from medpeft_ray.errors import MedpeftError
from medpeft_ray.leaderboard import LeaderboardStore, TrialRecord, default_db_url, results_dir
from medpeft_ray.leaderboard.store import SCHEMA_VERSION

PG_HOST, PG_PORT = "127.0.0.1", 5432


def make_record(trial_id: str = "t0", **overrides: Any) -> TrialRecord:
    values: dict[str, Any] = dict(
        experiment="exp",
        trial_id=trial_id,
        dataset="synthetic",
        label_ratio=1.0,
        method="lora",
        backbone="vit_tiny_patch16_224",
        status="completed",
        config={"method": {"name": "lora", "options": {"rank": 8}}, "train": {"lr": 1e-3}},
        params={"lr": 1e-3, "rank": 8},
        val_auroc=0.5,
        val_loss=0.7,
        best_epoch=2,
        epochs_run=3,
        trainable_params=1234,
        total_params=5_000_000,
        wall_time_s=12.5,
        startup_s=2.0,
        train_time_s=10.0,
    )
    values.update(overrides)
    return TrialRecord(**values)


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


# ----------------------------------------------------------------------------------------------
# Fixtures: a store per backend (SQLite always; PostgreSQL when a server answers)
# ----------------------------------------------------------------------------------------------


def _pg_connect(dbname: str) -> Any:
    import psycopg2

    conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user="postgres", dbname=dbname, connect_timeout=3)
    conn.autocommit = True
    return conn


@pytest.fixture(scope="module")
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this module, dropped afterwards."""
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.skip("psycopg2 is not installed")
    try:
        admin = _pg_connect("postgres")
    except Exception as exc:  # noqa: BLE001
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        pytest.skip(f"no PostgreSQL server answers at {PG_HOST}:{PG_PORT} as user postgres ({first_line})")
    name = f"medpeft_test_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg2://postgres@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def _pg_drop_tables(url: str) -> None:
    conn = _pg_connect(sa.make_url(url).database)
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS trials, medpeft_schema")
    conn.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield sqlite_url(tmp_path / "leaderboard.db")
        return
    url = request.getfixturevalue("pg_database")
    _pg_drop_tables(url)
    yield url
    _pg_drop_tables(url)


@pytest.fixture
def open_store() -> Iterator[Callable[..., LeaderboardStore]]:
    """Opens stores and disposes their connection pools afterwards."""
    stores: list[LeaderboardStore] = []

    def open_(url: str, create: bool = True) -> LeaderboardStore:
        store = LeaderboardStore(url, create=create)
        stores.append(store)
        return store

    yield open_
    for store in stores:
        store.engine.dispose()


@pytest.fixture
def store(db_url: str, open_store: Callable[..., LeaderboardStore]) -> LeaderboardStore:
    return open_store(db_url)


def raw_rows(store: LeaderboardStore, columns: str) -> list[tuple]:
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(f"SELECT {columns} FROM trials ORDER BY id"))]


# ----------------------------------------------------------------------------------------------
# Writing and reading
# ----------------------------------------------------------------------------------------------


def test_empty_store_queries_empty(store: LeaderboardStore) -> None:
    frame = store.query()
    assert frame.empty
    assert {"experiment", "trial_id", "val_auroc", "config", "params"} <= set(frame.columns)


def test_insert_and_read_back(store: LeaderboardStore) -> None:
    record = make_record("t1")
    store.record(record)
    frame = store.query()
    assert len(frame) == 1
    row = frame.iloc[0].to_dict()
    for name in ("experiment", "trial_id", "dataset", "method", "backbone", "status", "best_epoch", "epochs_run",
                 "trainable_params", "total_params"):
        assert row[name] == getattr(record, name), name
    for name in ("label_ratio", "val_auroc", "val_loss", "wall_time_s", "startup_s", "train_time_s"):
        assert row[name] == pytest.approx(getattr(record, name)), name
    assert row["checkpoint"] is None and row["error"] is None
    assert isinstance(row["created_at"], str) and row["created_at"][:2] == "20"


def test_config_and_params_round_trip(store: LeaderboardStore) -> None:
    config = {
        "experiment": "exp",
        "dataset": {"name": "folder", "root": Path("/data/x"), "label_ratios": [0.1]},
        "method": {"name": "lora", "options": {"rank": 8, "targets": ["qkv", "proj"], "blocks": None}},
        "train": {"lr": 0.000123, "augment": "flip", "deepspeed": {"zero_stage": 2}},
        "flag": True,
    }
    params = {"lr": 0.000123, "rank": 16, "targets": "qkv", "on": False}
    store.record(make_record("rt", config=config, params=params))
    row = store.query().iloc[0]
    assert isinstance(row["config"], dict) and isinstance(row["params"], dict)
    assert row["params"] == params
    expected = {**config, "dataset": {**config["dataset"], "root": "/data/x"}}  # paths are stored as strings
    assert row["config"] == expected


def test_query_orders_best_first_and_missing_last(store: LeaderboardStore) -> None:
    for trial_id, auroc in [("a", 0.7), ("b", None), ("c", 0.9), ("d", 0.8), ("e", float("nan"))]:
        store.record(make_record(trial_id, val_auroc=auroc))
    frame = store.query()
    assert list(frame["trial_id"]) == ["c", "d", "a", "b", "e"]
    assert list(frame["val_auroc"][:3]) == pytest.approx([0.9, 0.8, 0.7])
    assert all(v is None or math.isnan(v) for v in frame["val_auroc"][3:])


def test_query_sorts_ascending_by_val_loss(store: LeaderboardStore) -> None:
    for trial_id, loss in [("a", 0.5), ("b", None), ("c", 0.2), ("d", 0.3)]:
        store.record(make_record(trial_id, val_loss=loss))
    frame = store.query(metric="val_loss", ascending=True)
    assert list(frame["trial_id"]) == ["c", "d", "a", "b"]
    frame = store.query(metric="val_loss")
    assert list(frame["trial_id"]) == ["a", "d", "c", "b"]


def test_query_top(store: LeaderboardStore) -> None:
    for i, auroc in enumerate([0.6, 0.9, 0.7, 0.8]):
        store.record(make_record(f"t{i}", val_auroc=auroc))
    frame = store.query(top=2)
    assert list(frame["trial_id"]) == ["t1", "t3"]
    assert len(store.query(top=10)) == 4


def test_query_filters(store: LeaderboardStore) -> None:
    rows = [
        make_record("a", experiment="e1", dataset="synthetic", label_ratio=0.1 + 0.2, method="lora"),
        make_record("b", experiment="e1", dataset="synthetic", label_ratio=1.0, method="bitfit"),
        make_record("c", experiment="e2", dataset="folder", label_ratio=0.3, method="lora",
                    backbone="vit_base_patch16_224", status="failed", val_auroc=None),
        make_record("d", experiment="e2", dataset="synthetic", label_ratio=0.1, method="full",
                    backbone="resnet50", status="stopped"),
    ]
    for row in rows:
        store.record(row)

    def ids(**filters: Any) -> set[str]:
        return set(store.query(**filters)["trial_id"])

    assert ids() == {"a", "b", "c", "d"}
    assert ids(experiment="e1") == {"a", "b"}
    assert ids(dataset="folder") == {"c"}
    assert ids(label_ratio=0.3) == {"a", "c"}  # 0.1 + 0.2 != 0.3 in floating point
    assert ids(label_ratio=0.1) == {"d"}
    assert ids(label_ratio=0.5) == set()
    assert ids(method="lora") == {"a", "c"}
    assert ids(backbone="resnet50") == {"d"}
    assert ids(status="failed") == {"c"}
    assert ids(status="completed") == {"a", "b"}
    assert ids(experiment="e2", method="lora") == {"c"}
    assert ids(experiment="e1", method="full") == set()
    assert ids(experiment="nope") == set()


def test_unknown_sort_column(store: LeaderboardStore) -> None:
    store.record(make_record())
    with pytest.raises(MedpeftError) as info:
        store.query(metric="accuracy")
    assert "cannot sort by 'accuracy'" in str(info.value)
    assert "val_auroc" in str(info.value)


def test_rerecording_updates_instead_of_duplicating(store: LeaderboardStore) -> None:
    store.record(make_record("t1", status="stopped", val_auroc=0.6, epochs_run=1))
    store.record(make_record("t2", val_auroc=0.5))
    first_id = int(store.query(experiment="exp").set_index("trial_id").loc["t1", "id"])
    store.record(make_record("t1", status="completed", val_auroc=0.8, epochs_run=3, params={"lr": 0.5}))
    frame = store.query()
    assert len(frame) == 2
    row = frame.set_index("trial_id").loc["t1"]
    assert row["status"] == "completed"
    assert row["val_auroc"] == pytest.approx(0.8)
    assert row["epochs_run"] == 3
    assert row["params"] == {"lr": 0.5}
    assert int(row["id"]) == first_id
    # the same trial id in another experiment is another row
    store.record(make_record("t1", experiment="other"))
    assert len(store.query()) == 3
    assert len(store.query(experiment="other")) == 1


def test_non_finite_metrics_stored_as_null(store: LeaderboardStore) -> None:
    store.record(make_record("n", val_auroc=float("nan"), val_loss=float("inf"), wall_time_s=float("-inf"),
                             startup_s=1.5))
    assert raw_rows(store, "val_auroc, val_loss, wall_time_s, startup_s") == [(None, None, None, 1.5)]


def test_reopening_keeps_rows(db_url: str, open_store: Callable[..., LeaderboardStore]) -> None:
    open_store(db_url).record(make_record("keep"))
    again = open_store(db_url, create=False)
    assert list(again.query()["trial_id"]) == ["keep"]
    with again.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version FROM medpeft_schema")).scalars().all() == [SCHEMA_VERSION]


# ----------------------------------------------------------------------------------------------
# SQLite specifics and unusable databases
# ----------------------------------------------------------------------------------------------


def test_sqlite_creates_parent_folders_and_uses_wal(tmp_path: Path, open_store: Callable[..., LeaderboardStore]) -> None:
    path = tmp_path / "a" / "b" / "leaderboard.db"
    store = open_store(sqlite_url(path))
    store.record(make_record())
    assert path.is_file()
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_missing_sqlite_file_without_create(tmp_path: Path) -> None:
    path = tmp_path / "nothing" / "leaderboard.db"
    with pytest.raises(MedpeftError) as info:
        LeaderboardStore(sqlite_url(path), create=False)
    assert str(path) in str(info.value)
    assert "no leaderboard here yet" in str(info.value)
    assert "medpeft-ray search" in str(info.value)
    assert not path.exists()


def test_random_bytes_file(tmp_path: Path) -> None:
    path = tmp_path / "leaderboard.db"
    path.write_bytes(b"this is not sqlite " + bytes(range(256)) * 16)
    with pytest.raises(MedpeftError) as info:
        LeaderboardStore(sqlite_url(path))
    assert type(info.value) is MedpeftError
    assert str(path) in str(info.value)
    assert "not a usable leaderboard database" in str(info.value)


def test_foreign_trials_table(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE trials (name TEXT, score REAL)")
    conn.execute("INSERT INTO trials VALUES ('x', 1.0)")
    conn.commit()
    conn.close()
    for create in (True, False):
        with pytest.raises(MedpeftError) as info:
            LeaderboardStore(sqlite_url(path), create=create)
        assert "not a medpeft leaderboard" in str(info.value)
        assert str(path) in str(info.value)
    conn = sqlite3.connect(path)  # the foreign table is left alone
    assert conn.execute("SELECT name, score FROM trials").fetchall() == [("x", 1.0)]
    conn.close()


def test_schema_version_mismatch(tmp_path: Path, open_store: Callable[..., LeaderboardStore]) -> None:
    path = tmp_path / "leaderboard.db"
    open_store(sqlite_url(path)).record(make_record())
    conn = sqlite3.connect(path)
    conn.execute("UPDATE medpeft_schema SET version = 99")
    conn.commit()
    conn.close()
    for create in (True, False):
        with pytest.raises(MedpeftError) as info:
            LeaderboardStore(sqlite_url(path), create=create)
        text = str(info.value)
        assert "schema version 99" in text
        assert f"version {SCHEMA_VERSION}" in text
        assert str(path) in text


def test_unreachable_server_is_a_medpeft_error_without_password() -> None:
    with pytest.raises(MedpeftError) as info:
        LeaderboardStore("postgresql+psycopg2://postgres:s3cret-pw@127.0.0.1:1/nope?connect_timeout=3")
    text = str(info.value)
    assert "not a usable leaderboard database" in text
    assert "s3cret-pw" not in text
    assert "127.0.0.1:1/nope" in text


def test_existing_empty_sqlite_file_without_create(tmp_path: Path) -> None:
    path = tmp_path / "leaderboard.db"
    path.write_bytes(b"")
    with pytest.raises(MedpeftError):
        LeaderboardStore(sqlite_url(path), create=False).query()


# ----------------------------------------------------------------------------------------------
# Concurrent writers
# ----------------------------------------------------------------------------------------------


def _write_trials(url: str, worker: int, count: int, barrier: Any) -> None:
    barrier.wait(timeout=30)  # all writers open the store and write at the same time
    store = LeaderboardStore(url)
    for i in range(count):
        store.record(make_record(f"w{worker}-t{i}", val_auroc=(worker * count + i) / 1000, params={"w": worker, "i": i}))
    store.engine.dispose()


def run_writers(url: str, workers: int, count: int) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(workers)
    procs = [ctx.Process(target=_write_trials, args=(url, w, count, barrier)) for w in range(workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * workers


def check_written(store: LeaderboardStore, workers: int, count: int) -> None:
    frame = store.query()
    assert len(frame) == workers * count
    assert set(frame["trial_id"]) == {f"w{w}-t{i}" for w in range(workers) for i in range(count)}
    assert frame["params"].map(lambda p: (p["w"], p["i"])).nunique() == workers * count
    assert list(frame["val_auroc"]) == sorted(frame["val_auroc"], reverse=True)


def test_concurrent_sqlite_writers(tmp_path: Path, open_store: Callable[..., LeaderboardStore]) -> None:
    url = sqlite_url(tmp_path / "leaderboard.db")
    open_store(url)  # the schema exists before the writers race
    run_writers(url, workers=4, count=25)
    check_written(open_store(url, create=False), 4, 25)


# Opening a new database from several processes at once: creation is locked, so none fails.


def test_concurrent_writers_on_a_new_sqlite_file(tmp_path: Path, open_store: Callable[..., LeaderboardStore]) -> None:
    url = sqlite_url(tmp_path / "fresh" / "leaderboard.db")
    run_writers(url, workers=2, count=5)  # both writers create the schema
    check_written(open_store(url, create=False), 2, 5)


# ----------------------------------------------------------------------------------------------
# PostgreSQL only
# ----------------------------------------------------------------------------------------------


def test_concurrent_postgres_writers(pg_database: str, open_store: Callable[..., LeaderboardStore]) -> None:
    _pg_drop_tables(pg_database)
    try:
        open_store(pg_database)
        run_writers(pg_database, workers=2, count=10)
        check_written(open_store(pg_database, create=False), 2, 10)
    finally:
        _pg_drop_tables(pg_database)


def test_concurrent_writers_on_a_new_postgres_database(
    pg_database: str, open_store: Callable[..., LeaderboardStore]
) -> None:
    _pg_drop_tables(pg_database)
    try:
        run_writers(pg_database, workers=2, count=5)  # both writers create the schema
        check_written(open_store(pg_database, create=False), 2, 5)
    finally:
        _pg_drop_tables(pg_database)


def test_postgres_foreign_trials_table(pg_database: str) -> None:
    _pg_drop_tables(pg_database)
    conn = _pg_connect(sa.make_url(pg_database).database)
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE trials (name TEXT)")
    try:
        with pytest.raises(MedpeftError) as info:
            LeaderboardStore(pg_database)
        assert "not a medpeft leaderboard" in str(info.value)
    finally:
        conn.close()
        _pg_drop_tables(pg_database)


def test_postgres_empty_database_without_create(pg_database: str) -> None:
    _pg_drop_tables(pg_database)
    with pytest.raises(MedpeftError, match="no leaderboard here yet"):
        LeaderboardStore(pg_database, create=False)


# ----------------------------------------------------------------------------------------------
# Where the store lives
# ----------------------------------------------------------------------------------------------


def test_results_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MEDPEFT_RESULTS", raising=False)
    assert results_dir() == tmp_path.resolve() / "medpeft-results"
    monkeypatch.setenv("MEDPEFT_RESULTS", str(tmp_path / "env-results"))
    assert results_dir() == (tmp_path / "env-results").resolve()
    assert results_dir(tmp_path / "explicit") == (tmp_path / "explicit").resolve()
    assert results_dir("rel") == (tmp_path / "rel").resolve()
    monkeypatch.setenv("MEDPEFT_RESULTS", "~/somewhere")
    assert results_dir() == Path(os.path.expanduser("~/somewhere")).resolve()


def test_default_db_url_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MEDPEFT_DB", raising=False)
    monkeypatch.delenv("MEDPEFT_RESULTS", raising=False)
    assert default_db_url() == f"sqlite:///{tmp_path.resolve() / 'medpeft-results' / 'leaderboard.db'}"
    monkeypatch.setenv("MEDPEFT_RESULTS", str(tmp_path / "r"))
    assert default_db_url() == f"sqlite:///{(tmp_path / 'r').resolve() / 'leaderboard.db'}"
    assert default_db_url(tmp_path / "x") == f"sqlite:///{(tmp_path / 'x').resolve() / 'leaderboard.db'}"
    monkeypatch.setenv("MEDPEFT_DB", "postgresql+psycopg2://u@h/db")
    assert default_db_url() == "postgresql+psycopg2://u@h/db"
