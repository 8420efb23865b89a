"""An empty or comment-only YAML is an error naming the file, never a run with every default."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from medpeft_ray.cli import app
from medpeft_ray.config import load_search_config, load_trial_config
from medpeft_ray.errors import ConfigError

MESSAGE = "no settings: the file is empty or holds only comments"
EMPTY_TEXTS = {
    "empty": "",
    "blank-lines": "\n  \n\n",
    "comments": "# a search space, to be written\n\n   # dataset: {name: nih}\n",
    "document-marker": "---\n# nothing yet\n",
    "null": "~\n",
}


@pytest.fixture(params=sorted(EMPTY_TEXTS))
def empty_yaml(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    path = tmp_path / "empty.yaml"
    path.write_text(EMPTY_TEXTS[request.param])
    return path


@pytest.mark.parametrize("load", [load_search_config, load_trial_config], ids=["search", "trial"])
def test_loading_an_empty_yaml_is_one_line_naming_the_file(empty_yaml: Path, load: Callable[[Path], Any]) -> None:
    with pytest.raises(ConfigError) as info:
        load(empty_yaml)
    assert str(info.value) == f"empty.yaml: {MESSAGE}"
    assert info.value.exit_code == 2


def _no_search(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_runner = types.ModuleType("medpeft_ray.search.runner")
    fake_runner.run_search = lambda *a, **k: pytest.fail("search started")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "medpeft_ray.search.runner", fake_runner)


@pytest.mark.parametrize("command", ["validate --space", "search --space", "train --config", "data check --space"])
def test_cli_refuses_an_empty_yaml_with_exit_2(
    command: str, empty_yaml: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_search(monkeypatch)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*command.split(), str(empty_yaml)])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [f"error: empty.yaml: {MESSAGE}"]
    assert result.stdout == ""
    assert not (tmp_path / "medpeft-results").exists()
