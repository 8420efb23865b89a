"""The leaderboard store: rows, queries, upserts, bad databases, schema upgrades, concurrent writers,
Optuna's tables beside the leaderboard, PostgreSQL."""

from __future__ import annotations

import json
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
from medpeft_ray.leaderboard import LeaderboardStore, TrialRecord
from medpeft_ray.storage import default_db_url, results_dir
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
    """Every table of the test database (leaderboard, Optuna's, foreign ones) is dropped."""
    conn = _pg_connect(sa.make_url(url).database)
    with conn.cursor() as cur:
        cur.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
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
        return [tuple(r) for r in conn.execute(sa.text(f"SELECT {columns} FROM medpeft_trials ORDER BY id"))]


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


def test_someone_elses_trials_table_is_left_alone(tmp_path: Path, open_store: Callable[..., LeaderboardStore]) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE trials (name TEXT, score REAL)")
    conn.execute("INSERT INTO trials VALUES ('x', 1.0)")
    conn.commit()
    conn.close()
    with pytest.raises(MedpeftError, match="no leaderboard here yet"):
        LeaderboardStore(sqlite_url(path), create=False)
    store = open_store(sqlite_url(path))  # the leaderboard's own tables go beside it
    store.record(make_record("mine"))
    assert list(store.query()["trial_id"]) == ["mine"]
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT name, score FROM trials").fetchall() == [("x", 1.0)]
    conn.close()


def test_leaderboard_table_without_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "odd.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE medpeft_trials (id INTEGER)")
    conn.commit()
    conn.close()
    for create in (True, False):
        with pytest.raises(MedpeftError) as info:
            LeaderboardStore(sqlite_url(path), create=create)
        assert str(info.value) == (f"{path}: has a 'medpeft_trials' table but no schema version; "
                                   "not a medpeft leaderboard")


def test_foreign_schema_table_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "odd.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE medpeft_schema (name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(MedpeftError, match="its 'medpeft_schema' table is not a medpeft one"):
        LeaderboardStore(sqlite_url(path))


def test_newer_schema_version_is_refused(tmp_path: Path, open_store: Callable[..., LeaderboardStore]) -> None:
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
        assert text.startswith(f"{path}: leaderboard schema version 99, newer than this medpeft-ray reads")
        assert f"(version {SCHEMA_VERSION})" in text
        assert "\n" not in text
    conn = sqlite3.connect(path)  # refused, not touched
    assert conn.execute("SELECT version FROM medpeft_schema").fetchall() == [(99,)]
    assert conn.execute("SELECT count(*) FROM medpeft_trials").fetchone() == (1,)
    conn.close()


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


def run_writers(url: str, workers: int, count: int, target: Callable[..., None] = _write_trials) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(workers)
    procs = [ctx.Process(target=target, args=(url, w, count, barrier)) for w in range(workers)]
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


def test_postgres_foreign_trials_table_is_left_alone(
    pg_database: str, open_store: Callable[..., LeaderboardStore]
) -> None:
    _pg_drop_tables(pg_database)
    conn = _pg_connect(sa.make_url(pg_database).database)
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE trials (name TEXT PRIMARY KEY)")
        cur.execute("INSERT INTO trials VALUES ('x')")
    try:
        store = open_store(pg_database)
        store.record(make_record("mine"))
        assert list(store.query()["trial_id"]) == ["mine"]
        with conn.cursor() as cur:
            cur.execute("SELECT name FROM trials")
            assert cur.fetchall() == [("x",)]
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


# ----------------------------------------------------------------------------------------------
# Date and experiment filters
# ----------------------------------------------------------------------------------------------


def _set_created_at(store: LeaderboardStore, stamps: dict[str, str]) -> None:
    with store.engine.begin() as conn:
        for trial_id, stamp in stamps.items():
            conn.execute(sa.text("UPDATE medpeft_trials SET created_at = :s WHERE trial_id = :t"),
                         {"s": stamp, "t": trial_id})


def test_query_by_date(store: LeaderboardStore) -> None:
    for trial_id in ("old", "day", "late", "new"):
        store.record(make_record(trial_id))
    _set_created_at(store, {"old": "2026-10-31T23:59:59+00:00", "day": "2026-11-01T00:00:00+00:00",
                            "late": "2026-11-01T23:59:59+00:00", "new": "2026-11-02T08:00:00+00:00"})

    def ids(**filters: Any) -> set[str]:
        return set(store.query(**filters)["trial_id"])

    assert ids(since="2026-11-01") == {"day", "late", "new"}
    assert ids(until="2026-11-01") == {"old", "day", "late"}  # a bare date includes its whole day
    assert ids(since="2026-11-01", until="2026-11-01") == {"day", "late"}
    assert ids(until="2026-11-01T12:00") == {"old", "day"}  # a time is a point (UTC when no zone is given)
    assert ids(since="2026-11-02T09:00+02:00") == {"new"}  # 07:00 UTC
    from datetime import date, datetime, timezone

    assert ids(since=date(2026, 11, 2)) == {"new"}
    assert ids(until=datetime(2026, 10, 31, 23, 59, 59, tzinfo=timezone.utc)) == {"old"}
    with pytest.raises(MedpeftError, match="'yesterday' is not a date"):
        store.query(since="yesterday")


def test_query_several_experiments_and_describe(store: LeaderboardStore) -> None:
    assert store.describe() == "the leaderboard is empty (run `medpeft-ray search` first)"
    store.record(make_record("a", experiment="e1", label_ratio=0.1))
    store.record(make_record("b", experiment="e2", method="bitfit"))
    store.record(make_record("c", experiment="e3", dataset="nih", label_ratio=0.01))
    assert set(store.query(experiment=["e1", "e3"])["trial_id"]) == {"a", "c"}
    assert store.experiments() == ["e1", "e2", "e3"]
    assert store.count() == 3
    assert store.describe() == ("the leaderboard has nih at label ratios 0.01 (lora); "
                                "synthetic at label ratios 0.1, 1 (bitfit, lora)")


# ----------------------------------------------------------------------------------------------
# Older schemas are upgraded in place: version 1 (rows in `trials`), version 2 (no checkpoint identity)
# ----------------------------------------------------------------------------------------------

#: columns version 3 added
V3_COLUMNS = ("checkpoint_file", "checkpoint_sha256")
#: columns version 4 added
V4_COLUMNS = ("val_f1", "val_accuracy", "val_balanced_accuracy", "test_auroc", "test_loss", "test_f1", "test_accuracy",
              "test_balanced_accuracy", "role", "seed", "source_trial", "details")


def create_old_store(url: str, rows: int, version: int = 1) -> None:
    """A leaderboard exactly as schema ``version`` (1, 2 or 3) laid it out, holding ``rows`` trials."""
    from medpeft_ray.leaderboard.store import trials_table

    metadata = sa.MetaData()
    added_later = V4_COLUMNS + (V3_COLUMNS if version < 3 else ())
    columns = [sa.Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable) for c in trials_table.c
               if c.name not in added_later]
    name = "trials" if version == 1 else "medpeft_trials"
    table = sa.Table(name, metadata, *columns, sa.UniqueConstraint("experiment", "trial_id", name="uq_trial"))
    if version >= 2:
        sa.Index("ix_medpeft_trials_created_at", table.c.created_at)
        sa.Index("ix_medpeft_trials_lookup", table.c.dataset, table.c.label_ratio, table.c.method)
    schema = sa.Table("medpeft_schema", metadata, sa.Column("version", sa.Integer, primary_key=True))
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        metadata.create_all(conn)
        conn.execute(schema.insert().values(version=version))
        for i in range(rows):
            conn.execute(table.insert().values(
                experiment="old", trial_id=f"v{version}-{i}", dataset="synthetic", label_ratio=0.5, method="lora",
                backbone="vit_tiny_patch16_224", status="completed", val_auroc=0.5 + i / 100,
                params=json.dumps({"i": i}), config=json.dumps({"i": i}), created_at="2026-01-01T00:00:00+00:00",
            ))
    engine.dispose()


def create_v1_store(url: str, rows: int) -> None:
    create_old_store(url, rows, version=1)


def table_names(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_version_1_store_is_upgraded_in_place(db_url: str, open_store: Callable[..., LeaderboardStore]) -> None:
    import optuna

    from medpeft_ray.leaderboard import optuna_storage

    create_v1_store(db_url, rows=3)
    store = open_store(db_url, create=False)  # reading an old store upgrades it too
    assert SCHEMA_VERSION == 6
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version FROM medpeft_schema")).scalars().all() == [6]
        indexes = {ix["name"] for ix in sa.inspect(conn).get_indexes("medpeft_trials")}
    assert {"ix_medpeft_trials_created_at", "ix_medpeft_trials_lookup"} <= indexes
    assert "trials" not in table_names(db_url) and "medpeft_trials" in table_names(db_url)
    frame = store.query()
    assert list(frame["trial_id"]) == ["v1-2", "v1-1", "v1-0"]
    assert list(frame["params"]) == [{"i": 2}, {"i": 1}, {"i": 0}]
    ids_before = dict(zip(frame["trial_id"], frame["id"]))
    # writing after the upgrade: a new row gets a fresh id, an old one is updated in place
    store.record(make_record("new", experiment="old"))
    store.record(make_record("v1-0", experiment="old", val_auroc=0.99))
    frame = store.query().set_index("trial_id")
    assert len(frame) == 4
    assert int(frame.loc["v1-0", "id"]) == ids_before["v1-0"] and frame.loc["v1-0", "val_auroc"] == 0.99
    assert int(frame.loc["new", "id"]) not in ids_before.values()
    # Optuna's `trials` table now fits in the same database (it clashed with version 1's)
    study = optuna.create_study(study_name="s", storage=optuna_storage(db_url), direction="maximize")
    study.tell(study.ask(), 0.7)
    assert optuna.load_study(study_name="s", storage=optuna_storage(db_url)).best_value == 0.7
    assert len(open_store(db_url).query()) == 4


def test_failed_upgrade_leaves_version_1_untouched(
    db_url: str, open_store: Callable[..., LeaderboardStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    from medpeft_ray.leaderboard import store as store_module

    create_v1_store(db_url, rows=2)
    real = store_module._UPGRADES[1]

    def interrupted(conn: Any) -> None:
        real(conn)  # the rename and the indexes are done when the process dies
        raise sa.exc.OperationalError("upgrade", {}, Exception("disk I/O error"))

    monkeypatch.setitem(store_module._UPGRADES, 1, interrupted)
    with pytest.raises(MedpeftError, match="not a usable leaderboard database"):
        LeaderboardStore(db_url)
    names = table_names(db_url)
    assert "trials" in names and "medpeft_trials" not in names  # rolled back as one transaction
    monkeypatch.setitem(store_module._UPGRADES, 1, real)
    assert len(open_store(db_url).query()) == 2


def test_version_2_store_gains_the_checkpoint_columns(db_url: str, open_store: Callable[..., LeaderboardStore]) -> None:
    create_old_store(db_url, rows=2, version=2)
    store = open_store(db_url, create=False)
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version FROM medpeft_schema")).scalars().all() == [6]
        columns = {c["name"] for c in sa.inspect(conn).get_columns("medpeft_trials")}
    assert set(V3_COLUMNS) | set(V4_COLUMNS) | {"val_fid", "test_fid", "predictions"} <= columns
    frame = store.query().set_index("trial_id")
    assert list(frame.index) == ["v2-1", "v2-0"]  # old rows kept, best first, checkpoint not known
    assert frame["checkpoint_file"].isna().all() and frame["checkpoint_sha256"].isna().all()
    ids_before = dict(zip(frame.index, frame["id"]))
    store.record(make_record("v2-0", experiment="old", checkpoint_file="/w/mae.pth", checkpoint_sha256="ab" * 32))
    store.record(make_record("new", experiment="old", checkpoint_file="/w/mae.pth", checkpoint_sha256="cd" * 32))
    frame = open_store(db_url, create=False).query().set_index("trial_id")
    assert len(frame) == 3 and int(frame.loc["v2-0", "id"]) == ids_before["v2-0"]
    assert frame.loc["v2-0", "checkpoint_sha256"] == "ab" * 32 and frame.loc["new", "checkpoint_file"] == "/w/mae.pth"
    assert frame.loc["v2-1", ["checkpoint_file", "checkpoint_sha256"]].isna().all()


def test_version_3_store_gains_the_metric_role_and_details_columns(
    db_url: str, open_store: Callable[..., LeaderboardStore]
) -> None:
    create_old_store(db_url, rows=2, version=3)
    store = open_store(db_url, create=False)
    frame = store.query().set_index("trial_id")
    assert list(frame.index) == ["v3-1", "v3-0"]
    # the old rows were search trials; their new metrics and details are not known
    assert list(frame["role"]) == ["search", "search"] and frame["val_f1"].isna().all() and frame["details"].isna().all()
    store.record(make_record("seed-1", experiment="old", role="confirmation", seed=1, source_trial="v3-1",
                             val_f1=0.7, test_f1=0.6, details={"test": {"worst_group_gap": {"sex": {"test_f1": 0.1}}}}))
    frame = open_store(db_url, create=False).query().set_index("trial_id")
    row = frame.loc["seed-1"]
    assert row["role"] == "confirmation" and row["seed"] == 1 and row["source_trial"] == "v3-1"
    assert row["test_f1"] == 0.6 and row["details"]["test"]["worst_group_gap"]["sex"]["test_f1"] == 0.1
    assert list(store.query(role="search")["trial_id"]) == ["v3-1", "v3-0"]
    assert list(store.query(role="confirmation")["trial_id"]) == ["seed-1"]


def test_failed_upgrade_from_version_2_leaves_it_untouched(
    db_url: str, open_store: Callable[..., LeaderboardStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    from medpeft_ray.leaderboard import store as store_module

    create_old_store(db_url, rows=2, version=2)
    real = store_module._UPGRADES[2]

    def interrupted(conn: Any) -> None:
        real(conn)  # the columns are added when the process dies
        raise sa.exc.OperationalError("upgrade", {}, Exception("disk I/O error"))

    monkeypatch.setitem(store_module._UPGRADES, 2, interrupted)
    with pytest.raises(MedpeftError, match="not a usable leaderboard database"):
        LeaderboardStore(db_url)
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        assert not set(V3_COLUMNS) & {c["name"] for c in sa.inspect(conn).get_columns("medpeft_trials")}
        assert conn.execute(sa.text("SELECT version FROM medpeft_schema")).scalars().all() == [2]
    engine.dispose()
    monkeypatch.setitem(store_module._UPGRADES, 2, real)
    assert len(open_store(db_url).query()) == 2


def test_concurrent_openers_upgrade_once(tmp_path: Path, open_store: Callable[..., LeaderboardStore]) -> None:
    url = sqlite_url(tmp_path / "leaderboard.db")
    create_v1_store(url, rows=5)
    run_writers(url, workers=3, count=4)  # each opens (and upgrades) at once
    store = open_store(url, create=False)
    assert len(store.query(experiment="old")) == 5
    assert len(store.query(experiment="exp")) == 12
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version FROM medpeft_schema")).scalars().all() == [SCHEMA_VERSION]


# ----------------------------------------------------------------------------------------------
# More writers: the same trial from several processes, a writer killed mid-stream
# ----------------------------------------------------------------------------------------------


def _record_shared(url: str, worker: int, count: int, barrier: Any) -> None:
    store = LeaderboardStore(url)
    barrier.wait(timeout=30)
    for i in range(count):
        # every worker records the same trials (a resumed search racing the original), then its own
        store.record(make_record(f"shared-{i}", experiment="shared", val_auroc=worker / 10, params={"w": worker}))
        store.record(make_record(f"own-{worker}-{i}", experiment="shared"))
    store.engine.dispose()


def test_concurrent_writers_of_the_same_trials(db_url: str, open_store: Callable[..., LeaderboardStore]) -> None:
    open_store(db_url)
    run_writers(db_url, workers=3, count=8, target=_record_shared)
    frame = open_store(db_url, create=False).query(experiment="shared")
    assert len(frame) == 8 + 3 * 8
    shared = frame[frame["trial_id"].str.startswith("shared-")]
    assert sorted(shared["trial_id"]) == sorted(f"shared-{i}" for i in range(8))
    # each shared row is one writer's complete row, never a mix of two
    for _, row in shared.iterrows():
        assert row["params"] == {"w": round(row["val_auroc"] * 10)}


def _write_forever(url: str, ready: Any) -> None:
    store = LeaderboardStore(url)
    ready.set()
    i = 0
    while True:
        store.record(make_record(f"k{i}", params={"i": i, "pad": "x" * 2000}, config={"i": i, "pad": "y" * 5000}))
        i += 1


def test_killed_writer_leaves_no_half_row(tmp_path: Path, open_store: Callable[..., LeaderboardStore]) -> None:
    import signal
    import time

    url = sqlite_url(tmp_path / "leaderboard.db")
    open_store(url)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_write_forever, args=(url, ready))
    proc.start()
    assert ready.wait(timeout=60)
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=30)
    store = open_store(url, create=False)
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
    frame = store.query()
    assert len(frame) > 0
    # rows are k0..k(n-1) without gaps, each complete
    assert sorted(frame["trial_id"], key=lambda t: int(t[1:])) == [f"k{i}" for i in range(len(frame))]
    for _, row in frame.iterrows():
        assert row["params"]["i"] == row["config"]["i"] == int(row["trial_id"][1:])
        assert len(row["config"]["pad"]) == 5000 and row["status"] == "completed" and row["val_auroc"] == 0.5


# ----------------------------------------------------------------------------------------------
# Optuna's studies in the leaderboard's database
# ----------------------------------------------------------------------------------------------


def test_optuna_studies_share_the_database(db_url: str, open_store: Callable[..., LeaderboardStore]) -> None:
    import optuna

    from medpeft_ray.leaderboard import optuna_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = open_store(db_url)
    store.record(make_record("t0"))
    study = optuna.create_study(study_name="exp-ratio1", storage=optuna_storage(db_url), direction="maximize")
    for value in (0.6, 0.8):
        trial = study.ask()
        trial.suggest_float("lr", 1e-4, 1e-2, log=True)
        study.tell(trial, value)
    store.record(make_record("t1"))
    names = table_names(db_url)
    assert {"medpeft_trials", "medpeft_schema", "studies", "trials"} <= names
    assert len(open_store(db_url, create=False).query()) == 2
    loaded = optuna.load_study(study_name="exp-ratio1", storage=optuna_storage(db_url))
    assert [t.value for t in loaded.trials] == [0.6, 0.8]
