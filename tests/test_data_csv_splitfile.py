"""The generic ``csv`` and MED-PEFT ``splitfile`` formats, and ``data check`` on them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medpeft_ray.cli import app
from medpeft_ray.data import load_splits, train_subset_index
from medpeft_ray.data.check import check_dataset
from medpeft_ray.errors import ConfigError, DataError

SIZE = 16


def write_image(path: Path, grey: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((24, 20), grey, np.uint8)).save(path)


def grey_of(images: np.ndarray) -> list[int]:
    return [int(round(float(im.mean()))) for im in images]


# -- csv ----------------------------------------------------------------------------------------


def make_csv(root: Path, rows: list[str], header: str = "path,patient,A,B") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "labels.csv").write_text("\n".join([header, *rows]) + "\n")
    return root


def test_csv_multilabel_with_groups_and_unknown_labels(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    rows = []
    for i in range(30):
        write_image(root / "img" / f"{i}.png", 5 * i)
        a, b = i % 2, "" if i == 7 else (i // 2) % 2  # image 7 has an unknown B label
        rows.append(f"img/{i}.png,p{i // 3},{a},{b}")
    make_csv(root, rows)
    splits = load_splits("csv", root, SIZE, {"group_column": "patient", "label_columns": ["A", "B"]}, 0)
    assert splits.class_names == ("A", "B") and splits.task == "multilabel"
    seen = {}
    for name in ("train", "val", "test"):
        split = getattr(splits, name)
        for grey, labels, group in zip(grey_of(split.images), split.labels, split.groups):
            seen[grey // 5] = (labels, group, name)
    assert len(seen) == 30
    assert seen[4][0].tolist() == [0.0, 0.0] and seen[5][0].tolist() == [1.0, 0.0]
    assert math.isnan(seen[7][0][1])
    split_of_group: dict[str, set[str]] = {}
    for labels, group, name in seen.values():
        split_of_group.setdefault(group, set()).add(name)
    assert all(len(names) == 1 for names in split_of_group.values())  # patient-disjoint


def test_csv_multiclass_and_explicit_split(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    rows = []
    for i, (cls, split) in enumerate([("cat", "train"), ("dog", "train"), ("cat", "val"), ("dog", "test"), ("eel", "train")]):
        write_image(root / f"{i}.png", 40 * i)
        rows.append(f"{i}.png,{cls},{split}")
    make_csv(root, rows, header="file,kind,fold")
    splits = load_splits("csv", root, SIZE, {"path_column": "file", "class_column": "kind", "split_column": "fold"}, 0)
    assert splits.class_names == ("cat", "dog", "eel") and splits.task == "multiclass"
    assert (len(splits.train), len(splits.val), len(splits.test)) == (3, 1, 1)
    assert splits.test.labels.tolist() == [[0.0, 1.0, 0.0]]


@pytest.mark.parametrize(
    ("rows", "options", "message"),
    [
        (["img.png,p1,2,0"], {"group_column": "patient"}, r"labels.csv: row 2, column 'A': label '2' is not 0, 1 or blank"),
        (["img.png,p1,1,0"], {"group_column": "pid"}, r"labels.csv: no column 'pid'"),
        (["missing.png,p1,1,0"], {"group_column": "patient"}, r"ds: 1 of the 1 images listed in labels.csv is missing"),
        (["img.png,p1,1,0"], {"split_column": "patient"}, r"split 'p1' is not train, val or test"),
    ],
)
def test_csv_errors_name_the_file(tmp_path: Path, rows: list[str], options: dict, message: str) -> None:
    root = tmp_path / "ds"
    write_image(root / "img.png", 9)
    make_csv(root, rows)
    with pytest.raises(DataError, match=message):
        load_splits("csv", root, SIZE, options, 0)


def test_csv_missing_table(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    with pytest.raises(DataError, match=r"ds: no csv dataset found: looked for labels.csv in it"):
        load_splits("csv", tmp_path / "ds", SIZE, {}, 0)


# -- splitfile ----------------------------------------------------------------------------------


def make_splitfile_dataset(root: Path) -> None:
    """NIH-like names (patient_follow-up.png), 3 labels, MED-PEFT list files incl. 10% and 50% lists."""
    lines: dict[str, list[str]] = {"train_list.txt": [], "val_list.txt": [], "test_list.txt": []}
    for i in range(24):
        name = f"{i // 2:08d}_{i % 2:03d}.png"
        write_image(root / "images" / name, 10 * i)
        labels = f"{i % 2} {(i // 2) % 2} {int(i % 3 == 0)}"
        target = "test_list.txt" if i >= 20 else "val_list.txt" if i >= 16 else "train_list.txt"
        lines[target].append(f"{name} {labels}")
    lines["train_10.txt"] = lines["train_list.txt"][:2]
    lines["train_50.txt"] = lines["train_list.txt"][:8]
    for name, content in lines.items():
        (root / name).write_text("\n".join(content) + "\n")


def test_splitfile_uses_the_publishers_ratio_lists(tmp_path: Path) -> None:
    root = tmp_path / "medpeft"
    make_splitfile_dataset(root)
    options = {"images_dir": "images", "ratio_files": {0.1: "train_10.txt", 0.5: "train_50.txt"},
               "class_names": ["Atelectasis", "Cardiomegaly", "Effusion"], "group_pattern": r"(\d+)_\d+\.png$"}
    splits = load_splits("splitfile", root, SIZE, options, 0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (16, 4, 4)
    assert splits.class_names == ("Atelectasis", "Cardiomegaly", "Effusion")
    tenth = splits.train.subset(train_subset_index(splits, 0.1, 0))
    assert sorted(grey_of(tenth.images)) == [0, 10]  # exactly the listed images
    half = train_subset_index(splits, 0.5, 0)
    assert set(train_subset_index(splits, 0.1, 0)) <= set(half) and len(half) == 8
    assert len(train_subset_index(splits, 1.0, 0)) == 16
    assert set(splits.train.groups) == {f"{i:08d}" for i in range(8)}  # patient ids from the pattern
    # a ratio without a list falls back to a drawn, patient-disjoint subset
    drawn = splits.train.subset(train_subset_index(splits, 0.25, 0))
    assert 0 < len(drawn) < 16
    # the ratio lists survive the cache
    again = load_splits("splitfile", root, SIZE, options, 0)
    assert np.array_equal(train_subset_index(again, 0.5, 0), half)


def test_splitfile_errors(tmp_path: Path) -> None:
    root = tmp_path / "medpeft"
    make_splitfile_dataset(root)
    (root / "bad_ratio.txt").write_text("00000099_000.png 1 0 0\n")
    with pytest.raises(DataError, match=r"bad_ratio.txt: 1 image\(s\) not in train_list.txt"):
        load_splits("splitfile", root, SIZE, {"images_dir": "images", "ratio_files": {0.1: "bad_ratio.txt"}}, 0)
    (root / "val_list.txt").write_text("00000008_000.png 1 0\n")
    with pytest.raises(DataError, match=r"the split files disagree on the number of labels"):
        load_splits("splitfile", root, SIZE, {"images_dir": "images"}, 0)
    (root / "val_list.txt").write_text("00000008_000.png 1 x 0\n")
    with pytest.raises(DataError, match=r"val_list.txt: line 1: labels must be 0 or 1"):
        load_splits("splitfile", root, SIZE, {"images_dir": "images"}, 0)
    make_splitfile_dataset(root)
    with pytest.raises(DataError, match=r"nope.txt: split file not found"):
        load_splits("splitfile", root, SIZE, {"test": "nope.txt"}, 0)


# -- data check ---------------------------------------------------------------------------------


def test_check_reports_counts_ratios_and_every_bad_file(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    rows = []
    for i in range(20):
        write_image(root / f"{i}.png", i)
        rows.append(f"{i}.png,p{i},{i % 2},{int(i < 5)}")
    for bad in ("x.png", "y.png"):
        (root / bad).write_bytes(b"not a png")
        rows.append(f"{bad},p{bad},1,0")
    make_csv(root, rows)
    report = check_dataset("csv", root, {"group_column": "patient"}, image_size=SIZE, label_ratios=[0.1, 1.0])
    assert sum(report.images.values()) == 20
    assert report.positives["train"]["A"] + report.positives["val"]["A"] + report.positives["test"]["A"] == 10
    assert report.ratio_images[1.0] == report.images["train"]
    assert len(report.unreadable) == 2 and all(("x.png" in u) or ("y.png" in u) for u in report.unreadable)
    assert not report.usable and "2 unreadable file(s)" in report.problems[0]
    # with skip_unreadable asked for, the same dataset is usable
    assert check_dataset("csv", root, {"group_column": "patient", "skip_unreadable": True}, image_size=SIZE).usable


def test_check_cli_exit_codes(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["data", "check", "--dataset", "synthetic", "-o", "num_patients=40"])
    assert ok.exit_code == 0 and "usable" in ok.output and "Cardiomegaly" in ok.output
    missing = runner.invoke(app, ["data", "check", "--dataset", "csv", "--root", str(tmp_path)])
    assert missing.exit_code == 2 and f"{tmp_path}: no csv dataset found: looked for labels.csv" in missing.output
    bad_option = runner.invoke(app, ["data", "check", "--dataset", "synthetic", "-o", "num_classes=99"])
    assert bad_option.exit_code == 2 and "dataset.options.num_classes: must be <= 6" in bad_option.output
    with pytest.raises(ConfigError):
        check_dataset("synthetic", None, {"bogus": 1})
