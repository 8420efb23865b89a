"""Tests for the HAM10000 format (data/ham10000.py) on a tiny tree in the published layout."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import all_images
from PIL import Image

from medpeft_ray.config import validate_search_dict
from medpeft_ray.data import label_ratio_index, load_splits
from medpeft_ray.errors import ConfigError, DataError

SIZE = 32
CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
HEADER = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]


class Ham:
    """14 lesions (2 per diagnosis) with 1-3 images each; every image a flat, distinct grey level."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.csv = root / "HAM10000_metadata.csv"
        parts = [root / "HAM10000_images_part_1", root / "HAM10000_images_part_2"]
        for part in parts:
            part.mkdir(parents=True)
        self.rows: list[list[str]] = []
        self.level: dict[str, int] = {}  # image_id -> grey level
        self.dx: dict[str, str] = {}
        self.lesion: dict[str, str] = {}
        self.path: dict[str, Path] = {}
        n = 0
        for k in range(14):
            dx = CLASSES[k % 7]
            lesion = f"HAM_{7000 + k:07d}"
            for _ in range(1 + (k * 5) % 3):
                image = f"ISIC_{24300 + n:07d}"
                level = 12 + 8 * n
                size = (16 + n % 25, 40 - n % 20)
                path = parts[n % 2] / f"{image}.jpg"
                Image.new("RGB", size, (level, level, level)).save(path, quality=95)
                self.rows.append([lesion, image, dx, "histo", f"{40 + n}.0", "male", "back"])
                self.level[image], self.dx[image], self.lesion[image], self.path[image] = level, dx, lesion, path
                n += 1
        assert 20 <= n <= 30 and max(self.level.values()) < 256
        self.write_csv()

    def write_csv(self, rows: list[list[str]] | None = None) -> None:
        with self.csv.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(HEADER)
            writer.writerows(self.rows if rows is None else rows)

    def identify(self, image: np.ndarray) -> str:
        """The image_id whose grey level a decoded (flat) image shows."""
        image = np.asarray(image, dtype=np.int16)
        assert image.max() - image.min() <= 2, "test images are flat"
        mean = float(image.mean())
        best = min(self.level, key=lambda i: abs(self.level[i] - mean))
        assert abs(self.level[best] - mean) <= 2
        return best


@pytest.fixture
def ham(tmp_path: Path) -> Ham:
    return Ham(tmp_path / "ham")




def test_classes_labels_and_lesion_groups(ham: Ham) -> None:
    splits = load_splits("ham10000", ham.root, SIZE, {}, 0)
    assert splits.class_names == CLASSES
    assert splits.task == "multiclass"
    seen = []
    for image, label, group in all_images(splits):
        image_id = ham.identify(image)
        assert group == ham.lesion[image_id]
        assert label.tolist() == [1.0 if c == ham.dx[image_id] else 0.0 for c in CLASSES], image_id
        seen.append(image_id)
    assert sorted(seen) == sorted(ham.level), "every listed image exactly once"
    assert not splits.skipped


def test_lesions_never_span_splits(ham: Ham) -> None:
    lesions = sorted(set(ham.lesion.values()))
    for seed in range(4):
        splits = load_splits("ham10000", ham.root, SIZE, {"val_fraction": 0.2, "test_fraction": 0.3}, seed)
        parts = [set(s.groups.tolist()) for s in (splits.train, splits.val, splits.test)]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2]), f"seed {seed}"
        assert [len(p) for p in parts[1:]] == [round(0.2 * len(lesions)), round(0.3 * len(lesions))]
        assert sorted(parts[0] | parts[1] | parts[2]) == lesions


def test_label_ratio_subsets_nested_and_lesion_whole(ham: Ham) -> None:
    train = load_splits("ham10000", ham.root, SIZE, {"val_fraction": 0.1, "test_fraction": 0.1}, 1).train
    assert len(set(train.groups.tolist())) < len(train), "some training lesion must have several images"
    previous: set[int] = set()
    for ratio in (0.1, 0.25, 0.5, 1.0):
        index = label_ratio_index(train, ratio, seed=3)
        chosen = set(index.tolist())
        assert previous <= chosen, f"ratio {ratio} is not a superset of the smaller one"
        lesions = set(train.groups[index].tolist())
        assert chosen == {i for i, g in enumerate(train.groups.tolist()) if g in lesions}, "a lesion was cut"
        present = train.labels.sum(axis=0) > 0
        assert (train.labels[index].sum(axis=0) > 0)[present].all(), "every class keeps a positive"
        previous = chosen


def test_images_found_in_any_subfolder_once(ham: Ham) -> None:
    # the Kaggle copy repeats part 1 in a lower-case folder; a stray unlisted image is ignored
    shutil.copytree(ham.root / "HAM10000_images_part_1", ham.root / "ham10000_images_part_1")
    nested = ham.root / "extra" / "deeper"
    nested.mkdir(parents=True)
    moved = sorted(ham.path)[3]
    ham.path[moved].rename(nested / f"{moved}.jpg")
    Image.new("RGB", (20, 20), (3, 3, 3)).save(ham.root / "HAM10000_images_part_2" / "ISIC_9999999.jpg")
    splits = load_splits("ham10000", ham.root, SIZE, {}, 0)
    ids = [ham.identify(image) for image, _, _ in all_images(splits)]
    assert sorted(ids) == sorted(ham.level)


def test_unknown_dx_names_csv_row_column_value(ham: Ham) -> None:
    rows = [list(r) for r in ham.rows]
    rows[6][2] = "melanoma"
    ham.write_csv(rows)
    with pytest.raises(DataError) as err:
        load_splits("ham10000", ham.root, SIZE, {}, 0)
    message = str(err.value)
    assert message.startswith(str(ham.csv))
    assert "row 8" in message and "'dx'" in message and "'melanoma'" in message
    assert "\n" not in message


def test_repeated_image_id_is_an_error(ham: Ham) -> None:
    ham.write_csv(ham.rows + [ham.rows[0]])
    with pytest.raises(DataError, match="row 2") as err:
        load_splits("ham10000", ham.root, SIZE, {}, 0)
    assert str(err.value).startswith(str(ham.csv)) and ham.rows[0][1] in str(err.value)


def test_missing_csv_and_column_name_the_csv(ham: Ham) -> None:
    ham.csv.write_text("lesion_id,image_id,diagnosis\nHAM_1,ISIC_1,nv\n")
    with pytest.raises(DataError, match="'dx'") as err:
        load_splits("ham10000", ham.root, SIZE, {}, 0)
    assert str(err.value).startswith(str(ham.csv))
    ham.csv.unlink()
    with pytest.raises(DataError) as err:
        load_splits("ham10000", ham.root, SIZE, {}, 0)
    assert str(err.value).startswith(f"{ham.root}: no ham10000 dataset found: looked for HAM10000_metadata.csv")


def test_missing_and_corrupt_images_fail_or_are_skipped(ham: Ham) -> None:
    gone, bad = sorted(ham.path)[5], sorted(ham.path)[9]
    ham.path[gone].unlink()
    with pytest.raises(DataError) as err:
        load_splits("ham10000", ham.root, SIZE, {}, 0)
    assert str(err.value).startswith(
        f"{ham.root}: 1 of the {len(ham.level)} images listed in HAM10000_metadata.csv is missing, e.g. {gone}.jpg"
    )

    ham.path[bad].write_bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes())
    splits = load_splits("ham10000", ham.root, SIZE, {"skip_unreadable": True}, 0)
    expected = sorted([str(ham.root / f"{gone}.jpg"), str(ham.path[bad])])
    assert sorted(s.split(": ")[0] for s in splits.skipped) == expected
    ids = [ham.identify(image) for image, _, _ in all_images(splits)]
    assert sorted(ids) == sorted(set(ham.level) - {gone, bad})

    ham.path[gone].parent.mkdir(exist_ok=True)
    Image.new("RGB", (20, 20), (ham.level[gone],) * 3).save(ham.path[gone])
    with pytest.raises(DataError) as err:
        load_splits("ham10000", ham.root, SIZE, {}, 0)
    assert str(err.value).startswith(str(ham.path[bad])) and "unreadable" in str(err.value)


def test_search_config_accepts_ham10000_and_rejects_unknown_option(ham: Ham) -> None:
    raw = {"dataset": {"name": "ham10000", "root": str(ham.root), "label_ratios": [0.01, 1.0], "image_size": 32,
                       "options": {"test_fraction": 0.15}},
           "model": {"backbone": "vit_tiny_patch16_224"}}
    config = validate_search_dict(raw, "x.yaml")
    assert config.dataset.options["test_fraction"] == 0.15
    assert config.dataset.options["metadata_file"] == "HAM10000_metadata.csv"
    raw["dataset"]["options"] = {"group_by": "patient"}
    with pytest.raises(ConfigError) as err:
        validate_search_dict(raw, "x.yaml")
    assert "dataset.options.group_by" in str(err.value)


def test_sex_is_a_subgroup_attribute(ham: Ham) -> None:
    rows = [list(r) for r in ham.rows]
    for i, row in enumerate(rows):
        row[5] = ("male", "female", "unknown")[i % 3]
    ham.write_csv(rows)
    expected = {row[1]: ("M", "F", "")[i % 3] for i, row in enumerate(rows)}
    splits = load_splits("ham10000", ham.root, SIZE, {}, 0)
    assert splits.subgroup_attributes == ("sex",)
    for split in (splits.train, splits.val, splits.test):
        for image, sex in zip(split.images, split.subgroups["sex"]):
            assert sex == expected[ham.identify(image)]
