"""Tests for the CheXpert format (medpeft_ray/data/chexpert.py) on a tiny dataset in the published layout."""

from __future__ import annotations

import math
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
OBSERVATIONS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
]
HEADER = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(OBSERVATIONS)
COMPETITION = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
VALUES = ["1.0", "0.0", "-1.0", ""]
NUM_TRAIN, NUM_VALID = 18, 5


@dataclass
class CheXpert:
    root: Path
    rows: dict[str, list[str]] = field(default_factory=dict)  # "train"/"valid" -> CSV lines
    values: dict[str, dict[str, str]] = field(default_factory=dict)  # CSV Path -> observation -> raw value
    frontal: dict[str, bool] = field(default_factory=dict)  # CSV Path -> frontal view
    patient: dict[str, str] = field(default_factory=dict)  # CSV Path -> patient
    split: dict[str, str] = field(default_factory=dict)  # CSV Path -> train / valid
    level: dict[int, str] = field(default_factory=dict)  # grey level -> CSV Path

    def path_of(self, csv_path: str) -> Path:
        return self.root.parent / csv_path

    def name_of(self, pixel: int) -> str:
        """The CSV Path of an image decoded to grey level ``pixel`` (JPEG may shift it by a little)."""
        best = min(self.level, key=lambda level: abs(level - pixel))
        assert abs(best - pixel) <= 1, pixel
        return self.level[best]


def make_chexpert(base: Path, folder: str = "CheXpert-v1.0-small", prefix: str | None = None) -> CheXpert:
    """18 train + 5 valid patients, 1-2 studies of 1-2 views each (frontal and lateral): 58 JPEG images.

    ``prefix`` is the first component written in the CSV Path column (default: the folder's name;
    "" writes paths relative to the dataset folder).
    """
    root = base / folder
    root.mkdir(parents=True)
    prefix = folder if prefix is None else prefix
    data = CheXpert(root, {"train": [], "valid": []})
    rng = np.random.default_rng(0)
    k = 0
    for split, first, count in (("train", 1, NUM_TRAIN), ("valid", 64541, NUM_VALID)):
        for p in range(first, first + count):
            patient = f"patient{p:05d}"
            for study in range(1, 2 + p % 2):
                for view in range(1, 2 + (p + study) % 2):
                    frontal = view == 1
                    rel = f"{split}/{patient}/study{study}/view{view}_{'frontal' if frontal else 'lateral'}.jpg"
                    csv_path = f"{prefix}/{rel}" if prefix else rel
                    file = root / rel
                    file.parent.mkdir(parents=True, exist_ok=True)
                    level = 8 + 4 * k
                    assert level < 250, "too many images for distinct grey levels"
                    side = 20 + (k % 4) * 6
                    mode = "RGB" if k % 4 == 1 else "L"
                    colour = (level,) * 3 if mode == "RGB" else level
                    Image.new(mode, (side + k % 3, side), colour).save(file, quality=95)
                    values = {o: VALUES[int(rng.integers(0, 4))] for o in OBSERVATIONS}
                    data.values[csv_path], data.frontal[csv_path], data.patient[csv_path] = values, frontal, patient
                    data.split[csv_path], data.level[level] = split, csv_path
                    view_cols = "Frontal,AP" if frontal else "Lateral,"
                    data.rows[split].append(
                        f"{csv_path},{'Male' if p % 2 else 'Female'},{40 + p % 50},{view_cols},"
                        + ",".join(values.values())
                    )
                    k += 1
    write_csvs(data)
    return data


def write_csvs(data: CheXpert) -> None:
    for split, rows in data.rows.items():
        (data.root / f"{split}.csv").write_text(HEADER + "\n" + "\n".join(rows) + "\n")


def names_of(split: LabeledImages, data: CheXpert) -> list[str]:
    images = np.asarray(split.images, dtype=np.int64).reshape(len(split), -1)
    assert (images.max(axis=1) - images.min(axis=1) <= 1).all(), "every test image is one grey level"
    return [data.name_of(int(round(v))) for v in images.mean(axis=1)]


def all_rows(splits: DatasetSplits, data: CheXpert) -> dict[str, np.ndarray]:
    """CSV Path -> label vector over all three splits."""
    out = {}
    for split in (splits.train, splits.val, splits.test):
        out.update(zip(names_of(split, data), split.labels))
    return out


def groups_of(split: LabeledImages) -> set[str]:
    return {str(g) for g in split.groups}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> CheXpert:
    """A dataset that no test changes (tests that break files build their own)."""
    return make_chexpert(tmp_path_factory.mktemp("chexpert"))


@pytest.fixture
def chexpert(tmp_path: Path) -> CheXpert:
    return make_chexpert(tmp_path)


def load(data: CheXpert, seed: int = 0, **options) -> DatasetSplits:
    return load_splits("chexpert", data.root, SIZE, options, seed)


def expected(raw: str, policy: str) -> float:
    if raw == "-1.0":
        return {"u-ones": 1.0, "u-zeros": 0.0, "ignore": math.nan}[policy]
    return 1.0 if raw == "1.0" else 0.0


def assert_labels(splits: DatasetSplits, data: CheXpert, policies: dict[str, str]) -> int:
    """Checks every image's vector against the CSV; returns how many uncertain values were mapped."""
    uncertain = 0
    rows = all_rows(splits, data)
    assert sorted(rows) == sorted(data.values), "each CSV row once"
    for name, labels in rows.items():
        for label, got in zip(splits.class_names, labels.tolist()):
            want = expected(data.values[name][label], policies[label])
            assert (math.isnan(got) and math.isnan(want)) or got == want, (name, label, got, want)
            uncertain += data.values[name][label] == "-1.0"
    return uncertain


# ----------------------------------------------------------------------------- classes and labels


def test_default_labels_are_the_competition_five_with_the_common_mix(shared: CheXpert) -> None:
    splits = load(shared)
    assert list(splits.class_names) == COMPETITION
    assert splits.task == "multilabel"
    mix = {"Atelectasis": "u-ones", "Cardiomegaly": "u-zeros", "Consolidation": "u-zeros", "Edema": "u-ones",
           "Pleural Effusion": "u-ones"}
    assert assert_labels(splits, shared, mix) > 5, "the fixture must contain uncertain values"
    assert not np.isnan(np.concatenate([splits.train.labels, splits.val.labels, splits.test.labels])).any()


@pytest.mark.parametrize("policy", ["u-ones", "u-zeros", "ignore"])
def test_one_policy_for_all_labels(shared: CheXpert, policy: str) -> None:
    splits = load(shared, uncertainty=policy)
    assert assert_labels(splits, shared, dict.fromkeys(COMPETITION, policy)) > 5
    has_nan = np.isnan(splits.train.labels).any()
    assert has_nan == (policy == "ignore")


def test_policy_mapping_overrides_the_mix_for_named_labels(shared: CheXpert) -> None:
    splits = load(shared, uncertainty={"Cardiomegaly": "ignore", "Edema": "U-Zeros"})
    policies = {"Atelectasis": "u-ones", "Cardiomegaly": "ignore", "Consolidation": "u-zeros", "Edema": "u-zeros",
                "Pleural Effusion": "u-ones"}
    assert_labels(splits, shared, policies)
    cardio = np.concatenate([s.labels[:, 1] for s in (splits.train, splits.val, splits.test)])
    assert np.isnan(cardio).any()


def test_chosen_labels_in_chosen_order(shared: CheXpert) -> None:
    labels = ["Support Devices", "No Finding", "Lung Opacity"]
    splits = load(shared, labels=labels, uncertainty="ignore")
    assert list(splits.class_names) == labels
    assert_labels(splits, shared, dict.fromkeys(labels, "ignore"))


def test_blank_means_negative(shared: CheXpert) -> None:
    rows = all_rows(load(shared, uncertainty="ignore"), shared)
    blanks = [(n, k) for n in rows for k, label in enumerate(COMPETITION) if shared.values[n][label] == ""]
    assert blanks and all(rows[n][k] == 0.0 for n, k in blanks)


# ----------------------------------------------------------------------------- splits and views


def test_valid_csv_is_the_test_split_and_val_is_drawn_from_train_patients(shared: CheXpert) -> None:
    splits = load(shared)
    assert {shared.split[n] for n in names_of(splits.test, shared)} == {"valid"}
    assert len(splits.test) == len(shared.rows["valid"])
    train_names = names_of(splits.train, shared) + names_of(splits.val, shared)
    assert {shared.split[n] for n in train_names} == {"train"} and len(train_names) == len(shared.rows["train"])
    train, val, test = groups_of(splits.train), groups_of(splits.val), groups_of(splits.test)
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(val) == round(0.1 * NUM_TRAIN)
    assert all(g.startswith("patient") for g in train | val | test)
    for split in (splits.train, splits.val, splits.test):
        assert [shared.patient[n] for n in names_of(split, shared)] == [str(g) for g in split.groups]


def test_val_fraction_and_seed(shared: CheXpert) -> None:
    assert len(groups_of(load(shared, val_fraction=0.5).val)) == NUM_TRAIN // 2
    vals = {frozenset(groups_of(load(shared, seed=s).val)) for s in range(5)}
    assert len(vals) > 1, "the validation patients must depend on the dataset seed"


def test_frontal_only(shared: CheXpert) -> None:
    splits = load(shared, frontal_only=True)
    names = [n for s in (splits.train, splits.val, splits.test) for n in names_of(s, shared)]
    assert sorted(names) == sorted(n for n, frontal in shared.frontal.items() if frontal)
    assert len(names) < len(shared.frontal)
    everything = load(shared)
    assert len(everything.train) + len(everything.val) + len(everything.test) == len(shared.frontal)


def test_label_ratio_subsets_are_nested_and_keep_patients_whole(shared: CheXpert) -> None:
    train = load(shared).train
    previous: set[int] = set()
    for ratio in (0.1, 0.3, 0.6, 1.0):
        index = set(label_ratio_index(train, ratio, seed=1).tolist())
        assert previous <= index
        kept = {str(train.groups[i]) for i in index}
        assert index == {i for i, g in enumerate(train.groups) if str(g) in kept}
        previous = index
    assert len(label_ratio_index(train, 0.1, seed=1)) < len(train)


# ----------------------------------------------------------------------------- paths


@pytest.mark.parametrize(
    "folder,prefix",
    [("chexpert_renamed", "CheXpert-v1.0-small"), ("CheXpert-v1.0-small", ""), ("CheXpert-v1.0", None)],
)
def test_path_column_resolution(tmp_path: Path, folder: str, prefix: str | None) -> None:
    data = make_chexpert(tmp_path, folder=folder, prefix=prefix)
    splits = load(data)
    assert len(splits.train) + len(splits.val) + len(splits.test) == len(data.values)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("csv", ["train.csv", "valid.csv"])
def test_missing_csv_names_it(chexpert: CheXpert, csv: str) -> None:
    (chexpert.root / csv).unlink()
    with pytest.raises(DataError) as err:
        load(chexpert)
    assert str(err.value).startswith(str(chexpert.root / csv))


def test_bad_value_names_csv_line_column_and_value(chexpert: CheXpert) -> None:
    row = chexpert.rows["valid"][3].split(",")
    row[5 + OBSERVATIONS.index("Edema")] = "2.0"
    chexpert.rows["valid"][3] = ",".join(row)
    write_csvs(chexpert)
    with pytest.raises(DataError) as err:
        load(chexpert)
    message = str(err.value)
    assert message.startswith(str(chexpert.root / "valid.csv"))
    assert "line 5" in message and "'Edema'" in message and "'2.0'" in message
    assert "\n" not in message
    # a column that is not selected is not read
    assert list(load(chexpert, labels=["Cardiomegaly"]).class_names) == ["Cardiomegaly"]


def test_text_value_is_an_error(chexpert: CheXpert) -> None:
    row = chexpert.rows["train"][0].split(",")
    row[5 + OBSERVATIONS.index("Atelectasis")] = "yes"
    chexpert.rows["train"][0] = ",".join(row)
    write_csvs(chexpert)
    with pytest.raises(DataError, match="line 2: column 'Atelectasis': bad value 'yes'"):
        load(chexpert)


def test_missing_label_column_names_it(chexpert: CheXpert) -> None:
    text = (chexpert.root / "train.csv").read_text().replace(",Pleural Effusion,", ",Effusion,", 1)
    (chexpert.root / "train.csv").write_text(text)
    with pytest.raises(DataError, match="'Pleural Effusion'") as err:
        load(chexpert)
    assert str(err.value).startswith(str(chexpert.root / "train.csv"))


def test_path_without_patient_is_an_error(chexpert: CheXpert) -> None:
    chexpert.rows["train"][2] = chexpert.rows["train"][2].replace("/patient", "/person", 1)
    write_csvs(chexpert)
    with pytest.raises(DataError, match="line 4: column 'Path'"):
        load(chexpert)


def test_missing_image_fails_naming_it_or_is_skipped_and_counted(chexpert: CheXpert) -> None:
    name = next(n for n in chexpert.values if chexpert.split[n] == "valid")
    chexpert.path_of(name).unlink()
    with pytest.raises(DataError) as err:
        load(chexpert)
    assert str(err.value).startswith(f"{chexpert.root}: 1 of the {len(chexpert.values)} images listed is missing")
    assert str(chexpert.path_of(name).relative_to(chexpert.root)) in str(err.value)
    splits = load(chexpert, skip_unreadable=True)
    assert len(splits.skipped) == 1 and str(chexpert.path_of(name)) in splits.skipped[0]
    assert len(splits.test) == len(chexpert.rows["valid"]) - 1


def test_corrupt_image_fails_naming_it_or_is_skipped_and_counted(chexpert: CheXpert) -> None:
    names = [n for n in chexpert.values if chexpert.split[n] == "train"][3:5]
    for name in names:
        chexpert.path_of(name).write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    with pytest.raises(DataError, match="unreadable") as err:
        load(chexpert)
    assert any(str(err.value).startswith(str(chexpert.path_of(n))) for n in names)
    splits = load(chexpert, skip_unreadable=True)
    assert len(splits.skipped) == 2
    assert len(splits.train) + len(splits.val) == len(chexpert.rows["train"]) - 2


def test_patient_in_train_and_valid_is_an_error(chexpert: CheXpert) -> None:
    chexpert.rows["valid"][0] = chexpert.rows["valid"][0].replace("patient64541", "patient00001")
    write_csvs(chexpert)
    with pytest.raises(DataError, match="patient00001") as err:
        load(chexpert)
    assert str(err.value).startswith(str(chexpert.root / "valid.csv"))


@pytest.mark.parametrize(
    "options,where",
    [
        ({"labels": ["Edema", "Pleural Efusion"]}, "Pleural Efusion"),
        ({"labels": ["Edema", "Edema"]}, "distinct"),
        ({"labels": []}, "labels"),
        ({"uncertainty": "u-half"}, "u-half"),
        ({"uncertainty": {"Pneumonitis": "u-ones"}}, "Pneumonitis"),
        ({"uncertainty": {"Edema": "maybe"}}, "maybe"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"test_fraction": 0.2}, "test_fraction"),
    ],
)
def test_bad_options_are_validation_errors(shared: CheXpert, options: dict, where: str) -> None:
    with pytest.raises(OPTION_ERRORS, match=where):
        load(shared, **options)


# ----------------------------------------------------------------------------- config


def search_dict(root: Path, options: dict) -> dict:
    return {
        "dataset": {"name": "chexpert", "root": str(root), "label_ratios": [0.1, 1.0], "image_size": 32,
                    "options": options},
        "model": {"backbone": "vit_tiny_patch16_224"},
    }


def test_search_config_accepts_chexpert(shared: CheXpert) -> None:
    options = {"labels": ["Edema", "Cardiomegaly"], "uncertainty": {"Edema": "ignore"}, "frontal_only": True}
    config = validate_search_dict(search_dict(shared.root, options), "x.yaml")
    assert config.dataset.name == "chexpert"
    assert config.dataset.options["labels"] == ["Edema", "Cardiomegaly"]
    assert config.dataset.options["uncertainty"] == {"Edema": "ignore"}
    assert config.dataset.options["frontal_only"] is True
    defaults = validate_search_dict(search_dict(shared.root, {}), "x.yaml").dataset.options
    assert defaults == {
        "labels": COMPETITION,
        "uncertainty": {"Atelectasis": "u-ones", "Edema": "u-ones", "Pleural Effusion": "u-ones"},
        "frontal_only": False, "val_fraction": 0.1, "skip_unreadable": False,
    }


def test_search_config_rejects_unknown_option_and_label(shared: CheXpert) -> None:
    with pytest.raises(ConfigError) as err:
        validate_search_dict(search_dict(shared.root, {"frontal": True}), "x.yaml")
    assert err.value.key == "dataset.options.frontal"
    assert "frontal_only" in str(err.value)  # the did-you-mean hint
    with pytest.raises(ConfigError) as err:
        validate_search_dict(search_dict(shared.root, {"labels": ["Edema", "Hernia"]}), "x.yaml")
    assert err.value.key == "dataset.options.labels.1"
    assert "'Hernia'" in str(err.value)


def test_sex_and_views_are_subgroup_attributes(chexpert: CheXpert) -> None:
    first = chexpert.rows["train"][0]
    chexpert.rows["train"][0] = first.replace(",Female,", ",Unknown,").replace(",Male,", ",Unknown,")
    write_csvs(chexpert)
    splits = load_splits("chexpert", chexpert.root, SIZE, {}, 0)
    assert splits.subgroup_attributes == ("sex", "frontal_lateral", "view")
    unknown = first.split(",")[0]
    seen = set()
    for split in (splits.train, splits.val, splits.test):
        for i, image in enumerate(split.images):
            csv_path = chexpert.name_of(int(np.asarray(image).mean().round()))
            p = int(chexpert.patient[csv_path].removeprefix("patient"))
            frontal = chexpert.frontal[csv_path]
            attributes = {name: values[i] for name, values in split.subgroups.items()}
            assert attributes == {
                "sex": "" if csv_path == unknown else ("M" if p % 2 else "F"),
                "frontal_lateral": "Frontal" if frontal else "Lateral", "view": "AP" if frontal else "",
            }, csv_path
            seen.add(csv_path)
    assert len(seen) == len(chexpert.level)
