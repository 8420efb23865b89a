"""A CSV of image paths and labels: the format for any dataset with a label table.

Multi-label: ``label_columns`` hold 1/0 (blank = unknown). Multi-class: one ``class_column`` of
class names. Optional ``group_column`` (patient id, for patient-disjoint splits and label
ratios) and ``split_column`` (train/val/test; otherwise drawn by group).
"""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import Field, model_validator

from medpeft_ray.data.base import DatasetSplits
from medpeft_ray.data.layout import MarkerPaths
from medpeft_ray.data.records import SplitOptions
from medpeft_ray.data.records import SPLITS, ImageRecord, build_splits, one_hot
from medpeft_ray.data.registry import register_dataset
from medpeft_ray.data.tables import read_csv
from medpeft_ray.errors import DataError


class CsvOptions(SplitOptions):
    file: str = Field("labels.csv", description="the CSV, relative to the dataset root")
    path_column: str = Field("path", description="column of image paths, relative to the dataset root")
    label_columns: list[str] | None = Field(None, description="multi-label 0/1 columns (default: all other columns)")
    class_column: str | None = Field(None, description="a column of class names (multi-class instead of multi-label)")
    group_column: str | None = Field(None, description="patient id column (default: every image its own patient)")
    split_column: str | None = Field(None, description="column of train/val/test (default: drawn by patient)")

    @model_validator(mode="after")
    def _one_label_kind(self) -> "CsvOptions":
        if self.label_columns is not None and self.class_column is not None:
            raise ValueError("give label_columns (multi-label) or class_column (multi-class), not both")
        return self


def binary_label(value: str, csv: Path, row: int, column: str) -> float:
    """'1'/'1.0' -> 1, '0'/'0.0' -> 0, blank -> NaN (unknown); anything else is a DataError."""
    text = value.strip()
    if text == "":
        return math.nan
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if number not in (0.0, 1.0):
        raise DataError(f"{csv}: row {row}, column {column!r}: label {value!r} is not 0, 1 or blank")
    return number


@register_dataset(
    "csv", options=CsvOptions, needs_root=True, marker=lambda options: MarkerPaths((options.file,)),
    # a class column's classes, or the default label columns, are what the CSV holds
    classes=lambda options: None if options.class_column else options.label_columns,
)
def load_csv(root: Path, image_size: int, options: CsvOptions, seed: int) -> DatasetSplits:
    csv = root / options.file
    named = [c for c in (options.path_column, options.class_column, options.group_column, options.split_column) if c]
    table = read_csv(csv, tuple(named + list(options.label_columns or [])))
    columns = list(table.columns)
    rows = table.to_dict(orient="records")
    if options.class_column:
        task = "multiclass"
        class_names = sorted({r[options.class_column] for r in rows})
    else:
        task = "multilabel"
        class_names = options.label_columns or [c for c in columns if c not in named]
        if not class_names:
            raise DataError(f"{csv}: no label columns")
    records = []
    for i, row in enumerate(rows, start=2):  # row 1 is the header
        if options.class_column:
            labels = one_hot(class_names.index(row[options.class_column]), len(class_names))
        else:
            labels = tuple(binary_label(row[c], csv, i, c) for c in class_names)
        split = row[options.split_column].strip().lower() if options.split_column else None
        if split is not None and split not in SPLITS:
            raise DataError(f"{csv}: row {i}, column {options.split_column!r}: split {split!r} is not train, val or test")
        path = row[options.path_column]
        group = row[options.group_column] if options.group_column else path
        records.append(ImageRecord(root / path, labels, group, split))
    return build_splits(
        records, class_names, task, image_size, seed, root=root, val_fraction=options.val_fraction,
        test_fraction=options.test_fraction, skip_unreadable=options.skip_unreadable, colour=options.colour, source=str(csv),
    )
