"""Database URLs as README shows them: each driver form against the real PostgreSQL, and a URL
whose driver is not installed (or that is no URL) stops with one line and exit code 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import PG_ADDRESS, leaderboard_row, schema_tables, tiny_search
from typer.testing import CliRunner

from medpeft_ray.cli import app
from medpeft_ray.errors import UsageError
from medpeft_ray.leaderboard import LeaderboardStore, optuna_storage
from medpeft_ray.leaderboard.store import check_database_url

HOST = f"{PG_ADDRESS[0]}:{PG_ADDRESS[1]}"
#: README's URL forms: plain postgresql:// is psycopg 3 under SQLAlchemy 2.1
README_URLS = [f"postgresql://postgres@{HOST}/test", f"postgresql+psycopg2://postgres@{HOST}/test",
               f"postgresql+psycopg://postgres@{HOST}/test", f"postgresql://postgres:s3cret@{HOST}/test"]


def cli(*args: Any) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("url", README_URLS, ids=["plain", "psycopg2", "psycopg", "password"])
def test_readme_url_forms_on_postgresql(url: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import optuna

    # the URL exactly as README writes it; libpq's PGOPTIONS puts its tables in this test's own schema
    monkeypatch.setenv("PGOPTIONS", f"-csearch_path={pg_schema}")
    store = LeaderboardStore(url)
    assert "s3cret" not in store.label
    store.record(leaderboard_row("t1", "lora", 0.1, 0.8, checkpoint_file="/w/mae.pth", checkpoint_sha256="ab" * 32))
    store.engine.dispose()
    study = optuna.create_study(study_name="s", storage=optuna_storage(url), direction="maximize")
    study.tell(study.ask(), 0.8)

    board = cli("leaderboard", "--db", url, "--format", "json")
    assert board.exit_code == 0, board.output
    assert '"checkpoint_sha256": "' + "ab" * 32 in board.output and '"trial_id": "t1"' in board.output
    assert optuna.load_study(study_name="s", storage=optuna_storage(url)).best_value == 0.8
    assert {"medpeft_trials", "medpeft_schema", "studies", "trials"} <= schema_tables(url, pg_schema)


MISSING_DRIVER = [
    ("psycopg", "postgresql://user:pw@db-host/medpeft",
     "postgresql://user:***@db-host/medpeft: the database driver 'psycopg' that postgresql:// URLs use is not "
     "installed; pip install 'medpeft-ray[postgres]' (or 'psycopg[binary]')"),
    ("psycopg", "postgresql+psycopg://user@db-host/medpeft",
     "postgresql+psycopg://user@db-host/medpeft: the database driver 'psycopg' that postgresql+psycopg:// URLs use "
     "is not installed; pip install 'medpeft-ray[postgres]' (or 'psycopg[binary]')"),
    ("psycopg2", "postgresql+psycopg2://user@db-host/medpeft",
     "postgresql+psycopg2://user@db-host/medpeft: the database driver 'psycopg2' that postgresql+psycopg2:// URLs "
     "use is not installed; pip install 'medpeft-ray[postgres]' (or psycopg2-binary)"),
]


@pytest.mark.parametrize(("module", "url", "message"), MISSING_DRIVER, ids=["plain", "psycopg", "psycopg2"])
def test_a_driver_that_is_not_installed_is_one_line_exit_2(
    module: str, url: str, message: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # `import psycopg` now fails as if it were not installed
    with pytest.raises(UsageError) as info:
        LeaderboardStore(url)
    assert str(info.value) == message and info.value.exit_code == 2
    with pytest.raises(UsageError):
        optuna_storage(url)
    for command in (["leaderboard", "--db", url], ["best", "--dataset", "nih", "--label-ratio", "0.1", "--db", url]):
        result = cli(*command)
        assert result.exit_code == 2 and result.output.strip() == f"error: {message}", result.output


def test_a_search_with_a_missing_driver_stops_before_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          ray_starts: list[str | None]) -> None:
    import yaml

    monkeypatch.setitem(sys.modules, "psycopg", None)
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(tiny_search()))
    url = "postgresql://u@db-host/medpeft"
    result = cli("search", "--space", space, "--results", tmp_path / "results", "--db", url)
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "the database driver 'psycopg' that postgresql:// URLs use is not installed" in result.output
    assert not ray_starts


@pytest.mark.parametrize(("url", "message"), [
    ("postgres-ql://u@h/db", "postgres-ql://u@h/db: not a database URL (e.g. sqlite:///path/leaderboard.db or "
                             "postgresql://user:password@host/db)"),
    ("postgresql://u:pw@h:port/db", "postgresql://u:***@h:port/db: not a database URL (e.g. "),
    ("mongodb://u@h/db", "mongodb://u@h/db: SQLAlchemy knows no database type 'mongodb' (e.g. "),
    ("mysql://u@h/db", "mysql://u@h/db: the database driver 'MySQLdb' that mysql:// URLs use is not installed; "
                       "pip install mysqlclient"),
])
def test_urls_that_cannot_work_are_one_line(url: str, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "MySQLdb", None)
    with pytest.raises(UsageError) as info:
        check_database_url(url)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    result = cli("leaderboard", "--db", url)
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
