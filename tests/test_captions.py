"""Tests for image-text data: captions on LabeledImages and in the cache, synthetic captions, the
``mimic_cxr`` format (MIMIC-CXR-JPG with its reports) and the ``captions`` CSV format, and
label-ratio subsets of data without classes."""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medpeft_ray.data import label_ratio_index, load_splits, train_subset_index
from medpeft_ray.data.base import DatasetSplits, LabeledImages
from medpeft_ray.data.cache import cached_splits
from medpeft_ray.data.check import check_dataset
from medpeft_ray.data.mimic_cxr import report_caption, report_sections
from medpeft_ray.data.records import is_missing, is_uncaptioned
from medpeft_ray.data.synthetic import FINDINGS, NO_FINDING_CAPTION, caption_of, make_synthetic, render_image
from medpeft_ray.errors import ConfigError, DataError

SIZE = 16
OBSERVATIONS = [  # the labeller file's columns, in MIMIC-CXR-JPG's order
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
]
COMPETITION = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]


def _all(splits: DatasetSplits) -> list[LabeledImages]:
    return [splits.train, splits.val, splits.test]


def _object_array(values: list[str]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


# ----------------------------------------------------------------------------- LabeledImages captions


def test_captions_are_checked_and_carried_by_subset() -> None:
    images, labels, groups = np.zeros((3, 2, 2), np.uint8), np.zeros((3, 0), np.float32), np.arange(3)
    split = LabeledImages(images, labels, groups, captions=np.array(["a", "b", "c"]))
    assert split.subset(np.array([2, 0])).captions.tolist() == ["c", "a"]
    assert LabeledImages(images, labels, groups).subset(np.array([1])).captions is None
    with pytest.raises(ValueError, match="captions has 2 values for 3 images"):
        LabeledImages(images, labels, groups, captions=np.array(["a", "b"]))
    with pytest.raises(ValueError, match="one str per image"):
        LabeledImages(images, labels, groups, captions=_object_array(["a", "b", None]))  # type: ignore[list-item]
    with pytest.raises(ValueError, match="1-D object or unicode"):
        LabeledImages(images, labels, groups, captions=np.arange(3))


def test_has_captions_needs_every_split() -> None:
    def split(captions: bool) -> LabeledImages:
        return LabeledImages(np.zeros((2, 2, 2), np.uint8), np.zeros((2, 0), np.float32), np.arange(2),
                             captions=np.array(["x", "y"]) if captions else None)

    assert DatasetSplits(split(True), split(True), split(True), (), "multilabel").has_captions
    assert not DatasetSplits(split(True), split(False), split(True), (), "multilabel").has_captions


def test_zero_classes_positives_and_summary() -> None:
    split = LabeledImages(np.zeros((4, 2, 2), np.uint8), np.zeros((4, 0), np.float32), np.arange(4))
    empty = LabeledImages(np.zeros((0, 2, 2), np.uint8), np.zeros((0, 0), np.float32), np.arange(0))
    assert split.positives_per_class().shape == (0,) and empty.positives_per_class().shape == (0,)
    splits = DatasetSplits(split, split, empty, (), "multilabel")
    assert splits.num_classes == 0
    assert splits.summary() == {
        "train": {"images": 4, "positives": {}}, "val": {"images": 4, "positives": {}},
        "test": {"images": 0, "positives": {}},
    }


# ----------------------------------------------------------------------------- cache


def test_cache_round_trips_captions() -> None:
    rng = np.random.default_rng(0)

    def split(captions: list[str] | None, n: int) -> LabeledImages:
        return LabeledImages(rng.integers(0, 256, (n, 4, 4), dtype=np.uint8), np.zeros((n, 0), np.float32),
                             np.arange(n), {"view": np.array(["PA"] * n)},
                             None if captions is None else np.asarray(captions))

    long = "Enlarged cardiac silhouette. " * 40 + "Ünïcode ✓"
    built = DatasetSplits(split(["a", long, ""], 3), split(["b"], 1), split([], 0), (), "multilabel")
    calls = []

    def build() -> DatasetSplits:
        calls.append(1)
        return built

    cached_splits({"dataset": "toy-captions"}, build)
    again = cached_splits({"dataset": "toy-captions"}, build)
    assert len(calls) == 1  # read back from disk
    assert again.has_captions and again.class_names == ()
    for a, b in zip(_all(built), _all(again)):
        assert b.captions.tolist() == a.captions.tolist()
        assert b.labels.shape == a.labels.shape
        assert np.array_equal(np.asarray(a.images), np.asarray(b.images))
    assert again.train.captions.dtype == object  # not padded to the longest caption

    plain = DatasetSplits(split(None, 2), split(None, 1), split(None, 1), (), "multilabel")
    cached_splits({"dataset": "toy-plain"}, lambda: plain)
    back = cached_splits({"dataset": "toy-plain"}, lambda: pytest.fail("built twice"))
    assert not back.has_captions and back.train.captions is None


# ----------------------------------------------------------------------------- zero-class label ratios


def _zero_class_split() -> LabeledImages:
    groups = np.repeat(np.arange(40), 3)
    n = len(groups)
    return LabeledImages(np.zeros((n, 2, 2), np.uint8), np.zeros((n, 0), np.float32), groups,
                         captions=np.array([f"c{i}" for i in range(n)]))


def test_zero_class_label_ratio_subsets_are_random_groupwise_and_seeded() -> None:
    split = _zero_class_split()
    small, large = label_ratio_index(split, 0.1, 3), label_ratio_index(split, 0.5, 3)
    assert np.array_equal(small, label_ratio_index(split, 0.1, 3))  # deterministic in the seed
    assert not np.array_equal(small, label_ratio_index(split, 0.1, 4))
    assert len(np.unique(split.groups[small])) == 4 and len(np.unique(split.groups[large])) == 20
    for index in (small, large):  # a patient's images are all in or all out
        kept = set(split.groups[index].tolist())
        assert sorted(index.tolist()) == [i for i, g in enumerate(split.groups) if g in kept]
    assert set(small) <= set(large)  # nested
    assert len(label_ratio_index(split, 1.0, 3)) == len(split)
    splits = DatasetSplits(split, split, split, (), "multilabel")
    assert np.array_equal(train_subset_index(splits, 0.1, 3), small)
    assert split.subset(small).captions.tolist() == [f"c{i}" for i in small]


# ----------------------------------------------------------------------------- synthetic captions


def test_caption_of_no_finding_order_and_unknown_values() -> None:
    assert caption_of(np.zeros(5), FINDINGS[:5]) == NO_FINDING_CAPTION == "No acute cardiopulmonary process."
    assert caption_of(np.array([np.nan, 0, 0]), FINDINGS[:3]) == NO_FINDING_CAPTION  # unknown is not positive
    assert caption_of(np.array([0, 0, 1, 0, 0, 1]), FINDINGS) == "Multiple small pulmonary nodules. Pulmonary mass."
    assert caption_of([1, 1, 0], FINDINGS[:3]) == "Enlarged cardiac silhouette. Pleural effusion."
    # the order is the class names' order, whatever it is
    assert caption_of([1, 1], ("Mass", "Cardiomegaly")) == "Pulmonary mass. Enlarged cardiac silhouette."
    assert caption_of([1], ("Hernia",)) == "Hernia."
    with pytest.raises(ValueError, match="2 findings for 3 class names"):
        caption_of([1, 0], FINDINGS[:3])


def test_synthetic_captions_follow_labels() -> None:
    splits = make_synthetic(image_size=SIZE, num_classes=6, num_patients=30, seed=1)
    assert splits.has_captions
    for split in _all(splits):
        assert split.captions.tolist() == [caption_of(row, FINDINGS) for row in split.labels]
    every = [c for s in _all(splits) for c in s.captions]
    assert NO_FINDING_CAPTION in every and any(" " in c and c != NO_FINDING_CAPTION for c in every)


def _digest(images: np.ndarray, labels: np.ndarray) -> str:
    """Order-free hash of (image, labels) pairs."""
    pairs = sorted(hashlib.sha256(i.tobytes() + l.tobytes()).hexdigest() for i, l in zip(images, labels))  # noqa: E741
    return hashlib.sha256("".join(pairs).encode()).hexdigest()


def test_synthetic_images_are_what_the_renderer_draws() -> None:
    """Captions take no random draw: the loader's images are the renderer's, draw for draw."""
    seed, patients, per_patient, classes, prevalence = 5, 20, 2, 4, 0.3
    rng = np.random.default_rng(seed)  # make_synthetic's draws, in its order
    anatomy = rng.random((patients, 5), dtype=np.float32)
    groups = np.repeat(np.arange(patients), per_patient)
    patient_findings = rng.random((patients, classes)) < prevalence
    flips = rng.random((len(groups), classes)) < 0.1
    labels = (patient_findings[groups] ^ flips).astype(np.float32)
    image_seeds = rng.integers(0, 2**63 - 1, size=len(groups))
    drawn = np.stack([render_image(SIZE, anatomy[g], labels[i], np.random.default_rng(image_seeds[i]))
                      for i, g in enumerate(groups)])

    options = {"num_classes": classes, "num_patients": patients, "images_per_patient": per_patient,
               "prevalence": prevalence}
    loaded = load_splits("synthetic", None, SIZE, options, seed)  # the public loader, through the cache
    assert loaded.has_captions
    images = np.concatenate([np.asarray(s.images) for s in _all(loaded)])
    assert _digest(images, np.concatenate([s.labels for s in _all(loaded)])) == _digest(drawn, labels)
    again = load_splits("synthetic", None, SIZE, options, seed)  # read back from the cache
    assert [s.captions.tolist() for s in _all(again)] == [s.captions.tolist() for s in _all(loaded)]


# ----------------------------------------------------------------------------- MIMIC-CXR reports


REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough  // eval for pneumonia

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  The
 cardiomediastinal   silhouette is normal.

 IMPRESSION:

 No acute cardiopulmonary
 process.
"""


def test_report_sections_and_impression() -> None:
    sections = dict(report_sections(REPORT))
    assert sections["EXAMINATION"] == "CHEST (PA AND LAT)"
    assert sections["COMPARISON"] == "None."
    assert report_caption(REPORT) == "No acute cardiopulmonary process."  # whitespace collapsed
    assert report_caption(REPORT, "findings") == (
        "There is no focal consolidation, pleural effusion or pneumothorax. The cardiomediastinal silhouette is normal."
    )


def test_report_without_impression_falls_back_to_findings() -> None:
    only_findings = REPORT.split(" IMPRESSION:")[0]
    assert report_caption(only_findings).startswith("There is no focal consolidation")
    assert report_caption(only_findings, fallback=None) is None
    empty_impression = only_findings + "\n IMPRESSION:  \n\n NOTIFICATION:  Called to Dr. ___.\n"
    assert report_caption(empty_impression).startswith("There is no focal consolidation")


def test_report_with_neither_section_has_no_caption() -> None:
    assert report_caption(" FINAL REPORT\n EXAMINATION: CHEST\n\n WET READ: ___ no pneumothorax\n") is None
    assert report_caption("") is None


def test_combined_headers_and_in_line_text() -> None:
    combined = " FINDINGS AND IMPRESSION: Mild pulmonary edema.\n RECOMMENDATION(S): Follow-up.\n"
    assert report_caption(combined) == "Mild pulmonary edema." == report_caption(combined, "findings")
    # a colon after mixed-case text is no header
    assert report_caption(" IMPRESSION: NG tube: tip in the stomach.\n") == "NG tube: tip in the stomach."


# ----------------------------------------------------------------------------- MIMIC-CXR layout


def _write_gz_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", newline="") as f:
        f.write(",".join(header) + "\n")
        for row in rows:
            f.write(",".join(f'"{v}"' if "," in v else v for v in row) + "\n")


@dataclass
class Mimic:
    """A tiny MIMIC-CXR-JPG 2.x download: what each image is, to check the loaded splits against."""

    root: Path
    level: dict[int, str] = field(default_factory=dict)  # grey level -> dicom_id
    view: dict[str, str] = field(default_factory=dict)  # dicom_id -> ViewPosition
    split: dict[str, str] = field(default_factory=dict)  # dicom_id -> train / val / test
    subject: dict[str, str] = field(default_factory=dict)  # dicom_id -> subject_id
    study: dict[str, tuple[str, str]] = field(default_factory=dict)  # dicom_id -> (subject, study)
    caption: dict[tuple[str, str], str | None] = field(default_factory=dict)  # study -> expected caption
    labels: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # study -> raw labeller values
    report: dict[tuple[str, str], Path] = field(default_factory=dict)  # study -> its report file

    def dicom_of(self, image: np.ndarray) -> str:
        """The dicom_id of a decoded image (JPEG may shift its grey level by a little)."""
        pixel = int(np.median(image))
        best = min(self.level, key=lambda level: abs(level - pixel))
        assert abs(best - pixel) <= 2, pixel
        return self.level[best]


def make_mimic(base: Path, folder: str = "mimic-cxr-jpg", reports: Path | None = None) -> Mimic:
    """12 subjects (8 train, 2 validate, 2 test), 1-2 studies each, a PA or AP image per study and a
    lateral one in some: a report per study with an impression, only findings, or (one study) neither.

    ``reports``: where the reports' ``files/`` tree goes (default: the dataset folder).
    """
    root = base / folder
    data = Mimic(root)
    split_rows, meta_rows, label_rows, patients = [], [], [], []
    k = 0
    for s in range(12):
        subject = f"{10 + s % 2}{s:06d}"  # p10 and p11 folders
        split = "train" if s < 8 else "validate" if s < 10 else "test"
        patients.append([subject, "F" if s % 2 else "M", "60"])
        for st in range(1 + s % 2):
            study = f"5{s:04d}{st:03d}"
            key = (subject, study)
            views = ["AP" if s % 3 == 0 else "PA"] + (["LATERAL"] if (s + st) % 2 else [])
            for view in views:
                dicom = f"{k:08x}-{s:04d}{st}"
                level = 10 + 6 * k
                assert level < 250
                path = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("L", (20 + k % 3, 20), level).save(path, quality=95)
                data.level[level], data.view[dicom] = dicom, view
                data.split[dicom] = {"validate": "val"}.get(split, split)
                data.subject[dicom], data.study[dicom] = subject, key
                split_rows.append([dicom, study, subject, split])
                meta_rows.append([dicom, subject, study, "CHEST (PA AND LAT)", view, "2544", "3056", "21800506"])
                k += 1
            values = [["1.0", "0.0", "-1.0", ""][(s + st + j) % 4] for j in range(len(OBSERVATIONS))]
            if (s, st) != (3, 0):  # one study the labeller has no row for
                label_rows.append([subject, study, *values])
                data.labels[key] = values
            findings = f"Study {study}: heart size is normal,  no effusion."
            impression = f"Impression of {study}."
            if (s, st) == (5, 0):  # neither section: left out with its images
                text, caption = " FINAL REPORT\n EXAMINATION: CHEST\n\n WET READ: ___\n", None
            elif (s + st) % 3 == 1:  # findings only
                text = f" FINAL REPORT\n INDICATION: cough\n\n FINDINGS:\n\n {findings}\n"
                caption = " ".join(findings.split())
            else:
                text = f" FINAL REPORT\n FINDINGS:\n {findings}\n\n IMPRESSION:\n\n {impression}\n"
                caption = impression
            report = (reports or root) / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(text)
            data.caption[key], data.report[key] = caption, report
    _write_gz_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split_rows)
    _write_gz_csv(
        root / "mimic-cxr-2.0.0-metadata.csv.gz",
        ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns",
         "StudyDate"],
        meta_rows,
    )
    _write_gz_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *OBSERVATIONS], label_rows)
    _write_gz_csv(root / "patients.csv.gz", ["subject_id", "gender", "anchor_age"], patients)
    return data


def _pairs(splits: DatasetSplits, mimic: Mimic) -> dict[str, tuple[str, int, LabeledImages]]:
    """dicom_id -> (split, index, split arrays) of every loaded image."""
    out = {}
    for name in ("train", "val", "test"):
        split = getattr(splits, name)
        for i, image in enumerate(split.images):
            out[mimic.dicom_of(image)] = (name, i, split)
    return out


@pytest.fixture
def mimic(tmp_path: Path) -> Mimic:
    return make_mimic(tmp_path)


def test_mimic_captions_views_splits_and_skipped_study(mimic: Mimic) -> None:
    splits = load_splits("mimic_cxr", mimic.root, SIZE, {}, 0)
    assert splits.has_captions and splits.class_names == tuple(COMPETITION)
    loaded = _pairs(splits, mimic)
    expected = {d for d, v in mimic.view.items() if v in ("PA", "AP") and mimic.caption[mimic.study[d]] is not None}
    assert set(loaded) == expected  # laterals and the study without a caption are left out
    for dicom, (name, i, split) in loaded.items():
        assert name == mimic.split[dicom]
        assert split.captions[i] == mimic.caption[mimic.study[dicom]]
        assert split.groups[i] == mimic.subject[dicom]
        assert split.subgroups["view"][i] == mimic.view[dicom]
    assert "sex" not in splits.train.subgroups  # only with a patients file
    (skipped,) = splits.skipped
    no_caption = mimic.report[next(k for k, c in mimic.caption.items() if c is None)]
    assert skipped == f"{no_caption}: no caption (no IMPRESSION or FINDINGS section)" and is_uncaptioned(skipped)
    assert not is_missing(skipped) and splits.missing_summary == ""


def test_mimic_labels_follow_the_labeller_and_uncertainty_policy(mimic: Mimic) -> None:
    options = {"labels": ["Edema", "No Finding"], "uncertainty": "u-zeros"}
    splits = load_splits("mimic_cxr", mimic.root, SIZE, options, 0)
    assert splits.class_names == ("Edema", "No Finding")
    for dicom, (_, i, split) in _pairs(splits, mimic).items():
        study = mimic.study[dicom]
        if study not in mimic.labels:
            assert np.isnan(split.labels[i]).all()  # no labeller row: unknown
            continue
        raw = [mimic.labels[study][OBSERVATIONS.index(c)] for c in ("Edema", "No Finding")]
        assert split.labels[i].tolist() == [{"1.0": 1.0, "0.0": 0.0, "-1.0": 0.0, "": 0.0}[v] for v in raw]


def test_mimic_zero_labels_every_view_and_sex(mimic: Mimic) -> None:
    (mimic.root / "mimic-cxr-2.0.0-chexpert.csv.gz").unlink()  # not read without labels
    splits = load_splits(
        "mimic_cxr", mimic.root, SIZE, {"labels": [], "views": None, "patients": "patients.csv.gz"}, 0
    )
    assert splits.class_names == () and splits.train.labels.shape[1] == 0
    loaded = _pairs(splits, mimic)
    assert {mimic.view[d] for d in loaded} == {"PA", "AP", "LATERAL"}
    for dicom, (_, i, split) in loaded.items():
        assert split.subgroups["sex"][i] == ("F" if int(mimic.subject[dicom]) % 2 else "M")
    only_lateral = load_splits("mimic_cxr", mimic.root, SIZE, {"labels": [], "views": ["lateral"]}, 0)
    assert {mimic.view[d] for d in _pairs(only_lateral, mimic)} == {"LATERAL"}


def test_mimic_findings_caption_without_fallback_skips_more(mimic: Mimic) -> None:
    splits = load_splits("mimic_cxr", mimic.root, SIZE, {"caption_section": "findings", "fallback_section": None}, 0)
    for dicom, (_, i, split) in _pairs(splits, mimic).items():
        assert split.captions[i].startswith(f"Study {mimic.study[dicom][1]}: heart size is normal, no effusion.")
    impression_only = load_splits("mimic_cxr", mimic.root, SIZE, {"fallback_section": None}, 0)
    without = [k for k, c in mimic.caption.items() if c is None or not c.startswith("Impression")]
    assert len(impression_only.skipped) == len(without)
    assert all(is_uncaptioned(s) and "(no IMPRESSION section)" in s for s in impression_only.skipped)


def test_mimic_reports_in_their_own_folder(tmp_path: Path) -> None:
    mimic = make_mimic(tmp_path, reports=tmp_path / "mimic-cxr-reports")
    with pytest.raises(DataError, match=r"reports of the \d+ listed studies are missing"):
        load_splits("mimic_cxr", mimic.root, SIZE, {}, 0)
    elsewhere = tmp_path / "mimic-cxr-reports"
    for reports in (str(elsewhere), "../mimic-cxr-reports", str(elsewhere / "files")):  # absolute, relative, files/
        splits = load_splits("mimic_cxr", mimic.root, SIZE, {"reports": reports}, 0)
        assert splits.has_captions and len(splits.skipped) == 1
    with pytest.raises(DataError, match=r"nowhere: report folder not found \(dataset.options.reports\)$"):
        load_splits("mimic_cxr", mimic.root, SIZE, {"reports": "nowhere"}, 0)


def test_mimic_missing_reports_summarised_or_skipped(mimic: Mimic) -> None:
    gone = sorted(p for k, p in mimic.report.items() if mimic.caption[k] is not None)[:2]
    for path in gone:
        path.unlink()
    with pytest.raises(DataError) as err:
        load_splits("mimic_cxr", mimic.root, SIZE, {}, 0)
    message = str(err.value)
    assert message.startswith(f"{mimic.root / 'files'}: 2 of the reports of the")
    assert "unzip mimic-cxr-reports.zip" in message and "skip_unreadable" in message
    splits = load_splits("mimic_cxr", mimic.root, SIZE, {"skip_unreadable": True}, 0)
    assert sorted(s for s in splits.skipped if is_missing(s)) == [f"{p}: report file not found" for p in gone]
    assert "2 of the reports" in splits.missing_summary
    report = check_dataset("mimic_cxr", mimic.root, {}, image_size=SIZE, label_ratios=[0.5, 1.0])
    assert not report.usable and any("2 report file(s) missing" in p for p in report.problems), report.problems


def test_mimic_missing_image_is_summarised(mimic: Mimic) -> None:
    dicom = next(d for d, v in mimic.view.items() if v == "PA" and mimic.caption[mimic.study[d]] is not None)
    next(mimic.root.rglob(f"{dicom}.jpg")).unlink()
    with pytest.raises(DataError, match=r"1 of the \d+ images listed in mimic-cxr-2.0.0-split.csv.gz is missing"):
        load_splits("mimic_cxr", mimic.root, SIZE, {}, 0)
    splits = load_splits("mimic_cxr", mimic.root, SIZE, {"skip_unreadable": True}, 0)
    assert sum(map(is_missing, splits.skipped)) == 1 and sum(map(is_uncaptioned, splits.skipped)) == 1


def test_mimic_check_and_download_folder(mimic: Mimic, tmp_path: Path) -> None:
    report = check_dataset("mimic_cxr", tmp_path, {}, image_size=SIZE, label_ratios=[0.5, 1.0])
    assert report.root == str(mimic.root.resolve())  # found inside the download folder
    assert report.usable, report.problems  # a study without a caption is no problem
    assert report.has_captions and report.uncaptioned == 1 and len(report.unreadable) == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: (m.root / "mimic-cxr-2.0.0-split.csv.gz").unlink(), r"mimic-cxr-2.0.0-split.csv.gz: file not found"),
        (lambda m: (m.root / "mimic-cxr-2.0.0-metadata.csv.gz").unlink(), r"metadata.csv.gz: file not found"),
        (lambda m: (m.root / "mimic-cxr-2.0.0-chexpert.csv.gz").unlink(), r"chexpert.csv.gz: file not found"),
        (lambda m: _write_gz_csv(m.root / "mimic-cxr-2.0.0-metadata.csv.gz", ["dicom_id", "Rows"], [["x", "1"]]),
         r"metadata.csv.gz: no column 'ViewPosition'"),
        (lambda m: _write_gz_csv(m.root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id",
                                 "split"], [[next(iter(m.view)), "5", "10000000", "holdout"]]),
         r"split.csv.gz: line 2: column 'split': split 'holdout' is not train, validate or test"),
        (lambda m: _write_gz_csv(m.root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id",
                                 "split"], [["nope", "5", "10000000", "train"]]),
         r"metadata.csv.gz: no row for dicom_id 'nope'"),
    ],
)
def test_mimic_errors_name_the_file_and_column(mimic: Mimic, change: Callable[[Mimic], None], message: str) -> None:
    change(mimic)
    with pytest.raises(DataError, match=message) as err:
        load_splits("mimic_cxr", mimic.root, SIZE, {}, 0)
    assert "\n" not in str(err.value)


def test_mimic_bad_options() -> None:
    with pytest.raises(ConfigError, match="caption_section"):
        load_splits("mimic_cxr", "/nonexistent", SIZE, {"caption_section": "history"}, 0)
    with pytest.raises(ConfigError, match="unknown CheXpert label"):
        load_splits("mimic_cxr", "/nonexistent", SIZE, {"labels": ["Edemaa"]}, 0)


# ----------------------------------------------------------------------------- the captions CSV


def make_captions(base: Path, split_column: bool = True, labels: bool = False) -> Path:
    """24 images of 12 patients in ``img/``, ``captions.csv`` beside them; one row without a caption."""
    root = base / "captions"
    (root / "img").mkdir(parents=True)
    header = ["image", "caption", "patient"] + (["split"] if split_column else []) + (["effusion"] if labels else [])
    rows = [",".join(header)]
    for i in range(24):
        Image.fromarray(np.full((20, 20), 10 * i, np.uint8)).save(root / "img" / f"{i}.png")
        caption = "" if i == 5 else f'"Image {i}, a radiograph."'
        cells = [f"img/{i}.png", caption, f"p{i // 2}"]
        cells += [["train", "val", "test", "train"][(i // 2) % 4]] if split_column else []
        cells += [str(i % 2)] if labels else []
        rows.append(",".join(cells))
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    return root


def _captions_by_level(splits: DatasetSplits) -> dict[str, dict[int, str]]:
    return {
        name: {int(image[0, 0]) // 10: caption for image, caption in zip(split.images, split.captions)}
        for name, split in zip(("train", "val", "test"), _all(splits))
    }


def test_captions_csv_with_split_column(tmp_path: Path) -> None:
    root = make_captions(tmp_path)
    splits = load_splits("captions", root, SIZE, {"split_column": "split", "patient_column": "patient"}, 0)
    assert splits.has_captions and splits.class_names == () and splits.train.labels.shape == (len(splits.train), 0)
    by_split = _captions_by_level(splits)
    for name, captions in by_split.items():
        for i, caption in captions.items():
            assert caption == f"Image {i}, a radiograph."
            assert ["train", "val", "test", "train"][(i // 2) % 4] == name
    assert 5 not in set().union(*by_split.values())
    (skipped,) = splits.skipped
    assert skipped == f"{root / 'img' / '5.png'}: no caption (row 7 of captions.csv: blank 'caption')"
    assert is_uncaptioned(skipped)


def test_captions_csv_drawn_by_patient_with_labels(tmp_path: Path) -> None:
    root = make_captions(tmp_path, split_column=False, labels=True)
    options = {"patient_column": "patient", "label_columns": ["effusion"]}
    splits = load_splits("captions", root, SIZE, options, 0)
    assert splits.class_names == ("effusion",) and splits.has_captions
    assert all(len(s) for s in _all(splits))
    patients = [set(s.groups.tolist()) for s in _all(splits)]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    for split in _all(splits):
        for image, label in zip(split.images, split.labels):
            assert label.tolist() == [float((int(image[0, 0]) // 10) % 2)]
    other = load_splits("captions", root, SIZE, options, 1)
    assert [s.groups.tolist() for s in _all(other)] != [s.groups.tolist() for s in _all(splits)]
    report = check_dataset("captions", root, options, image_size=SIZE, label_ratios=[0.5, 1.0])
    assert report.usable and report.has_captions and report.uncaptioned == 1


def test_captions_csv_zero_classes_check(tmp_path: Path) -> None:
    root = make_captions(tmp_path, split_column=False)
    report = check_dataset("captions", root, {}, image_size=SIZE, label_ratios=[0.5, 1.0])
    assert report.usable, report.problems
    assert report.class_names == [] and report.positives["train"] == {} and report.ratio_positives[0.5] == {}
    assert 0 < report.ratio_images[0.5] < report.ratio_images[1.0]


def test_captions_csv_missing_and_unreadable_images(tmp_path: Path) -> None:
    root = make_captions(tmp_path)
    (root / "img" / "3.png").unlink()
    (root / "img" / "4.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"1 of the 23 images listed in captions.csv is missing, e.g. img/3.png"):
        load_splits("captions", root, SIZE, {"split_column": "split"}, 0)
    splits = load_splits("captions", root, SIZE, {"split_column": "split", "skip_unreadable": True}, 0)
    assert len(splits.skipped) == 3 and sum(map(is_missing, splits.skipped)) == 1
    assert sum(map(is_uncaptioned, splits.skipped)) == 1
    assert sum(len(s) for s in _all(splits)) == 21


@pytest.mark.parametrize(
    ("csv", "options", "message"),
    [
        (None, {"csv": "other.csv"}, r"captions: no captions dataset found: looked for other.csv in it"),
        ("image,text\nimg/0.png,x\n", {}, r"captions.csv: no column 'caption' \(columns: image, text\)$"),
        ("image,caption\nimg/0.png,\nimg/1.png, \n", {},
         r"captions.csv: column 'caption' is empty \(no row has a caption\)$"),
        ("image,caption\nimg/0.png,x\n", {"label_columns": ["effusion"]}, r"no column 'effusion'"),
        ("image,caption,split\nimg/0.png,x,dev\n", {"split_column": "split"},
         r"captions.csv: row 2, column 'split': split 'dev' is not train, val or test$"),
        ("image,caption,e\nimg/0.png,x,2\n", {"label_columns": ["e"]},
         r"row 2, column 'e': label '2' is not 0, 1 or blank"),
        ("image,caption\n,x\n", {}, r"captions.csv: row 2, column 'image': empty image path$"),
    ],
)
def test_captions_csv_errors(tmp_path: Path, csv: str | None, options: dict, message: str) -> None:
    root = make_captions(tmp_path)
    if csv is not None:
        (root / "captions.csv").write_text(csv)
    with pytest.raises(DataError, match=message):
        load_splits("captions", root, SIZE, options, 0)


def test_captions_csv_in_a_subfolder_resolves_images_beside_it(tmp_path: Path) -> None:
    root = make_captions(tmp_path)
    (root / "meta").mkdir()
    text = (root / "captions.csv").read_text().replace("img/", "../img/")
    (root / "captions.csv").unlink()
    (root / "meta" / "pairs.csv").write_text(text)
    splits = load_splits("captions", root, SIZE, {"csv": "meta/pairs.csv", "split_column": "split"}, 0)
    assert sum(len(s) for s in _all(splits)) == 23 and len(splits.skipped) == 1
