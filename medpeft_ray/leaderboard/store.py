"""The results store: one row per trial (its best epoch), in SQLite or any SQLAlchemy database.

Rows are keyed by (experiment, trial_id), so re-recording a trial (a resumed search) updates it
instead of duplicating it. A write is one upsert statement in one transaction: concurrent writers
of the same trial cannot both insert, and an interrupted write leaves no half row. SQLite runs in
WAL mode with a busy timeout so several processes can write one file.

The schema is versioned (``medpeft_schema``): an older leaderboard is upgraded in place in one
transaction when it is opened, a newer or foreign one is refused with a one-line message. The
table is ``medpeft_trials`` so that Optuna's own tables (``studies``, ``trials``, ...) can live in
the same database (:func:`optuna_storage`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import re
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Sequence

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DatabaseError, OperationalError

from medpeft_ray.errors import MedpeftError, UsageError
from medpeft_ray.label_ratios import LABEL_RATIO_TOLERANCE
from medpeft_ray.metrics import METRICS, finite_or_none, names_on_split

if TYPE_CHECKING:
    import optuna

#: Version 2 renamed ``trials`` to ``medpeft_trials`` (Optuna's RDB storage owns a ``trials`` table,
#: and its studies live in the same database) and added indexes for date and (dataset, ratio, method).
#: Version 3 added the pre-trained checkpoint each trial started from (``checkpoint_file``, ``checkpoint_sha256``).
#: Version 4 added F1 and the accuracies, every metric's test-split value, the row's ``role``
#: (a search trial or a confirmation seed), its ``seed`` and ``source_trial``, and ``details``.
#: Version 5 added FID (``val_fid``, ``test_fid``) of generation searches.
#: Version 6 added ``predictions``: the folder of the trial's per-image predictions.
SCHEMA_VERSION = 6
TRIALS_TABLE = "medpeft_trials"
SCHEMA_TABLE = "medpeft_schema"
Status = Literal["completed", "stopped", "failed"]
Role = Literal["search", "confirmation"]

_metadata = sa.MetaData()

trials_table = sa.Table(
    TRIALS_TABLE,
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("experiment", sa.String(200), nullable=False),
    sa.Column("trial_id", sa.String(100), nullable=False),
    sa.Column("dataset", sa.String(100), nullable=False),
    sa.Column("label_ratio", sa.Float, nullable=False),
    sa.Column("method", sa.String(100), nullable=False),
    sa.Column("backbone", sa.String(200), nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    # every metric of the registry: its validation value at the best epoch, and (confirmation
    # rows, `train --config`) that epoch's test-split value
    *(sa.Column(name, sa.Float) for name in (*METRICS, *names_on_split("test"))),
    sa.Column("best_epoch", sa.Integer),
    sa.Column("epochs_run", sa.Integer),
    sa.Column("trainable_params", sa.BigInteger),
    sa.Column("total_params", sa.BigInteger),
    sa.Column("wall_time_s", sa.Float),
    sa.Column("startup_s", sa.Float),
    sa.Column("train_time_s", sa.Float),
    sa.Column("skipped_images", sa.Integer),  # unreadable files left out (dataset.options.skip_unreadable)
    sa.Column("params", sa.Text, nullable=False),  # the sampled hyperparameters (JSON)
    sa.Column("config", sa.Text, nullable=False),  # the full trial config (JSON)
    sa.Column("checkpoint", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("created_at", sa.String(40), nullable=False),  # UTC ISO 8601: sorts and compares as text
    # the pre-trained weights (model.checkpoint) the trial started from, and their content's SHA-256
    # (NULL: random initialisation, or a row written before version 3)
    sa.Column("checkpoint_file", sa.Text),
    sa.Column("checkpoint_sha256", sa.String(64)),
    # "search": a trial of the search; "confirmation": one seed of re-training a top configuration
    # (source_trial: the search trial it re-trains), so several seeds give a mean and a spread
    sa.Column("role", sa.String(20)),
    sa.Column("seed", sa.Integer),
    sa.Column("source_trial", sa.String(100)),
    # per-class values, multi-label thresholds, per-subgroup values and worst-group gaps (JSON)
    sa.Column("details", sa.Text),
    # the folder (path or URI) of the trial's per-image predictions (medpeft_ray.evaluation.predictions):
    # its best validation epoch's, and a confirmation seed's test split's; what intervals and paired tests use
    sa.Column("predictions", sa.Text),
    sa.UniqueConstraint("experiment", "trial_id", name="uq_trial"),
)
_indexes = (
    sa.Index("ix_medpeft_trials_created_at", trials_table.c.created_at),
    sa.Index("ix_medpeft_trials_lookup", trials_table.c.dataset, trials_table.c.label_ratio, trials_table.c.method),
)

schema_table = sa.Table(
    SCHEMA_TABLE,
    _metadata,
    sa.Column("version", sa.Integer, primary_key=True),
)

#: Cost columns: a leaderboard sorted by one of them shows the cheapest first.
COST_COLUMNS = frozenset({"wall_time_s", "startup_s", "train_time_s", "trainable_params", "total_params",
                          "skipped_images"})


def lower_is_better(column: str) -> bool:
    """Whether a leaderboard sorted by ``column`` puts the smallest first (losses, times, parameter counts)."""
    return (column in METRICS and METRICS[column].ascending) or column in COST_COLUMNS


@dataclass
class TrialRecord:
    """One leaderboard row: a trial's best epoch, its cost and its full configuration."""

    experiment: str
    trial_id: str
    dataset: str
    label_ratio: float
    method: str
    backbone: str
    status: Status
    config: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)
    val_auroc: float | None = None
    val_loss: float | None = None
    val_f1: float | None = None
    val_accuracy: float | None = None
    val_balanced_accuracy: float | None = None
    val_fid: float | None = None
    test_auroc: float | None = None
    test_loss: float | None = None
    test_f1: float | None = None
    test_accuracy: float | None = None
    test_balanced_accuracy: float | None = None
    test_fid: float | None = None
    best_epoch: int | None = None
    epochs_run: int | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    wall_time_s: float | None = None
    startup_s: float | None = None
    train_time_s: float | None = None
    skipped_images: int | None = None
    checkpoint: str | None = None
    error: str | None = None
    checkpoint_file: str | None = None
    checkpoint_sha256: str | None = None
    role: Role = "search"
    seed: int | None = None
    source_trial: str | None = None
    details: dict[str, Any] | None = None
    predictions: str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "TrialRecord":
        """The record of one row of :meth:`TrialStore.query` (missing values as None)."""
        values = {name: row[name] for name in cls.__dataclass_fields__ if name in row}
        return cls(**{k: None if not isinstance(v, (dict, list)) and pd.isna(v) else v for k, v in values.items()})


#: What to install for a database driver SQLAlchemy cannot import (by the driver's module).
_DRIVER_INSTALL = {
    "psycopg": "pip install 'medpeft-ray[postgres]' (or 'psycopg[binary]')",
    "psycopg2": "pip install 'medpeft-ray[postgres]' (or psycopg2-binary)",
    "MySQLdb": "pip install mysqlclient",
}
_URL_EXAMPLES = "e.g. sqlite:///path/leaderboard.db or postgresql://user:password@host/db"


def check_database_url(url: str) -> sa.URL:
    """Parses a database URL and imports its driver, so that a bad URL fails before any work starts.

    Raises:
        UsageError: one line (exit code 2) naming the URL, password masked, and for a driver that
            is not installed, what to install (plain ``postgresql://`` is psycopg 3 in SQLAlchemy 2.1,
            ``postgresql+psycopg2://`` is psycopg2; the ``postgres`` extra installs both).
    """
    try:
        parsed = sa.make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        masked = re.sub(r"(//[^/@:]*):[^/@]*@", r"\1:***@", url)
        raise UsageError(f"{masked}: not a database URL ({_URL_EXAMPLES})") from None
    label = parsed.render_as_string()
    try:
        dialect = parsed.get_dialect()
    except sa.exc.NoSuchModuleError:
        raise UsageError(
            f"{label}: SQLAlchemy knows no database type {parsed.drivername!r} ({_URL_EXAMPLES})"
        ) from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        module = (exc.name or dialect.driver).split(".")[0]
        install = _DRIVER_INSTALL.get(module, f"pip install {module}")
        raise UsageError(f"{label}: the database driver {module!r} that {parsed.drivername}:// URLs use is not "
                         f"installed; {install}") from None
    return parsed


def _clean(value: Any) -> Any:
    """NaN/inf become NULL: a trial that never produced a metric has none, not a fake number."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _as_utc_text(value: str | date | datetime, end_of_day: bool = False) -> str:
    """A date or time as the store's UTC ISO text; a bare date means its start (or its end)."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value) if ("T" in value or " " in value) else date.fromisoformat(value)
        except ValueError:
            raise UsageError(f"{value!r} is not a date (YYYY-MM-DD) or time (YYYY-MM-DDTHH:MM[:SS])") from None
    if not isinstance(value, datetime):
        value = datetime.combine(value + timedelta(days=1) if end_of_day else value, time())
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)  # the store records UTC, so naive times are read as UTC
    return value.astimezone(timezone.utc).isoformat(timespec="seconds")


def _is_bare_date(value: str | date | datetime) -> bool:
    if isinstance(value, datetime):
        return False
    return isinstance(value, date) or ("T" not in value and " " not in value)


class TrialStore:
    """Reads and writes the leaderboard of one database (SQLite file or any SQLAlchemy URL).

    It hands out rows only; :mod:`medpeft_ray.leaderboard.views` ranks and compares them, and
    :class:`~medpeft_ray.leaderboard.board.LeaderboardStore` puts the two together by filter.

    Opening a store checks its schema version: a new database gets the current schema (unless
    ``create`` is false), an older medpeft leaderboard is upgraded in place in one transaction,
    and a newer or foreign one is refused with a one-line :class:`MedpeftError`.
    """

    def __init__(self, url: str, create: bool = True) -> None:
        self.url = url
        parsed = check_database_url(url)
        #: the database as shown in messages (a password in the URL is masked)
        self.label = url.split("///", 1)[-1] if url.startswith("sqlite") else parsed.render_as_string()
        if url.startswith("sqlite:///"):
            path = Path(url.removeprefix("sqlite:///"))
            if not create and not path.exists():
                raise MedpeftError(f"{path}: no leaderboard here yet (run `medpeft-ray search` first)")
            path.parent.mkdir(parents=True, exist_ok=True)
            self.engine = sa.create_engine(url, connect_args={"timeout": 60})
            sa.event.listen(self.engine, "connect", _sqlite_connect)
            sa.event.listen(self.engine, "begin", _sqlite_begin)
        else:
            self.engine = sa.create_engine(url, pool_pre_ping=True)
        self._check_schema(create)

    # -- schema ----------------------------------------------------------------------------------
    def _check_schema(self, create: bool) -> None:
        try:
            with self._creation_lock():
                with self.engine.connect() as conn:
                    version = self._read_version(conn)
                if version == SCHEMA_VERSION:
                    return
                if version is None and not create:
                    raise MedpeftError(f"{self.label}: no leaderboard here yet (run `medpeft-ray search` first)")
                with self._write_transaction() as conn:
                    version = self._read_version(conn)  # another process may have acted in between
                    if version is None:
                        _metadata.create_all(conn)
                        conn.execute(schema_table.insert().values(version=SCHEMA_VERSION))
                    elif version < SCHEMA_VERSION:
                        self._upgrade(conn, version)
        except (DatabaseError, OperationalError) as exc:
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
            raise MedpeftError(f"{self.label}: not a usable leaderboard database ({reason})") from None

    def _read_version(self, conn: sa.Connection) -> int | None:
        """The stored schema version (None: no leaderboard yet); refuses newer and foreign schemas."""
        names = set(sa.inspect(conn).get_table_names())
        if SCHEMA_TABLE not in names:
            if TRIALS_TABLE in names:
                raise MedpeftError(f"{self.label}: has a {TRIALS_TABLE!r} table but no schema version; "
                                   "not a medpeft leaderboard")
            return None
        columns = {c["name"] for c in sa.inspect(conn).get_columns(SCHEMA_TABLE)}
        if "version" not in columns:
            raise MedpeftError(f"{self.label}: its {SCHEMA_TABLE!r} table is not a medpeft one")
        version = conn.execute(sa.select(sa.func.max(schema_table.c.version))).scalar()
        if not isinstance(version, int) or version < 1:
            raise MedpeftError(f"{self.label}: leaderboard schema version {version!r} is not one medpeft-ray wrote")
        if version > SCHEMA_VERSION:
            raise MedpeftError(
                f"{self.label}: leaderboard schema version {version}, newer than this medpeft-ray reads "
                f"(version {SCHEMA_VERSION}); upgrade medpeft-ray, or use a new --results folder"
            )
        expected = _V1_TRIALS_TABLE if version == 1 else TRIALS_TABLE
        if expected not in names:
            raise MedpeftError(f"{self.label}: leaderboard schema version {version} but no {expected!r} table")
        return version

    def _upgrade(self, conn: sa.Connection, version: int) -> None:
        """Upgrades an older leaderboard step by step to SCHEMA_VERSION, inside the caller's transaction."""
        for step in range(version, SCHEMA_VERSION):
            _UPGRADES[step](conn)
        conn.execute(schema_table.delete())
        conn.execute(schema_table.insert().values(version=SCHEMA_VERSION))

    @contextlib.contextmanager
    def _write_transaction(self) -> Iterator[sa.Connection]:
        """A transaction that holds the database's write lock from its first statement."""
        with self.engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                conn.execution_options(sqlite_begin="BEGIN IMMEDIATE")
            with conn.begin():
                if conn.dialect.name == "postgresql":
                    # two processes opening a new database must not both create the tables
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(7346001)"))
                yield conn

    @contextlib.contextmanager
    def _creation_lock(self) -> Iterator[None]:
        """Serialises check-and-create of a SQLite file across processes."""
        if not self.url.startswith("sqlite:///"):
            yield
            return
        lock_path = Path(self.url.removeprefix("sqlite:///") + ".lock")
        with open(lock_path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- writing ---------------------------------------------------------------------------------
    def record(self, row: TrialRecord) -> None:
        """Inserts the trial's row, or replaces it if the (experiment, trial_id) pair exists.

        One statement in one transaction: concurrent writers of the same trial cannot both insert,
        and an interrupted write leaves no half row.
        """
        values = {k: _clean(v) for k, v in asdict(row).items()}
        values["config"] = json.dumps(row.config, sort_keys=True, default=str)
        values["params"] = json.dumps(row.params, sort_keys=True, default=str)
        values["details"] = None if row.details is None else json.dumps(finite_or_none(row.details), default=str)
        values["created_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        updates = {k: v for k, v in values.items() if k not in ("experiment", "trial_id")}
        with self.engine.begin() as conn:
            dialect = conn.dialect.name
            if dialect in ("sqlite", "postgresql"):
                insert = sqlite_insert if dialect == "sqlite" else postgresql_insert
                statement = insert(trials_table).values(**values)
                conn.execute(statement.on_conflict_do_update(index_elements=["experiment", "trial_id"], set_=updates))
                return
            key = (trials_table.c.experiment == row.experiment) & (trials_table.c.trial_id == row.trial_id)
            if conn.execute(sa.select(trials_table.c.id).where(key).with_for_update()).first() is None:
                conn.execute(trials_table.insert().values(**values))
            else:
                conn.execute(trials_table.update().where(key).values(**updates))

    # -- reading ---------------------------------------------------------------------------------
    def default_metric(self, **filters: Any) -> str:
        """What the selected rows are ranked by when no metric is named: the registry's first metric
        they have, the loss aside (every task has one): val_auroc for classifiers, val_fid for generation."""
        frame = self.query(**filters)
        for name in METRICS:
            if name != "val_loss" and name in frame and frame[name].notna().any():
                return name
        return next(iter(METRICS))

    def query(
        self,
        *,
        experiment: str | Sequence[str] | None = None,
        dataset: str | None = None,
        label_ratio: float | None = None,
        method: str | None = None,
        backbone: str | None = None,
        status: str | None = None,
        role: str | None = None,
        since: str | date | datetime | None = None,
        until: str | date | datetime | None = None,
        metric: str = "val_auroc",
        ascending: bool = False,
        top: int | None = None,
    ) -> "pd.DataFrame":
        """Matching rows as a pandas DataFrame, best ``metric`` first (trials without it last).

        Args:
            experiment: one experiment name or several.
            role: ``search`` (the search's trials) or ``confirmation`` (re-trainings with other seeds).
            since, until: recorded on or after / on or before (a date, a time, or ISO text; a
                bare ``until`` date includes that whole day; times without a zone are UTC).
            metric: any column to sort by; ``ascending`` puts the smallest first.
        """
        if metric not in trials_table.c:
            raise UsageError(f"cannot sort by {metric!r}; columns: {', '.join(trials_table.c.keys())}")
        t = trials_table
        query = sa.select(t)
        filters = {"dataset": dataset, "method": method, "backbone": backbone, "status": status}
        for column, value in filters.items():
            if value is not None:
                query = query.where(t.c[column] == value)
        if isinstance(experiment, str):
            query = query.where(t.c.experiment == experiment)
        elif experiment is not None:
            query = query.where(t.c.experiment.in_(list(experiment)))
        if role == "search":  # rows of version 3 and older, NULL there, were all search trials
            query = query.where(sa.or_(t.c.role == role, t.c.role.is_(None)))
        elif role is not None:
            query = query.where(t.c.role == role)
        if label_ratio is not None:
            query = query.where(sa.func.abs(t.c.label_ratio - label_ratio) < LABEL_RATIO_TOLERANCE)
        if since is not None:
            query = query.where(t.c.created_at >= _as_utc_text(since))
        if until is not None:
            bound = _as_utc_text(until, end_of_day=True)
            query = query.where(t.c.created_at < bound if _is_bare_date(until) else t.c.created_at <= bound)
        order = t.c[metric].asc() if ascending else t.c[metric].desc()
        query = query.order_by(t.c[metric].is_(None), order, t.c.id)
        if top is not None:
            query = query.limit(top)
        with self.engine.connect() as conn:
            frame = pd.DataFrame(conn.execute(query).mappings().all(), columns=list(t.c.keys()))
        for column in ("config", "params"):
            frame[column] = frame[column].map(json.loads)
        frame["details"] = frame["details"].map(lambda text: json.loads(text) if isinstance(text, str) else None)
        frame["role"] = frame["role"].fillna("search")  # rows of version 3 and older were all search trials
        for column in ("best_epoch", "epochs_run", "trainable_params", "total_params", "skipped_images", "seed"):
            frame[column] = frame[column].astype("Int64")  # nullable: a failed trial has no counts
        for column in ("label_ratio", *METRICS, *names_on_split("test"), "wall_time_s", "startup_s", "train_time_s"):
            frame[column] = frame[column].astype("float64")  # None (no value) becomes NaN, even in an empty frame
        return frame

    def experiments(self) -> list[str]:
        """The experiment names in the store, sorted."""
        with self.engine.connect() as conn:
            return sorted(conn.execute(sa.select(trials_table.c.experiment).distinct()).scalars())

    def count(self) -> int:
        """How many trials the store holds."""
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(trials_table)).scalar() or 0)

    def describe(self) -> str:
        """What the store holds, in words: datasets with their label ratios and methods."""
        with self.engine.connect() as conn:
            t = trials_table
            rows = conn.execute(sa.select(t.c.dataset, t.c.label_ratio, t.c.method).distinct()).all()
        if not rows:
            return "the leaderboard is empty (run `medpeft-ray search` first)"
        parts = []
        for dataset in sorted({r.dataset for r in rows}):
            ratios = ", ".join(f"{r:g}" for r in sorted({r.label_ratio for r in rows if r.dataset == dataset}))
            methods = ", ".join(sorted({r.method for r in rows if r.dataset == dataset}))
            parts.append(f"{dataset} at label ratios {ratios} ({methods})")
        return "the leaderboard has " + "; ".join(parts)


def optuna_storage(url: str) -> "optuna.storages.RDBStorage":
    """Optuna's RDB storage on the leaderboard's database, so optuna-dashboard opens the searches' studies.

    Optuna keeps its own tables (``studies``, ``trials``, ...) beside the leaderboard's.
    """
    import optuna  # the studies' storage only: reading rows does not pay for importing Optuna

    check_database_url(url)
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


# ------------------------------------------------------------------------------------------------
# Upgrades of older schemas: UPGRADES[v] turns version v into v + 1 inside one transaction.
# ------------------------------------------------------------------------------------------------

_V1_TRIALS_TABLE = "trials"


def _upgrade_1_to_2(conn: sa.Connection) -> None:
    """Version 1 kept the rows in ``trials``, which Optuna's storage also uses: rename and index."""
    conn.execute(sa.text(f"ALTER TABLE {_V1_TRIALS_TABLE} RENAME TO {TRIALS_TABLE}"))
    if conn.dialect.name == "postgresql":
        # PostgreSQL keeps the old names of the key and its sequence; Optuna's `trials` would clash with them
        conn.execute(sa.text(f"ALTER TABLE {TRIALS_TABLE} RENAME CONSTRAINT trials_pkey TO {TRIALS_TABLE}_pkey"))
        sequence = conn.execute(sa.text(f"SELECT pg_get_serial_sequence('{TRIALS_TABLE}', 'id')")).scalar()
        if sequence and sequence.split(".")[-1].strip('"') == "trials_id_seq":
            conn.execute(sa.text(f"ALTER SEQUENCE {sequence} RENAME TO {TRIALS_TABLE}_id_seq"))
    for index in _indexes:
        index.create(conn)


def _add_new_columns(conn: sa.Connection) -> None:
    """Adds the columns of :data:`trials_table` an older leaderboard lacks; its rows keep NULL there.

    Version 3 added the pre-trained checkpoint of each trial, version 4 the new metrics, the test
    values, the role, seed, source trial and details (older rows: not known, or search trials),
    version 5 FID (older rows: classification trials, which have none), version 6 the per-image
    predictions' folder (older rows: none kept).
    """
    present = {c["name"] for c in sa.inspect(conn).get_columns(TRIALS_TABLE)}
    for column in trials_table.c:
        if column.name not in present:
            kind = column.type.compile(dialect=conn.dialect)
            conn.execute(sa.text(f'ALTER TABLE {TRIALS_TABLE} ADD COLUMN "{column.name}" {kind}'))


_UPGRADES: dict[int, Callable[[sa.Connection], None]] = {
    1: _upgrade_1_to_2, 2: _add_new_columns, 3: _add_new_columns, 4: _add_new_columns, 5: _add_new_columns,
}


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # pysqlite opens a transaction only before INSERT/UPDATE/DELETE, so a schema upgrade's DDL would
    # run outside it; turning that off and emitting BEGIN ourselves (_sqlite_begin) makes it atomic
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.close()


def _sqlite_begin(conn: sa.Connection) -> None:
    conn.exec_driver_sql(conn.get_execution_options().get("sqlite_begin", "BEGIN"))
