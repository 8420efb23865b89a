"""NIH ChestX-ray14 as published: ``Data_Entry_2017.csv``, ``images*/`` folders, official split lists.

Layout under ``root`` (the folder holding the CSV)::

    Data_Entry_2017.csv        Image Index,Finding Labels,Follow-up #,Patient ID,...
    train_val_list.txt         one image name per line (official train + validation images)
    test_list.txt              one image name per line (official test images)
    images_001/images/*.png    the Kaggle layout; a plain images/*.png works too

``root`` may also be a download folder holding that folder (up to two levels above it).

Images are found by file name in any folder whose path below ``root`` has a component starting
with ``images`` (``images/``, ``images_001/images/``, ``data/images_012/...``), at any depth and
through symbolic links; when one name occurs twice, the first in sorted path order is used. CSV
rows whose image is in none of them are missing: the load stops with one summary of them (how
many, which image folders were found) or, with ``skip_unreadable``, counts them in
``DatasetSplits.skipped``.

``Finding Labels`` holds findings joined by ``|`` (``No Finding`` for none); labels are the 14
classes in MED-PEFT order (:data:`CLASSES`). An unknown finding is a :class:`DataError` naming the
CSV, its line and the value.

Splits: with both list files, ``test_list.txt`` is the test split and validation is drawn from the
``train_val_list.txt`` patients (``val_fraction`` of them, seeded by the dataset seed), so the
splits are patient-disjoint and about 70/10/20 overall; CSV rows in neither list are left out.
Without the list files (both missing), the test split is drawn by patient too (``test_fraction``
of all patients), then validation from the remaining patients (``val_fraction`` of them). Only
one of the two list files present is an error: that would silently change the protocol.

Each image records the subgroup attributes ``sex`` (``Patient Gender``: ``M``/``F``) and ``view``
(``View Position``: ``PA``/``AP``), "" where a value is blank or the column is absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import Field

from medpeft_ray.data.base import DatasetSplits
from medpeft_ray.data.layout import MarkerPaths, is_tool_folder, walk
from medpeft_ray.data.records import Colour, SplitOptions
from medpeft_ray.data.records import ImageRecord, assign_splits, build_splits
from medpeft_ray.data.tables import read_csv
from medpeft_ray.data.registry import register_dataset
from medpeft_ray.errors import DataError

CSV_NAME = "Data_Entry_2017.csv"
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"

#: The 14 findings in the order MED-PEFT labels them.
CLASSES = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
NO_FINDING = "No Finding"
#: the dataset folder holds the CSV; the official lists (optional) are a sign of it too
NIH_MARKER = MarkerPaths((CSV_NAME, TRAIN_VAL_LIST, TEST_LIST))
IMAGE_COLUMN, FINDINGS_COLUMN, PATIENT_COLUMN = "Image Index", "Finding Labels", "Patient ID"
#: subgroup attribute -> the CSV column it is read from (optional columns: "" where absent)
ATTRIBUTE_COLUMNS = {"sex": "Patient Gender", "view": "View Position"}


class NIHOptions(SplitOptions):
    """Options of the ``nih`` format (ChestX-ray14)."""

    colour: Colour = Field("grey", description="grey (one channel), rgb (three) or auto (radiographs: grey by default)")
    val_fraction: float = Field(
        0.125, ge=0, lt=1,
        description="share of the train+val patients drawn for validation (0.125 gives 70/10/20 overall)",
    )
    test_fraction: float = Field(
        0.2, ge=0, lt=1,
        description="share of all patients drawn for testing; used only when train_val_list.txt and "
        "test_list.txt are absent",
    )
    skip_unreadable: bool = Field(False, description="skip (and count) missing or unreadable images instead of failing")


def index_images(root: Path) -> dict[str, Path]:
    """File name -> path of every file in a folder under ``root`` whose relative path has a part ``images*``."""
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in walk(root):
        dirnames[:] = [d for d in dirnames if not is_tool_folder(d)]
        parts = Path(dirpath).relative_to(root).parts
        if any(part.lower().startswith("images") for part in parts):
            for name in filenames:
                found.setdefault(name, Path(dirpath) / name)
    return found


def read_list(path: Path) -> set[str]:
    """Image names of an official split list (one per line; a leading folder is dropped)."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read split list ({type(exc).__name__}: {exc})") from None
    return {Path(line.strip()).name for line in lines if line.strip()}


def parse_findings(value: str, csv: Path, line: int) -> tuple[float, ...]:
    findings = [f.strip() for f in value.split("|")]
    if not value.strip() or any(not f for f in findings):
        raise DataError(f"{csv}: line {line}: column {FINDINGS_COLUMN!r}: empty finding in {value!r}")
    labels = [0.0] * len(CLASSES)
    for finding in findings:
        if finding == NO_FINDING:
            continue
        try:
            labels[CLASSES.index(finding)] = 1.0
        except ValueError:
            raise DataError(
                f"{csv}: line {line}: column {FINDINGS_COLUMN!r}: unknown finding {finding!r}"
                f" (known: {', '.join(CLASSES)}, {NO_FINDING})"
            ) from None
    return tuple(labels)


def official_splits(root: Path) -> tuple[set[str], set[str]] | None:
    """(train_val names, test names) from the official lists; None when both files are absent."""
    train_val_path, test_path = root / TRAIN_VAL_LIST, root / TEST_LIST
    if not train_val_path.is_file() and not test_path.is_file():
        return None
    for present, absent in ((train_val_path, test_path), (test_path, train_val_path)):
        if not absent.is_file():
            raise DataError(
                f"{absent}: file not found (needed with {present.name}; remove both to draw the test split by patient)"
            )
    train_val, test = read_list(train_val_path), read_list(test_path)
    both = sorted(train_val & test)
    if both:
        raise DataError(f"{test_path}: {len(both)} image(s) also in {TRAIN_VAL_LIST}, e.g. {both[0]!r}")
    return train_val, test


@register_dataset("nih", options=NIHOptions, needs_root=True, marker=lambda _: NIH_MARKER, classes=lambda _: CLASSES)
def load_nih(root: Path, image_size: int, options: NIHOptions, seed: int) -> DatasetSplits:
    csv = root / CSV_NAME
    frame = read_csv(csv, (IMAGE_COLUMN, FINDINGS_COLUMN, PATIENT_COLUMN))
    lists = official_splits(root)
    images = index_images(root)

    names, labels, groups = [], [], []
    attribute_values = {
        name: [v.strip().upper() for v in frame[column]] if column in frame.columns else [""] * len(frame)
        for name, column in ATTRIBUTE_COLUMNS.items()
    }
    seen: dict[str, int] = {}
    for i, (name, findings, patient) in enumerate(
        zip(frame[IMAGE_COLUMN], frame[FINDINGS_COLUMN], frame[PATIENT_COLUMN])
    ):
        line = i + 2  # the header is line 1
        name, patient = name.strip(), patient.strip()
        if not name:
            raise DataError(f"{csv}: line {line}: column {IMAGE_COLUMN!r}: empty image name")
        if not patient:
            raise DataError(f"{csv}: line {line}: column {PATIENT_COLUMN!r}: empty patient id")
        if name in seen:
            raise DataError(
                f"{csv}: line {line}: column {IMAGE_COLUMN!r}: {name!r} already listed on line {seen[name]}"
            )
        seen[name] = line
        names.append(name)
        labels.append(parse_findings(findings, csv, line))
        groups.append(patient)

    if lists is None:
        # No official lists: test by patient, then validation from the remaining patients.
        split = assign_splits(groups, 0.0, options.test_fraction, seed)
    else:
        train_val, test = lists
        split = np.asarray(["test" if n in test else "train" if n in train_val else "" for n in names], dtype=object)
        test_patients = {g for g, s in zip(groups, split) if s == "test"}
        shared = sorted({g for g, s in zip(groups, split) if s == "train"} & test_patients)
        if shared:
            raise DataError(
                f"{root / TEST_LIST}: patient {shared[0]!r} has images in both {TEST_LIST} and {TRAIN_VAL_LIST}"
                f" ({len(shared)} such patient(s)); the split would not be patient-disjoint"
            )
    rest = np.flatnonzero(split == "train")
    split[rest] = assign_splits([groups[i] for i in rest], options.val_fraction, 0.0, seed)

    records = [
        ImageRecord(
            images.get(name, root / "images" / name), labels[i], groups[i], split[i],
            tuple((attribute, values[i]) for attribute, values in attribute_values.items()),
        )
        for i, name in enumerate(names)
        if split[i]  # rows in neither official list are left out
    ]
    return build_splits(
        records, CLASSES, "multilabel", image_size, seed, root=root, val_fraction=options.val_fraction,
        test_fraction=options.test_fraction, skip_unreadable=options.skip_unreadable, colour=options.colour, source=str(csv),
        found_by_name=True,
    )
