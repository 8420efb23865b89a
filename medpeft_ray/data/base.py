"""The in-memory form every dataset is turned into before training.

Each dataset module decodes its own file format once into these arrays (uint8 images of one size,
grey or RGB, float labels, group ids for patient-disjoint subsets), so the training loop has
exactly one data path whatever the source format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Task = Literal["multilabel", "multiclass"]


@dataclass(frozen=True)
class LabeledImages:
    """One split: ``images`` (N, H, W) grey or (N, H, W, 3) RGB uint8, ``labels`` (N, K) float32 0/1,
    ``groups`` (N,) ids. Grey stays one channel (a radiograph set is not tripled in memory).

    ``groups`` holds the patient (or lesion) each image belongs to, so that label-ratio subsets
    never split one patient's images. ``subgroups`` holds, per attribute the publisher records
    (Fitzpatrick skin type, sex, view), each image's value as a string ("" where unknown): the
    metrics are also computed per value, so that a row shows the worst group's gap.

    ``captions`` holds, for image-text data (a text-to-image model trained on radiographs and their
    report text), one str per image (an object or unicode array); None when the dataset has none.
    Such data may have no classes at all: ``labels`` is then (N, 0).
    """

    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    subgroups: dict[str, np.ndarray] = field(default_factory=dict)
    captions: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.images)
        grey, rgb = self.images.ndim == 3, self.images.ndim == 4 and self.images.shape[-1] == 3
        if not (grey or rgb) or self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, H, W) or (N, H, W, 3), got {self.images.dtype} {self.images.shape}")
        if self.labels.shape[0] != n or self.groups.shape[0] != n:
            raise ValueError(
                f"images ({n}), labels ({self.labels.shape[0]}) and groups ({self.groups.shape[0]}) differ in length"
            )
        for attribute, values in self.subgroups.items():
            if len(values) != n:
                raise ValueError(f"subgroup {attribute!r} has {len(values)} values for {n} images")
        if self.captions is not None:
            captions = self.captions
            if not isinstance(captions, np.ndarray) or captions.ndim != 1 or (
                captions.dtype.kind not in "OU" and len(captions)  # np.asarray([]) is float: no caption to check
            ):
                raise ValueError("captions must be a 1-D object or unicode array of str")
            if len(captions) != n:
                raise ValueError(f"captions has {len(captions)} values for {n} images")
            if captions.dtype.kind == "O" and not all(isinstance(c, str) for c in captions):
                raise ValueError("captions must hold one str per image")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: np.ndarray) -> "LabeledImages":
        return LabeledImages(
            self.images[index], self.labels[index], self.groups[index],
            {attribute: values[index] for attribute, values in self.subgroups.items()},
            None if self.captions is None else self.captions[index],
        )

    def positives_per_class(self) -> np.ndarray:
        """Positives per class, shape (K,): (0,) for caption-only data without classes."""
        return (self.labels > 0).sum(axis=0).astype(np.int64)  # NaN (unknown) is not positive


@dataclass(frozen=True)
class DatasetSplits:
    """Train, validation and test splits of one dataset, with its class names and task type.

    Caption data (image-text pairs) may have no classes: ``class_names`` is then () and every
    split's labels are (N, 0). Its ``task`` stays "multilabel": zero independent binary labels
    is a (degenerate) multi-label task, and no classification metric is computed on it.
    """

    train: LabeledImages
    val: LabeledImages
    test: LabeledImages
    class_names: tuple[str, ...]
    task: Task
    #: files left out because they could not be decoded (``skip_unreadable``), as "path: reason"
    skipped: tuple[str, ...] = ()
    #: label-ratio subsets given by the publisher (indices into ``train``), used instead of drawn ones
    ratio_subsets: dict[float, np.ndarray] = field(default_factory=dict)
    #: the block summarising listed files that were missing (and skipped), "" when none was
    missing_summary: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        """1 for grey images, 3 for RGB."""
        return 3 if self.train.images.ndim == 4 else 1

    @property
    def has_captions(self) -> bool:
        """Whether every split (train, val and test) carries a caption per image."""
        return all(getattr(self, name).captions is not None for name in ("train", "val", "test"))

    @property
    def subgroup_attributes(self) -> tuple[str, ...]:
        """The attributes every split records per image (what subgroup metrics are computed over)."""
        return tuple(a for a in self.test.subgroups if a in self.val.subgroups)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per split: ``{"images": N, "positives": {class: count}}``."""
        out: dict[str, dict[str, Any]] = {}
        for split_name in ("train", "val", "test"):
            split: LabeledImages = getattr(self, split_name)
            counts = split.positives_per_class()
            out[split_name] = {"images": len(split), "positives": {c: int(n) for c, n in zip(self.class_names, counts)}}
        return out
