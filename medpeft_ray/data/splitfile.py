"""MED-PEFT split files: one line per image, ``<relative path> <K labels 0/1 ...>``, one file per split.

The publisher's label-ratio training files (1%, 10%, ...) are used as given (``ratio_files``)
instead of drawn subsets, so results are comparable with the studies that ship them.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, field_validator

from medpeft_ray.data.base import DatasetSplits
from medpeft_ray.data.layout import MarkerPaths
from medpeft_ray.data.records import Colour, ImageRecord, build_splits
from medpeft_ray.data.registry import DatasetOptions, register_dataset
from medpeft_ray.errors import DataError
from medpeft_ray.label_ratios import same_label_ratio


class SplitFileOptions(DatasetOptions):
    train: str = Field("train_list.txt", description="the full (100%) training list, relative to the root")
    val: str = Field("val_list.txt", description="the validation list")
    test: str = Field("test_list.txt", description="the test list")
    ratio_files: dict[float, str] = Field(
        default_factory=dict, description="label ratio -> its training list, e.g. {0.01: train_1.txt, 0.1: train_10.txt}"
    )
    images_dir: str = Field("", description="folder the listed paths are relative to (relative to the root)")
    class_names: list[str] | None = Field(None, description="names of the label columns (default: class_0, ...)")
    group_pattern: str | None = Field(
        None, description=r"regex whose first group is the patient id in a listed path, e.g. '(\d+)_\d+\.png$' for NIH"
    )
    skip_unreadable: bool = Field(False, description="skip (and count) unreadable images instead of failing")
    colour: Colour = Field("auto", description="grey (one channel), rgb (three), or auto: rgb when the images have colour")

    @field_validator("ratio_files")
    @classmethod
    def _ratios(cls, files: dict[float, str]) -> dict[float, str]:
        for ratio in files:
            if not 0 < ratio <= 1:
                raise ValueError(f"label ratio {ratio} must be in (0, 1]")
        return files

    @field_validator("group_pattern")
    @classmethod
    def _pattern(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                if re.compile(pattern).groups < 1:
                    raise ValueError("needs one (group) for the patient id")
            except re.error as exc:
                raise ValueError(f"not a valid regex: {exc}") from None
        return pattern


def read_split_file(path: Path) -> list[tuple[str, tuple[float, ...]]]:
    """(relative path, labels) per non-empty line; DataError names the file and line."""
    if not path.is_file():
        raise DataError(f"{path}: split file not found")
    entries, width = [], None
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            labels = tuple(float(v) for v in parts[1:])
        except ValueError:
            raise DataError(f"{path}: line {number}: labels must be 0 or 1, got {' '.join(parts[1:])!r}") from None
        if not labels or any(v not in (0.0, 1.0) for v in labels):
            raise DataError(f"{path}: line {number}: expected '<path> <labels 0/1 ...>', got {line.strip()!r}")
        if width is not None and len(labels) != width:
            raise DataError(f"{path}: line {number}: {len(labels)} labels where earlier lines have {width}")
        width = len(labels)
        entries.append((parts[0], labels))
    if not entries:
        raise DataError(f"{path}: no images listed")
    return entries


@register_dataset(
    "splitfile", options=SplitFileOptions, needs_root=True,
    marker=lambda options: MarkerPaths((options.train, options.val, options.test)),
    classes=lambda options: options.class_names,
)
def load_splitfile(root: Path, image_size: int, options: SplitFileOptions, seed: int) -> DatasetSplits:
    images = root / options.images_dir
    pattern = re.compile(options.group_pattern) if options.group_pattern else None

    def group_of(relative: str) -> str:
        match = pattern.search(relative) if pattern else None
        return match.group(1) if match else relative

    records: list[ImageRecord] = []
    for split, name in (("train", options.train), ("val", options.val), ("test", options.test)):
        for relative, labels in read_split_file(root / name):
            records.append(ImageRecord(images / relative, labels, group_of(relative), split))
    width = len(records[0].labels)
    if any(len(r.labels) != width for r in records):
        raise DataError(f"{root}: the split files disagree on the number of labels")
    class_names = options.class_names or [f"class_{k}" for k in range(width)]
    if len(class_names) != width:
        raise DataError(f"{root / options.train}: {width} labels per line but {len(class_names)} class_names given")

    train_files = {r.path for r in records if r.split == "train"}
    members: dict[float, set[Path]] = {}
    for ratio, name in options.ratio_files.items():
        listed = {images / relative for relative, _ in read_split_file(root / name)}
        outside = sorted(listed - train_files)
        if outside:
            raise DataError(f"{root / name}: {len(outside)} image(s) not in {options.train}, e.g. {outside[0]}")
        members[ratio] = listed
    if not any(same_label_ratio(r, 1.0) for r in members):
        members[1.0] = train_files
    return build_splits(
        records, class_names, "multilabel", image_size, seed, root=root, skip_unreadable=options.skip_unreadable, colour=options.colour,
        source=str(root / options.train), ratio_members=members,
    )
