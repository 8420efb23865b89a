"""Tests for the BUSI breast-ultrasound format (data/busi.py) on a tiny tree in the published layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import all_images
from PIL import Image

from medpeft_ray.config import validate_search_dict
from medpeft_ray.data import label_ratio_index, load_splits
from medpeft_ray.data.busi import is_mask
from medpeft_ray.errors import ConfigError, DataError

SIZE = 32
CLASSES = ("benign", "malignant", "normal")
MASK_LEVELS = (255, 251)  # no image uses these


class Busi:
    """8 images per class, each with one or two masks; every image a flat, distinct grey level."""

    def __init__(self, root: Path, per_class: int = 8) -> None:
        self.root = root
        self.level: dict[tuple[str, str], int] = {}  # (class, file name) -> grey level
        n = 0
        for name in CLASSES:
            folder = root / name
            folder.mkdir(parents=True)
            for i in range(1, per_class + 1):
                level = 10 + 9 * n
                size = (16 + 3 * i, 40 - 2 * i)
                image = f"{name} ({i}).png"
                Image.new("L", size, level).save(folder / image)
                Image.new("L", size, MASK_LEVELS[0]).save(folder / f"{name} ({i})_mask.png")
                if i % 3 == 0:  # a second tumour: a second mask
                    Image.new("L", size, MASK_LEVELS[1]).save(folder / f"{name} ({i})_mask_1.png")
                self.level[(name, image)] = level
                n += 1
            (folder / ".DS_Store").write_bytes(b"\0\1\2")
        assert max(self.level.values()) < min(MASK_LEVELS)

    def path(self, name: str, i: int) -> Path:
        return self.root / name / f"{name} ({i}).png"

    def identify(self, image: np.ndarray) -> tuple[str, str]:
        image = np.asarray(image)
        assert image.min() == image.max(), "test images are flat"
        value = int(image[0, 0])
        assert value not in MASK_LEVELS, "a mask was read as an image"
        matches = [key for key, level in self.level.items() if level == value]
        assert len(matches) == 1, f"grey level {value} is no test image"
        return matches[0]


@pytest.fixture
def busi(tmp_path: Path) -> Busi:
    return Busi(tmp_path / "Dataset_BUSI_with_GT")




def test_mask_names() -> None:
    assert is_mask(Path("benign (1)_mask.png")) and is_mask(Path("malignant (12)_mask_1.png"))
    assert is_mask(Path("benign (3)_MASK_2.png"))
    assert not is_mask(Path("benign (1).png")) and not is_mask(Path("normal (133).png"))
    assert not is_mask(Path("mask (1).png"))


def test_classes_labels_groups_and_masks_ignored(busi: Busi) -> None:
    splits = load_splits("busi", busi.root, SIZE, {}, 0)
    assert splits.class_names == CLASSES
    assert splits.task == "multiclass"
    seen = []
    for image, label, group in all_images(splits):
        name, file_name = busi.identify(image)
        assert label.tolist() == [1.0 if c == name else 0.0 for c in CLASSES]
        assert group == f"{name}/{file_name}"
        seen.append((name, file_name))
    assert sorted(seen) == sorted(busi.level), "every image once, and no mask"
    assert not splits.skipped


def test_every_image_its_own_group_and_split_sizes(busi: Busi) -> None:
    n = len(busi.level)
    splits = load_splits("busi", busi.root, SIZE, {"val_fraction": 0.25, "test_fraction": 0.25}, 5)
    assert (len(splits.val), len(splits.test)) == (round(0.25 * n), round(0.25 * n))
    groups = [g for _, _, g in all_images(splits)]
    assert len(set(groups)) == n
    other = load_splits("busi", busi.root, SIZE, {"val_fraction": 0.25, "test_fraction": 0.25}, 6)
    assert set(other.test.groups.tolist()) != set(splits.test.groups.tolist()), "the seed must change the split"


def test_label_ratio_subsets_nested(busi: Busi) -> None:
    train = load_splits("busi", busi.root, SIZE, {}, 0).train
    previous: set[int] = set()
    for ratio in (0.1, 0.3, 0.7, 1.0):
        index = label_ratio_index(train, ratio, seed=2)
        chosen = set(index.tolist())
        assert previous <= chosen
        assert (train.labels[index].sum(axis=0) > 0).all(), "every class keeps an image"
        previous = chosen
    assert len(previous) == len(train)


def test_missing_class_folder_is_named(busi: Busi) -> None:
    shutil.rmtree(busi.root / "malignant")
    with pytest.raises(DataError) as err:
        load_splits("busi", busi.root, SIZE, {}, 0)
    assert str(err.value).startswith(str(busi.root / "malignant"))
    assert "not found" in str(err.value)


def test_class_folder_with_only_masks_is_an_error(busi: Busi) -> None:
    for i in range(1, 9):
        busi.path("normal", i).unlink()
    with pytest.raises(DataError) as err:
        load_splits("busi", busi.root, SIZE, {}, 0)
    assert str(err.value).startswith(str(busi.root / "normal"))


def test_corrupt_image_fails_or_is_skipped(busi: Busi) -> None:
    bad = busi.path("malignant", 3)
    bad.write_bytes(np.random.default_rng(2).integers(0, 256, 300, dtype=np.uint8).tobytes())
    with pytest.raises(DataError) as err:
        load_splits("busi", busi.root, SIZE, {}, 0)
    assert str(err.value).startswith(str(bad)) and "unreadable" in str(err.value)
    splits = load_splits("busi", busi.root, SIZE, {"skip_unreadable": True}, 0)
    assert [s.split(": ")[0] for s in splits.skipped] == [str(bad)]
    seen = {busi.identify(image) for image, _, _ in all_images(splits)}
    assert seen == set(busi.level) - {("malignant", bad.name)}


def test_search_config_accepts_busi_and_rejects_bad_options(busi: Busi) -> None:
    raw = {"dataset": {"name": "busi", "root": str(busi.root), "label_ratios": [0.5, 1.0], "image_size": 32},
           "model": {"backbone": "vit_tiny_patch16_224"}}
    config = validate_search_dict(raw, "x.yaml")
    assert config.dataset.name == "busi"
    assert config.dataset.options == {"val_fraction": 0.1, "test_fraction": 0.2, "skip_unreadable": False,
                                      "colour": "grey"}
    raw["dataset"]["options"] = {"mask_suffix": "_mask"}
    with pytest.raises(ConfigError) as err:
        validate_search_dict(raw, "x.yaml")
    assert "dataset.options.mask_suffix" in str(err.value)
    raw["dataset"]["options"] = {"val_fraction": 0.5, "test_fraction": 0.5}
    with pytest.raises(ConfigError, match="dataset.options"):
        validate_search_dict(raw, "x.yaml")
