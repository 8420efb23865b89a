"""``data check``: what a dataset holds and whether a search can use it, before any GPU time."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from medpeft_ray.data.records import is_missing, is_missing_report, is_uncaptioned
from medpeft_ray.data.registry import get_dataset
from medpeft_ray.data.splits import train_subset_index
from medpeft_ray.errors import DataError
from medpeft_ray.schema import parse_section


@dataclass
class DatasetReport:
    """Images per split, positives per class (per split and per label ratio), files that failed.

    ``unreadable`` lists every file left out (missing or undecodable, as "path: reason");
    ``missing`` summarises the missing ones in one block ("" when none is). For image-text data
    (``has_captions``) ``unreadable`` also lists the records left out for want of a caption (a
    report without the section), counted in ``uncaptioned``: always left out, never a problem.
    Caption data may have no classes (``class_names`` empty, ``positives`` empty per split).
    """

    name: str
    root: str | None
    class_names: list[str]
    task: str
    images: dict[str, int]
    positives: dict[str, dict[str, int]]
    ratio_images: dict[float, int]
    ratio_positives: dict[float, dict[str, int]]
    unreadable: list[str] = field(default_factory=list)
    missing: str = ""
    problems: list[str] = field(default_factory=list)
    has_captions: bool = False
    uncaptioned: int = 0
    channels: int = 1  # 1: decoded grey, 3: decoded in colour (RGB)

    @property
    def usable(self) -> bool:
        return not self.problems


def check_dataset(
    name: str,
    root: str | Path | None,
    options: dict[str, Any] | None = None,
    *,
    image_size: int = 64,
    label_ratios: Sequence[float] = (0.01, 0.1, 1.0),
    seed: int = 0,
) -> DatasetReport:
    """Decodes every image of the dataset (not cached) and reports what a search would meet.

    Every unreadable file is collected (not only the first). The dataset is unusable when a split
    is empty, when files are unreadable and ``skip_unreadable`` is off (a search would stop at the
    first), or when a label ratio leaves a class without positives.

    Raises:
        DataError: metadata that cannot be read at all (a missing CSV, a bad label value).
        ConfigError: an unknown option or a bad option value.
        KeyError: an unknown dataset name.
    """
    spec = get_dataset(name)
    options = dict(options or {})
    skip_asked = bool(options.get("skip_unreadable", False))
    if "skip_unreadable" in spec.options.model_fields:
        options["skip_unreadable"] = True  # collect every bad file instead of stopping at the first
    parsed = parse_section(spec.options, options, "dataset.options")
    if root is not None and not Path(root).expanduser().is_dir():
        # a folder that is not there is named itself, not as the first file the format reads inside it
        raise DataError(f"{root}: {'not a folder' if Path(root).expanduser().exists() else 'folder not found'}")
    root_path = spec.dataset_folder(Path(root).expanduser().resolve(), parsed) if root is not None else None
    splits = spec.load(root_path, image_size, parsed, seed)

    classes = list(splits.class_names)
    per_split = {s: getattr(splits, s) for s in ("train", "val", "test")}
    report = DatasetReport(
        name=name,
        root=str(root_path) if root_path else None,
        class_names=classes,
        task=splits.task,
        images={s: len(split) for s, split in per_split.items()},
        positives={s: dict(zip(classes, map(int, split.positives_per_class()))) for s, split in per_split.items()},
        ratio_images={},
        ratio_positives={},
        unreadable=list(splits.skipped),
        missing=splits.missing_summary,
        has_captions=splits.has_captions,
        uncaptioned=sum(map(is_uncaptioned, splits.skipped)),
        channels=splits.channels,
    )
    for ratio in label_ratios:
        index = train_subset_index(splits, ratio, seed)
        subset = splits.train.subset(index)
        report.ratio_images[ratio] = len(subset)
        report.ratio_positives[ratio] = dict(zip(classes, map(int, subset.positives_per_class())))
        empty = [c for c in classes if report.ratio_positives[ratio][c] == 0 and report.positives["train"][c] > 0]
        if empty:
            report.problems.append(f"label ratio {ratio:g} leaves no positive for: {', '.join(empty)}")
    for split_name, count in report.images.items():
        if count == 0:
            report.problems.append(f"the {split_name} split has no images")
    missing_reports = sum(map(is_missing_report, report.unreadable))
    missing = sum(map(is_missing, report.unreadable)) - missing_reports
    undecodable = len(report.unreadable) - missing - missing_reports - report.uncaptioned
    if missing_reports and not skip_asked:
        report.problems.append(
            f"{missing_reports} report file(s) missing: a search stops before its first trial; unpack them or set "
            "dataset.options.skip_unreadable: true"
        )
    if missing and not skip_asked:
        report.problems.append(
            f"{missing} listed image file(s) missing: a search stops before its first trial; unpack them or set "
            "dataset.options.skip_unreadable: true"
        )
    if undecodable and not skip_asked:
        report.problems.append(
            f"{undecodable} unreadable file(s): a search stops at the first; fix them or set "
            "dataset.options.skip_unreadable: true"
        )
    return report
