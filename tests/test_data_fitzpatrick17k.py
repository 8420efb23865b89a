"""Tests for the Fitzpatrick17k format (data/fitzpatrick17k.py) on a tiny tree in the published layout."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medpeft_ray.config import validate_search_dict
from medpeft_ray.data import label_ratio_index, load_splits
from medpeft_ray.data.fitzpatrick17k import NINE_CLASSES, THREE_CLASSES
from medpeft_ray.errors import ConfigError, DataError

SIZE = 32
HEADER = ["md5hash", "fitzpatrick_scale", "fitzpatrick_centaur", "label", "nine_partition_label",
          "three_partition_label", "qc", "url", "url_alphanum"]
#: (condition, nine-partition label, three-partition label), as the published CSV pairs them
CONDITIONS = (
    ("psoriasis", "inflammatory", "non-neoplastic"),
    ("neurofibromatosis", "genodermatoses", "non-neoplastic"),
    ("dermatofibroma", "benign dermal", "benign"),
    ("seborrheic keratosis", "benign epidermal", "benign"),
    ("melanoma", "malignant melanoma", "malignant"),
    ("basal cell carcinoma", "malignant epidermal", "malignant"),
)
SKIN = ("1", "2", "3", "4", "5", "6", "-1")


class Fitz:
    """24 images, 4 per condition, skin types 1-6 and -1, from both atlases; each a flat grey level.

    The images lie where a download script might put them: one folder per atlas, a few deeper.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.csv = root / "fitzpatrick17k.csv"
        self.rows: list[list[str]] = []
        self.level: dict[str, int] = {}
        self.condition: dict[str, tuple[str, str, str]] = {}
        self.skin: dict[str, str] = {}
        self.source: dict[str, str] = {}
        self.path: dict[str, Path] = {}
        for n in range(24):
            md5 = hashlib.md5(f"image {n}".encode()).hexdigest()
            condition = CONDITIONS[n % len(CONDITIONS)]
            skin = SKIN[n % len(SKIN)]
            if n == 23:
                url, source = "", ""  # the published CSV has rows without a url
            elif n % 3 == 0:
                url, source = f"http://atlasdermatologico.com.br/img?imageId={n}", "atlasdermatologico"
            else:
                url, source = f"https://www.dermaamin.com/site/images/clinical-pic/x/x{n}.jpg", "dermaamin"
            folder = root / "images" / (source or "other") / ("deeper" if n % 5 == 0 else "")
            folder.mkdir(parents=True, exist_ok=True)
            level = 12 + 9 * n
            path = folder / f"{md5}.jpg"
            Image.new("RGB", (20 + n % 7, 30 - n % 5), (level, level, level)).save(path, quality=95)
            qc = "1 Diagnostic" if n % 11 == 0 else ""
            self.rows.append([md5, skin, skin, *condition, qc, url, "".join(c for c in url if c.isalnum()) + ".jpg"])
            self.level[md5], self.condition[md5], self.skin[md5] = level, condition, skin
            self.source[md5], self.path[md5] = source, path
        assert max(self.level.values()) < 256
        self.write_csv()

    def write_csv(self, rows: list[list[str]] | None = None, header: list[str] = HEADER) -> None:
        with self.csv.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(self.rows if rows is None else rows)

    def identify(self, image: np.ndarray) -> str:
        """The md5hash whose grey level a decoded (flat) image shows."""
        image = np.asarray(image, dtype=np.int16)
        assert image.max() - image.min() <= 2, "test images are flat"
        best = min(self.level, key=lambda m: abs(self.level[m] - float(image.mean())))
        assert abs(self.level[best] - float(image.mean())) <= 2
        return best


@pytest.fixture
def fitz(tmp_path: Path) -> Fitz:
    return Fitz(tmp_path / "fitzpatrick17k")


def _images(splits):  # -> list of (image, labels, group, {attribute: value})
    out = []
    for split in (splits.train, splits.val, splits.test):
        for i in range(len(split)):
            attributes = {name: str(values[i]) for name, values in split.subgroups.items()}
            out.append((split.images[i], split.labels[i], split.groups[i], attributes))
    return out


def test_three_partition_labels_groups_and_subgroups(fitz: Fitz) -> None:
    splits = load_splits("fitzpatrick17k", fitz.root, SIZE, {}, 0)
    assert splits.class_names == THREE_CLASSES == ("non-neoplastic", "benign", "malignant")
    assert splits.task == "multiclass"
    assert splits.subgroup_attributes == ("skin_type", "source")
    seen = []
    for image, label, group, attributes in _images(splits):
        md5 = fitz.identify(image)
        assert group == md5, "each image is its own group"
        assert label.tolist() == [1.0 if c == fitz.condition[md5][2] else 0.0 for c in THREE_CLASSES]
        # -1 (unknown skin type) and a row without a url are "" (left out of per-subgroup metrics)
        assert attributes == {"skin_type": "" if fitz.skin[md5] == "-1" else fitz.skin[md5],
                              "source": fitz.source[md5]}
        seen.append(md5)
    assert sorted(seen) == sorted(fitz.level), "every listed image exactly once"
    values = {a["skin_type"] for *_, a in _images(splits)}
    assert values == {"", "1", "2", "3", "4", "5", "6"}
    assert not splits.skipped and not splits.missing_summary


def test_nine_and_114_partitions(fitz: Fitz) -> None:
    nine = load_splits("fitzpatrick17k", fitz.root, SIZE, {"partition": 9}, 0)
    assert nine.class_names == NINE_CLASSES and len(NINE_CLASSES) == 9
    for image, label, _, _ in _images(nine):
        assert nine.class_names[int(label.argmax())] == fitz.condition[fitz.identify(image)][1]
        assert label.sum() == 1.0

    conditions = load_splits("fitzpatrick17k", fitz.root, SIZE, {"partition": 114}, 0)
    # the conditions the CSV lists, in name order (the published CSV lists 114)
    assert conditions.class_names == tuple(sorted(c for c, _, _ in CONDITIONS))
    for image, label, _, _ in _images(conditions):
        assert conditions.class_names[int(label.argmax())] == fitz.condition[fitz.identify(image)][0]


def test_split_is_drawn_per_image(fitz: Fitz) -> None:
    for seed in range(3):
        splits = load_splits("fitzpatrick17k", fitz.root, SIZE, {"val_fraction": 0.25, "test_fraction": 0.25}, seed)
        assert [len(splits.val), len(splits.test)] == [6, 6] and len(splits.train) == 12
    train = load_splits("fitzpatrick17k", fitz.root, SIZE, {}, 1).train
    index = label_ratio_index(train, 0.5, seed=0)
    assert 0 < len(index) < len(train)
    assert (train.labels[index].sum(axis=0) > 0).all(), "every class keeps a positive"


def test_bad_values_name_the_csv_row_and_column(fitz: Fitz) -> None:
    cases = [
        (1, "7", "'fitzpatrick_scale'", "'7'"),
        (1, "fair", "'fitzpatrick_scale'", "'fair'"),
        (5, "neoplastic", "'three_partition_label'", "'neoplastic'"),
        (0, "", "'md5hash'", "empty value"),
    ]
    for column, value, named, shown in cases:
        rows = [list(r) for r in fitz.rows]
        rows[4][column] = value
        fitz.write_csv(rows)
        with pytest.raises(DataError) as err:
            load_splits("fitzpatrick17k", fitz.root, SIZE, {}, 0)
        message = str(err.value)
        assert message.startswith(str(fitz.csv)) and "row 6" in message, message
        assert named in message and shown in message and "\n" not in message

    rows = [list(r) for r in fitz.rows]
    rows[7][4] = "benign vascular"  # not one of the nine
    fitz.write_csv(rows)
    with pytest.raises(DataError, match="row 9, column 'nine_partition_label'"):
        load_splits("fitzpatrick17k", fitz.root, SIZE, {"partition": 9}, 0)
    load_splits("fitzpatrick17k", fitz.root, SIZE, {"partition": 3}, 0)  # a column not used is not read

    fitz.write_csv(fitz.rows + [fitz.rows[2]])
    with pytest.raises(DataError, match=r"row 26, column 'md5hash': .* listed again \(first at row 4\)"):
        load_splits("fitzpatrick17k", fitz.root, SIZE, {}, 0)


def test_missing_column_and_csv(fitz: Fitz) -> None:
    fitz.write_csv([r[:5] for r in fitz.rows], header=HEADER[:5])  # no three_partition_label
    with pytest.raises(DataError, match="'three_partition_label'") as err:
        load_splits("fitzpatrick17k", fitz.root, SIZE, {}, 0)
    assert str(err.value).startswith(str(fitz.csv))
    fitz.csv.unlink()
    with pytest.raises(DataError) as err:
        load_splits("fitzpatrick17k", fitz.root, SIZE, {}, 0)
    assert str(err.value).startswith(f"{fitz.root}: no fitzpatrick17k dataset found: looked for fitzpatrick17k.csv")


def test_missing_images_summarised_or_skipped(fitz: Fitz) -> None:
    gone = sorted(fitz.path)[:2]
    for md5 in gone:
        fitz.path[md5].unlink()
    with pytest.raises(DataError) as err:
        load_splits("fitzpatrick17k", fitz.root, SIZE, {}, 0)
    message = str(err.value)
    assert message.startswith(f"{fitz.root}: 2 of the 24 images listed in fitzpatrick17k.csv are missing, e.g. ")
    assert all(f"{md5}.jpg" in message for md5 in gone)
    assert "skip_unreadable" in message

    splits = load_splits("fitzpatrick17k", fitz.root, SIZE, {"skip_unreadable": True}, 0)
    assert sorted(Path(s.split(": ")[0]).stem for s in splits.skipped) == sorted(gone)
    assert splits.missing_summary.startswith(f"{fitz.root}: 2 of the 24 images")
    assert sorted(fitz.identify(im) for im, *_ in _images(splits)) == sorted(set(fitz.level) - set(gone))


def test_download_folder_csv_name_png_and_options(fitz: Fitz, tmp_path: Path) -> None:
    # the folder the dataset was downloaded into works as the root; images may be PNG
    md5 = sorted(fitz.path)[3]
    Image.open(fitz.path[md5]).save(fitz.path[md5].with_suffix(".png"))
    fitz.path[md5].unlink()
    assert len(load_splits("fitzpatrick17k", tmp_path, SIZE, {}, 0).train) > 0

    fitz.csv.rename(fitz.root / "annotations.csv")
    splits = load_splits("fitzpatrick17k", fitz.root, SIZE, {"csv_file": "annotations.csv"}, 0)
    assert sum(len(s) for s in (splits.train, splits.val, splits.test)) == 24

    raw = {"dataset": {"name": "fitzpatrick17k", "root": str(fitz.root), "label_ratios": [1.0], "image_size": 32,
                       "options": {"partition": 9}},
           "model": {"backbone": "vit_tiny_patch16_224"}}
    config = validate_search_dict(raw, "x.yaml")
    assert config.dataset.options["partition"] == 9 and config.dataset.options["csv_file"] == "fitzpatrick17k.csv"
    for bad in ({"partition": 7}, {"holdout": "a12"}):
        raw["dataset"]["options"] = bad
        with pytest.raises(ConfigError) as err:
            validate_search_dict(raw, "x.yaml")
        assert f"dataset.options.{next(iter(bad))}" in str(err.value)
