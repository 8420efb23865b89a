"""Ray's own messages go to its session log, not a search's terminal, unless asked for (--verbose).

A real search through the CLI checks the same: test_executors_e2e's warm search.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import tiny_search
from typer.testing import CliRunner

from medpeft_ray.cli import app
from medpeft_ray.search import ray_session

TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out."
WORKER_NOTICE = "WARNING: 6 PYTHON worker processes have been started on node: abc with address: 10.0.0.1"
TUNE_WARNING = "No trial is running and no new trial has been started within the last 60 seconds."
#: a line as Ray's loggers write it: "2026-12-01 09:59:35,267\tWARNING authentication_token_setup.py:85 -- ..."
RAY_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+:\d+ -- ",
                          re.MULTILINE)


@dataclass
class Terminal:
    """What reached the terminal through Ray's three ways there, and where the session's logs are."""

    logs: Path  # the fake Ray session's log folder
    log_lines: io.StringIO = field(default_factory=io.StringIO)  # the ``ray`` logger's terminal handler
    shown: list[str] = field(default_factory=list)  # warnings displayed, as "Category: message"
    printed: list[str] = field(default_factory=list)  # the raylet's notices Ray prints to stdout


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Terminal:
    """Ray's driver-side output state, restored after the test, with the terminal replaced by recorders."""
    import ray._private.worker as ray_worker

    seen = Terminal(tmp_path / "session" / "logs")
    seen.logs.mkdir(parents=True)
    monkeypatch.setattr(logging.getLogger("ray"), "handlers", [logging.StreamHandler(seen.log_lines)])
    monkeypatch.setattr(ray_worker, "print_to_stdstream",
                        lambda data, ignore_prefix: seen.printed.extend(data["lines"]))
    monkeypatch.setattr(warnings, "showwarning",
                        lambda message, category, *rest: seen.shown.append(f"{category.__name__}: {message}"))
    monkeypatch.setattr(ray_worker, "_global_node", types.SimpleNamespace(get_logs_dir_path=lambda: str(seen.logs)),
                        raising=False)
    return seen


def fake_init() -> None:
    """What ``ray.init`` says on a local cluster: a notice on the ``ray`` logger and a deprecation."""
    from ray.util.annotations import RayDeprecationWarning

    logging.getLogger("ray._private.authentication.authentication_token_setup").warning(TOKEN_NOTICE)
    warnings.warn("`old_api` is deprecated", RayDeprecationWarning, stacklevel=1)


def later_in_the_search() -> None:
    """What Ray says while trials run: the raylet's worker-count notice, a Tune warning."""
    import ray._private.worker as ray_worker

    ray_worker.print_to_stdstream({"lines": [WORKER_NOTICE], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    logging.getLogger("ray.tune.execution.insufficient_resources_manager").warning(TUNE_WARNING)


def test_ray_messages_go_to_the_session_log(terminal: Terminal) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        ray_session.start_ray(fake_init, verbose=False)
        later_in_the_search()
        warnings.warn("a warning of our own", UserWarning, stacklevel=1)  # not Ray's: still shown
    assert terminal.log_lines.getvalue() == "" and terminal.printed == []
    assert terminal.shown == ["UserWarning: a warning of our own"]
    log = (terminal.logs / "medpeft-driver.log").read_text()
    for text in (TOKEN_NOTICE, f"(raylet) {WORKER_NOTICE}", TUNE_WARNING,
                 "RayDeprecationWarning: `old_api` is deprecated"):
        assert text in log, log
    assert "a warning of our own" not in log


def test_verbose_leaves_ray_messages_on_the_terminal(terminal: Terminal) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        ray_session.start_ray(fake_init, verbose=True)
        later_in_the_search()
    assert TOKEN_NOTICE in terminal.log_lines.getvalue() and TUNE_WARNING in terminal.log_lines.getvalue()
    assert terminal.printed == [WORKER_NOTICE]
    assert terminal.shown == ["RayDeprecationWarning: `old_api` is deprecated"]
    assert not (terminal.logs / "medpeft-driver.log").exists()


def test_a_failed_start_shows_what_ray_said_and_restores_the_terminal(terminal: Terminal) -> None:
    def failing_init() -> None:
        logging.getLogger("ray").warning("could not reach the GCS")
        raise ConnectionError("no cluster")

    show = warnings.showwarning
    with pytest.raises(ConnectionError):
        ray_session.start_ray(failing_init, verbose=False)
    assert "could not reach the GCS" in terminal.log_lines.getvalue()
    assert warnings.showwarning is show
    later_in_the_search()
    assert TUNE_WARNING in terminal.log_lines.getvalue() and terminal.printed == [WORKER_NOTICE]


def test_without_a_session_folder_the_search_goes_on(terminal: Terminal, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray._private.worker as ray_worker

    monkeypatch.setattr(ray_worker, "_global_node", None)
    ray_session.start_ray(lambda: logging.getLogger("ray").warning(TOKEN_NOTICE), verbose=False)
    assert TOKEN_NOTICE in terminal.log_lines.getvalue()


@pytest.mark.parametrize(("args", "expected"), [([], None), (["--verbose"], "1"), (["-v"], "1")])
def test_search_verbose_asks_for_worker_logs(
    args: list[str], expected: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MEDPEFT_WORKER_LOGS", raising=False)
    seen: list[str | None] = []

    def run_search(*args: object, **kwargs: object) -> None:
        seen.append(os.environ.get("MEDPEFT_WORKER_LOGS"))
        sys.exit(0)  # no search, no summary to print

    fake_runner = types.ModuleType("medpeft_ray.search.runner")
    fake_runner.run_search = run_search  # type: ignore[attr-defined]
    fake_runner.resumable_config = None  # type: ignore[attr-defined]
    fake_runner.run_grid = None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "medpeft_ray.search.runner", fake_runner)
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(tiny_search()))
    result = CliRunner().invoke(app, ["search", "--space", str(space), *args])
    assert result.exit_code == 0, result.output
    assert seen == [expected]
