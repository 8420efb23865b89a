"""OS-level failures (a full disk) end the CLI with one line naming the file, not a traceback."""

from __future__ import annotations

import errno
import sys

import pytest

import medpeft_ray.cli as cli


def test_full_disk_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/results/leaderboard.db")

    import medpeft_ray.search.runner as runner

    monkeypatch.setattr(runner, "run_search", full_disk)
    monkeypatch.setattr(sys, "argv", ["medpeft-ray", "search", "--space", "search_spaces/lora.yaml"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: /results/leaderboard.db: No space left on device"
    assert "Traceback" not in err


def test_bad_arguments_exit_2(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from medpeft_ray.leaderboard import LeaderboardStore

    LeaderboardStore(f"sqlite:///{tmp_path / 'leaderboard.db'}")
    runner = CliRunner()
    sort = runner.invoke(cli.app, ["leaderboard", "--results", str(tmp_path), "--sort", "bogus"])
    assert sort.exit_code == 2 and "cannot sort by 'bogus'" in sort.output
    option = runner.invoke(cli.app, ["data", "check", "--dataset", "synthetic", "-o", "oops"])
    assert option.exit_code == 2 and "--option 'oops': expected key=value" in option.output
