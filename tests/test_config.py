"""The search-space YAML: loading, validation messages, defaults and trial configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from conftest import load_shipped_space

from medpeft_ray.config import (
    METHOD_PARAM,
    SEARCHABLE_TRAIN_FIELDS,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    TrialConfig,
    load_search_config,
    validate_search_dict,
)
from medpeft_ray.data.registry import get_dataset, list_datasets
from medpeft_ray.errors import ConfigError, MedpeftError
from medpeft_ray.methods.registry import get_method, list_methods

REPO = Path(__file__).resolve().parents[1]
SPACES = REPO / "search_spaces"
LORA_YAML = SPACES / "lora.yaml"
#: the shipped search files (grid files, which name several searches, are tested in test_grid.py)
ALL_SPACES = [p for p in sorted(SPACES.glob("*.yaml")) + sorted(SPACES.glob("*.yml"))
              if "grid" not in yaml.safe_load(p.read_text())]


def lora_dict() -> dict[str, Any]:
    return yaml.safe_load(LORA_YAML.read_text())


def write_yaml(tmp_path: Path, data: Any, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _value(dist: Any, which: str) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[0] if which == "low" else dist.choices[-1]
    return dist.low if which == "low" else dist.high


# ----------------------------------------------------------------------------------------------
# Every shipped search space
# ----------------------------------------------------------------------------------------------


def test_search_spaces_exist() -> None:
    assert ALL_SPACES, f"no search-space YAML in {SPACES}"


@pytest.mark.parametrize("path", ALL_SPACES, ids=[p.name for p in ALL_SPACES])
@pytest.mark.parametrize("which", ["low", "high"])
def test_shipped_space_loads_and_builds_trials(path: Path, which: str, tmp_path: Path) -> None:
    config = load_shipped_space(path, tmp_path)
    assert config.experiment == yaml.safe_load(path.read_text())["experiment"]
    dists = config.distributions()
    assert dists, "a search must search something"
    assert config.experiment
    for name in dists:  # a method option or a train field (of the method it is scoped to, with several)
        scope, field = config.split_param(name)
        if name != METHOD_PARAM:
            method = scope or config.method.names[0]
            assert field in set(get_method(method).options.model_fields) | set(SEARCHABLE_TRAIN_FIELDS), name
    sampled = {name: _value(dist, which) for name, dist in dists.items()}
    for ratio in config.dataset.label_ratios:
        trial = config.trial_config(ratio, sampled)
        assert isinstance(trial, TrialConfig)
        # What a worker receives must survive the JSON round trip the leaderboard does.
        again = TrialConfig.model_validate_json(trial.model_dump_json())
        assert again == TrialConfig.model_validate(trial.model_dump())
        assert trial.label_ratio == ratio
        assert trial.dataset.label_ratios == [ratio]
        assert trial.experiment == config.experiment
        for name, value in sampled.items():
            scope, field = config.split_param(name)
            if name == METHOD_PARAM:
                assert trial.method.name == value
                continue
            if scope not in (None, trial.method.name):
                continue  # another method's parameter
            where = trial.train.model_dump() if field in SEARCHABLE_TRAIN_FIELDS else trial.method.options
            assert where[field] == value, name
        # The method options a trial carries validate against the method's schema.
        get_method(trial.method.name).options.model_validate(trial.method.options)


def test_lora_yaml_contents() -> None:
    config = load_search_config(LORA_YAML)
    assert config.experiment == "lora-synthetic"
    assert config.method.name == "lora"
    assert config.dataset.label_ratios == [0.25, 1.0]
    dists = config.distributions()
    assert list(dists) == ["lr", "rank"]
    assert isinstance(dists["lr"], FloatDistribution) and dists["lr"].log
    assert isinstance(dists["rank"], CategoricalDistribution) and dists["rank"].choices == [4, 8, 16]
    assert config.search.resolved_mode == "max"


def test_the_metric_sets_the_direction_everywhere() -> None:
    """One definition of "best": the search's mode, the store's sort order and the views' ranking."""
    from medpeft_ray.config import SearchSettings
    from medpeft_ray.leaderboard import views
    from medpeft_ray.leaderboard.store import lower_is_better
    from medpeft_ray.metrics import METRICS

    for metric, direction in ((m.name, m.direction) for m in METRICS.values()):
        assert SearchSettings(metric=metric).resolved_mode == direction
        assert SearchSettings(metric=metric, mode=direction).resolved_mode == direction
        assert views.metric_mode(metric) == direction
        assert lower_is_better(metric) == (direction == "min")
    assert SearchSettings(metric="val_loss").objectives == (["val_loss"], ["min"])


# ----------------------------------------------------------------------------------------------
# Bad configs: one line naming the file, the key and the problem
# ----------------------------------------------------------------------------------------------

Mutation = Callable[[dict, Path], Any]


def _set(*keys: str, value: Any) -> Mutation:
    def mutate(d: dict, _tmp: Path) -> None:
        node = d
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value

    return mutate


def _rename_top(old: str, new: str) -> Mutation:
    def mutate(d: dict, _tmp: Path) -> None:
        d[new] = d.pop(old)

    return mutate


def _folder_without_root(d: dict, _tmp: Path) -> None:
    d["dataset"]["name"] = "folder"
    d["dataset"].pop("options")


def _folder_with_synthetic_options(d: dict, tmp: Path) -> None:
    d["dataset"]["name"] = "folder"
    d["dataset"]["root"] = str(tmp)


def _missing_root(d: dict, tmp: Path) -> None:
    d["dataset"]["root"] = str(tmp / "no-such-dir")


def _missing_checkpoint(d: dict, tmp: Path) -> None:
    d["model"]["checkpoint"] = str(tmp / "weights.pth")


def _rank_both(d: dict, _tmp: Path) -> None:
    d["method"]["options"]["rank"] = 8


def _searched_target_sets(d: dict, _tmp: Path) -> None:
    del d["method"]["options"]["targets"]
    d["space"]["targets"] = {"type": "categorical", "choices": ["q,v", "q,x"]}


def _indivisible_batch(d: dict, _tmp: Path) -> None:
    d["train"]["batch_size"] = 30
    d["resources"]["workers_per_trial"] = 4


def _resnet_with_vit_targets(d: dict, _tmp: Path) -> None:
    d["model"]["backbone"] = "resnet50"
    d["method"]["options"]["targets"] = ["q", "v"]


def _vpt_on_resnet(d: dict, _tmp: Path) -> None:
    d["model"]["backbone"] = "resnet50"
    d["method"] = {"name": "vpt_deep"}


def _fp16_on_cpu(d: dict, _tmp: Path) -> None:
    d["train"]["precision"] = "fp16"
    d["resources"]["gpus_per_worker"] = 0


BAD_CASES: list[tuple[str, Mutation, str, str]] = [
    # (id, mutation, key path, message fragment)
    ("rank-int-low-0", _set("space", "rank", value={"type": "int", "low": 0, "high": 8}),
     "space.rank.low", "must be >= 1 (got 0)"),
    ("top-level-typo", _rename_top("dataset", "datset"),
     "datset", "unknown key (did you mean 'dataset'?); known: dataset, experiment, method, model, resources, "
     "search, space, task, tracking, train"),
    ("nested-typo", _set("train", "deepspeed", "zero_stag", value=1),
     "train.deepspeed.zero_stag", "unknown key (did you mean 'zero_stage'?)"),
    ("method-option-typo", _set("method", "options", "alpah", value=3),
     "method.options.alpah", "unknown key (did you mean 'alpha'?)"),
    ("method-option-negative", _set("method", "options", "rank", value=-1),
     "method.options.rank", "must be >= 1 (got -1)"),
    ("method-option-target", _set("method", "options", "targets", value=["qkvv"]),
     "method.options.targets", "unknown 'qkvv'; choose among q, k, v, proj, fc1, fc2"),
    ("method-option-block-set", _set("method", "options", "blocks", value="last4"),
     "method.options.blocks", "'last4' is not a block set: use all, first:K, last:K, every:K or indices"),
    ("target-for-other-family", _resnet_with_vit_targets,
     "method.options.targets", "unknown 'q', 'v'; choose among conv1, conv2, conv3, downsample"),
    ("searched-target-set", _searched_target_sets,
     "space.targets.choices.1", "unknown 'x'; choose among q, k, v, proj, fc1, fc2"),
    ("unknown-method", _set("method", "name", value="lorra"),
     "method.name", "unknown method 'lorra'; known: "),
    ("method-not-for-family", _vpt_on_resnet,
     "method.name", "'vpt_deep' does not apply to resnet backbones like 'resnet50' (it applies to: vit)"),
    ("unknown-dataset", _set("dataset", "name", value="nihh"),
     "dataset.name", "unknown dataset 'nihh'; known: "),
    ("folder-without-root", _folder_without_root,
     "dataset.root", "required for dataset 'folder'"),
    ("folder-with-synthetic-options", _folder_with_synthetic_options,
     "dataset.options.num_classes", "unknown key"),
    ("dataset-option-typo", _set("dataset", "options", "num_clases", value=3),
     "dataset.options.num_clases", "unknown key (did you mean 'num_classes'?)"),
    ("root-not-found", _missing_root, "dataset.root", "directory not found: "),
    ("checkpoint-not-found", _missing_checkpoint, "model.checkpoint", "file not found: "),
    ("space-unknown-param", _set("space", "rnak", value={"type": "int", "low": 1, "high": 8}),
     "space.rnak", "not a searchable parameter (did you mean 'rank'?); searchable: alpha, batch_size,"),
    ("space-not-a-mapping", _set("space", "lr", value=0.01),
     "space.lr", "must be a mapping"),
    ("space-bad-type", _set("space", "lr", value={"type": "normal", "low": 1, "high": 2}),
     "space.lr.type", "must be one of float, int, categorical, got 'normal'"),
    ("space-dist-typo", _set("space", "lr", value={"type": "float", "low": 1e-3, "high": 1e-2, "steps": 1e-3}),
     "space.lr.steps", "unknown key (did you mean 'step'?); known: high, log, low, step, type"),
    ("log-low-0", _set("space", "lr", value={"type": "float", "low": 0.0, "high": 1e-2, "log": True}),
     "space.lr.low", "must be > 0 for a log-scale distribution"),
    ("high-below-low", _set("space", "lr", value={"type": "float", "low": 1e-2, "high": 1e-3}),
     "space.lr.high", "must be >= low (0.01)"),
    ("bound-outside-field", _set("space", "lr", value={"type": "float", "low": -1.0, "high": 1e-2}),
     "space.lr.low", "must be > 0"),
    ("choice-outside-field", _set("space", "drop_path", value={"type": "categorical", "choices": [0.1, 1.0]}),
     "space.drop_path.choices.1", "must be < 1"),
    ("int-log-step", _set("space", "rank", value={"type": "int", "low": 1, "high": 16, "log": True, "step": 2}),
     "space.rank.step", "must be 1 for a log-scale int distribution"),
    ("choice-is-list", _set("space", "rank", value={"type": "categorical", "choices": [[1, 2]]}),
     "space.rank.choices", "choices must be numbers, strings, booleans or null"),
    ("searched-and-fixed", _rank_both,
     "space.rank", "also fixed in method.options.rank; search it or fix it, not both"),
    ("epochs-per-ratio-missing", _set("train", "epochs", value={0.25: 4}),
     "train.epochs", "no epochs for label ratio 1 (dataset.label_ratios: 0.25, 1)"),
    ("epochs-per-ratio-extra", _set("train", "epochs", value={0.25: 4, 1.0: 2, 0.01: 8}),
     "train.epochs", "label ratio 0.01 is not searched (dataset.label_ratios: 0.25, 1)"),
    ("epochs-per-ratio-zero", _set("train", "epochs", value={0.25: 4, 1.0: 0}),
     "train.epochs", "must be >= 1 (got 0 for label ratio 1)"),
    ("label-ratio-zero", _set("dataset", "label_ratios", value=[0.0, 1.0]),
     "dataset.label_ratios", "every label ratio must be in (0, 1], got 0.0"),
    ("label-ratio-above-1", _set("dataset", "label_ratios", value=[0.5, 1.5]),
     "dataset.label_ratios", "every label ratio must be in (0, 1], got 1.5"),
    ("label-ratio-duplicate", _set("dataset", "label_ratios", value=[0.5, 0.5]),
     "dataset.label_ratios", "label ratios must be distinct"),
    ("label-ratios-empty", _set("dataset", "label_ratios", value=[]),
     "dataset.label_ratios", "must have at least 1 item(s)"),
    ("image-size", _set("dataset", "image_size", value=8),
     "dataset.image_size", "must be >= 16 (got 8)"),
    ("batch-indivisible", _indivisible_batch,
     "train.batch_size", "30 is not divisible by resources.workers_per_trial x "
     "train.deepspeed.gradient_accumulation_steps (4)"),
    ("epochs-not-int", _set("train", "epochs", value="three"),
     "train.epochs", "must be an integer, or a mapping of label ratio to epochs (got 'three')"),
    ("min-lr-above-lr", _set("train", "min_lr", value=1.0),
     "train", "min_lr (1.0) must not exceed lr"),
    ("fp16-on-cpu", _fp16_on_cpu, "train.precision", "fp16 needs GPUs"),
    ("unknown-sampler", _set("search", "sampler", value="bohb"),
     "search.sampler", "must be one of 'tpe', 'random', 'cmaes', 'gp' or 'grid' (got 'bohb')"),
    ("grid-over-a-continuous-range", _set("search", "sampler", value="grid"),
     "space.lr", "a grid needs listed values"),
    ("reduction-factor", _set("search", "scheduler", "reduction_factor", value=1),
     "search.scheduler.reduction_factor", "must be > 1"),
    ("mode-against-the-metric", _set("search", "mode", value="min"),
     "search.mode", "val_auroc is maximised (mode max); got min"),
    ("unsupported-backbone", _set("model", "backbone", value="efficientnet_b0"),
     "model.backbone", "'efficientnet_b0' is not a supported timm ViT"),
    ("gpus-fractional-above-1", _set("resources", "gpus_per_worker", value=1.5),
     "resources.gpus_per_worker", "must be 'auto', a fraction in [0, 1] or a whole number of GPUs"),
    ("gpus-negative", _set("resources", "gpus_per_worker", value=-1),
     "resources.gpus_per_worker", "must be 'auto', a fraction in [0, 1]"),
    ("workers-0", _set("resources", "workers_per_trial", value=0),
     "resources.workers_per_trial", "must be >= 1 (got 0)"),
    ("experiment-slash", _set("experiment", value="a/b"),
     "experiment", "must be 1-100 letters, digits, '_', '.' or '-' (it names folders)"),
    ("section-not-mapping", _set("train", value=[1, 2]),
     "train", "must be a mapping (got list)"),
]


@pytest.mark.parametrize(("mutate", "key", "fragment"), [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_config_names_file_and_key(tmp_path: Path, mutate: Mutation, key: str, fragment: str) -> None:
    data = lora_dict()
    mutate(data, tmp_path)
    path = write_yaml(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_search_config(path)
    err = info.value
    text = str(err)
    assert text.startswith(f"bad.yaml: {key}: "), text
    assert fragment in text, text
    assert "\n" not in text
    assert (err.file, err.key) == ("bad.yaml", key)
    assert text == f"bad.yaml: {key}: {err.message}"


def test_bad_config_exact_messages(tmp_path: Path) -> None:
    data = lora_dict()
    data["space"]["rank"] = {"type": "int", "low": 0, "high": 8}
    with pytest.raises(ConfigError) as info:
        load_search_config(write_yaml(tmp_path, data))
    assert str(info.value) == "bad.yaml: space.rank.low: must be >= 1 (got 0)"

    data = lora_dict()
    data["datset"] = data.pop("dataset")
    with pytest.raises(ConfigError) as info:
        load_search_config(write_yaml(tmp_path, data))
    assert str(info.value) == (
        "bad.yaml: datset: unknown key (did you mean 'dataset'?); "
        "known: dataset, experiment, method, model, resources, search, space, task, tracking, train"
    )


def test_unknown_names_list_the_registered_ones(tmp_path: Path) -> None:
    data = lora_dict()
    data["method"]["name"] = "lorra"
    with pytest.raises(ConfigError) as info:
        load_search_config(write_yaml(tmp_path, data))
    assert str(info.value) == f"bad.yaml: method.name: unknown method 'lorra'; known: {', '.join(list_methods())}"
    assert {"bitfit", "full", "linear", "lora"} <= set(list_methods())

    data = lora_dict()
    data["dataset"]["name"] = "nihh"
    with pytest.raises(ConfigError) as info:
        load_search_config(write_yaml(tmp_path, data))
    assert str(info.value) == f"bad.yaml: dataset.name: unknown dataset 'nihh'; known: {', '.join(list_datasets())}"
    assert {"folder", "synthetic"} <= set(list_datasets())


def test_missing_paths_are_named(tmp_path: Path) -> None:
    data = lora_dict()
    data["dataset"]["root"] = str(tmp_path / "no-such-dir")
    with pytest.raises(ConfigError) as info:
        load_search_config(write_yaml(tmp_path, data))
    assert str(info.value) == f"bad.yaml: dataset.root: directory not found: {tmp_path / 'no-such-dir'}"

    data = lora_dict()
    data["model"]["checkpoint"] = str(tmp_path / "weights.pth")
    with pytest.raises(ConfigError) as info:
        load_search_config(write_yaml(tmp_path, data))
    assert str(info.value) == f"bad.yaml: model.checkpoint: file not found: {tmp_path / 'weights.pth'}"


def test_relative_paths_resolve_against_the_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "weights.pth").write_bytes(b"\0")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    data = lora_dict()
    data["dataset"] = {"name": "folder", "root": "imgs", "label_ratios": [1.0]}
    data["model"]["checkpoint"] = "weights.pth"
    config = load_search_config(write_yaml(tmp_path, data, "ok.yaml"))
    assert config.dataset.root == (tmp_path / "imgs").resolve()
    assert config.model.checkpoint == (tmp_path / "weights.pth").resolve()
    assert config.dataset.options == get_dataset("folder").options().model_dump()  # defaults filled in


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("experiment: x\ntrain: {epochs: 2\nsearch: {}\n")
    with pytest.raises(ConfigError) as info:
        load_search_config(path)
    text = str(info.value)
    assert text.startswith("bad.yaml: line "), text
    assert ": not valid YAML: " in text
    assert info.value.key.startswith("line ") and int(info.value.key.split()[1]) in (2, 3)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_search_config(path)
    assert str(info.value) == f"{path}: file not found"


@pytest.mark.parametrize(("text", "kind"), [("- 1\n- 2\n", "list"), ("just words\n", "str"), ("42\n", "int")])
def test_yaml_must_be_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_search_config(path)
    assert str(info.value) == f"bad.yaml: must be a mapping of sections, got {kind}"


def test_binary_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(ConfigError) as info:
        load_search_config(path)
    assert str(info.value).startswith("bad.yaml: ")


def test_config_error_shape() -> None:
    assert ConfigError.exit_code == 2
    assert issubclass(ConfigError, MedpeftError)
    assert MedpeftError.exit_code == 1
    err = ConfigError("a.b", "broken")
    assert err.exit_code == 2
    assert str(err) == "a.b: broken"
    named = err.with_file("x.yaml")
    assert str(named) == "x.yaml: a.b: broken"
    assert (named.key, named.message, named.file) == ("a.b", "broken", "x.yaml")
    assert str(ConfigError("", "just this")) == "just this"
    assert str(ConfigError("", "gone", "f.yaml")) == "f.yaml: gone"


# ----------------------------------------------------------------------------------------------
# Experiment names and defaults
# ----------------------------------------------------------------------------------------------


def test_experiment_defaults_to_file_stem(tmp_path: Path) -> None:
    data = lora_dict()
    del data["experiment"]
    path = write_yaml(tmp_path, data, "my-search.v2.yaml")
    assert load_search_config(path).experiment == "my-search.v2"
    assert load_search_config(path, experiment="x").experiment == "x"


def test_experiment_argument_overrides_yaml() -> None:
    assert load_search_config(LORA_YAML).experiment == "lora-synthetic"
    config = load_search_config(LORA_YAML, experiment="x")
    assert config.experiment == "x"
    assert config.trial_config(1.0, {"lr": 1e-3, "rank": 4}).experiment == "x"


def test_experiment_argument_is_validated() -> None:
    with pytest.raises(ConfigError) as info:
        load_search_config(LORA_YAML, experiment="a/b")
    assert str(info.value).startswith("lora.yaml: experiment: must be 1-100 letters")


def test_empty_mapping_means_all_defaults(tmp_path: Path) -> None:
    """``{}`` asks for every default on purpose; an empty file is an error (tests/test_empty_yaml.py)."""
    path = tmp_path / "empty.yaml"
    path.write_text("{}\n")
    config = load_search_config(path)
    assert config.experiment == "empty"
    assert config.method.name == "lora"
    assert config.dataset.name == "synthetic"
    assert set(config.distributions()) == set(get_method("lora").space_for("vit"))


def test_distributions_fall_back_to_method_default_space(tmp_path: Path) -> None:
    data = lora_dict()
    del data["space"]
    config = load_search_config(write_yaml(tmp_path, data, "nospace.yaml"))
    assert config.space is None
    dists = config.distributions()
    default = get_method("lora").space_for("vit")
    # what the YAML fixes (targets: [q, v]) is not searched; the rest of the default space is
    assert "targets" in default and config.method.options["targets"] == ["q", "v"]
    assert list(dists) == [name for name in default if name != "targets"]
    assert dists["lr"] == FloatDistribution.model_validate(default["lr"])
    assert dists["rank"] == CategoricalDistribution.model_validate(default["rank"])
    assert dists["rank"].choices != [4, 8, 16]  # not the YAML's own space

    data = lora_dict()
    del data["space"]
    data["method"] = {"name": "full"}
    data["model"]["backbone"] = "resnet50"
    config = load_search_config(write_yaml(tmp_path, data, "full.yaml"))
    dists = config.distributions()
    assert list(dists) == ["lr"]
    assert (dists["lr"].low, dists["lr"].high, dists["lr"].log) == (1e-5, 1e-3, True)


def test_explicit_space_replaces_default() -> None:
    config = load_search_config(LORA_YAML)
    assert isinstance(config.distributions()["rank"], CategoricalDistribution)
    assert config.distributions()["rank"].choices == [4, 8, 16]


def test_int_distribution_parses(tmp_path: Path) -> None:
    data = lora_dict()
    data["space"]["rank"] = {"type": "int", "low": 2, "high": 32, "log": True}
    data["space"]["batch_size"] = {"type": "categorical", "choices": [16, 32]}
    dists = load_search_config(write_yaml(tmp_path, data, "int.yaml")).distributions()
    assert dists["rank"] == IntDistribution(type="int", low=2, high=32, log=True, step=1)
    assert dists["batch_size"].choices == [16, 32]


# ----------------------------------------------------------------------------------------------
# Trial configs: sampled values go where they belong
# ----------------------------------------------------------------------------------------------


def test_trial_config_routes_sampled_values() -> None:
    config = load_search_config(LORA_YAML)
    fixed_options = dict(config.method.options)
    fixed_train = config.train.model_dump()
    sampled = {"lr": 0.0123, "rank": 16, "alpha": 8.0, "dropout": 0.2,
               "weight_decay": 0.1, "batch_size": 64, "momentum": 0.5, "warmup_epochs": 1.0, "drop_path": 0.1}
    trial = config.trial_config(0.1, sampled)

    assert trial.method.name == "lora"
    assert trial.method.options == {**fixed_options, "rank": 16, "alpha": 8.0, "dropout": 0.2}
    assert trial.method.options["targets"] == ["q", "v"]
    for name in ("lr", "weight_decay", "batch_size", "momentum", "warmup_epochs", "drop_path"):
        assert getattr(trial.train, name) == sampled[name]
        assert name not in trial.method.options
    for name in ("rank", "alpha", "dropout"):
        assert name not in trial.train.model_dump()
    # untouched train settings come from the YAML
    assert trial.train.epochs == 4 and trial.train.augment == "flip"
    assert trial.model == config.model
    assert trial.label_ratio == 0.1 and trial.dataset.label_ratios == [0.1]
    # the search config itself is not modified
    assert config.method.options == fixed_options
    assert config.train.model_dump() == fixed_train
    assert config.dataset.label_ratios == [0.25, 1.0]


def test_trial_config_validates_train_values() -> None:
    config = load_search_config(LORA_YAML)
    with pytest.raises(Exception) as info:
        config.trial_config(1.0, {"lr": -1.0, "rank": 4})
    assert "lr" in str(info.value)


@pytest.mark.parametrize("name", ["epochs", "nonsense", "optimizer"])
def test_trial_config_rejects_unknown_sampled_names(name: str) -> None:
    config = load_search_config(LORA_YAML)
    with pytest.raises(KeyError) as info:
        config.trial_config(1.0, {"lr": 1e-3, name: 1})
    assert repr(name) in str(info.value)


def test_trial_config_without_experiment_name() -> None:
    config = validate_search_dict({"method": {"name": "linear"}})
    assert config.experiment is None
    trial = config.trial_config(0.5, {"lr": 0.01})
    assert trial.experiment == "search"
    assert trial.method.options == {}
    assert trial.family == "vit"


# ----------------------------------------------------------------------------------------------
# Known gaps: configs that validate but fail once a search runs (see the report)
# ----------------------------------------------------------------------------------------------


def test_searched_lr_below_fixed_min_lr_is_rejected(tmp_path: Path) -> None:
    data = lora_dict()
    data["train"]["min_lr"] = 1e-3  # the space searches lr from 5e-4
    with pytest.raises(ConfigError) as info:
        load_search_config(write_yaml(tmp_path, data))
    assert str(info.value).startswith("bad.yaml: space.lr.low: ")


def test_float_log_with_step_is_rejected(tmp_path: Path) -> None:
    data = lora_dict()
    data["space"]["lr"] = {"type": "float", "low": 1e-3, "high": 1e-2, "log": True, "step": 1e-3}
    with pytest.raises(ConfigError) as info:
        load_search_config(write_yaml(tmp_path, data))
    assert str(info.value).startswith("bad.yaml: space.lr.step: ")


def test_searched_batch_size_must_divide_across_workers(tmp_path: Path) -> None:
    data = lora_dict()
    data["resources"]["workers_per_trial"] = 4
    data["space"]["batch_size"] = {"type": "categorical", "choices": [30, 32]}
    with pytest.raises(ConfigError) as info:
        load_search_config(write_yaml(tmp_path, data))
    assert str(info.value).startswith("bad.yaml: space.batch_size")


# ----------------------------------------------------------------------------------------------
# Validation is light: no torch, no Ray
# ----------------------------------------------------------------------------------------------


def test_validation_imports_neither_torch_nor_ray() -> None:
    code = (
        "import sys; from medpeft_ray.config import load_search_config; "
        "load_search_config('search_spaces/lora.yaml'); "
        "heavy = sorted(m for m in ('torch', 'ray', 'timm', 'deepspeed', 'peft') if m in sys.modules); "
        "assert not heavy, heavy; print('clean')"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "clean"


def test_epochs_per_label_ratio_make_each_study_its_own_budget(tmp_path: Path) -> None:
    """MED-PEFT trains 400 / 200 / 100 epochs at 1% / 10% / 100% labels: each trial gets its ratio's,
    and so does its study's scheduler (its rungs stop at that budget)."""
    from medpeft_ray.search.space import make_scheduler

    data = lora_dict()
    data["dataset"]["label_ratios"] = [0.01, 0.1, 1.0]
    data["train"]["epochs"] = {0.01: 400, 0.1: 200, 1.0: 100}
    config = load_search_config(write_yaml(tmp_path, data, "budgets.yaml"))
    space = config.search_space
    assert [space.trial_config(r, {}).train.epochs for r in (0.01, 0.1, 1.0)] == [400, 200, 100]
    assert [config.train.epochs_for(r) for r in (0.01, 0.1 + 1e-12, 1.0)] == [400, 200, 100]
    scheduler = make_scheduler(config.search, config.train.epochs_for(0.01))
    assert scheduler._max_t == 400
    # a trial carries one budget; one per ratio is refused there
    trial = space.trial_config(0.1, {})
    with pytest.raises(ValueError, match="a trial trains one number of epochs"):
        type(trial).model_validate({**trial.model_dump(), "train": {**trial.train.model_dump(), "epochs": {0.1: 2}}})
