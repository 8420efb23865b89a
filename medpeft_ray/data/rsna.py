"""RSNA Pneumonia Detection Challenge, as published (Kaggle, stage 2).

``stage_2_train_labels.csv`` (``patientId,x,y,width,height,Target``) has one row per opacity box,
so a positive patient appears once per box and a negative once with an empty box. Rows are
deduplicated by ``patientId``: a patient is positive when any of its rows has ``Target`` 1. Images
are ``stage_2_train_images/<patientId>.dcm`` (one frontal radiograph per patient, DICOM; decoded
with the modality LUT applied and MONOCHROME1 inverted). One class, ``Pneumonia``, trained as a
binary multi-label task (BCE). The publisher gives no split: it is drawn by patient.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from medpeft_ray.data.base import DatasetSplits
from medpeft_ray.data.layout import MarkerPaths
from medpeft_ray.data.records import Colour, SplitOptions
from medpeft_ray.data.records import ImageRecord, build_splits
from medpeft_ray.data.registry import register_dataset
from medpeft_ray.data.tables import csv_rows
from medpeft_ray.errors import DataError

CLASS_NAMES = ("Pneumonia",)
ID_COLUMN = "patientId"
TARGET_COLUMN = "Target"


class RsnaOptions(SplitOptions):
    """Where the RSNA files lie under the dataset root (defaults: the stage 2 release)."""

    colour: Colour = Field("grey", description="grey (one channel), rgb (three) or auto (radiographs: grey by default)")
    labels_file: str = Field(
        "stage_2_train_labels.csv",
        description="the box CSV, relative to the dataset root (stage 1: stage_1_train_labels.csv)",
    )
    images_dir: str = Field(
        "stage_2_train_images", description="folder of <patientId>.dcm files, relative to the dataset root"
    )


def _target(value: str, csv_path: Path, row: int) -> float:
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if number not in (0.0, 1.0):
        raise DataError(f"{csv_path}: row {row}, column {TARGET_COLUMN!r}: value {value!r} is not 0 or 1")
    return number


def read_targets(csv_path: Path) -> dict[str, tuple[float, int]]:
    """``patientId -> (1.0 if any row has Target 1 else 0.0, first row)``, in order of first appearance.

    Rows are numbered as in a spreadsheet: the header is row 1.
    """
    targets: dict[str, tuple[float, int]] = {}
    for row_number, row in csv_rows(csv_path, (ID_COLUMN, TARGET_COLUMN)):
        patient = row[ID_COLUMN].strip()
        if not patient:
            raise DataError(f"{csv_path}: row {row_number}, column {ID_COLUMN!r}: empty patient id")
        target = _target(row[TARGET_COLUMN], csv_path, row_number)
        seen = targets.get(patient)
        if seen is None:
            targets[patient] = (target, row_number)
        elif target > seen[0]:
            targets[patient] = (target, seen[1])
    return targets


@register_dataset(
    "rsna", options=RsnaOptions, needs_root=True,
    marker=lambda options: MarkerPaths((options.labels_file, f"{options.images_dir}/")), classes=lambda _: CLASS_NAMES,
)
def load_rsna(root: Path, image_size: int, options: RsnaOptions, seed: int) -> DatasetSplits:
    csv_path = root / options.labels_file
    images = root / options.images_dir
    targets = read_targets(csv_path)
    records = [
        ImageRecord(images / f"{patient}.dcm", (target,), patient) for patient, (target, _) in targets.items()
    ]
    return build_splits(
        records, CLASS_NAMES, "multilabel", image_size, seed, root=root, val_fraction=options.val_fraction,
        test_fraction=options.test_fraction, skip_unreadable=options.skip_unreadable, colour=options.colour, source=str(csv_path),
    )
