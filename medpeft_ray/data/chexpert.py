"""CheXpert as published: ``train.csv`` and ``valid.csv`` under the dataset folder.

Layout (``root`` is the dataset folder, e.g. ``CheXpert-v1.0-small``, or the download folder
that holds it)::

    train.csv    Path,Sex,Age,Frontal/Lateral,AP/PA,<14 observations>
    valid.csv    same columns
    train/patient00001/study1/view1_frontal.jpg
    valid/patient64541/study1/view1_frontal.jpg

``Path`` values (``CheXpert-v1.0-small/train/patient00001/...``) are relative to the folder that
contains the dataset folder: they are resolved against ``root.parent`` when their first component
is ``root``'s name, else against ``root``; a renamed dataset folder also works (a first component
that is neither ``root``'s name nor a folder in ``root``, followed by one that is, is dropped).

Observation values: ``1.0`` positive, ``0.0`` negative, ``-1.0`` uncertain (mapped by the
``uncertainty`` policy: ``u-ones`` -> 1, ``u-zeros`` -> 0, ``ignore`` -> NaN, left out of loss and
AUROC), blank = not mentioned = negative. Any other value in a selected label column is a
:class:`DataError` naming the CSV, the line, the column and the value (columns not selected are
not read).

Splits: ``valid.csv`` is the test split (the official validation set, as the competition's test
set is hidden); validation is drawn from the ``train.csv`` patients (``val_fraction`` of them,
seeded by the dataset seed), the patient being the ``patientNNNNN`` component of ``Path``.

Each image records the subgroup attributes ``sex`` (``Sex``: ``M``/``F``; ``Unknown`` is ""),
``frontal_lateral`` (``Frontal``/``Lateral``) and ``view`` (``AP/PA``: ``AP``, ``PA``, ``LL``,
``RL``; blank for most laterals), "" where a value is blank or the column is absent.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import AfterValidator, Field, field_validator

from medpeft_ray.data.base import DatasetSplits
from medpeft_ray.data.layout import MarkerPaths
from medpeft_ray.data.tables import read_csv
from medpeft_ray.data.records import ImageRecord, assign_splits, build_splits, sex_of
from medpeft_ray.data.registry import DatasetOptions, register_dataset
from medpeft_ray.errors import DataError

#: The 14 observations, in the order of the CSV columns.
OBSERVATIONS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
#: The five labels of the CheXpert competition.
COMPETITION_LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
POLICIES = ("u-ones", "u-zeros", "ignore")
#: The common mix: U-Ones for these, U-Zeros for every other label.
U_ONES_IN_MIX = ("Atelectasis", "Edema", "Pleural Effusion")
PATH_COLUMN, VIEW_COLUMN = "Path", "Frontal/Lateral"
PATIENT = re.compile(r"^patient\d+$")


def _observation(name: str) -> str:
    if name not in OBSERVATIONS:
        raise ValueError(f"unknown CheXpert label {name!r}; known: {', '.join(OBSERVATIONS)}")
    return name


def _policy(value: str, label: str | None = None) -> str:
    policy = value.strip().lower().replace("_", "-")
    if policy not in POLICIES:
        where = f" for {label!r}" if label else ""
        raise ValueError(f"unknown uncertainty policy {value!r}{where}; known: {', '.join(POLICIES)}")
    return policy


#: one of the 14 observation names (an unknown one is an option error listing them)
Observation = Annotated[str, AfterValidator(_observation)]


class ObservationOptions(DatasetOptions):
    """Which CheXpert-labeller observations to predict and how uncertain values map: the options
    of every format labelled by the CheXpert labeller (``chexpert``, ``mimic_cxr``)."""

    labels: list[Observation] = Field(
        default_factory=lambda: list(COMPETITION_LABELS), min_length=1,
        description="observations to predict, in this order (default: the 5 competition labels; any of the 14 "
        "observation columns)",
    )
    uncertainty: str | dict[str, str] = Field(
        default_factory=lambda: {name: "u-ones" for name in U_ONES_IN_MIX},
        description="policy for uncertain (-1.0) values: u-ones (1), u-zeros (0) or ignore (NaN, left out of loss "
        "and AUROC); one policy for every label, or a mapping label -> policy where unnamed labels follow the "
        "common mix (u-ones for Atelectasis, Edema, Pleural Effusion; u-zeros for the others)",
    )

    @field_validator("labels")
    @classmethod
    def _distinct(cls, labels: list[str]) -> list[str]:
        repeated = sorted({name for name in labels if labels.count(name) > 1})
        if repeated:
            raise ValueError(f"labels must be distinct; repeated: {', '.join(repeated)}")
        return labels

    @field_validator("uncertainty")
    @classmethod
    def _uncertainty(cls, value: str | dict[str, str]) -> str | dict[str, str]:
        if isinstance(value, str):
            return _policy(value)
        return {_observation(name): _policy(policy, name) for name, policy in value.items()}

    def policy_of(self, label: str) -> str:
        if isinstance(self.uncertainty, str):
            return self.uncertainty
        return self.uncertainty.get(label, "u-ones" if label in U_ONES_IN_MIX else "u-zeros")


class CheXpertOptions(ObservationOptions):
    """Options of the ``chexpert`` format."""

    frontal_only: bool = Field(False, description="keep only frontal views (Frontal/Lateral == Frontal)")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of train.csv patients drawn for validation")
    skip_unreadable: bool = Field(False, description="skip (and count) missing or unreadable images instead of failing")


def label_matrix(frame, csv: Path, options: ObservationOptions) -> np.ndarray:  # frame: pandas.DataFrame
    """(rows, labels) float32: 1, 0, or the uncertainty policy's value for -1; blank is 0."""
    import pandas as pd

    out = np.zeros((len(frame), len(options.labels)), dtype=np.float32)
    uncertain_value = {"u-ones": 1.0, "u-zeros": 0.0, "ignore": np.nan}
    for k, label in enumerate(options.labels):
        raw = frame[label].str.strip()
        blank = (raw == "").to_numpy()
        values = pd.to_numeric(raw.where(~blank), errors="coerce").to_numpy(dtype=np.float64, copy=True)
        bad = ~blank & ~np.isin(values, (1.0, 0.0, -1.0))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{csv}: line {i + 2}: column {label!r}: bad value {frame[label].iloc[i]!r}"
                " (expected 1.0, 0.0, -1.0 or blank)"
            )
        values[blank] = 0.0  # not mentioned in the report: negative
        values[values == -1.0] = uncertain_value[options.policy_of(label)]
        out[:, k] = values
    return out


class PathResolver:
    """Resolves CSV ``Path`` values (as their parts); decides once per first path component."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.base: dict[str, tuple[Path, int]] = {}  # first component -> (base folder, parts to drop)

    def __call__(self, parts: list[str]) -> Path:
        first = parts[0]
        if first not in self.base:
            if first == self.root.name:
                self.base[first] = (self.root.parent, 0)
            elif len(parts) > 1 and not (self.root / first).exists() and (self.root / parts[1]).is_dir():
                self.base[first] = (self.root, 1)  # the dataset folder was renamed
            else:
                self.base[first] = (self.root, 0)
        base, drop = self.base[first]
        return base.joinpath(*parts[drop:])


def read_records(csv: Path, split: str | None, options: CheXpertOptions, resolve: PathResolver) -> list[ImageRecord]:
    required = (PATH_COLUMN, *options.labels) + ((VIEW_COLUMN,) if options.frontal_only else ())
    frame = read_csv(csv, required)
    labels = label_matrix(frame, csv, options).tolist()
    keep = np.ones(len(frame), bool)
    if options.frontal_only:
        keep = (frame[VIEW_COLUMN].str.strip() == "Frontal").to_numpy()
    paths = frame[PATH_COLUMN].tolist()
    attributes = _attributes(frame)
    records = []
    for i in np.flatnonzero(keep).tolist():
        value = paths[i].strip()
        parts = [p for p in value.replace("\\", "/").split("/") if p and p != "."]
        patient = next((p for p in parts if PATIENT.match(p)), None)
        if patient is None:
            raise DataError(f"{csv}: line {i + 2}: column {PATH_COLUMN!r}: no patientNNNNN folder in {value!r}")
        records.append(ImageRecord(resolve(parts), tuple(labels[i]), patient, split, attributes[i]))
    return records


def _attributes(frame) -> list[tuple[tuple[str, str], ...]]:  # frame: pandas.DataFrame
    """Per row: ``sex``, ``frontal_lateral`` and ``view`` (see the module text)."""
    def column(name: str) -> list[str]:
        return [v.strip() for v in frame[name]] if name in frame.columns else [""] * len(frame)

    sexes = [sex_of(v) for v in column("Sex")]
    return [
        (("sex", sex), ("frontal_lateral", fl), ("view", view.upper()))
        for sex, fl, view in zip(sexes, column(VIEW_COLUMN), column("AP/PA"))
    ]


@register_dataset(
    "chexpert", options=CheXpertOptions, needs_root=True,
    marker=lambda _: MarkerPaths(("train.csv", "valid.csv")), classes=lambda options: options.labels,
)
def load_chexpert(root: Path, image_size: int, options: CheXpertOptions, seed: int) -> DatasetSplits:
    resolve = PathResolver(root)
    train = read_records(root / "train.csv", None, options, resolve)
    test = read_records(root / "valid.csv", "test", options, resolve)
    shared = sorted({r.group for r in train} & {r.group for r in test})
    if shared:
        raise DataError(
            f"{root / 'valid.csv'}: patient {shared[0]!r} is also in train.csv ({len(shared)} such patient(s));"
            " the split would not be patient-disjoint"
        )
    drawn = assign_splits([r.group for r in train], options.val_fraction, 0.0, seed) if train else []
    train = [ImageRecord(r.path, r.labels, r.group, str(s), r.attributes) for r, s in zip(train, drawn)]
    return build_splits(
        train + test, options.labels, "multilabel", image_size, seed, root=root, val_fraction=options.val_fraction,
        test_fraction=0.0, skip_unreadable=options.skip_unreadable, colour="grey", source=str(root),
    )
