"""SMDG-19, the Standardized Multi-Channel Dataset for Glaucoma (Kiefer et al.), as published.

Layout (the root is the folder holding the metadata CSV, or a download folder above it)::

    metadata - standardized.csv      names,types,...,patient_id,fundus,...,sex,gender,age,eye,...
    full-fundus/<names>.png          the Kaggle archive nests it: full-fundus/full-fundus/<names>.png

The ``fundus`` column (``/full-fundus/<names>.png``) gives an image's path where the column is
there and filled; otherwise the path follows from ``names``. Both the plain and the nested
``full-fundus/`` folder work.

``types`` is 0 (non-glaucoma), 1 (glaucoma) or -1 (glaucoma suspect). One class, ``Glaucoma``,
trained as a binary multi-label task (BCE), as RSNA's pneumonia is. Suspects are neither healthy
nor diagnosed, so they are left out by default; ``suspects: positive`` or ``negative`` keeps them
with that label.

Subgroup attributes per image: ``source``, the collection the image was standardised from (the
``names`` prefix: ``OIA-ODIR-TRAIN``, ``REFUGE1-train``, ``PAPILA``, ...), since the collections
differ in camera, population and glaucoma share; ``sex`` (``M``/``F`` from the ``sex`` column,
filled for ODIR and LES-AV; PAPILA's numeric ``gender`` code is not decoded); ``eye`` (``OD``/``OS``).
Unknown values are "".

Groups: the metadata's ``patient_id`` where it is filled (PAPILA, both eyes of a patient);
otherwise, where the source file name names the eye (ODIR's ``<patient>_left.jpg`` and
``<patient>_right.jpg``, BEH's ``IM000000_L.JPG``, CRFO's ``...-Left Eye``), the two eyes of one
name within a collection are one group; every other image is its own group. The split is drawn by
group, so one patient's two eyes never span two splits where the metadata tells them apart.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import Field

from medpeft_ray.data.base import DatasetSplits
from medpeft_ray.data.layout import MarkerPaths
from medpeft_ray.data.records import Colour, SEXES, ImageRecord, SplitOptions, build_splits
from medpeft_ray.data.registry import register_dataset
from medpeft_ray.data.tables import csv_rows
from medpeft_ray.errors import DataError

CLASS_NAMES = ("Glaucoma",)
NAME_COLUMN, TYPE_COLUMN, FUNDUS_COLUMN = "names", "types", "fundus"
PATIENT_COLUMN, SEX_COLUMN, EYE_COLUMN = "patient_id", "sex", "eye"
TYPES = {"0": 0.0, "1": 1.0, "-1": None}  # None: a suspect
EYES = {"od": "OD", "os": "OS", "right": "OD", "left": "OS"}
#: ``OIA-ODIR-TRAIN-12`` -> ``OIA-ODIR-TRAIN``: names are the collection and a running number
NAME = re.compile(r"^(?P<source>.+)-\d+$")
#: a source file name that names the eye: ``1029_right.jpg``, ``IM000000_L.JPG``, ``Glaucoma-P_1-Left Eye``
EYE_IN_NAME = re.compile(r"^(?P<stem>.+?)[_\- ](?:left|right|l|r)(?: eye)?(?:\.[a-z]+)?$", re.IGNORECASE)
ORIGINAL_COLUMN = "original_name"


class SmdgOptions(SplitOptions):
    """SMDG-19: the metadata CSV, the image folder, glaucoma suspects, and split fractions (in patients)."""

    colour: Colour = Field("rgb", description="grey (one channel), rgb (three) or auto (fundus photographs: rgb by default)")
    metadata_file: str = Field(
        "metadata - standardized.csv", description="the metadata CSV, relative to the dataset root"
    )
    images_dir: str = Field(
        "full-fundus", description="folder of <names>.png fundus images (or that folder nested in itself, as "
        "the Kaggle archive unpacks), relative to the dataset root",
    )
    suspects: Literal["exclude", "positive", "negative"] = Field(
        "exclude", description="glaucoma suspects (types -1): left out, or kept as glaucoma or as non-glaucoma",
    )


def source_of(name: str) -> str:
    match = NAME.match(name)
    return match["source"] if match else ""


def group_of(name: str, source: str, patient: str, original: str) -> str:
    """The patient an image belongs to, as far as the metadata tells (see the module text)."""
    if patient:
        return f"patient:{patient}"
    match = EYE_IN_NAME.match(original)
    if match and source:
        return f"{source}/{match['stem']}"
    return name


def images_folder(root: Path, images_dir: str) -> Path:
    """``root/full-fundus``, or ``root/full-fundus/full-fundus`` where the archive nested it."""
    folder = root / images_dir
    nested = folder / PurePosixPath(images_dir).name
    return nested if nested.is_dir() else folder


def image_path(root: Path, images: Path, images_dir: str, name: str, fundus: str) -> Path:
    """Where an image lies: the ``fundus`` column's path (below ``images`` when it starts with the
    image folder's name), or ``<images>/<name>.png``."""
    parts = [p for p in fundus.strip().replace("\\", "/").split("/") if p and p != "."]
    if not parts:
        return images / f"{name}.png"
    lead = PurePosixPath(images_dir).parts
    if tuple(parts[: len(lead)]) == lead:
        return images.joinpath(*parts[len(lead):])
    return root.joinpath(*parts)


def _type(value: str, csv_path: Path, row: int) -> float | None:
    text = value.strip()
    try:
        key = str(int(float(text))) if float(text).is_integer() else text
    except ValueError:
        key = text
    if key not in TYPES:
        raise DataError(
            f"{csv_path}: row {row}, column {TYPE_COLUMN!r}: value {value!r} is not 0 (non-glaucoma), "
            "1 (glaucoma) or -1 (suspect)"
        )
    return TYPES[key]


def _coded(value: str, codes: dict[str, str], column: str, csv_path: Path, row: int) -> str:
    text = value.strip()
    if not text:
        return ""
    if text.lower() not in codes:
        known = ", ".join(sorted(set(codes.values())))
        raise DataError(f"{csv_path}: row {row}, column {column!r}: value {value!r} is not one of {known} or blank")
    return codes[text.lower()]


def read_records(root: Path, options: SmdgOptions) -> tuple[Path, list[ImageRecord]]:
    """The metadata CSV's path and its images, suspects handled as ``options.suspects`` says.

    Raises:
        DataError: naming the CSV, the row (the header is row 1) and the column of a bad value.
    """
    csv_path = root / options.metadata_file
    images = images_folder(root, options.images_dir)
    suspect_label = {"exclude": None, "positive": 1.0, "negative": 0.0}[options.suspects]
    records: list[ImageRecord] = []
    first_row: dict[str, int] = {}
    for row_number, row in csv_rows(csv_path, (NAME_COLUMN, TYPE_COLUMN)):
        name = row[NAME_COLUMN].strip()
        if not name:
            raise DataError(f"{csv_path}: row {row_number}, column {NAME_COLUMN!r}: empty value")
        if name in first_row:
            raise DataError(
                f"{csv_path}: row {row_number}, column {NAME_COLUMN!r}: {name!r} is listed again "
                f"(first at row {first_row[name]})"
            )
        first_row[name] = row_number
        label = _type(row[TYPE_COLUMN], csv_path, row_number)
        sex = _coded(row.get(SEX_COLUMN, ""), SEXES, SEX_COLUMN, csv_path, row_number)
        eye = _coded(row.get(EYE_COLUMN, ""), EYES, EYE_COLUMN, csv_path, row_number)
        if label is None:
            if suspect_label is None:
                continue
            label = suspect_label
        source = source_of(name)
        records.append(ImageRecord(
            image_path(root, images, options.images_dir, name, row.get(FUNDUS_COLUMN, "")),
            (label,),
            group_of(name, source, row.get(PATIENT_COLUMN, "").strip(), row.get(ORIGINAL_COLUMN, "").strip()),
            attributes=(("source", source), ("sex", sex), ("eye", eye)),
        ))
    if first_row and not records:
        raise DataError(f"{csv_path}: every listed image is a glaucoma suspect (types -1); set dataset.options.suspects")
    return csv_path, records


@register_dataset(
    "smdg", options=SmdgOptions, needs_root=True,
    marker=lambda options: MarkerPaths((options.metadata_file, f"{options.images_dir}/")),
    classes=lambda _: CLASS_NAMES,
)
def load_smdg(root: Path, image_size: int, options: SmdgOptions, seed: int) -> DatasetSplits:
    csv_path, records = read_records(root, options)
    return build_splits(
        records, CLASS_NAMES, "multilabel", image_size, seed, root=root, val_fraction=options.val_fraction,
        test_fraction=options.test_fraction, skip_unreadable=options.skip_unreadable, colour=options.colour, source=str(csv_path),
    )
