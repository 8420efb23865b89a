"""Image-text pairs from one CSV: an image-path column and a caption column (text-to-image data).

Layout under ``root``::

    captions.csv     image,caption[,split][,patient][,<label columns>]
    img/0001.png     image paths are relative to the CSV's folder

``split_column`` (values ``train``/``val``/``test``) gives the split; without it the split is drawn
by patient (``val_fraction``, ``test_fraction``, seeded by the dataset seed) as in the ``csv``
format, the patient being ``patient_column`` (default: every image its own patient).
``label_columns`` are 1/0 columns (blank = unknown), as the ``csv`` format reads them; without them
the data has no classes (labels (N, 0)).

A row with a blank caption is left out and counted in ``DatasetSplits.skipped``
(``<image>: no caption (...)``); a caption column blank in every row is an error. Missing and
unreadable images are handled as in the ``csv`` format (an error, or with ``skip_unreadable``
left out and counted).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from medpeft_ray.data.base import DatasetSplits
from medpeft_ray.data.csv_table import binary_label
from medpeft_ray.data.layout import MarkerPaths
from medpeft_ray.data.records import Colour, SPLITS, ImageRecord, SplitOptions, build_splits, no_caption
from medpeft_ray.data.registry import register_dataset
from medpeft_ray.data.tables import read_csv
from medpeft_ray.errors import DataError


class CaptionsOptions(SplitOptions):
    """Options of the ``captions`` format."""

    colour: Colour = Field("grey", description="grey (one channel), rgb (three) or auto (radiographs: grey by default)")
    csv: str = Field("captions.csv", description="the CSV, relative to the dataset root")
    image_column: str = Field("image", description="column of image paths, relative to the CSV's folder")
    caption_column: str = Field("caption", description="column of the captions (a blank one leaves its row out)")
    split_column: str | None = Field(None, description="column of train/val/test (default: drawn by patient)")
    patient_column: str | None = Field(None, description="patient id column (default: every image its own patient)")
    label_columns: list[str] | None = Field(
        None, description="1/0 label columns, blank = unknown (default: none, zero classes)"
    )


@register_dataset(
    "captions", options=CaptionsOptions, needs_root=True, marker=lambda options: MarkerPaths((options.csv,)),
    classes=lambda options: options.label_columns,
)
def load_captions(root: Path, image_size: int, options: CaptionsOptions, seed: int) -> DatasetSplits:
    csv = root / options.csv
    labels = list(options.label_columns or [])
    columns = (options.image_column, options.caption_column, options.split_column, options.patient_column)
    named = [c for c in columns if c]
    rows = read_csv(csv, tuple(named + labels)).to_dict(orient="records")
    if rows and not any(row[options.caption_column].strip() for row in rows):
        raise DataError(f"{csv}: column {options.caption_column!r} is empty (no row has a caption)")
    records: list[ImageRecord] = []
    left_out: list[str] = []
    for i, row in enumerate(rows, start=2):  # row 1 is the header
        image = row[options.image_column].strip()
        if not image:
            raise DataError(f"{csv}: row {i}, column {options.image_column!r}: empty image path")
        path = csv.parent / image
        caption = row[options.caption_column].strip()
        if not caption:
            left_out.append(no_caption(path, f"row {i} of {csv.name}: blank {options.caption_column!r}"))
            continue
        split = row[options.split_column].strip().lower() if options.split_column else None
        if split is not None and split not in SPLITS:
            raise DataError(
                f"{csv}: row {i}, column {options.split_column!r}: split {split!r} is not train, val or test"
            )
        group = image
        if options.patient_column:
            group = row[options.patient_column].strip()
            if not group:
                raise DataError(f"{csv}: row {i}, column {options.patient_column!r}: empty patient id")
        values = tuple(binary_label(row[c], csv, i, c) for c in labels)
        records.append(ImageRecord(path, values, group, split, caption=caption))
    # "multilabel" also without label columns: zero binary labels (see DatasetSplits)
    return build_splits(
        records, labels, "multilabel", image_size, seed, root=root, val_fraction=options.val_fraction,
        test_fraction=options.test_fraction, skip_unreadable=options.skip_unreadable, colour=options.colour, source=str(csv),
        left_out=left_out,
    )
