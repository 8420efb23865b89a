"""Tests for the RSNA Pneumonia format (data/rsna.py), on pydicom's bundled real DICOM files."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medpeft_ray.config import validate_search_dict
from medpeft_ray.data import label_ratio_index, load_splits
from medpeft_ray.data.records import decode_image
from medpeft_ray.errors import ConfigError, DataError

SIZE = 32
HEADER = ["patientId", "x", "y", "width", "height", "Target"]
#: bundled 2-D grey files that pydicom decodes without extra plugins (uncompressed or deflated)
ORIGINALS = ("CT_small.dcm", "MR_small.dcm", "image_dfl.dcm", "liver_1frame.dcm", "rtdose_1frame.dcm",
             "examples_overlay.dcm")


def _rolled(source: str, shift: int, dest: Path) -> None:
    """A real DICOM file with its pixels rolled sideways (a distinct but genuine image)."""
    ds = pydicom.dcmread(get_testdata_file(source))
    pixels = ds.pixel_array
    ds.PixelData = np.roll(pixels, shift, axis=1).astype(pixels.dtype).tobytes()
    ds.save_as(dest)


def _monochrome1(source: str, dest: Path) -> None:
    """The same pixels as ``source``, declared MONOCHROME1 (low values shown bright)."""
    ds = pydicom.dcmread(get_testdata_file(source))
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(dest)


class Rsna:
    """A tiny RSNA tree: patients, their truth and the CSV rows, in the published layout."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.images = root / "stage_2_train_images"
        self.images.mkdir(parents=True)
        self.csv = root / "stage_2_train_labels.csv"
        self.truth: dict[str, float] = {}
        rows: list[list[str]] = []
        sources: list[tuple[str, str, int]] = [(name, "copy", 0) for name in ORIGINALS]
        sources += [("CT_small.dcm", "roll", 8 * k) for k in range(1, 10)]
        sources += [("MR_small.dcm", "roll", 5 * k) for k in range(1, 9)]
        for i, (source, how, shift) in enumerate(sources):
            patient = f"{i:08x}-0000-4000-8000-rsna{i:08d}"
            path = self.images / f"{patient}.dcm"
            if how == "copy":
                path.write_bytes(Path(get_testdata_file(source)).read_bytes())
            else:
                _rolled(source, shift, path)
            positive = i % 3 == 0
            self.truth[patient] = 1.0 if positive else 0.0
            if positive:  # one row per box, as published
                for b in range(1 + i % 2 + 1):
                    rows.append([patient, str(100 + b), str(200 + b), "150", "300", "1"])
            else:
                rows.append([patient, "", "", "", "", "0"])
        # a patient whose rows disagree: positive because one row has Target 1
        self.mixed = "ffffffff-0000-4000-8000-mixed0000000"
        _rolled("MR_small.dcm", 50, self.images / f"{self.mixed}.dcm")
        rows += [[self.mixed, "", "", "", "", "0"], [self.mixed, "10", "20", "30", "40", "1"]]
        self.truth[self.mixed] = 1.0
        # MONOCHROME1 copy of MR_small beside the MONOCHROME2 original (patient 1)
        self.mono1 = "eeeeeeee-0000-4000-8000-mono10000000"
        self.mono2 = f"{1:08x}-0000-4000-8000-rsna{1:08d}"
        _monochrome1("MR_small.dcm", self.images / f"{self.mono1}.dcm")
        rows.append([self.mono1, "", "", "", "", "0"])
        self.truth[self.mono1] = 0.0
        self.rows = rows
        self.write_csv()
        # what each file decodes to, to map split images back to patients
        self.by_pixels = {decode_image(self.path(p), SIZE).tobytes(): p for p in self.truth}
        assert len(self.by_pixels) == len(self.truth), "test images must decode to distinct arrays"

    def path(self, patient: str) -> Path:
        return self.images / f"{patient}.dcm"

    def write_csv(self, rows: list[list[str]] | None = None) -> None:
        with self.csv.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(HEADER)
            writer.writerows(self.rows if rows is None else rows)


@pytest.fixture
def rsna(tmp_path: Path) -> Rsna:
    return Rsna(tmp_path / "rsna")


def _patients(split) -> list[str]:  # type: ignore[no-untyped-def]
    return [str(g) for g in split.groups]


def test_one_image_per_patient_with_deduplicated_labels(rsna: Rsna) -> None:
    splits = load_splits("rsna", rsna.root, SIZE, {}, 0)
    assert splits.class_names == ("Pneumonia",)
    assert splits.task == "multilabel"
    assert len(rsna.rows) > len(rsna.truth), "the CSV must hold repeated patients for this test"
    seen: list[str] = []
    for split in (splits.train, splits.val, splits.test):
        assert split.images.shape[1:] == (SIZE, SIZE) and split.images.dtype == np.uint8
        assert split.labels.shape == (len(split), 1)
        for image, label, group in zip(split.images, split.labels, split.groups):
            patient = rsna.by_pixels[np.asarray(image).tobytes()]
            assert group == patient, "the group of an image must be its patientId"
            assert label[0] == rsna.truth[patient], f"{patient}: wrong label"
            seen.append(patient)
    assert sorted(seen) == sorted(rsna.truth), "every patient exactly once"
    assert splits.train.labels[:, 0].tolist().count(1.0) + splits.val.labels[:, 0].tolist().count(1.0) + \
        splits.test.labels[:, 0].tolist().count(1.0) == sum(rsna.truth.values())
    assert not splits.skipped


def test_split_sizes_follow_fractions_and_seed(rsna: Rsna) -> None:
    n = len(rsna.truth)
    splits = load_splits("rsna", rsna.root, SIZE, {"val_fraction": 0.2, "test_fraction": 0.25}, 3)
    assert (len(splits.val), len(splits.test)) == (round(0.2 * n), round(0.25 * n))
    assert len(splits.train) == n - len(splits.val) - len(splits.test)
    parts = [set(_patients(s)) for s in (splits.train, splits.val, splits.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2]), "patients span splits"
    other = load_splits("rsna", rsna.root, SIZE, {"val_fraction": 0.2, "test_fraction": 0.25}, 4)
    assert set(_patients(other.test)) != parts[2], "the seed must change the drawn split"


def test_label_ratio_subsets_are_nested_and_keep_patients_whole(rsna: Rsna) -> None:
    splits = load_splits("rsna", rsna.root, SIZE, {"val_fraction": 0.1, "test_fraction": 0.1}, 0)
    train = splits.train
    previous: set[int] = set()
    for ratio in (0.1, 0.3, 0.6, 1.0):
        index = label_ratio_index(train, ratio, seed=7)
        chosen = set(index.tolist())
        assert previous <= chosen, f"ratio {ratio} does not contain the smaller subset"
        assert train.labels[index, 0].max() == 1.0, "a subset must keep a positive"
        groups = set(train.groups[index].tolist())
        assert chosen == {i for i, g in enumerate(train.groups.tolist()) if g in groups}
        previous = chosen
    assert len(previous) == len(train)


def test_monochrome1_is_inverted(rsna: Rsna) -> None:
    splits = load_splits("rsna", rsna.root, SIZE, {}, 0)
    images = {g: np.asarray(im, dtype=np.int16) for s in (splits.train, splits.val, splits.test)
              for im, g in zip(s.images, s.groups)}
    original, inverted = images[rsna.mono2], images[rsna.mono1]
    assert original.std() > 10, "the reference image must have contrast"
    assert np.abs(inverted - (255 - original)).max() <= 1
    assert np.abs(inverted - original).mean() > 20


def test_missing_csv_names_it(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    (root / "stage_2_train_images").mkdir(parents=True)
    with pytest.raises(DataError) as err:
        load_splits("rsna", root, SIZE, {}, 0)
    assert str(err.value) == f"{root / 'stage_2_train_labels.csv'}: file not found"


def test_bad_target_names_csv_row_column_value(rsna: Rsna) -> None:
    rows = [list(r) for r in rsna.rows]
    rows[3][5] = "2"
    rsna.write_csv(rows)
    with pytest.raises(DataError) as err:
        load_splits("rsna", rsna.root, SIZE, {}, 0)
    message = str(err.value)
    assert message.startswith(str(rsna.csv))
    assert "row 5" in message and "'Target'" in message and "'2'" in message  # header is row 1
    assert "\n" not in message


def test_missing_column_names_csv(rsna: Rsna) -> None:
    rsna.csv.write_text("patientId,x,y,width,height,Label\nabc,,,,,0\n")
    with pytest.raises(DataError, match="'Target'") as err:
        load_splits("rsna", rsna.root, SIZE, {}, 0)
    assert str(err.value).startswith(str(rsna.csv))


def test_missing_image_fails_or_is_skipped(rsna: Rsna) -> None:
    gone = sorted(rsna.truth)[4]
    rsna.path(gone).unlink()
    with pytest.raises(DataError) as err:
        load_splits("rsna", rsna.root, SIZE, {}, 0)
    assert str(err.value).startswith(
        f"{rsna.root}: 1 of the {len(rsna.truth)} images listed in stage_2_train_labels.csv is missing, "
        f"e.g. stage_2_train_images/{gone}.dcm"
    )
    assert "folders with some missing: stage_2_train_images/ (1 of " in str(err.value)

    splits = load_splits("rsna", rsna.root, SIZE, {"skip_unreadable": True}, 0)
    assert len(splits.skipped) == 1 and splits.skipped[0].startswith(str(rsna.path(gone)))
    total = len(splits.train) + len(splits.val) + len(splits.test)
    assert total == len(rsna.truth) - 1
    assert gone not in {g for s in (splits.train, splits.val, splits.test) for g in s.groups.tolist()}


def test_corrupt_dicom_fails_or_is_skipped(rsna: Rsna) -> None:
    bad = sorted(rsna.truth)[2]
    rsna.path(bad).write_bytes(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    with pytest.raises(DataError) as err:
        load_splits("rsna", rsna.root, SIZE, {}, 0)
    assert str(err.value).startswith(str(rsna.path(bad)))
    assert "unreadable" in str(err.value)

    splits = load_splits("rsna", rsna.root, SIZE, {"skip_unreadable": True}, 0)
    assert [s.split(":")[0] for s in splits.skipped] == [str(rsna.path(bad))]
    assert len(splits.train) + len(splits.val) + len(splits.test) == len(rsna.truth) - 1


def test_stage_1_file_names_through_options(rsna: Rsna) -> None:
    rsna.csv.rename(rsna.root / "stage_1_train_labels.csv")
    rsna.images.rename(rsna.root / "stage_1_train_images")
    options = {"labels_file": "stage_1_train_labels.csv", "images_dir": "stage_1_train_images"}
    splits = load_splits("rsna", rsna.root, SIZE, options, 0)
    assert len(splits.train) + len(splits.val) + len(splits.test) == len(rsna.truth)
    with pytest.raises(DataError, match="stage_2_train_labels.csv"):
        load_splits("rsna", rsna.root, SIZE, {}, 0)


def test_search_config_accepts_rsna_and_rejects_unknown_option(rsna: Rsna) -> None:
    raw = {"dataset": {"name": "rsna", "root": str(rsna.root), "label_ratios": [0.01, 0.1, 1.0], "image_size": 32},
           "model": {"backbone": "vit_tiny_patch16_224"}}
    config = validate_search_dict(raw, "x.yaml")
    assert config.dataset.options["labels_file"] == "stage_2_train_labels.csv"
    assert config.dataset.options["val_fraction"] == 0.1 and config.dataset.options["test_fraction"] == 0.2
    raw["dataset"]["options"] = {"label_file": "x.csv"}
    with pytest.raises(ConfigError) as err:
        validate_search_dict(raw, "x.yaml")
    assert "dataset.options.label_file" in str(err.value)
