"""Fitzpatrick17k clinical dermatology images (Groh et al. 2021, 16,577 images), as published.

``fitzpatrick17k.csv`` (``md5hash,fitzpatrick_scale,fitzpatrick_centaur,label,nine_partition_label,
three_partition_label,qc,url,url_alphanum``) lists one row per image. The publisher ships no
images: users download each one from its ``url`` and name it ``<md5hash>.jpg`` (``.jpeg`` and
``.png`` are found too), in any sub-folder of the root. Rows whose image is not there (dead links,
the rows without a ``url``) are summarised by the missing-files check, or skipped and counted with
``skip_unreadable``.

The task is multi-class over one of the publisher's three label partitions (``partition``):

* 3: ``three_partition_label``: non-neoplastic, benign, malignant (the default);
* 9: ``nine_partition_label``, ordered by their three-partition class (:data:`NINE_CLASSES`);
* 114: ``label``, the skin conditions, in name order as listed in the CSV.

Each image records two subgroup attributes: ``skin_type``, the Fitzpatrick skin type (1-6) of
``fitzpatrick_scale`` ("" where it is -1, unknown), and ``source``, the atlas the image came from
(``dermaamin`` or ``atlasdermatologico``, from the ``url`` host; "" without a url), since a model
may fit one atlas's photography rather than the condition.

The dataset names no patients, so every image is its own group (its ``md5hash``) and the split is
drawn per image. Near-duplicate photographs of one lesion can therefore land in two splits; the
publisher gives nothing to tie them together.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import Field

from medpeft_ray.data.base import DatasetSplits
from medpeft_ray.data.layout import MarkerPaths, is_tool_folder, walk
from medpeft_ray.data.records import Colour, ImageRecord, SplitOptions, build_splits, one_hot
from medpeft_ray.data.registry import register_dataset
from medpeft_ray.data.tables import csv_rows
from medpeft_ray.errors import DataError

THREE_CLASSES = ("non-neoplastic", "benign", "malignant")
#: the nine partition labels, grouped by their three-partition class (then in name order)
NINE_CLASSES = (
    "genodermatoses", "inflammatory",
    "benign dermal", "benign epidermal", "benign melanocyte",
    "malignant cutaneous lymphoma", "malignant dermal", "malignant epidermal", "malignant melanoma",
)
PARTITION_COLUMN = {3: "three_partition_label", 9: "nine_partition_label", 114: "label"}
HASH_COLUMN, SKIN_COLUMN, URL_COLUMN = "md5hash", "fitzpatrick_scale", "url"
SKIN_TYPES = ("1", "2", "3", "4", "5", "6")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
#: url host -> the atlas it belongs to
ATLASES = {"dermaamin.com": "dermaamin", "atlasdermatologico.com.br": "atlasdermatologico"}


class Fitzpatrick17kOptions(SplitOptions):
    """Fitzpatrick17k: the label partition, the CSV, and split fractions counted in images."""

    colour: Colour = Field("rgb", description="grey (one channel), rgb (three) or auto (skin photographs: rgb by default)")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of images drawn for validation")
    test_fraction: float = Field(0.2, ge=0, lt=1, description="share of images drawn for testing")
    partition: Literal[3, 9, 114] = Field(
        3, description="classes: 3 (three_partition_label: non-neoplastic, benign, malignant), "
        "9 (nine_partition_label) or 114 (label, the skin conditions)",
    )
    csv_file: str = Field("fitzpatrick17k.csv", description="the annotation CSV, relative to the dataset root")


def index_images(root: Path) -> dict[str, Path]:
    """``stem -> path`` of every image file under ``root`` (hidden and ``__`` folders skipped).

    Walked in sorted order, so where one image lies in several folders the first path wins.
    """
    found: dict[str, Path] = {}
    for folder, subfolders, files in walk(root):
        subfolders[:] = [d for d in subfolders if not is_tool_folder(d)]
        for name in files:
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in IMAGE_SUFFIXES and not name.startswith("."):
                found.setdefault(stem, Path(folder) / name)
    return found


def skin_type(value: str, csv_path: Path, row: int) -> str:
    """``"1"``..``"6"``, or "" for -1 (and blank): the publisher's "unknown"."""
    text = value.strip()
    try:
        number = float(text) if text else -1.0
    except ValueError:
        number = float("nan")
    if number == -1.0:
        return ""
    if number.is_integer() and str(int(number)) in SKIN_TYPES:
        return str(int(number))
    raise DataError(f"{csv_path}: row {row}, column {SKIN_COLUMN!r}: value {value!r} is not 1-6 or -1 (unknown)")


def atlas(url: str) -> str:
    host = urlparse(url.strip()).netloc.lower()
    return next((name for domain, name in ATLASES.items() if host == domain or host.endswith("." + domain)), "")


def read_rows(csv_path: Path, partition: int) -> tuple[tuple[str, ...], list[tuple[str, str, str, str]]]:
    """The class names and ``(md5hash, class, skin type, atlas)`` per row.

    Raises:
        DataError: naming the CSV, the row (the header is row 1) and the column of a bad value.
    """
    label_column = PARTITION_COLUMN[partition]
    fixed = {3: THREE_CLASSES, 9: NINE_CLASSES}.get(partition)
    rows: list[tuple[str, str, str, str]] = []
    first_row: dict[str, int] = {}
    for row_number, row in csv_rows(csv_path, (HASH_COLUMN, SKIN_COLUMN, label_column)):
        md5 = row[HASH_COLUMN].strip()
        label = row[label_column].strip().lower()
        for column, value in ((HASH_COLUMN, md5), (label_column, label)):
            if not value:
                raise DataError(f"{csv_path}: row {row_number}, column {column!r}: empty value")
        if fixed is not None and label not in fixed:
            raise DataError(
                f"{csv_path}: row {row_number}, column {label_column!r}: value {row[label_column]!r} "
                f"is not one of {', '.join(fixed)}"
            )
        if md5 in first_row:
            raise DataError(
                f"{csv_path}: row {row_number}, column {HASH_COLUMN!r}: {md5!r} is listed again "
                f"(first at row {first_row[md5]})"
            )
        first_row[md5] = row_number
        rows.append((md5, label, skin_type(row[SKIN_COLUMN], csv_path, row_number), atlas(row.get(URL_COLUMN, ""))))
    # the 114 conditions are whatever the CSV lists: all its rows count, present images or not,
    # so that the classes do not change with what was downloaded
    classes = fixed if fixed is not None else tuple(sorted({label for _, label, _, _ in rows}))
    return classes, rows


@register_dataset(
    "fitzpatrick17k", options=Fitzpatrick17kOptions, needs_root=True,
    marker=lambda options: MarkerPaths((options.csv_file,)),
    # the 114 conditions are whatever the CSV lists
    classes=lambda options: {3: THREE_CLASSES, 9: NINE_CLASSES}.get(options.partition),
)
def load_fitzpatrick17k(root: Path, image_size: int, options: Fitzpatrick17kOptions, seed: int) -> DatasetSplits:
    csv_path = root / options.csv_file
    classes, rows = read_rows(csv_path, options.partition)
    images = index_images(root)
    records = [
        # an image in no folder is missing: build_splits summarises (or, asked to, skips) all such
        ImageRecord(
            images.get(md5, root / f"{md5}.jpg"), one_hot(classes.index(label), len(classes)), md5,
            attributes=(("skin_type", skin), ("source", source)),
        )
        for md5, label, skin, source in rows
    ]
    return build_splits(
        records, classes, "multiclass", image_size, seed, root=root, val_fraction=options.val_fraction,
        test_fraction=options.test_fraction, skip_unreadable=options.skip_unreadable, colour=options.colour, source=str(csv_path),
        found_by_name=True,
    )
