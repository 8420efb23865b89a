"""Tests for the NIH ChestX-ray14 format (medpeft_ray/data/nih.py) on a tiny dataset in the published layout."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from medpeft_ray.config import validate_search_dict
from medpeft_ray.data import label_ratio_index, load_splits
from medpeft_ray.data.base import DatasetSplits, LabeledImages
from medpeft_ray.errors import ConfigError, DataError

SIZE = 32
# load_splits reports bad options as ConfigError (dataset.options.<key>); a bare pydantic error is accepted too
OPTION_ERRORS = (ConfigError, ValidationError)
HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
# Written out here (not imported) so that a change of order in the module fails the test.
MEDPEFT_ORDER = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
]
FINDINGS = [
    "No Finding", "Cardiomegaly", "Effusion|Infiltration", "Hernia", "Atelectasis|Pleural_Thickening|Mass",
    "No Finding", "Nodule", "Pneumonia|Pneumothorax", "Consolidation|Edema", "Emphysema|Fibrosis", "Effusion",
]
NUM_PATIENTS = 20
TEST_PATIENTS = {16, 17, 18, 19, 20}


@dataclass
class NIH:
    root: Path
    csv: Path
    findings: dict[str, str] = field(default_factory=dict)  # image name -> "Finding Labels"
    patient: dict[str, str] = field(default_factory=dict)  # image name -> patient id
    level: dict[int, str] = field(default_factory=dict)  # grey level -> image name
    path: dict[str, Path] = field(default_factory=dict)  # image name -> file
    rows: list[str] = field(default_factory=list)


def make_nih(base: Path, layout: str = "kaggle", lists: bool = True, trailing_comma: bool = False) -> NIH:
    """20 patients with 2-4 images each (56 images), every image one distinct grey level."""
    root = base / "nih"
    root.mkdir(parents=True)
    data = NIH(root, root / "Data_Entry_2017.csv")
    k = 0
    for patient in range(1, NUM_PATIENTS + 1):
        for follow_up in range(2 + patient % 3):
            name = f"{patient:08d}_{follow_up:03d}.png"
            if layout == "kaggle":
                folder = root / f"images_{1 + k // 20:03d}" / "images"
            elif layout == "plain":
                folder = root / "images"
            else:  # deep
                folder = root / "data" / "extracted" / f"images_{1 + k // 20:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            level = 10 + 4 * k
            side = 16 + (k % 5) * 6
            mode = "RGB" if k % 3 == 0 else "L"
            Image.new(mode, (side, side + k % 4), (level,) * 3 if mode == "RGB" else level).save(folder / name)
            finding = FINDINGS[k % len(FINDINGS)]
            data.findings[name], data.patient[name], data.path[name] = finding, str(patient), folder / name
            data.level[level] = name
            sex = "MF"[patient % 2]
            end = "," if trailing_comma else ""
            data.rows.append(
                f"{name},{finding},{follow_up},{patient},{30 + patient},{sex},PA,2500,2048,0.143,0.143{end}"
            )
            k += 1
    write_csv(data)
    if lists:
        names = sorted(data.findings)
        test = [n for n in names if int(data.patient[n]) in TEST_PATIENTS]
        (root / "train_val_list.txt").write_text("\n".join(n for n in names if n not in test) + "\n")
        (root / "test_list.txt").write_text("\n".join(test) + "\n")
    return data


def write_csv(data: NIH) -> None:
    data.csv.write_text(HEADER + "\n" + "\n".join(data.rows) + "\n")


def expected_labels(finding: str) -> list[float]:
    present = set(finding.split("|"))
    return [1.0 if c in present else 0.0 for c in MEDPEFT_ORDER]


def names_of(split: LabeledImages, data: NIH) -> list[str]:
    """The image name of every row, recognised by its grey level."""
    levels = np.asarray(split.images, dtype=np.int64).reshape(len(split), -1)
    assert (levels.min(axis=1) == levels.max(axis=1)).all(), "every test image is one constant grey level"
    return [data.level[int(v)] for v in levels[:, 0]]


def groups_of(split: LabeledImages) -> set[str]:
    return {str(g) for g in split.groups}


@pytest.fixture
def nih(tmp_path: Path) -> NIH:
    return make_nih(tmp_path)


def load(data: NIH, seed: int = 0, **options) -> DatasetSplits:
    return load_splits("nih", data.root, SIZE, options, seed)


# ----------------------------------------------------------------------------- labels and classes


def test_class_names_in_medpeft_order_and_multilabel(nih: NIH) -> None:
    splits = load(nih)
    assert list(splits.class_names) == MEDPEFT_ORDER
    assert splits.task == "multilabel"
    assert splits.train.images.shape[1:] == (SIZE, SIZE)
    assert len(splits.train) + len(splits.val) + len(splits.test) == len(nih.findings)
    assert splits.skipped == [] or tuple(splits.skipped) == ()


def test_every_label_vector_matches_its_finding_labels(nih: NIH) -> None:
    splits = load(nih)
    seen = 0
    for split in (splits.train, splits.val, splits.test):
        for name, labels, group in zip(names_of(split, nih), split.labels, split.groups):
            assert labels.tolist() == expected_labels(nih.findings[name]), name
            assert str(group) == nih.patient[name]
            seen += 1
    assert seen == len(nih.findings)
    # spot checks written out by hand
    by_name = {n: l for s in (splits.train, splits.val, splits.test) for n, l in zip(names_of(s, nih), s.labels)}  # noqa: E741
    assert by_name["00000001_000.png"].sum() == 0  # No Finding
    assert by_name["00000001_001.png"].tolist() == [0, 1] + [0] * 12  # Cardiomegaly
    # Atelectasis|Pleural_Thickening|Mass
    assert by_name["00000002_001.png"].tolist() == [1, 0, 0, 0, 1] + [0] * 7 + [1, 0]


def test_rgb_and_grey_images_decode_to_their_grey_level(nih: NIH) -> None:
    splits = load(nih)
    rgb_name = "00000001_000.png"  # k = 0: RGB
    assert Image.open(nih.path[rgb_name]).mode == "RGB"
    all_names = [n for s in (splits.train, splits.val, splits.test) for n in names_of(s, nih)]
    assert sorted(all_names) == sorted(nih.findings)


# ----------------------------------------------------------------------------- splits


def test_official_test_list_is_the_test_split(nih: NIH) -> None:
    splits = load(nih)
    test_list = set((nih.root / "test_list.txt").read_text().split())
    train_val_list = set((nih.root / "train_val_list.txt").read_text().split())
    assert set(names_of(splits.test, nih)) == test_list
    assert set(names_of(splits.train, nih)) | set(names_of(splits.val, nih)) == train_val_list
    assert groups_of(splits.test) == {str(p) for p in TEST_PATIENTS}


def test_splits_are_patient_disjoint_and_val_is_drawn_by_patient(nih: NIH) -> None:
    for seed in (0, 1, 2):
        splits = load(nih, seed=seed)
        train, val, test = groups_of(splits.train), groups_of(splits.val), groups_of(splits.test)
        assert not (train & val) and not (train & test) and not (val & test)
        assert len(val) == round(0.125 * (NUM_PATIENTS - len(TEST_PATIENTS)))  # 2 of 15
        assert len(train) + len(val) == NUM_PATIENTS - len(TEST_PATIENTS)


def test_val_fraction_option_and_seed(nih: NIH) -> None:
    wide = load(nih, val_fraction=0.4)
    assert len(groups_of(wide.val)) == round(0.4 * 15)
    vals = {frozenset(groups_of(load(nih, seed=s).val)) for s in range(6)}
    assert len(vals) > 1, "the validation patients must depend on the dataset seed"
    assert groups_of(load(nih, seed=3).val) == groups_of(load(nih, seed=3).val)


def test_without_list_files_test_is_drawn_by_patient(tmp_path: Path) -> None:
    data = make_nih(tmp_path, lists=False)
    splits = load(data, seed=5)
    train, val, test = groups_of(splits.train), groups_of(splits.val), groups_of(splits.test)
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(test) == round(0.2 * NUM_PATIENTS)
    assert len(val) == round(0.125 * (NUM_PATIENTS - len(test)))
    assert train | val | test == {str(p) for p in range(1, NUM_PATIENTS + 1)}
    assert len(groups_of(load(data, seed=5, test_fraction=0.5).test)) == 10


def test_only_one_list_file_is_an_error(nih: NIH) -> None:
    (nih.root / "train_val_list.txt").unlink()
    with pytest.raises(DataError) as err:
        load(nih)
    assert str(err.value).startswith(str(nih.root / "train_val_list.txt"))


def test_patient_in_both_lists_is_an_error(nih: NIH) -> None:
    test_names = (nih.root / "test_list.txt").read_text().split()
    moved = next(n for n in test_names if nih.patient[n] == "16")
    (nih.root / "test_list.txt").write_text("\n".join(n for n in test_names if n != moved) + "\n")
    with (nih.root / "train_val_list.txt").open("a") as f:
        f.write(moved + "\n")
    with pytest.raises(DataError, match="patient '16'") as err:
        load(nih)
    assert str(err.value).startswith(str(nih.root / "test_list.txt"))


def test_label_ratio_subsets_are_nested_and_keep_patients_whole(nih: NIH) -> None:
    train = load(nih).train
    previous: set[int] = set()
    for ratio in (0.1, 0.3, 0.6, 1.0):
        index = set(label_ratio_index(train, ratio, seed=0).tolist())
        assert previous <= index, f"ratio {ratio} subset must contain the smaller ones"
        kept = {str(train.groups[i]) for i in index}
        whole = {i for i, g in enumerate(train.groups) if str(g) in kept}
        assert index == whole, "a patient's images are all in or all out"
        previous = index
    assert previous == set(range(len(train)))
    assert len(label_ratio_index(train, 0.1, seed=0)) < len(train)


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("layout", ["plain", "deep"])
def test_images_found_by_name_in_other_layouts(tmp_path: Path, layout: str) -> None:
    data = make_nih(tmp_path, layout=layout)
    splits = load(data)
    names = [n for s in (splits.train, splits.val, splits.test) for n in names_of(s, data)]
    assert sorted(names) == sorted(data.findings)


def test_images_outside_images_folders_are_not_used(nih: NIH) -> None:
    name = "00000001_000.png"
    stray = nih.root / "other" / name
    stray.parent.mkdir()
    nih.path[name].rename(stray)
    with pytest.raises(DataError, match=name) as err:
        load(nih)
    head = f"{nih.root}: 1 of the {len(nih.findings)} images listed in Data_Entry_2017.csv is missing"
    assert str(err.value).startswith(head)
    assert "in none of these folders" in str(err.value)


def test_rows_with_trailing_commas_do_not_shift_columns(tmp_path: Path) -> None:
    data = make_nih(tmp_path, trailing_comma=True)
    splits = load(data)
    assert list(splits.class_names) == MEDPEFT_ORDER
    for split in (splits.train, splits.val, splits.test):
        for name, labels, group in zip(names_of(split, data), split.labels, split.groups):
            assert labels.tolist() == expected_labels(data.findings[name])
            assert str(group) == data.patient[name]


def test_header_with_extra_unnamed_columns(nih: NIH) -> None:
    nih.csv.write_text(HEADER + ",,\n" + "\n".join(r + ",," for r in nih.rows) + "\n")
    splits = load(nih)
    assert len(splits.train) + len(splits.val) + len(splits.test) == len(nih.findings)


# ----------------------------------------------------------------------------- errors


def test_missing_csv_names_it(nih: NIH) -> None:
    nih.csv.unlink()
    with pytest.raises(DataError) as err:
        load(nih)
    assert str(err.value).startswith(str(nih.csv))
    assert "\n" not in str(err.value)


def test_missing_column_names_csv_and_column(nih: NIH) -> None:
    nih.csv.write_text(HEADER.replace("Patient ID", "Patient") + "\n" + "\n".join(nih.rows) + "\n")
    with pytest.raises(DataError, match="'Patient ID'") as err:
        load(nih)
    assert str(err.value).startswith(str(nih.csv))


def test_unknown_finding_names_csv_line_column_and_value(nih: NIH) -> None:
    nih.rows[4] = nih.rows[4].replace(nih.findings[nih.rows[4].split(",")[0]], "Cardiomegaly|Pneumonitis", 1)
    write_csv(nih)
    with pytest.raises(DataError) as err:
        load(nih)
    message = str(err.value)
    assert message.startswith(str(nih.csv))
    assert "line 6" in message and "'Finding Labels'" in message and "'Pneumonitis'" in message
    assert "\n" not in message


def test_empty_finding_is_an_error(nih: NIH) -> None:
    name = nih.rows[0].split(",")[0]
    nih.rows[0] = nih.rows[0].replace(f"{name},No Finding,", f"{name},,", 1)
    write_csv(nih)
    with pytest.raises(DataError, match="line 2") as err:
        load(nih)
    assert str(err.value).startswith(str(nih.csv))


def test_missing_image_fails_naming_it_or_is_skipped_and_counted(nih: NIH) -> None:
    name = "00000003_001.png"
    nih.path[name].unlink()
    with pytest.raises(DataError, match=name) as err:
        load(nih)
    assert str(err.value).startswith(f"{nih.root}: 1 of the ") and " is missing" in str(err.value)
    splits = load(nih, skip_unreadable=True)
    assert len(splits.skipped) == 1 and name in splits.skipped[0]
    all_names = [n for s in (splits.train, splits.val, splits.test) for n in names_of(s, nih)]
    assert sorted(all_names) == sorted(set(nih.findings) - {name})


def test_corrupt_image_fails_naming_it_or_is_skipped_and_counted(nih: NIH) -> None:
    names = ["00000004_000.png", "00000018_001.png"]
    for name in names:
        nih.path[name].write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError) as err:
        load(nih)
    assert str(err.value).startswith(str(nih.path[names[0]])) or str(err.value).startswith(str(nih.path[names[1]]))
    assert "unreadable" in str(err.value)
    splits = load(nih, skip_unreadable=True)
    assert len(splits.skipped) == 2
    assert all(any(n in s for s in splits.skipped) for n in names)
    assert len(splits.train) + len(splits.val) + len(splits.test) == len(nih.findings) - 2


def test_options_are_validated(nih: NIH) -> None:
    with pytest.raises(OPTION_ERRORS, match="val_fractio"):
        load(nih, val_fractio=0.2)
    with pytest.raises(OPTION_ERRORS, match="val_fraction"):
        load(nih, val_fraction=1.5)


# ----------------------------------------------------------------------------- config


def search_dict(root: Path, options: dict) -> dict:
    return {
        "dataset": {"name": "nih", "root": str(root), "label_ratios": [0.1, 1.0], "image_size": 32, "options": options},
        "model": {"backbone": "vit_tiny_patch16_224"},
    }


def test_search_config_accepts_nih(nih: NIH) -> None:
    config = validate_search_dict(search_dict(nih.root, {"val_fraction": 0.2, "skip_unreadable": True}), "x.yaml")
    assert config.dataset.name == "nih"
    assert config.dataset.options == {"val_fraction": 0.2, "test_fraction": 0.2, "skip_unreadable": True,
                                      "colour": "grey"}
    defaults = validate_search_dict(search_dict(nih.root, {}), "x.yaml").dataset.options
    assert defaults == {"val_fraction": 0.125, "test_fraction": 0.2, "skip_unreadable": False, "colour": "grey"}


def test_search_config_rejects_unknown_option(nih: NIH) -> None:
    with pytest.raises(ConfigError) as err:
        validate_search_dict(search_dict(nih.root, {"labels": ["Mass"]}), "x.yaml")
    assert err.value.key == "dataset.options.labels"
    assert "x.yaml" in str(err.value)


def test_sex_and_view_are_subgroup_attributes(nih: NIH) -> None:
    nih.rows = [r.replace(",PA,", ",AP,") if nih.patient[r.split(",")[0]] == "3" else r for r in nih.rows]
    write_csv(nih)
    splits = load_splits("nih", nih.root, SIZE, {}, 0)
    assert splits.subgroup_attributes == ("sex", "view")
    seen = 0
    for split in (splits.train, splits.val, splits.test):
        for image, sex, view in zip(split.images, split.subgroups["sex"], split.subgroups["view"]):
            patient = int(nih.patient[nih.level[int(np.asarray(image)[0, 0])]])
            assert (sex, view) == ("MF"[patient % 2], "AP" if patient == 3 else "PA")
            seen += 1
    assert seen == len(nih.level)
