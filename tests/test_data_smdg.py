"""Tests for the SMDG-19 glaucoma fundus format (data/smdg.py) on a tiny tree in the published layout."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medpeft_ray.config import validate_search_dict
from medpeft_ray.data import load_splits
from medpeft_ray.data.smdg import EYE_IN_NAME
from medpeft_ray.errors import ConfigError, DataError

SIZE = 32
CSV_NAME = "metadata - standardized.csv"
#: the published CSV's header
HEADER = (
    "names,types,type_expanded,isColor,original_name,patient_id,fundus,fundus_od_seg,fundus_oc_seg,bv_seg,"
    "artery_seg,vein_seg,oct,oct_oc_seg,oct_od_seg,sex,gender,age,eye,sbp,dbp,hr,iop,vcdr,Unnamed: 24,"
    "notchI_present,notchS_present,notchN_present,notchT_present,expert1_grade,expert2_grade,expert3_grade,"
    "expert4_grade,expert5_grade,cdr_avg,cdr_expert1,cdr_expert2,cdr_expert3,cdr_expert4,refractive_dioptre_1,"
    "refractive_dioptre_2,refractive_astigmatism,phakic_or_pseudophakic,iop_perkins,iop_pneumatic,pachymetry,"
    "axial_length,visual_field_mean_defect"
).split(",")


def _rows() -> list[dict[str, str]]:
    """26 images from five collections, as the published CSV fills their columns."""
    rows: list[dict[str, str]] = []
    odir_types = ("0", "1", "1", "1", "0", "0", "0", "-1", "1", "0")
    for k, kind in enumerate(odir_types):  # 5 patients, both eyes: <patient>_left.jpg, <patient>_right.jpg
        patient, side = 1000 + k // 2, ("left", "right")[k % 2]
        rows.append({"names": f"OIA-ODIR-TRAIN-{k + 1}", "types": kind, "original_name": f"{patient}_{side}.jpg",
                     "sex": "MF"[k // 2 % 2], "age": "60", "eye": {"left": "OS", "right": "OD"}[side]})
    papila_types = ("-1", "1", "0", "0", "1", "1")
    for k, kind in enumerate(papila_types):  # patient_id given; sex only as a numeric gender code
        rows.append({"names": f"PAPILA-{k + 1}", "types": kind, "original_name": str(2 * (k // 2) + 2),
                     "patient_id": f"PAPILA-{2 * (k // 2) + 2}", "gender": str(k // 2 % 2), "age": "50",
                     "eye": ("OD", "OS")[k % 2]})
    for k, kind in enumerate(("1", "1", "0", "0")):
        rows.append({"names": f"REFUGE1-train-{k + 1}", "types": kind, "original_name": f"g{k + 1:04d}.jpg"})
    for k, kind in enumerate(("0", "1", "0", "1")):
        rows.append({"names": f"ORIGA-{k + 1}", "types": kind, "original_name": f"{k + 1:03d}.jpg",
                     "eye": ("OD", "OS")[k % 2], "vcdr": "0.7"})
    # HRF's 01_g / 01_h are two people (glaucoma, healthy): no eye in the name, no pair
    rows += [{"names": "HRF-1", "types": "1", "original_name": "01_g.jpg"},
             {"names": "HRF-2", "types": "0", "original_name": "01_h.jpg"}]
    for row in rows:
        row.update(isColor="1", fundus=f"/full-fundus/{row['names']}.png")
        if row["names"].startswith(("PAPILA", "REFUGE1", "ORIGA")):
            row.update(fundus_od_seg=f"/optic-disc/{row['names']}.png", fundus_oc_seg=f"/optic-cup/{row['names']}.png")
    return rows


class Smdg:
    """The Kaggle layout: the CSV, and every image at ``full-fundus/full-fundus/<names>.png`` (one flat colour)."""

    def __init__(self, root: Path, nested: bool = True) -> None:
        self.root = root
        self.csv = root / CSV_NAME
        self.images = root / "full-fundus" / "full-fundus" if nested else root / "full-fundus"
        self.images.mkdir(parents=True)
        (root / "optic-disc" / "optic-disc").mkdir(parents=True)  # the other channels' folders, unused
        self.rows = _rows()
        self.level: dict[str, int] = {}
        for n, row in enumerate(self.rows):
            level = 10 + 9 * n
            Image.new("RGB", (28 + n % 5, 24), (level, level // 2, level)).save(self.images / f"{row['names']}.png")
            self.level[row["names"]] = (level, level // 2, level)  # fundus photographs are decoded in colour
        self.write_csv()

    def write_csv(self, rows: list[dict[str, str]] | None = None, header: list[str] = HEADER) -> None:
        with self.csv.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({c: r.get(c, "") for c in header} for r in (self.rows if rows is None else rows))

    def row(self, name: str) -> dict[str, str]:
        return next(r for r in self.rows if r["names"] == name)

    def identify(self, image: np.ndarray) -> str:
        image = np.asarray(image, dtype=np.int16)
        assert image.shape[-1] == 3 and (image == image[0, 0]).all(), "test images are flat RGB"
        matches = [n for n, level in self.level.items() if np.abs(np.asarray(level) - image[0, 0]).max() <= 1]
        assert len(matches) == 1, f"colour {image[0, 0]} is no test image"
        return matches[0]


@pytest.fixture
def smdg(tmp_path: Path) -> Smdg:
    return Smdg(tmp_path / "smdg")


def _images(splits):  # -> list of (name-identifying image, label, group, {attribute: value})
    out = []
    for split in (splits.train, splits.val, splits.test):
        for i in range(len(split)):
            attributes = {name: str(values[i]) for name, values in split.subgroups.items()}
            out.append((split.images[i], float(split.labels[i][0]), str(split.groups[i]), attributes))
    return out


def test_labels_attributes_and_suspects_left_out(smdg: Smdg) -> None:
    splits = load_splits("smdg", smdg.root, SIZE, {}, 0)
    assert splits.class_names == ("Glaucoma",) and splits.task == "multilabel"
    assert splits.subgroup_attributes == ("source", "sex", "eye")
    seen = {}
    for image, label, group, attributes in _images(splits):
        name = smdg.identify(image)
        row = smdg.row(name)
        assert label == float(row["types"]), name
        assert attributes == {"source": name.rsplit("-", 1)[0], "sex": row.get("sex", ""), "eye": row.get("eye", "")}
        seen[name] = (group, attributes)
    suspects = {r["names"] for r in smdg.rows if r["types"] == "-1"}
    assert set(seen) == set(smdg.level) - suspects and len(suspects) == 2
    assert {a["source"] for _, a in seen.values()} == {"OIA-ODIR-TRAIN", "PAPILA", "REFUGE1-train", "ORIGA", "HRF"}
    # PAPILA's gender is a numeric code, not decoded: its sex is unknown
    assert {a["sex"] for n, (_, a) in seen.items() if n.startswith("PAPILA")} == {""}
    assert {a["sex"] for n, (_, a) in seen.items() if n.startswith("OIA")} == {"M", "F"}


def test_groups_keep_a_patients_eyes_together(smdg: Smdg) -> None:
    splits = load_splits("smdg", smdg.root, SIZE, {}, 0)
    group = {smdg.identify(image): g for image, _, g, _ in _images(splits)}
    assert group["OIA-ODIR-TRAIN-1"] == group["OIA-ODIR-TRAIN-2"] == "OIA-ODIR-TRAIN/1000"
    assert group["OIA-ODIR-TRAIN-3"] != group["OIA-ODIR-TRAIN-1"]
    assert group["PAPILA-3"] == group["PAPILA-4"] == "patient:PAPILA-4"
    assert group["HRF-1"] == "HRF-1" and group["HRF-2"] == "HRF-2"
    assert group["REFUGE1-train-1"] == "REFUGE1-train-1"
    for seed in range(5):
        splits = load_splits("smdg", smdg.root, SIZE, {"val_fraction": 0.25, "test_fraction": 0.25}, seed)
        parts = [set(s.groups.tolist()) for s in (splits.train, splits.val, splits.test)]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2]), f"seed {seed}"


def test_eye_in_source_file_name() -> None:
    for name, stem in (("1029_right.jpg", "1029"), ("0_left.jpg", "0"), ("IM000003_L.JPG", "IM000003"),
                       ("Glaucoma-P_10-Right Eye", "Glaucoma-P_10")):
        match = EYE_IN_NAME.match(name)
        assert match and match["stem"] == stem, name
    for name in ("01_g.jpg", "IM000001.JPG", "NL_001.png", "g0001.jpg", "image_0.jpg", "drishtiGS_002.png"):
        assert EYE_IN_NAME.match(name) is None, name


def test_suspects_kept_as_positive_or_negative(smdg: Smdg) -> None:
    suspects = {r["names"] for r in smdg.rows if r["types"] == "-1"}
    for policy, value in (("positive", 1.0), ("negative", 0.0)):
        splits = load_splits("smdg", smdg.root, SIZE, {"suspects": policy}, 0)
        labels = {smdg.identify(image): label for image, label, _, _ in _images(splits)}
        assert set(labels) == set(smdg.level)
        assert all(labels[n] == value for n in suspects)
        assert all(labels[n] == float(smdg.row(n)["types"]) for n in set(labels) - suspects)

    only_suspects = [dict(r, types="-1") for r in smdg.rows]
    smdg.write_csv(only_suspects)
    with pytest.raises(DataError, match="glaucoma suspect") as err:
        load_splits("smdg", smdg.root, SIZE, {}, 0)
    assert str(err.value).startswith(str(smdg.csv)) and "dataset.options.suspects" in str(err.value)


def test_plain_layout_download_folder_and_no_fundus_column(smdg: Smdg, tmp_path: Path) -> None:
    nested = smdg.root / "full-fundus" / "full-fundus"
    for path in nested.iterdir():
        path.rename(smdg.root / "full-fundus" / path.name)
    nested.rmdir()
    splits = load_splits("smdg", smdg.root, SIZE, {}, 0)
    assert sum(len(s) for s in (splits.train, splits.val, splits.test)) == len(smdg.level) - 2

    # the download folder that holds the dataset folder works as the root
    assert len(load_splits("smdg", tmp_path, SIZE, {}, 0).train) > 0

    # a CSV with only the two columns needed: paths follow from the names, attributes are unknown
    smdg.write_csv(header=["names", "types"])
    splits = load_splits("smdg", smdg.root, SIZE, {}, 0)
    assert {a["sex"] for *_, a in _images(splits)} == {""} and {a["eye"] for *_, a in _images(splits)} == {""}
    assert {a["source"] for *_, a in _images(splits)} >= {"ORIGA", "PAPILA"}


def test_bad_values_name_the_csv_row_and_column(smdg: Smdg) -> None:
    cases = [
        ("types", "2", "'2'"), ("types", "glaucoma", "'glaucoma'"), ("types", "", "''"),
        ("sex", "X", "'X'"), ("eye", "OU", "'OU'"), ("names", "", "empty value"),
    ]
    for column, value, shown in cases:
        rows = [dict(r) for r in smdg.rows]
        rows[3][column] = value
        smdg.write_csv(rows)
        with pytest.raises(DataError) as err:
            load_splits("smdg", smdg.root, SIZE, {}, 0)
        message = str(err.value)
        assert message.startswith(str(smdg.csv)), message
        assert f"row 5, column '{column}'" in message and shown in message and "\n" not in message

    smdg.write_csv(smdg.rows + [smdg.rows[1]])
    with pytest.raises(DataError, match=r"row 28, column 'names': 'OIA-ODIR-TRAIN-2' is listed again \(first at row 3\)"):
        load_splits("smdg", smdg.root, SIZE, {}, 0)

    smdg.write_csv(header=["names", "diagnosis"])
    with pytest.raises(DataError, match="no column 'types'") as err:
        load_splits("smdg", smdg.root, SIZE, {}, 0)
    assert str(err.value).startswith(str(smdg.csv))


def test_missing_images_summarised_or_skipped(smdg: Smdg) -> None:
    gone = ["ORIGA-2", "REFUGE1-train-3"]
    for name in gone:
        (smdg.images / f"{name}.png").unlink()
    with pytest.raises(DataError) as err:
        load_splits("smdg", smdg.root, SIZE, {}, 0)
    message = str(err.value)
    listed = len(smdg.level) - 2  # the suspects are not listed for loading
    assert message.startswith(f"{smdg.root}: 2 of the {listed} images listed in {CSV_NAME} are missing, e.g. ")
    assert "full-fundus/full-fundus/ORIGA-2.png" in message and "full-fundus/ (2 of" in message

    splits = load_splits("smdg", smdg.root, SIZE, {"skip_unreadable": True}, 0)
    assert sorted(Path(s.split(": ")[0]).stem for s in splits.skipped) == sorted(gone)
    assert splits.missing_summary.startswith(f"{smdg.root}: 2 of the {listed} images")

    shutil.rmtree(smdg.root / "full-fundus")
    with pytest.raises(DataError, match=r"absent folders: full-fundus/"):
        load_splits("smdg", smdg.root, SIZE, {}, 0)


def test_search_config_options(smdg: Smdg) -> None:
    raw = {"dataset": {"name": "smdg", "root": str(smdg.root), "label_ratios": [1.0], "image_size": 32,
                       "options": {"suspects": "positive"}},
           "model": {"backbone": "vit_tiny_patch16_224"}}
    config = validate_search_dict(raw, "x.yaml")
    assert config.dataset.options["suspects"] == "positive"
    assert config.dataset.options["metadata_file"] == CSV_NAME
    for bad in ({"suspects": "maybe"}, {"drop_suspects": True}):
        raw["dataset"]["options"] = bad
        with pytest.raises(ConfigError) as err:
            validate_search_dict(raw, "x.yaml")
        assert f"dataset.options.{next(iter(bad))}" in str(err.value)
