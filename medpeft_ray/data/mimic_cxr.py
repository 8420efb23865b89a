"""MIMIC-CXR-JPG 2.x as PhysioNet publishes it: chest radiographs and their report text.

Layout (``root`` is the dataset folder, e.g. ``physionet.org/files/mimic-cxr-jpg/2.1.0``, or the
download folder that holds it)::

    mimic-cxr-2.0.0-split.csv.gz      dicom_id,study_id,subject_id,split (train / validate / test)
    mimic-cxr-2.0.0-metadata.csv.gz   dicom_id,subject_id,study_id,...,ViewPosition,...
    mimic-cxr-2.0.0-chexpert.csv.gz   subject_id,study_id,<14 CheXpert observations>
    files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg
    files/p10/p10000032/s50414267.txt the study's free-text report (mimic-cxr-reports.zip)

Images are ``files/p<first two digits of subject_id>/p<subject_id>/s<study_id>/<dicom_id>.jpg``.
Reports are ``files/p<2>/p<subject_id>/s<study_id>.txt`` below the dataset folder, or below the
``reports`` option's folder (relative to the dataset folder, or absolute), which may be the folder
``mimic-cxr-reports.zip`` unpacked into (holding ``files/``) or that ``files/`` folder itself.

Captions: a report has upper-case section headers at the start of a line (``FINDINGS:``,
``IMPRESSION:``); the caption is the ``caption_section`` (``impression``: a header naming
IMPRESSION(S) or CONCLUSION(S); ``findings``: one naming FINDING(S); ``FINDINGS AND IMPRESSION:``
names both), whitespace collapsed, several such sections joined with a space; where it is missing
or empty, the ``fallback_section`` (default ``findings``; null for none). A study with neither is
left out with all its images and counted in ``DatasetSplits.skipped`` (``<report>: no caption
(...)``), never an error. Missing report files are summarised like missing images: an error, or
with ``skip_unreadable`` left out and counted.

Labels: the CheXpert labeller's observations of each study (``labels``, default the 5 competition
labels; ``[]`` for none: caption-only data with zero classes), uncertain (``-1.0``) values mapped
by the ``uncertainty`` policy and blanks negative, as in the ``chexpert`` format. A study the
labeller file has no row for gets unknown (NaN) labels. The label file is read only when labels
are asked for (``label_file``: the NegBio file has the same columns).

Splits: the official ``split`` column (``validate`` is the validation split); groups are
``subject_id`` (the split is patient-disjoint; a patient in two splits is an error). ``views``
keeps the images whose ``ViewPosition`` is listed (default PA and AP: frontal views; null keeps
every image). Subgroup attributes: ``view`` (``ViewPosition``), and ``sex`` when a ``patients``
file (MIMIC-IV's ``patients.csv.gz``: ``subject_id``, ``gender``) is given.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from medpeft_ray.data.base import DatasetSplits
from medpeft_ray.data.chexpert import COMPETITION_LABELS, Observation, ObservationOptions, label_matrix
from medpeft_ray.data.layout import MarkerPaths
from medpeft_ray.data.records import (
    REPORT_NOT_FOUND, SHOWN, ImageRecord, build_splits, no_caption, sex_of,
)
from medpeft_ray.data.registry import register_dataset
from medpeft_ray.data.tables import read_csv
from medpeft_ray.errors import DataError

SPLIT_FILE = "mimic-cxr-2.0.0-split.csv.gz"
METADATA_FILE = "mimic-cxr-2.0.0-metadata.csv.gz"
LABEL_FILE = "mimic-cxr-2.0.0-chexpert.csv.gz"
MIMIC_MARKER = MarkerPaths((SPLIT_FILE, METADATA_FILE))
#: the official split values -> this package's split names
SPLIT_VALUES = {"train": "train", "validate": "val", "test": "test"}
DICOM, STUDY, SUBJECT, SPLIT, VIEW = "dicom_id", "study_id", "subject_id", "split", "ViewPosition"
#: words of a section header that make it the impression, or the findings
SECTION_WORDS = {
    "impression": frozenset({"IMPRESSION", "IMPRESSIONS", "CONCLUSION", "CONCLUSIONS"}),
    "findings": frozenset({"FINDING", "FINDINGS"}),
}
#: an upper-case section header at the start of a line: "FINDINGS:", " WET READ:", "FINDINGS AND IMPRESSION:"
HEADER = re.compile(r"^[ \t]*([A-Z][A-Z ()/,&'-]*[A-Z)])[ \t]*:", re.MULTILINE)
Section = Literal["impression", "findings"]


class MimicCxrOptions(ObservationOptions):
    """Options of the ``mimic_cxr`` format (MIMIC-CXR-JPG 2.x with its reports)."""

    labels: list[Observation] = Field(
        default_factory=lambda: list(COMPETITION_LABELS),
        description="CheXpert observations to predict, in this order (default: the 5 competition labels; [] for "
        "none: images and captions only)",
    )
    label_file: str = Field(
        LABEL_FILE, description="the labeller's CSV, relative to the dataset folder (mimic-cxr-2.0.0-negbio.csv.gz "
        "for NegBio); read only when labels are asked for",
    )
    views: list[str] | None = Field(
        default_factory=lambda: ["PA", "AP"], min_length=1,
        description="ViewPosition values to keep (default: PA and AP, the frontal views); null keeps every image",
    )
    reports: str | None = Field(
        None, description="folder of the reports (mimic-cxr-reports.zip unpacked: its files/ tree), relative to the "
        "dataset folder or absolute (default: the dataset folder)",
    )
    caption_section: Section = Field("impression", description="the report section that is the caption")
    fallback_section: Section | None = Field(
        "findings", description="the section used where caption_section is missing or empty (null: none)"
    )
    patients: str | None = Field(
        None, description="MIMIC-IV patients.csv.gz (subject_id, gender), relative to the dataset folder or "
        "absolute: records the sex subgroup",
    )
    skip_unreadable: bool = Field(
        False, description="skip (and count) missing or unreadable images and reports instead of failing"
    )

    @field_validator("views")
    @classmethod
    def _views(cls, views: list[str] | None) -> list[str] | None:
        return None if views is None else [v.strip().upper() for v in views]


def report_sections(text: str) -> list[tuple[str, str]]:
    """``(header, text)`` per section in report order, whitespace collapsed; the text before the
    first header has the header ""."""
    sections: list[tuple[str, str]] = []
    matches = list(HEADER.finditer(text))
    starts = [m.start() for m in matches] + [len(text)]
    if matches:
        sections.append(("", " ".join(text[: matches[0].start()].split())))
    else:
        sections.append(("", " ".join(text.split())))
    for match, end in zip(matches, starts[1:]):
        sections.append((" ".join(match.group(1).split()), " ".join(text[match.end() : end].split())))
    return sections


def section_text(text: str, section: Section) -> str:
    """The report's ``section`` (several such sections joined with a space), "" when it has none."""
    words = SECTION_WORDS[section]
    found = [body for header, body in report_sections(text) if body and words & set(re.split(r"[^A-Z]+", header))]
    return " ".join(found)


def report_caption(text: str, section: Section = "impression", fallback: Section | None = "findings") -> str | None:
    """The caption of a report: its ``section``, else its ``fallback`` section; None with neither."""
    for name in (section, fallback):
        if name is not None:
            caption = section_text(text, name)
            if caption:
                return caption
    return None


def _ids(frame, csv: Path, columns: tuple[str, ...]) -> list[list[str]]:
    """The id columns of ``frame`` as stripped digit strings; anything else is a DataError (line named)."""
    out = []
    for column in columns:
        values = [v.strip() for v in frame[column]]
        for i, v in enumerate(values):
            if not v.isdigit():
                raise DataError(f"{csv}: line {i + 2}: column {column!r}: {v!r} is not a numeric id")
        out.append(values)
    return out


def _local(root: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else root / path


def _reports_folder(root: Path, options: MimicCxrOptions) -> Path:
    """The folder holding ``p<2>/p<subject>/s<study>.txt`` (the reports' ``files/``)."""
    folder = root if options.reports is None else _local(root, options.reports)
    if not folder.is_dir():
        raise DataError(f"{folder}: report folder not found (dataset.options.reports)")
    return folder / "files" if (folder / "files").is_dir() else folder


def _read_report(path: Path) -> tuple[str | None, str | None]:
    """(text, None), or (None, the reason it cannot be read)."""
    try:
        return path.read_text(encoding="utf-8"), None
    except FileNotFoundError:
        return None, REPORT_NOT_FOUND
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"unreadable report ({type(exc).__name__}: {exc})"


def _sexes(root: Path, options: MimicCxrOptions) -> dict[str, str] | None:
    if options.patients is None:
        return None
    csv = _local(root, options.patients)
    frame = read_csv(csv, (SUBJECT, "gender"))
    (subjects,) = _ids(frame, csv, (SUBJECT,))
    return {s: sex_of(g) for s, g in zip(subjects, frame["gender"])}


def _labels(root: Path, options: MimicCxrOptions) -> dict[tuple[str, str], tuple[float, ...]]:
    """(subject, study) -> the study's labels (none read when no label is asked for)."""
    if not options.labels:
        return {}
    csv = root / options.label_file
    frame = read_csv(csv, (SUBJECT, STUDY, *options.labels))
    subjects, studies = _ids(frame, csv, (SUBJECT, STUDY))
    matrix = label_matrix(frame, csv, options).tolist()
    out: dict[tuple[str, str], tuple[float, ...]] = {}
    for i, key in enumerate(zip(subjects, studies)):
        if key in out:
            raise DataError(f"{csv}: line {i + 2}: study {key[1]} of subject {key[0]} is listed twice")
        out[key] = tuple(matrix[i])
    return out


def _missing_reports_summary(folder: Path, missing: list[Path], studies: int, root: Path) -> str:
    """One block on the studies whose report file is not there (like the missing-images summary)."""
    def shown(path: Path) -> str:
        try:
            return str(path.relative_to(folder.parent))
        except ValueError:
            return str(path)

    examples = ", ".join(shown(p) for p in missing[:SHOWN])
    verb = "is" if len(missing) == 1 else "are"
    return "\n  ".join([
        f"{folder}: {len(missing):,} of the reports of the {studies:,} listed studies {verb} missing, e.g. {examples}",
        f"unzip mimic-cxr-reports.zip into {root} (or name its folder in dataset.options.reports), or set "
        f"dataset.options.skip_unreadable: true to use the {studies - len(missing):,} studies with a report",
    ])


@register_dataset(
    "mimic_cxr", options=MimicCxrOptions, needs_root=True, marker=lambda _: MIMIC_MARKER,
    classes=lambda options: options.labels,
)
def load_mimic_cxr(root: Path, image_size: int, options: MimicCxrOptions, seed: int) -> DatasetSplits:
    split_csv, metadata_csv = root / SPLIT_FILE, root / METADATA_FILE
    table = read_csv(split_csv, (DICOM, STUDY, SUBJECT, SPLIT))
    metadata = read_csv(metadata_csv, (DICOM, VIEW))
    reports = _reports_folder(root, options)
    labels_of = _labels(root, options)
    sex_of_subject = _sexes(root, options)
    view_of = dict(zip((d.strip() for d in metadata[DICOM]), (v.strip().upper() for v in metadata[VIEW])))

    subjects, studies = _ids(table, split_csv, (SUBJECT, STUDY))
    dicoms = [d.strip() for d in table[DICOM]]
    unlisted = [d for d in dicoms if d not in view_of]
    if unlisted:
        raise DataError(
            f"{metadata_csv}: no row for dicom_id {unlisted[0]!r} of {SPLIT_FILE} ({len(unlisted):,} such image(s))"
        )
    keep: list[int] = []
    split_of: list[str] = []
    for i, value in enumerate(table[SPLIT]):
        split = SPLIT_VALUES.get(value.strip().lower())
        if split is None:
            raise DataError(
                f"{split_csv}: line {i + 2}: column {SPLIT!r}: split {value!r} is not train, validate or test"
            )
        split_of.append(split)
        if options.views is None or view_of[dicoms[i]] in options.views:
            keep.append(i)
    if not keep:
        raise DataError(f"{split_csv}: no image has a ViewPosition in {', '.join(options.views or [])}")
    splits_of_subject: dict[str, set[str]] = {}
    for i in keep:
        splits_of_subject.setdefault(subjects[i], set()).add(split_of[i])
    shared = sorted(s for s, names in splits_of_subject.items() if len(names) > 1)
    if shared:
        raise DataError(
            f"{split_csv}: subject {shared[0]} has images in several splits ({len(shared)} such subject(s));"
            " the split would not be patient-disjoint"
        )

    # one report per study: read once, the caption shared by the study's images
    study_keys = list(dict.fromkeys((subjects[i], studies[i]) for i in keep))
    report_paths = [reports / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt" for subject, study in study_keys]
    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(_read_report, report_paths))
    missing = [path for path, (_, why) in zip(report_paths, texts) if why == REPORT_NOT_FOUND]
    summary = _missing_reports_summary(reports, missing, len(study_keys), root) if missing else ""
    if missing and not options.skip_unreadable:
        raise DataError(summary)
    left_out: list[str] = []
    captions: dict[tuple[str, str], str] = {}
    sections = " or ".join(s.upper() for s in dict.fromkeys((options.caption_section, options.fallback_section)) if s)
    for key, path, (text, why) in zip(study_keys, report_paths, texts):
        if text is None:
            if why != REPORT_NOT_FOUND and not options.skip_unreadable:
                raise DataError(f"{path}: {why}")
            left_out.append(f"{path}: {why}")
            continue
        caption = report_caption(text, options.caption_section, options.fallback_section)
        if caption is None:
            left_out.append(no_caption(path, f"no {sections} section"))
        else:
            captions[key] = caption

    unknown = (np.nan,) * len(options.labels)
    records = []
    for i in keep:
        key = (subjects[i], studies[i])
        if key not in captions:
            continue
        attributes = [("view", view_of[dicoms[i]])]
        if sex_of_subject is not None:
            attributes.append(("sex", sex_of_subject.get(subjects[i], "")))
        path = root / "files" / f"p{key[0][:2]}" / f"p{key[0]}" / f"s{key[1]}" / f"{dicoms[i]}.jpg"
        labels = labels_of.get(key, unknown) if options.labels else ()
        records.append(ImageRecord(path, labels, key[0], split_of[i], tuple(attributes), captions[key]))
    if not records:
        raise DataError(f"{reports}: no listed study has a report with a caption ({len(left_out):,} left out)")
    splits = build_splits(
        records, options.labels, "multilabel", image_size, seed, root=root, skip_unreadable=options.skip_unreadable, colour="grey",
        source=str(split_csv), left_out=left_out,
    )
    if summary:  # the missing reports lead the missing images' block
        splits = replace(splits, missing_summary="\n".join(filter(None, (summary, splits.missing_summary))))
    return splits
