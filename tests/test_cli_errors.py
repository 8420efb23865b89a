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
