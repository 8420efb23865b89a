"""Grid files: a study's experiment grid as one command, every cell validated before any runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import cli_in_process, shipped_presets_in, tiny_search

from medpeft_ray.config.grid import deep_merge, load_grid
from medpeft_ray.errors import ConfigError


def write(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def grid_files(tmp_path: Path, axes: dict) -> Path:
    write(tmp_path / "base.yaml", {**tiny_search(), "experiment": "study"})
    return write(tmp_path / "grid.yaml", {"grid": {"base": "base.yaml", "axes": axes}})


def test_deep_merge_merges_mappings_and_replaces_the_rest() -> None:
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 2}
    assert deep_merge(base, {"a": {"y": [3]}, "c": 4}) == {"a": {"x": 1, "y": [3]}, "b": 2, "c": 4}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 2}  # the base is not changed
    # _replace: the override's mapping instead of a merge (a full cell drops LoRA's options)
    assert deep_merge(base, {"a": {"_replace": True, "z": 0}}) == {"a": {"z": 0}, "b": 2}


def test_every_combination_is_one_named_validated_search(tmp_path: Path) -> None:
    path = grid_files(tmp_path, {
        "ratio": {"small": {"dataset": {"label_ratios": [0.5]}}, "all": {"dataset": {"label_ratios": [1.0]}}},
        "method": {"lora": {"method": {"name": "lora"}}, "bitfit": {"method": {"_replace": True, "name": "bitfit"},
                                                      "space": {"_replace": True, "lr": {"type": "float", "low": 1e-4,
                                                                                        "high": 1e-2, "log": True}}}},
    })
    cells = load_grid(path)
    assert [c.entries for c in cells] == [("small", "lora"), ("small", "bitfit"), ("all", "lora"), ("all", "bitfit")]
    assert [c.config.experiment_name for c in cells] == ["study-small-lora", "study-small-bitfit", "study-all-lora",
                                                          "study-all-bitfit"]
    assert cells[1].config.method.names == ["bitfit"] and cells[2].config.dataset.label_ratios == [1.0]
    # what the base sets and no axis overrides is in every cell
    assert {c.config.model.backbone for c in cells} == {tiny_search()["model"]["backbone"]}


def test_a_bad_key_in_one_cell_names_the_grid_file_the_cell_and_the_key(tmp_path: Path) -> None:
    path = grid_files(tmp_path, {"method": {"lora": {"method": {"name": "lora"}},
                                            "typo": {"method": {"name": "lorra"}}}})
    with pytest.raises(ConfigError, match=r"grid.yaml \(cell typo\).*method.name.*unknown method 'lorra'"):
        load_grid(path)


def test_grid_file_errors_are_one_line(tmp_path: Path) -> None:
    path = write(tmp_path / "grid.yaml", {"grid": {"base": "missing.yaml", "axes": {"a": {"x": {}}}}})
    with pytest.raises(ConfigError, match="grid.base: file not found"):
        load_grid(path)
    write(tmp_path / "grid.yaml", {"grid": {"base": "b.yaml", "axis": {}}})
    with pytest.raises(ConfigError, match=r"grid.axes: required key is missing"):
        load_grid(path)
    write(tmp_path / "grid.yaml", {"grid": {"base": "b.yaml", "axes": {"a": {"x": {}}}}, "train": {}})
    with pytest.raises(ConfigError, match="train: a grid file holds only `grid`"):
        load_grid(path)


def test_the_studies_grids_are_one_validated_command_each(tmp_path: Path) -> None:
    """MED-PEFT's grid (2 models x 3 datasets x LoRA/full, each with the 1/10/100% studies and their
    epoch budgets) and Dutt et al.'s (datasets x backbones x methods, lr only, F1, 3 seeds)."""
    spaces = shipped_presets_in(tmp_path)
    medpeft = load_grid(spaces / "medpeft_grid.yaml")
    assert len(medpeft) == 12
    for cell in medpeft:
        model, dataset, method = cell.entries
        config = cell.config
        assert config.dataset.label_ratios == [0.01, 0.1, 1.0] and config.method.names == [method]
        assert [config.search_space.trial_config(r, {}).train.epochs for r in (0.01, 0.1, 1.0)] == [400, 200, 100]
        assert config.dataset.name == dataset and config.train.optimizer == ("sgd" if model == "mrm" else "adamw")
        assert config.method.options_for(method) == ({} if method == "full" else
                                                     {"targets": ["q", "v"], "alpha": 32, "dropout": 0.1})
    vit, cnn = load_grid(spaces / "dutt_vit_grid.yaml"), load_grid(spaces / "dutt_cnn_grid.yaml")
    assert (len(vit), len(cnn)) == (5 * 5 * 8, 5 * 6)
    for cell in vit + cnn:
        config = cell.config
        assert list(config.search_space.distributions) == ["lr"]  # the protocol searches the lr only
        assert config.search.metric == "val_f1" and config.search.confirm.seeds == 3
        assert config.train.optimizer == "adamw"
    assert {c.config.dataset.name for c in cnn} == {"busi", "fitzpatrick17k", "ham10000", "smdg", "rsna"}


@pytest.mark.ray
@pytest.mark.slow
def test_a_grid_runs_its_searches_on_one_set_of_executors_with_per_ratio_budgets(
    tmp_path: Path, ray_session: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two cells (LoRA, BitFit), each with two label-ratio studies whose epoch budgets differ: one
    command, the executors set up once, every trial in one leaderboard with its study's budget."""
    import json

    from medpeft_ray.search.pools import release_executors

    release_executors()  # the grid's first cell starts its own executors, the second finds them warm
    base = tiny_search(dataset={"label_ratios": [0.5, 1.0]}, train={"epochs": {0.5: 2, 1.0: 1}},
                       search={"num_samples": 1})
    write(tmp_path / "base.yaml", {**base, "experiment": "cells"})
    write(tmp_path / "grid.yaml", {"grid": {"base": "base.yaml", "axes": {"method": {
        "lora": {},
        "bitfit": {"method": {"_replace": True, "name": "bitfit"}},
    }}}})
    results = str(tmp_path / "results")
    run = cli_in_process(["search", "--space", "grid.yaml", "--results", results], monkeypatch, capsys, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "grid cell lora (1 of 2)" in run.stdout and "grid cell bitfit (2 of 2)" in run.stdout
    # set up once, for both cells: the second cell found the first one's executors warm
    assert run.stdout.count("executor(s) ready") == 2, run.stdout[-3000:]
    assert run.stdout.count("kept warm from this process's last search") == 1, run.stdout[-3000:]
    board = cli_in_process(["leaderboard", "--results", results, "--format", "json"], monkeypatch, capsys)
    rows = json.loads(board.stdout)
    assert sorted((r["experiment"], r["label_ratio"]) for r in rows) == [
        ("cells-bitfit", 0.5), ("cells-bitfit", 1.0), ("cells-lora", 0.5), ("cells-lora", 1.0)]
    for row in rows:
        assert row["status"] == "completed", row["error"]
        assert row["epochs_run"] == {0.5: 2, 1.0: 1}[row["label_ratio"]]  # each study's own budget
        assert row["config"]["train"]["epochs"] == row["epochs_run"]
        assert row["method"] == row["experiment"].removeprefix("cells-")
