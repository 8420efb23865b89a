"""HAM10000 dermoscopy ("Human Against Machine", 10,015 images, 7 diagnoses), as published.

``HAM10000_metadata.csv`` (``lesion_id,image_id,dx,dx_type,age,sex,localization``) lists one row
per image; ``dx`` is the diagnosis: akiec, bcc, bkl, df, mel, nv, vasc (multi-class, in that
order). Images are ``<image_id>.jpg`` in any sub-folder of the root (the release splits them over
``HAM10000_images_part_1/`` and ``HAM10000_images_part_2/``; where one file lies in several
folders, as in the Kaggle copy with lower-case duplicates, the first path in sorted order is used).
A lesion often has several images, so the split is drawn by ``lesion_id``: one lesion never spans
two splits, and label-ratio subsets take a lesion's images all or none. Each image records the
subgroup attribute ``sex`` (``M``/``F`` from the ``sex`` column; "" where it is ``unknown``, blank
or the column is absent).
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field

from medpeft_ray.data.base import DatasetSplits
from medpeft_ray.data.layout import MarkerPaths, is_tool_folder, walk
from medpeft_ray.data.records import Colour, SplitOptions
from medpeft_ray.data.records import ImageRecord, build_splits, one_hot, sex_of
from medpeft_ray.data.registry import register_dataset
from medpeft_ray.data.tables import csv_rows
from medpeft_ray.errors import DataError

CLASS_NAMES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
REQUIRED_COLUMNS = ("lesion_id", "image_id", "dx")
#: the ``sex`` column's values as subgroup values (anything else, ``unknown`` included, is "")


class Ham10000Options(SplitOptions):
    """HAM10000: the metadata CSV, and split fractions counted in lesions."""

    colour: Colour = Field("rgb", description="grey (one channel), rgb (three) or auto (dermoscopy photographs: rgb by default)")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of lesions drawn for validation")
    test_fraction: float = Field(0.2, ge=0, lt=1, description="share of lesions drawn for testing")
    metadata_file: str = Field("HAM10000_metadata.csv", description="the metadata CSV, relative to the dataset root")


def index_jpegs(root: Path) -> dict[str, Path]:
    """``image_id -> path`` of every ``.jpg``/``.jpeg`` under ``root`` (hidden and ``__`` folders skipped)."""
    found: dict[str, Path] = {}
    for folder, subfolders, files in walk(root):
        subfolders[:] = [d for d in subfolders if not is_tool_folder(d)]
        for name in files:
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in (".jpg", ".jpeg") and not name.startswith("."):
                found.setdefault(stem, Path(folder) / name)  # walked in sorted order: the first path wins
    return found


def read_metadata(csv_path: Path) -> list[tuple[int, str, str, str, str]]:
    """``(row, lesion_id, image_id, dx, sex)`` per image (sex ``M``, ``F`` or ""); the header is row 1."""
    rows: list[tuple[int, str, str, str, str]] = []
    first_row: dict[str, int] = {}
    for row_number, row in csv_rows(csv_path, REQUIRED_COLUMNS):
        lesion, image, dx = (row[c].strip() for c in REQUIRED_COLUMNS)
        for column, value in (("lesion_id", lesion), ("image_id", image)):
            if not value:
                raise DataError(f"{csv_path}: row {row_number}, column {column!r}: empty value")
        if dx.lower() not in CLASS_NAMES:
            raise DataError(
                f"{csv_path}: row {row_number}, column 'dx': value {row['dx']!r} is not one of {', '.join(CLASS_NAMES)}"
            )
        if image in first_row:
            raise DataError(
                f"{csv_path}: row {row_number}, column 'image_id': {image!r} is listed again (first at row {first_row[image]})"
            )
        first_row[image] = row_number
        rows.append((row_number, lesion, image, dx.lower(), sex_of(row.get("sex", ""))))
    return rows


@register_dataset(
    "ham10000", options=Ham10000Options, needs_root=True,
    marker=lambda options: MarkerPaths((options.metadata_file,)), classes=lambda _: CLASS_NAMES,
)
def load_ham10000(root: Path, image_size: int, options: Ham10000Options, seed: int) -> DatasetSplits:
    csv_path = root / options.metadata_file
    rows = read_metadata(csv_path)
    jpegs = index_jpegs(root)
    records = [
        # an image in no folder is missing: build_splits summarises (or, asked to, skips) all such
        ImageRecord(
            jpegs.get(image, root / f"{image}.jpg"), one_hot(CLASS_NAMES.index(dx), len(CLASS_NAMES)), lesion,
            attributes=(("sex", sex),),
        )
        for _, lesion, image, dx, sex in rows
    ]
    return build_splits(
        records, CLASS_NAMES, "multiclass", image_size, seed, root=root, val_fraction=options.val_fraction,
        test_fraction=options.test_fraction, skip_unreadable=options.skip_unreadable, colour=options.colour, source=str(csv_path),
        found_by_name=True,
    )
