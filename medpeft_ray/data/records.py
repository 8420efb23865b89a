"""From file records to decoded splits: the part every file-based dataset format shares.

A format module only reads its metadata (CSV, folders, split files) into :class:`ImageRecord`s;
:func:`build_splits` checks that the listed files are there (summarising the missing ones at
once: a partial download misses thousands), decodes the images (PNG/JPEG/16-bit/DICOM), carves
patient-disjoint splits where the publisher gives none, and counts unreadable files when asked to
skip them.

Image-text formats give each record a ``caption`` (report text); records without one are left out
before decoding and counted (``left_out``, entries ending ``: no caption (why)``), never an error.

Labels are floats: 1 positive, 0 negative, NaN unknown (CheXpert's "ignore" policy); unknown
labels are left out of the loss and of that class's AUROC.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal, Sequence

import numpy as np
from pydantic import Field, model_validator
from rich.progress import track

from medpeft_ray.data.base import DatasetSplits, LabeledImages, Task
from medpeft_ray.data.registry import DatasetOptions
from medpeft_ray.errors import DataError

SPLITS = ("train", "val", "test")
NOT_FOUND = "image file not found"
#: a missing file a caption is read from (a radiology report)
REPORT_NOT_FOUND = "report file not found"
#: an image-text record left out for want of a caption, as "path: no caption (why)"
NO_CAPTION = "no caption"
#: how many missing file names, and folders per kind, a missing-files summary shows
SHOWN = 3
#: how a dataset's images are decoded: one grey channel, three RGB channels, or RGB when any of
#: the first images has colour (a radiograph saved as RGB, every channel equal, stays grey)
Colour = Literal["auto", "grey", "rgb"]
#: images ``auto`` looks at
COLOUR_SAMPLE = 16


class SplitOptions(DatasetOptions):
    """Options of formats whose split is drawn by patient when the publisher gives none."""

    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of patients drawn for validation")
    test_fraction: float = Field(0.2, ge=0, lt=1, description="share of patients drawn for testing")
    skip_unreadable: bool = Field(False, description="skip (and count) unreadable images instead of failing")
    colour: Colour = Field("auto", description="grey (one channel), rgb (three), or auto: rgb when the images have colour")

    @model_validator(mode="after")
    def _fractions(self) -> "SplitOptions":
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction must be < 1 (got {self.val_fraction + self.test_fraction:g})")
        return self


@dataclass(frozen=True)
class ImageRecord:
    """One image: its file, its labels (K floats: 1, 0 or NaN), its patient and its split.

    ``split`` is ``train``, ``val``, ``test`` or None (the split is then drawn by patient).
    ``attributes`` holds the image's subgroup values (``{"skin_type": "3", "sex": "F"}``); every
    record of a dataset names the same attributes ("" where a value is unknown). ``caption`` is
    the image's text for image-text data: every record of such a dataset has one, else none has.
    """

    path: Path
    labels: tuple[float, ...]
    group: str
    split: str | None = None
    attributes: tuple[tuple[str, str], ...] = ()
    caption: str | None = None


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Min-max scales any grey array to uint8 (a constant image becomes black)."""
    pixels = pixels.astype(np.float32)
    low, high = float(pixels.min()), float(pixels.max())
    scaled = (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
    return (scaled * 255.0).round().astype(np.uint8)


def read_dicom(path: Path) -> np.ndarray:
    """Pixels of a DICOM file as uint8: modality LUT applied, MONOCHROME1 inverted, min-max scaled."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(str(path))
    pixels = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    if pixels.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
        pixels = pixels[pixels.shape[0] // 2]  # a multi-frame file: its middle frame
    elif pixels.ndim == 3:
        pixels = pixels.mean(axis=-1)  # colour: grey
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        pixels = pixels.max() - pixels  # MONOCHROME1 shows low values bright
    return to_uint8(pixels)


def has_colour(paths: Sequence[Path], sample: int = COLOUR_SAMPLE) -> bool:
    """Whether any of the first ``sample`` readable images has colour (channels that differ)."""
    from PIL import Image

    looked = 0
    for path in paths:
        if looked >= sample:
            break
        try:
            if path.suffix.lower() in (".dcm", ".dicom"):
                import pydicom

                if int(getattr(pydicom.dcmread(str(path), stop_before_pixels=True), "SamplesPerPixel", 1)) == 3:
                    return True
                looked += 1
                continue
            with Image.open(path) as img:
                looked += 1
                if img.mode in ("L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "1"):
                    continue
                thumb = np.asarray(img.convert("RGB").resize((64, 64)), dtype=np.int16)
        except Exception:  # noqa: BLE001  (an unreadable file is reported where it is decoded)
            continue
        if np.abs(thumb - thumb.mean(axis=-1, keepdims=True)).max() > 2:  # JPEG leaves grey a little tinted
            return True
    return False


def decode_image(path: Path, size: int, rgb: bool = False) -> np.ndarray:
    """A PNG/JPEG/DICOM file decoded to uint8 ``(size, size)`` grey, or ``(size, size, 3)`` with ``rgb``.

    Raises:
        DataError: naming the file, when it is missing or cannot be decoded.
    """
    from PIL import Image

    try:
        if path.suffix.lower() in (".dcm", ".dicom"):
            img = Image.fromarray(read_dicom(path))  # grey: repeated in three channels when rgb
        else:
            img = Image.open(path)
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                # 16-bit and float radiographs: Pillow's convert("L") clips at 255 (a white image)
                img = Image.fromarray(to_uint8(np.asarray(img, dtype=np.float32)))
        return np.asarray(img.convert("RGB" if rgb else "L").resize((size, size), Image.BILINEAR), dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: {NOT_FOUND}") from None
    except Exception as exc:  # noqa: BLE001  (PIL and pydicom raise many types for corrupt files)
        raise DataError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from exc


@dataclass(frozen=True)
class DecodeResult:
    images: np.ndarray
    kept: np.ndarray  # indices of the records that decoded
    unreadable: list[tuple[Path, str]]


def decode_all(
    paths: Sequence[Path],
    size: int,
    skip_unreadable: bool,
    progress: Callable[[Iterable], Iterable] | None = None,
    rgb: bool = False,
) -> DecodeResult:
    """Decodes ``paths`` (grey, or RGB) with a thread pool (Pillow and pydicom release the GIL while decoding)."""
    workers = min(8, os.cpu_count() or 1)
    images: list[np.ndarray | None] = [None] * len(paths)
    unreadable: list[tuple[Path, str]] = []

    def one(i: int) -> tuple[int, np.ndarray | None, str | None]:
        try:
            return i, decode_image(paths[i], size, rgb), None
        except DataError as exc:
            return i, None, str(exc)

    pool = ThreadPoolExecutor(workers)
    try:
        results = pool.map(one, range(len(paths)))
        for i, image, error in progress(results) if progress else results:
            if error is not None:
                if not skip_unreadable:
                    raise DataError(error)
                unreadable.append((paths[i], error))
            images[i] = image
    finally:
        # on the first bad file, the queued decodes are dropped instead of finishing the dataset
        pool.shutdown(wait=True, cancel_futures=True)
    kept = np.asarray([i for i, im in enumerate(images) if im is not None], dtype=np.int64)
    empty = np.zeros((0, size, size, 3) if rgb else (0, size, size), np.uint8)
    stacked = np.stack([images[i] for i in kept]) if len(kept) else empty
    return DecodeResult(stacked, kept, unreadable)


def assign_splits(groups: Sequence[str], val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """A split name per record, drawn by group, so one patient never spans two splits."""
    if not groups:
        return np.asarray([], dtype=object)
    unique = np.unique(np.asarray(groups, dtype=str))
    order = np.random.default_rng(seed).permutation(len(unique))

    def count(fraction: float) -> int:
        # a split asked for keeps at least one group when there are enough to go round
        n = int(math.floor(fraction * len(unique) + 0.5))
        return max(n, 1) if fraction > 0 and len(unique) >= 3 else n

    n_val, n_test = count(val_fraction), count(test_fraction)
    split_of_group = np.empty(len(unique), dtype=object)
    split_of_group[order[:n_val]] = "val"
    split_of_group[order[n_val : n_val + n_test]] = "test"
    split_of_group[order[n_val + n_test :]] = "train"
    lookup = dict(zip(unique.tolist(), split_of_group.tolist()))
    return np.asarray([lookup[g] for g in groups], dtype=object)


def is_missing(skipped: str) -> bool:
    """Whether a ``DatasetSplits.skipped`` entry is a missing file (not an undecodable one).

    Missing image files and missing report files both count: the dataset's missing-files
    summary (``DatasetSplits.missing_summary``) names them.
    """
    return skipped.endswith((f": {NOT_FOUND}", f": {REPORT_NOT_FOUND}"))


def is_missing_report(skipped: str) -> bool:
    """Whether a ``DatasetSplits.skipped`` entry is a missing report file (image-text data)."""
    return skipped.endswith(f": {REPORT_NOT_FOUND}")


def no_caption(path: Path | str, why: str) -> str:
    """The ``DatasetSplits.skipped`` entry of a record left out for want of a caption."""
    return f"{path}: {NO_CAPTION} ({why})"


def is_uncaptioned(skipped: str) -> bool:
    """Whether a ``DatasetSplits.skipped`` entry is a record without a caption (:func:`no_caption`).

    Such records are always left out (with or without ``skip_unreadable``): not a problem.
    """
    return re.search(rf": {NO_CAPTION} \([^()]*\)$", skipped) is not None


def missing_files_summary(
    records: Sequence[ImageRecord], missing: Sequence[int], root: Path, source: str, found_by_name: bool
) -> str:
    """One block on the files of ``records`` (indices ``missing``) that are not there.

    How many of how many listed, a few names, which folders were found or are absent, and what
    to do. With ``found_by_name`` (images looked up by name in every folder below ``root``) a
    missing file has no folder of its own, so the folders the present ones were found in are named.
    """
    def relative(path: Path) -> Path:
        try:
            return path.relative_to(root)
        except ValueError:  # a listed path outside the dataset folder
            return path

    paths = [relative(r.path) for r in records]
    examples = ", ".join(paths[i].name if found_by_name else str(paths[i]) for i in missing[:SHOWN])
    listed_in = relative(Path(source))
    where = f" in {listed_in}" if not listed_in.is_absolute() and str(listed_in) != "." else ""
    verb = "is" if len(missing) == 1 else "are"
    lines = [f"{root}: {len(missing):,} of the {len(records):,} images listed{where} {verb} missing, e.g. {examples}"]
    if found_by_name:
        gone = set(missing)
        found = Counter(f"{path.parent}/" for i, path in enumerate(paths) if i not in gone)
        lines.append(
            f"the others were found in: {_few({f: f'{n:,} found' for f, n in found.items()})}; "
            "the missing ones are in none of these folders" if found else "no image folder holds any of them"
        )
    else:
        def first_folder(path: Path) -> str:
            """train/, valid/, stage_2_train_images/: where a listed path lies below the dataset folder."""
            if path.is_absolute():  # listed outside the dataset folder
                return f"{path.parent}/"
            return f"{path.parts[0]}/" if len(path.parts) > 1 else "./"

        top = [first_folder(path) for path in paths]
        listed, lost = Counter(top), Counter(top[i] for i in missing)
        absent, empty = "absent folders", "folders with none of their listed images"
        partly = "folders with some missing"
        kinds: dict[str, dict[str, str]] = {absent: {}, empty: {}, partly: {}}
        for folder, n in listed.items():
            if lost[folder] == n:
                kinds[empty if (root / folder).is_dir() else absent][folder] = f"{n:,} listed"
            elif lost[folder]:
                kinds[partly][folder] = f"{lost[folder]:,} of {n:,} missing"
        lines += [f"{kind}: {_few(folders)}" for kind, folders in kinds.items() if folders]
    present = len(records) - len(missing)
    lines.append(
        f"unpack the rest of the download into {root}, or set dataset.options.skip_unreadable: true "
        f"to use the {present:,} images present"
    )
    return "\n  ".join(lines)


def _few(folders: dict[str, str]) -> str:
    """``a/ (12 listed), b/ (7 listed) and 9 more``: the first :data:`SHOWN` folders in name order."""
    names = sorted(folders)
    text = ", ".join(f"{name} ({folders[name]})" for name in names[:SHOWN])
    return text + (f" and {len(names) - SHOWN:,} more" if len(names) > SHOWN else "")


def build_splits(
    records: Sequence[ImageRecord],
    class_names: Sequence[str],
    task: Task,
    image_size: int,
    seed: int,
    *,
    root: Path,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    skip_unreadable: bool = False,
    source: str = "dataset",
    found_by_name: bool = False,
    ratio_members: dict[float, set[Path]] | None = None,
    left_out: Sequence[str] = (),
    colour: Colour = "auto",
) -> DatasetSplits:
    """Decodes ``records`` into train/val/test :class:`LabeledImages`.

    Records without a split are assigned one by patient (``val_fraction``, ``test_fraction``);
    records with one keep it. Missing files are checked first, all at once: without
    ``skip_unreadable`` they raise one :class:`DataError` summarising them
    (:func:`missing_files_summary`, ``found_by_name`` as there). ``skip_unreadable`` drops missing
    and undecodable files and counts them in ``DatasetSplits.skipped``; otherwise the first
    undecodable one raises :class:`DataError` naming it. ``ratio_members`` maps a label ratio to
    the training files the publisher lists for it. ``left_out`` are the "path: reason" entries of
    records the format dropped before (a study without a report section): they lead ``skipped``.
    Records with a ``caption`` give each split its ``captions``. ``colour`` decides grey or RGB
    images (see :data:`Colour`).
    """
    if not records:
        raise DataError(f"{source}: no images listed")
    missing = [i for i, r in enumerate(records) if not r.path.is_file()]
    summary = missing_files_summary(records, missing, root, source, found_by_name) if missing else ""
    if missing and not skip_unreadable:
        raise DataError(summary)
    widths = {len(r.labels) for r in records}
    if widths != {len(class_names)}:
        raise DataError(f"{source}: label vectors of lengths {sorted(widths)} for {len(class_names)} classes")
    groups = [r.group for r in records]
    # only records without a publisher's split are drawn, over their own patients
    undecided = [i for i, r in enumerate(records) if r.split is None]
    drawn = dict(zip(undecided, assign_splits([groups[i] for i in undecided], val_fraction, test_fraction, seed)))
    split_names = [r.split or drawn[i] for i, r in enumerate(records)]
    for r, name in zip(records, split_names):
        if name not in SPLITS:
            raise DataError(f"{r.path}: unknown split {name!r}")
    captioned = {r.caption is not None for r in records}
    if len(captioned) > 1:
        raise ValueError(f"{source}: some records have a caption and some have none")
    labels = np.asarray([r.labels for r in records], dtype=np.float32).reshape(len(records), len(class_names))
    paths = [r.path for r in records]
    rgb = colour == "rgb" or (colour == "auto" and has_colour([p for p in paths if p.is_file()]))
    decoded = decode_all(paths, image_size, skip_unreadable, progress=_progress(source, len(records)), rgb=rgb)
    kept_split = np.asarray(split_names, dtype=object)[decoded.kept]
    kept_labels = labels[decoded.kept]
    kept_groups = np.asarray(groups, dtype=str)[decoded.kept]
    attribute_names = [name for name, _ in records[0].attributes]
    kept_attributes = {
        name: np.asarray([dict(r.attributes).get(name, "") for r in records], dtype=str)[decoded.kept]
        for name in attribute_names
    }
    kept_captions = None
    if captioned == {True}:
        kept_captions = np.empty(len(records), dtype=object)  # object: reports differ much in length
        kept_captions[:] = [r.caption for r in records]
        kept_captions = kept_captions[decoded.kept]

    def take(name: str) -> LabeledImages:
        index = np.flatnonzero(kept_split == name)
        return LabeledImages(
            decoded.images[index], kept_labels[index], kept_groups[index],
            {attribute: values[index] for attribute, values in kept_attributes.items()},
            None if kept_captions is None else kept_captions[index],
        )

    train_paths = [records[i].path for i in decoded.kept[kept_split == "train"]]
    ratio_subsets = {
        ratio: np.asarray([j for j, p in enumerate(train_paths) if p in members], dtype=np.int64)
        for ratio, members in (ratio_members or {}).items()
    }
    return DatasetSplits(
        take("train"), take("val"), take("test"), tuple(class_names), task,
        # each entry starts with its file's path
        skipped=tuple(left_out) + tuple(error for _, error in decoded.unreadable),
        ratio_subsets=ratio_subsets,
        missing_summary=summary,
    )


def _progress(source: str, total: int) -> Callable[[Iterable], Iterable] | None:
    """A rich progress bar for the decode pass when a person is watching (stderr is a terminal)."""
    if total < 200 or not sys.stderr.isatty():
        return None
    return lambda items: track(items, total=total, description=f"decoding {source}", transient=True)


#: how the publishers write a patient's sex, as the one spelling subgroup attributes use (M/F);
#: anything else ("Unknown", blank) is "", an unknown value
SEXES = {"m": "M", "f": "F", "male": "M", "female": "F"}


def sex_of(value: str) -> str:
    """``M``, ``F`` or "" (unknown) for a CSV's sex cell."""
    return SEXES.get(value.strip().lower(), "")


def one_hot(index: int, num_classes: int) -> tuple[float, ...]:
    return tuple(1.0 if k == index else 0.0 for k in range(num_classes))
