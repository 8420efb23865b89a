"""The results store: one row per trial (its best epoch), in SQLite or any SQLAlchemy database.

Rows are keyed by (experiment, trial_id), so re-recording a trial (a resumed search) updates it
instead of duplicating it. Writes are single transactions: an interrupted write leaves no half
row. SQLite runs in WAL mode with a busy timeout so several processes can write one file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Literal

import sqlalchemy as sa
from sqlalchemy.exc import DatabaseError, OperationalError

from medpeft_ray.errors import MedpeftError, UsageError

SCHEMA_VERSION = 1
DEFAULT_RESULTS_DIR = "medpeft-results"
Status = Literal["completed", "stopped", "failed"]

_metadata = sa.MetaData()

trials_table = sa.Table(
    "trials",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("experiment", sa.String(200), nullable=False),
    sa.Column("trial_id", sa.String(100), nullable=False),
    sa.Column("dataset", sa.String(100), nullable=False),
    sa.Column("label_ratio", sa.Float, nullable=False),
    sa.Column("method", sa.String(100), nullable=False),
    sa.Column("backbone", sa.String(200), nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("val_auroc", sa.Float),
    sa.Column("val_loss", sa.Float),
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
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.UniqueConstraint("experiment", "trial_id", name="uq_trial"),
)

schema_table = sa.Table(
    "medpeft_schema",
    _metadata,
    sa.Column("version", sa.Integer, primary_key=True),
)


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


def results_dir(path: str | Path | None = None) -> Path:
    """The results store folder: ``path``, else ``$MEDPEFT_RESULTS``, else ``./medpeft-results``."""
    return Path(path or os.environ.get("MEDPEFT_RESULTS") or DEFAULT_RESULTS_DIR).expanduser().resolve()


def default_db_url(results: str | Path | None = None) -> str:
    """``$MEDPEFT_DB`` if set, else the SQLite file ``leaderboard.db`` in the results folder."""
    return os.environ.get("MEDPEFT_DB") or f"sqlite:///{results_dir(results) / 'leaderboard.db'}"


def _clean(value: Any) -> Any:
    """NaN/inf become NULL: a trial that never produced a metric has none, not a fake number."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class LeaderboardStore:
    """Reads and writes the ``trials`` table of one database."""

    def __init__(self, url: str, create: bool = True) -> None:
        self.url = url
        self._label = url.split("///", 1)[-1] if url.startswith("sqlite") else sa.make_url(url).render_as_string()
        if url.startswith("sqlite:///"):
            path = Path(url.removeprefix("sqlite:///"))
            if not create and not path.exists():
                raise MedpeftError(f"{path}: no leaderboard here yet (run `medpeft-ray search` first)")
            path.parent.mkdir(parents=True, exist_ok=True)
            self.engine = sa.create_engine(url, connect_args={"timeout": 60})
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = sa.create_engine(url, pool_pre_ping=True)
        self._check_schema(create)

    def _check_schema(self, create: bool) -> None:
        try:
            with self._creation_lock(), self.engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    # two processes opening a new database must not both create the tables
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(7346001)"))
                names = set(sa.inspect(conn).get_table_names())
                if "trials" in names and "medpeft_schema" not in names:
                    raise MedpeftError(f"{self._label}: has a 'trials' table that is not a medpeft leaderboard")
                if "medpeft_schema" in names:
                    version = conn.execute(sa.select(sa.func.max(schema_table.c.version))).scalar()
                    if version != SCHEMA_VERSION:
                        raise MedpeftError(
                            f"{self._label}: leaderboard schema version {version}, this medpeft-ray reads "
                            f"version {SCHEMA_VERSION}; use a matching medpeft-ray or a new --results folder"
                        )
                elif create:
                    _metadata.create_all(conn)
                    conn.execute(schema_table.insert().values(version=SCHEMA_VERSION))
                else:
                    raise MedpeftError(f"{self._label}: no leaderboard here yet (run `medpeft-ray search` first)")
        except (DatabaseError, OperationalError) as exc:
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
            raise MedpeftError(f"{self._label}: not a usable leaderboard database ({reason})") from None

    @contextlib.contextmanager
    def _creation_lock(self) -> Iterator[None]:
        """Serialises check-and-create of a SQLite file across processes (its DDL is not transactional)."""
        if not self.url.startswith("sqlite:///"):
            yield
            return
        import fcntl

        lock_path = Path(self.url.removeprefix("sqlite:///") + ".lock")
        with open(lock_path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def record(self, row: TrialRecord) -> None:
        """Inserts the trial's row, or replaces it if the (experiment, trial_id) pair exists."""
        values = {k: _clean(v) for k, v in asdict(row).items()}
        values["config"] = json.dumps(row.config, sort_keys=True, default=str)
        values["params"] = json.dumps(row.params, sort_keys=True, default=str)
        values["created_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        key = (trials_table.c.experiment == row.experiment) & (trials_table.c.trial_id == row.trial_id)
        with self.engine.begin() as conn:
            if conn.execute(sa.select(trials_table.c.id).where(key)).first() is None:
                conn.execute(trials_table.insert().values(**values))
            else:
                conn.execute(trials_table.update().where(key).values(**values))

    def query(
        self,
        *,
        experiment: str | None = None,
        dataset: str | None = None,
        label_ratio: float | None = None,
        method: str | None = None,
        backbone: str | None = None,
        status: str | None = None,
        metric: str = "val_auroc",
        ascending: bool = False,
        top: int | None = None,
    ) -> "Any":
        """Matching rows as a pandas DataFrame, best ``metric`` first (trials without it last)."""
        import pandas as pd

        if metric not in trials_table.c:
            raise UsageError(f"cannot sort by {metric!r}; columns: {', '.join(trials_table.c.keys())}")
        t = trials_table
        query = sa.select(t)
        filters = {"experiment": experiment, "dataset": dataset, "method": method, "backbone": backbone, "status": status}
        for column, value in filters.items():
            if value is not None:
                query = query.where(t.c[column] == value)
        if label_ratio is not None:
            query = query.where(sa.func.abs(t.c.label_ratio - label_ratio) < 1e-9)
        order = t.c[metric].asc() if ascending else t.c[metric].desc()
        query = query.order_by(t.c[metric].is_(None), order, t.c.id)
        if top is not None:
            query = query.limit(top)
        with self.engine.connect() as conn:
            frame = pd.DataFrame(conn.execute(query).mappings().all(), columns=list(t.c.keys()))
        for column in ("config", "params"):
            frame[column] = frame[column].map(json.loads)
        for column in ("best_epoch", "epochs_run", "trainable_params", "total_params", "skipped_images"):
            frame[column] = frame[column].astype("Int64")  # nullable: a failed trial has no counts
        return frame


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.close()
