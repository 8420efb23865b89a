"""Per-image predictions a trial keeps: what confidence intervals and paired tests are computed from.

A trial's folder in the results storage gets a ``predictions/`` folder with, at most, two files:

- ``val.npz``: the best validation epoch's predictions (every search trial and confirmation seed;
  rewritten whenever a later epoch becomes the best);
- ``test.npz``: that epoch's test-split predictions (confirmation seeds and ``train --config``).

Each is a NumPy ``.npz`` archive (``numpy.load`` reads it, no pickling) holding:

============  ====================  ==========================================================
array         shape, dtype          meaning
============  ====================  ==========================================================
``scores``    (N, K) float32        predicted probabilities (sigmoid: multi-label; softmax:
                                    multi-class), in the split's image order
``labels``    (N, K) float32        targets 1, 0 or NaN (unknown)
``groups``    (N,) str              the patient (or lesion) each image belongs to; an image's
                                    own index where the dataset records none
``classes``   (K,) str              class names
``thresholds`` (K,) float64         multi-label: the per-class decision thresholds chosen on
                                    validation (what F1 counts); empty for multi-class
``meta``      () str                JSON: split, epoch, multilabel, format version
============  ====================  ==========================================================

Two configurations' files pair image by image when their splits are the same: same labels and
groups in the same order (:func:`check_paired` refuses anything else, in one line). The split's
order is the dataset's own, fixed for a dataset and its options.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from medpeft_ray.errors import MedpeftError
from medpeft_ray.metrics import Predictions
from medpeft_ray.storage import filesystem

if TYPE_CHECKING:
    from collections.abc import Sequence

#: the folder of a trial's prediction files, inside the trial's folder
PREDICTIONS_FOLDER = "predictions"
#: the format's version (``meta["version"]``); a newer file is refused
FORMAT_VERSION = 1
SPLITS = ("val", "test")


@dataclass(frozen=True)
class SplitPredictions:
    """One trial's predictions on one split at its best validation epoch (see the module's table)."""

    split: str
    epoch: int
    scores: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    classes: tuple[str, ...]
    multilabel: bool
    thresholds: np.ndarray | None = None
    #: where it was read from ("" when made in memory): named in errors
    source: str = ""

    def __post_init__(self) -> None:
        n = len(self.scores)
        if self.scores.ndim != 2 or self.labels.shape != self.scores.shape or len(self.groups) != n:
            raise MedpeftError(f"{self.source or 'predictions'}: scores {self.scores.shape}, labels "
                               f"{self.labels.shape} and groups ({len(self.groups)}) do not agree")

    @property
    def num_images(self) -> int:
        return len(self.scores)

    def metric_input(self) -> Predictions:
        """The registry's :class:`~medpeft_ray.metrics.Predictions` of these images (no loss)."""
        return Predictions(self.labels.astype(np.float64), self.scores.astype(np.float64), float("nan"),
                           self.multilabel, self.thresholds if self.multilabel else None)

    @classmethod
    def of(cls, predictions: Predictions, split: str, epoch: int, groups: np.ndarray,
           classes: Sequence[str]) -> SplitPredictions:
        """The file's content for the registry's ``predictions`` of ``split`` at ``epoch``."""
        thresholds = predictions.decision_thresholds if predictions.multilabel else None
        return cls(split, int(epoch), np.asarray(predictions.scores, dtype=np.float32),
                   np.asarray(predictions.labels, dtype=np.float32), np.asarray(groups).astype(str),
                   tuple(classes), bool(predictions.multilabel), thresholds)

    # -- the file ----------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        meta = {"split": self.split, "epoch": self.epoch, "multilabel": self.multilabel, "version": FORMAT_VERSION}
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer, scores=self.scores.astype(np.float32), labels=self.labels.astype(np.float32),
            groups=np.asarray(self.groups).astype(str), classes=np.asarray(self.classes, dtype=str),
            thresholds=np.asarray(self.thresholds if self.thresholds is not None else [], dtype=np.float64),
            meta=np.asarray(json.dumps(meta)),
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "") -> SplitPredictions:
        """Reads a file's bytes; raises a one-line MedpeftError naming ``source`` when it is not one."""
        try:
            archive = np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, ValueError):  # numpy's own words guess at pickles: say what it is not
            raise MedpeftError(f"{source or 'predictions'}: not a predictions file (no NumPy .npz archive)") from None
        try:
            with archive:
                meta = json.loads(str(archive["meta"]))
                arrays = {name: archive[name] for name in ("scores", "labels", "groups", "classes", "thresholds")}
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            raise MedpeftError(f"{source or 'predictions'}: not a predictions file ({exc})") from None
        if int(meta.get("version", 0)) > FORMAT_VERSION:
            raise MedpeftError(f"{source}: predictions format {meta['version']} is newer than this version "
                               f"reads ({FORMAT_VERSION}); upgrade medpeft-ray")
        thresholds = arrays["thresholds"] if len(arrays["thresholds"]) else None
        return cls(str(meta["split"]), int(meta["epoch"]), arrays["scores"], arrays["labels"],
                   arrays["groups"].astype(str), tuple(arrays["classes"].tolist()), bool(meta["multilabel"]),
                   thresholds, source)


def predictions_file(folder: str, split: str) -> str:
    """The file of ``split``'s predictions in a trial's predictions ``folder`` (a path or URI)."""
    if split not in SPLITS:
        raise ValueError(f"no predictions are kept for split {split!r}")
    return f"{str(folder).rstrip('/')}/{split}.npz"


def write_predictions(folder: str, predictions: SplitPredictions) -> str:
    """Writes ``predictions`` into ``folder`` (a local path or storage URI), replacing any earlier
    file of its split whole (written beside it, then moved, on a local disk); returns the file."""
    target = predictions_file(folder, predictions.split)
    fs, path = filesystem(target)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    temporary = f"{path}.partial"
    with fs.open_output_stream(temporary) as out:
        out.write(predictions.to_bytes())
    fs.move(temporary, path)
    return target


def read_predictions(folder: str, split: str) -> SplitPredictions:
    """``split``'s predictions in a trial's predictions ``folder``.

    Raises:
        MedpeftError: the file is missing or is not a predictions file (one line naming it).
    """
    target = predictions_file(folder, split)
    fs, path = filesystem(target)
    try:
        with fs.open_input_stream(path) as stream:
            data = stream.read()
    except (FileNotFoundError, OSError) as exc:
        raise MedpeftError(f"{target}: cannot read the trial's {split} predictions ({exc})") from None
    return SplitPredictions.from_bytes(data, target)


def check_paired(a: SplitPredictions, b: SplitPredictions) -> None:
    """Raises a one-line MedpeftError unless ``a`` and ``b`` are predictions on the same images, in
    the same order (same split, labels and groups): what a paired test needs."""
    if a.split != b.split:
        raise MedpeftError(f"{b.source}: {b.split} predictions cannot be paired with {a.split} ones ({a.source})")
    same = (a.labels.shape == b.labels.shape and a.classes == b.classes
            and np.array_equal(a.groups, b.groups)
            and np.array_equal(np.nan_to_num(a.labels, nan=-1), np.nan_to_num(b.labels, nan=-1)))
    if not same:
        raise MedpeftError(f"{b.source}: not the same {b.split} images as {a.source} ({b.num_images} vs "
                           f"{a.num_images} images, or other labels or patients); a paired test needs one split")
