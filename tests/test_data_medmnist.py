"""Tests for the MedMNIST format (data/medmnist.py) on tiny files in the published .npz layout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_in_process, tiny_search
from medmnist_fixtures import COUNTS, FIXTURE_SETS, medmnist_arrays, write_medmnist
from PIL import Image

from medpeft_ray.config import validate_search_dict
from medpeft_ray.data import dataset_key, get_dataset, load_splits, train_subset_index
from medpeft_ray.data import medmnist as medmnist_format
from medpeft_ray.data.check import check_dataset
from medpeft_ray.errors import ConfigError, DataError
from medpeft_ray.metrics import Predictions, metric_values
from medpeft_ray.schema import parse_section

#: flag -> (task, classes, first and last class name, colour), as MedMNIST's INFO gives them
EXPECTED = {
    "chestmnist": ("multilabel", 14, "atelectasis", "hernia", False),
    "dermamnist": ("multiclass", 7, "actinic keratoses and intraepithelial carcinoma", "vascular lesions", True),
    "pneumoniamnist": ("multiclass", 2, "normal", "pneumonia", False),
    "retinamnist": ("multiclass", 5, "0", "4", True),
}
#: the class counts and channels of all twelve 2D sets (MedMNIST v2, Table 1)
ALL_SETS = {
    "pathmnist": (9, 3), "chestmnist": (14, 1), "dermamnist": (7, 3), "octmnist": (4, 1), "pneumoniamnist": (2, 1),
    "retinamnist": (5, 3), "breastmnist": (2, 1), "bloodmnist": (8, 3), "tissuemnist": (8, 1),
    "organamnist": (11, 1), "organcmnist": (11, 1), "organsmnist": (11, 1),
}


def _one_line(error: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("flag", sorted(FIXTURE_SETS))
def test_each_kind_loads_as_published(flag: str, tmp_path: Path) -> None:
    path = write_medmnist(tmp_path, flag)
    task, classes, first, last, colour = EXPECTED[flag]
    splits = load_splits("medmnist", tmp_path, 28, {"flag": flag}, 0)
    assert splits.task == task and splits.num_classes == classes
    assert (splits.class_names[0], splits.class_names[-1]) == (first, last)
    assert splits.channels == (3 if colour else 1)
    with np.load(path) as published:
        for name, n in COUNTS.items():
            split = getattr(splits, name)
            assert len(split) == n, "the official split, exactly as the file has it"
            images, labels = published[f"{name}_images"], published[f"{name}_labels"]
            assert split.images.dtype == np.uint8 and split.images.shape == images.shape
            assert np.array_equal(split.images, images), "the file's pixels, unchanged"
            assert split.labels.dtype == np.float32 and split.labels.shape == (n, classes)
            expected = labels if task == "multilabel" else np.eye(classes)[labels[:, 0]]
            assert np.array_equal(split.labels, expected)
            assert split.groups.tolist() == list(range(n)), "each image its own group: its index in its split"
            assert split.subgroups == {} and split.captions is None
    assert splits.subgroup_attributes == () and not splits.skipped and not splits.ratio_subsets


def test_every_2d_set_declares_its_classes_and_channels() -> None:
    spec = get_dataset("medmnist")
    assert set(medmnist_format.SETS) == set(ALL_SETS)
    for flag, (classes, channels) in ALL_SETS.items():
        fixed = spec.fixed_classes(parse_section(spec.options, {"flag": flag}, "dataset.options"))
        assert fixed is not None and len(fixed) == len(set(fixed)) == classes, flag
        assert medmnist_format.SETS[flag].n_channels == channels
    assert medmnist_format.SETS["breastmnist"].class_names == ("malignant", "normal, benign")
    # what docs/datasets.md gives as the memory of the largest sets at 224 px
    assert round(medmnist_format.pixel_bytes("chestmnist", 224) / 1e9, 1) == 5.6
    assert round(medmnist_format.pixel_bytes("pathmnist", 224) / 1e9, 1) == 16.1


def test_sizes_28_and_64_are_named_as_medmnist_names_them(tmp_path: Path) -> None:
    small = write_medmnist(tmp_path, "dermamnist", 28, seed=1)
    large = write_medmnist(tmp_path, "dermamnist", 64, seed=2)
    assert (small.name, large.name) == ("dermamnist.npz", "dermamnist_64.npz")
    for path, size in ((small, 28), (large, 64)):
        splits = load_splits("medmnist", tmp_path, size, {"flag": "dermamnist", "size": size}, 0)
        with np.load(path) as published:
            assert np.array_equal(splits.test.images, published["test_images"])
    with pytest.raises(DataError) as error:
        load_splits("medmnist", tmp_path, 128, {"flag": "dermamnist", "size": 128}, 0)
    message = _one_line(error)
    assert message.startswith(f"{tmp_path}: no medmnist dataset found: looked for dermamnist_128.npz in it and in its "
                              f"sub-folders (2 levels down); {tmp_path} holds dermamnist.npz, dermamnist_64.npz: set "
                              "dataset.options.size to match, or download ")


def test_another_image_size_resizes_like_the_other_formats(tmp_path: Path) -> None:
    path = write_medmnist(tmp_path, "retinamnist")
    splits = load_splits("medmnist", tmp_path, 32, {"flag": "retinamnist"}, 0)
    assert splits.val.images.shape == (COUNTS["val"], 32, 32, 3)
    with np.load(path) as published:
        first = Image.fromarray(published["val_images"][0]).resize((32, 32), Image.BILINEAR)
    assert np.array_equal(splits.val.images[0], np.asarray(first))


def test_label_ratio_subsets_draw_images_of_the_official_training_split(tmp_path: Path) -> None:
    write_medmnist(tmp_path, "chestmnist", counts={"train": 200, "val": 30, "test": 30})
    splits = load_splits("medmnist", tmp_path, 28, {"flag": "chestmnist"}, 0)
    previous: set[int] = set()
    for ratio in (0.05, 0.25, 1.0):
        index = train_subset_index(splits, ratio, seed=3)
        chosen = set(index.tolist())
        assert previous <= chosen and len(index) >= round(ratio * 200)
        assert (splits.train.labels[index].sum(axis=0) > 0).all(), "every finding keeps a positive"
        previous = chosen
    assert len(train_subset_index(splits, 0.05, seed=3)) < 20  # single images, not whole patients
    report = check_dataset("medmnist", tmp_path, {"flag": "chestmnist"}, image_size=28, label_ratios=[0.05, 1.0])
    assert report.images == {"train": 200, "val": 30, "test": 30}, "the splits stay the publisher's"
    assert report.ratio_images[1.0] == 200 and report.usable


def test_large_splits_are_streamed_into_a_scratch_file_not_memory(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_medmnist(tmp_path / "data", "dermamnist", compressed=False)  # a stored (uncompressed) member too
    monkeypatch.setattr(medmnist_format, "SCRATCH_BYTES", 0)
    monkeypatch.setattr(medmnist_format, "CHUNK_BYTES", 1000)  # several chunks per array
    splits = get_dataset("medmnist").load(tmp_path / "data", 28, medmnist_format.MedmnistOptions(flag="dermamnist"), 0)
    assert isinstance(splits.train.images, np.memmap)
    with np.load(path) as published:
        assert np.array_equal(splits.train.images, published["train_images"])
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".medmnist-")], "scratch files are unlinked"


def test_the_cache_is_keyed_by_the_sets_file_alone(tmp_path: Path) -> None:
    path = write_medmnist(tmp_path, "pneumoniamnist")
    key = dataset_key("medmnist", tmp_path, 28, {"flag": "pneumoniamnist"}, 0)
    write_medmnist(tmp_path, "dermamnist")  # another set downloaded into the same folder
    assert dataset_key("medmnist", tmp_path, 28, {"flag": "pneumoniamnist"}, 0) == key
    first = load_splits("medmnist", tmp_path, 28, {"flag": "pneumoniamnist"}, 0)
    again = load_splits("medmnist", tmp_path, 28, {"flag": "pneumoniamnist"}, 0)
    assert np.array_equal(first.test.images, again.test.images) and np.array_equal(first.test.labels, again.test.labels)
    os.utime(path, ns=(0, 0))  # a file downloaded again
    assert dataset_key("medmnist", tmp_path, 28, {"flag": "pneumoniamnist"}, 0) != key


def test_a_missing_file_says_where_to_get_it(tmp_path: Path) -> None:
    """Looked for in the root and two levels below it, as every format's dataset folder is."""
    write_medmnist(tmp_path / "downloads" / "medmnist", "chestmnist", 64)
    assert len(load_splits("medmnist", tmp_path, 64, {"flag": "chestmnist", "size": 64}, 0).train) == COUNTS["train"]
    with pytest.raises(DataError) as error:
        load_splits("medmnist", tmp_path, 224, {"flag": "chestmnist", "size": 224}, 0)
    message = _one_line(error)
    assert message.startswith(f"{tmp_path}: no medmnist dataset found: looked for chestmnist_224.npz in it and in its "
                              f"sub-folders (2 levels down); download https://zenodo.org/records/10519652/files/"
                              f"chestmnist_224.npz into {tmp_path}, or run python -c \"import medmnist; ")
    assert f"medmnist.ChestMNIST(split='test', size=224, root='{tmp_path}', download=True)" in message
    options = medmnist_format.MedmnistOptions(flag="chestmnist", size=224)
    with pytest.raises(DataError) as error:  # the loader itself, given the folder
        get_dataset("medmnist").load(tmp_path, 224, options, 0)
    assert _one_line(error).startswith(f"{tmp_path / 'chestmnist_224.npz'}: file not found; download https://")


@pytest.mark.parametrize("replace,expected", [
    ({"val_images": None}, "no 'val_images' array (the file holds test_images, test_labels, train_images, "
                           "train_labels, val_labels); a MedMNIST .npz holds train_images, train_labels, val_images"),
    ({"train_images": np.zeros((70, 64, 64, 3), np.uint8)}, "train_images holds 64x64 images, not the 28x28 of "
                                                            "dataset.options.size 28"),
    ({"test_images": np.zeros((28, 28, 28), np.uint8)}, "test_images has shape (28, 28, 28); dermamnist is colour: "
                                                        "(N, 28, 28, 3)"),
    ({"val_images": np.zeros((28, 28, 28, 3), np.float32)}, "val_images is float32, not uint8"),
    ({"train_labels": np.zeros((70, 14), np.uint8)}, "train_labels has shape (70, 14); dermamnist is multi-class: "
                                                     "(70, 1), one class index per image (0-6)"),
    ({"train_labels": np.zeros((69, 1), np.uint8)}, "train_labels has shape (69, 1); dermamnist is multi-class: (70, 1)"),
    ({"test_labels": np.full((28, 1), 7, np.uint8)}, "test_labels row 0 holds [7], not a class index 0-6 (28 such row(s))"),
    ({"val_labels": np.zeros((28, 1), np.float64)}, "val_labels is float64; MedMNIST labels are integers"),
])
def test_a_file_unlike_the_published_layout_is_one_line_naming_file_and_key(
    replace: dict, expected: str, tmp_path: Path
) -> None:
    path = write_medmnist(tmp_path, "dermamnist", **replace)
    with pytest.raises(DataError) as error:
        load_splits("medmnist", tmp_path, 28, {"flag": "dermamnist"}, 0)
    assert _one_line(error).startswith(f"{path}: {expected}")


def test_multilabel_labels_must_be_the_fourteen_findings(tmp_path: Path) -> None:
    path = write_medmnist(tmp_path, "chestmnist", train_labels=np.zeros((70, 1), np.uint8))
    with pytest.raises(DataError) as error:
        load_splits("medmnist", tmp_path, 28, {"flag": "chestmnist"}, 0)
    assert _one_line(error) == (f"{path}: train_labels has shape (70, 1); chestmnist is multi-label, binary-class: "
                                "(70, 14), 14 0/1 labels per image")
    bad = medmnist_arrays("chestmnist")["val_labels"].copy()
    bad[5, 3] = 2
    write_medmnist(tmp_path, "chestmnist", val_labels=bad)
    with pytest.raises(DataError, match=r"val_labels row 5 holds \[.*2.*\], not 0 or 1 \(1 such row\(s\)\)"):
        load_splits("medmnist", tmp_path, 28, {"flag": "chestmnist"}, 0)


def test_a_corrupt_or_cut_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bloodmnist.npz"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(DataError) as error:
        load_splits("medmnist", tmp_path, 28, {"flag": "bloodmnist"}, 0)
    assert _one_line(error).startswith(f"{path}: not a readable .npz file (BadZipFile")

    whole = write_medmnist(tmp_path, "dermamnist").read_bytes()
    path = tmp_path / "dermamnist.npz"
    damaged = bytearray(whole)
    middle = len(whole) // 2
    damaged[middle:middle + 200] = bytes(200)  # inside a compressed member: its CRC or its stream breaks
    path.write_bytes(bytes(damaged))
    with pytest.raises(DataError) as error:
        load_splits("medmnist", tmp_path, 28, {"flag": "dermamnist"}, 0)
    assert _one_line(error).startswith(f"{path}: train_images: unreadable (BadZipFile: Bad CRC-32 for file "
                                       "'train_images.npy'); download the file again")


@pytest.mark.parametrize("options,expected", [
    ({"flag": "dermamnit"}, "dataset.options.flag: unknown MedMNIST flag 'dermamnit' (did you mean 'dermamnist'?); "
                            "the 2D sets: pathmnist, chestmnist, dermamnist, octmnist, pneumoniamnist, retinamnist, "
                            "breastmnist, bloodmnist, tissuemnist, organamnist, organcmnist, organsmnist"),
    ({"flag": "nodulemnist3d"}, "dataset.options.flag: 'nodulemnist3d' is a 3D MedMNIST set; the medmnist format "
                                "reads the 2D sets only: pathmnist, "),
    ({"flag": "pathmnist", "size": 32}, "dataset.options.size: must be one of 28, 64, 128, 224, the sizes MedMNIST "
                                        "publishes (got 32)"),
    ({}, "dataset.options.flag: required key is missing"),
])
def test_options_name_the_sets_and_sizes(options: dict, expected: str, tmp_path: Path) -> None:
    raw = tiny_search(dataset={"name": "medmnist", "root": str(tmp_path), "options": options})
    with pytest.raises(ConfigError) as error:
        validate_search_dict(raw, "x.yaml")
    assert _one_line(error).startswith(f"x.yaml: {expected}")
    assert parse_section(medmnist_format.MedmnistOptions, {"flag": "DermaMNIST"}, "o").flag == "dermamnist"


def test_data_check_reports_the_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    write_medmnist(tmp_path, "chestmnist", 64)
    run = cli_in_process(["data", "check", "--dataset", "medmnist", "--root", tmp_path, "-o", "flag=chestmnist",
                          "-o", "size=64", "--image-size", "64", "--label-ratios", "0.5,1"], monkeypatch, capsys)
    assert run.returncode == 0, run.stdout + run.stderr
    out = " ".join(run.stdout.split())
    assert f"medmnist {tmp_path}: 14 classes (multilabel), images grey (one channel)" in out
    assert "train (70)" in out and "val (28)" in out and "test (28)" in out and "usable" in out
    assert "atelectasis" in out and "hernia" in out
    write_medmnist(tmp_path, "dermamnist")
    run = cli_in_process(["data", "check", "--dataset", "medmnist", "--root", tmp_path, "-o", "flag=dermamnist",
                          "--format", "json"], monkeypatch, capsys)
    report = json.loads(run.stdout)
    assert (report["task"], report["channels"], report["images"]) == ("multiclass", 3, {"train": 70, "val": 28, "test": 28})
    assert report["usable"] and sum(report["positives"]["train"].values()) == 70


def test_val_auroc_and_accuracy_are_medmnists_auc_and_acc() -> None:
    """MedMNIST's evaluator (medmnist/evaluator.py getAUC, getACC), with scikit-learn, against the metric
    registry on the same softmax scores: the same numbers for binary and multi-class sets, and for
    multi-label ChestMNIST its ACC (mean over the 14 labels of the accuracy at a 0.5 threshold)."""
    from sklearn.metrics import accuracy_score, roc_auc_score

    rng = np.random.default_rng(0)
    for classes in (2, 7):
        truth = rng.integers(0, classes, 300)
        logits = rng.normal(size=(300, classes)) + 1.5 * np.eye(classes)[truth]
        scores = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        ours = metric_values(Predictions(np.eye(classes)[truth], scores, 0.0, multilabel=False))
        if classes == 2:  # binary-class: the last column's AUC and accuracy at 0.5
            auc, acc = roc_auc_score(truth, scores[:, -1]), accuracy_score(truth, scores[:, -1] > 0.5)
        else:  # multi-class: mean one-vs-rest AUC, argmax accuracy
            auc = np.mean([roc_auc_score(truth == k, scores[:, k]) for k in range(classes)])
            acc = accuracy_score(truth, scores.argmax(axis=1))
        assert ours["val_auroc"] == pytest.approx(auc, abs=1e-12) and ours["val_accuracy"] == pytest.approx(acc)
    labels = (rng.random((300, 14)) < 0.3).astype(float)
    scores = rng.random((300, 14))
    ours = metric_values(Predictions(labels, scores, 0.0, multilabel=True))
    acc = np.mean([accuracy_score(labels[:, k], scores[:, k] > 0.5) for k in range(14)])
    assert ours["val_accuracy"] == pytest.approx(acc, abs=1e-12)


@pytest.mark.slow  # four epochs of a tiny ViT on 140 images: about 25 s on two idle cores
def test_a_tiny_model_learns_the_fixture(tmp_path: Path) -> None:
    from medpeft_ray.train.single import train_single

    root = tmp_path / "medmnist"
    write_medmnist(root, "dermamnist", counts={"train": 140, "val": 42, "test": 42})
    config = validate_search_dict(tiny_search(
        dataset={"name": "medmnist", "root": str(root), "image_size": 32, "options": {"flag": "dermamnist"}},
        method={"name": "full", "options": {}}, train={"epochs": 4, "batch_size": 16, "augment": "none", "lr": 1e-3},
    ), "learn.yaml")
    result = train_single(config.trial_config(1.0, {"lr": 1e-3}), tmp_path / "run")
    best = max(e["val_auroc"] for e in result["epochs"])
    assert best > 0.85 and result["test_auroc"] > 0.8, result  # chance is 0.5
    assert 0.0 <= result["test_accuracy"] <= 1.0


def test_rows_name_the_set_and_size_not_the_format() -> None:
    """Twelve sets at four sizes share one format; a leaderboard that called every row "medmnist"
    would compare DermaMNIST's trials with ChestMNIST's as one task."""
    from medpeft_ray.config.sections import DatasetConfig

    assert DatasetConfig(name="medmnist", options={"flag": "chestmnist", "size": 224}).row_name == "chestmnist_224"
    assert DatasetConfig(name="medmnist", options={"flag": "dermamnist"}).row_name == "dermamnist"
    assert DatasetConfig(name="synthetic").row_name == "synthetic"
