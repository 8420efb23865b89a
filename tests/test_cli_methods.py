"""``medpeft-ray methods --space``: counts what a search file or a grid file configures, before the data is there."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import cli_in_process, tiny_search

from medpeft_ray.methods import method_summaries

BACKBONE = tiny_search()["model"]["backbone"]


def write(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def ham10000_search(tmp_path: Path) -> Path:
    """A HAM10000 search whose dataset folder is not on this machine (yet)."""
    return write(tmp_path / "ham.yaml", tiny_search(
        experiment="ham", dataset={"name": "ham10000", "root": str(tmp_path / "not-downloaded"), "options": {}}))


def lora_count(num_classes: int) -> int:
    (row,) = method_summaries(BACKBONE, num_classes, 32, {"lora": {"rank": 2}})
    return row["trainable_params"]


def test_counts_without_the_dataset_folder_with_the_classes_its_format_fixes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    space = ham10000_search(tmp_path)
    counted = cli_in_process(["methods", "--space", space, "--json"], monkeypatch, capsys)
    assert counted.returncode == 0, counted.stderr
    (row,) = json.loads(counted.stdout)
    # HAM10000's 7 classes size the head, not the default 14
    assert (row["method"], row["num_classes"], row["image_size"]) == ("lora", 7, 32)
    assert row["trainable_params"] == lora_count(7) != lora_count(14)
    assert row["experiments"] == ["ham"]

    table = cli_in_process(["methods", "--space", space], monkeypatch, capsys)
    assert table.returncode == 0, table.stderr
    assert "7 classes of the ham10000 format; options of ham.yaml" in " ".join(table.stdout.split())
    # --num-classes still decides where it is given
    given = cli_in_process(["methods", "--space", space, "--num-classes", "14", "--json"], monkeypatch, capsys)
    assert json.loads(given.stdout)[0]["trainable_params"] == lora_count(14)


def test_the_search_still_refuses_the_missing_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    space = ham10000_search(tmp_path)
    for command in (["validate", "--space", space], ["search", "--space", space],
                    ["search", "--space", space, "--dry-run"]):
        refused = cli_in_process(command, monkeypatch, capsys)
        assert refused.returncode == 2, command
        assert "ham.yaml: dataset.root: directory not found" in refused.stderr, refused.stderr


def test_a_grid_file_counts_each_cells_methods(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "base.yaml", {**tiny_search(), "experiment": "study"})
    space = write(tmp_path / "grid.yaml", {"grid": {"base": "base.yaml", "axes": {
        "data": {"synthetic": {}, "ham": {"dataset": {"_replace": True, "name": "ham10000", "root": "/nowhere/HAM10000",
                                             "label_ratios": [1.0], "image_size": 32}}},
        "method": {"lora": {}, "bitfit": {"method": {"_replace": True, "name": "bitfit"},
                                          "space": {"_replace": True, "lr": {"type": "float", "low": 1e-4,
                                                                            "high": 1e-2, "log": True}}}},
    }}})
    counted = cli_in_process(["methods", "--space", space, "--json"], monkeypatch, capsys)
    assert counted.returncode == 0, counted.stderr
    rows = {(row["num_classes"], row["method"]): row for row in json.loads(counted.stdout)}
    # synthetic's 3 classes (its num_classes option) and HAM10000's 7: one row per method and head
    assert sorted(rows) == [(3, "bitfit"), (3, "lora"), (7, "bitfit"), (7, "lora")]
    assert rows[(7, "lora")]["experiments"] == ["study-ham-lora"]
    assert rows[(3, "bitfit")]["experiments"] == ["study-synthetic-bitfit"]
    assert rows[(7, "lora")]["trainable_params"] == lora_count(7)

    table = cli_in_process(["methods", "--space", space], monkeypatch, capsys)
    assert table.returncode == 0, table.stderr
    text = " ".join(table.stdout.split())
    assert "3 classes of the synthetic format; options of each of the 4 cells of grid.yaml" in text
    assert "7 classes of the ham10000 format; options of each of the 4 cells of grid.yaml" in text


def test_a_format_whose_files_decide_its_classes_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    space = write(tmp_path / "folder.yaml", tiny_search(dataset={"name": "folder", "root": "/nowhere", "options": {}}))
    table = cli_in_process(["methods", "--space", space], monkeypatch, capsys)
    assert table.returncode == 0, table.stderr
    assert ("14 classes by default (the files of a folder dataset decide its classes: give --num-classes)"
            in " ".join(table.stdout.split()))
