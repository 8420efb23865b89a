"""Tiny MedMNIST files in the published layout, written by the tests (never downloaded).

A file is ``<flag>.npz`` (28 px) or ``<flag>_<size>.npz`` with the six arrays MedMNIST publishes:
``{train,val,test}_images`` uint8 (N, size, size) grey or (N, size, size, 3) colour, and
``{train,val,test}_labels`` uint8 (N, 1) class indices, or (N, 14) 0/1 for multi-label ChestMNIST.
The layout is written out here, not taken from ``medpeft_ray.data.medmnist``, so that the tests
hold the reader to the published layout rather than to itself.

Each class (each finding, for ChestMNIST) draws a bright blob at a place of its own, in a colour of
its own on the colour sets, over a noisy background: a small model learns it in a few epochs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

#: flag -> (classes or labels, channels) of the sets the tests write: multi-label grey, multi-class
#: colour, binary grey, ordinal colour
FIXTURE_SETS = {"chestmnist": (14, 1), "dermamnist": (7, 3), "pneumoniamnist": (2, 1), "retinamnist": (5, 3)}
COUNTS = {"train": 70, "val": 28, "test": 28}
#: a distinct colour per class on the colour sets (RGB, 0-1)
_HUES = np.array([[1.0, 0.2, 0.2], [0.2, 1.0, 0.2], [0.2, 0.3, 1.0], [1.0, 1.0, 0.2], [1.0, 0.2, 1.0],
                  [0.2, 1.0, 1.0], [1.0, 0.6, 0.2]])


def npz_name(flag: str, size: int) -> str:
    """The published name: ``dermamnist.npz`` at 28 px, ``dermamnist_64.npz`` at 64 px."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def file_labels(flag: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Labels as the file holds them: (n, 14) 0/1 for ChestMNIST, else (n, 1) class indices; uint8.

    Every class (finding) has a positive in every split of a few dozen images.
    """
    classes, _ = FIXTURE_SETS[flag]
    if flag == "chestmnist":
        labels = (rng.random((n, classes)) < 0.25).astype(np.uint8)
        labels[np.arange(min(n, classes)), np.arange(min(n, classes))] = 1
        return labels
    return rng.permutation(np.arange(n) % classes).astype(np.uint8).reshape(n, 1)


def render(positives: np.ndarray, size: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 image: a blob per positive class, class k at angle 2 pi k / K on a ring."""
    k_all = len(positives)
    lin = np.linspace(-1.0, 1.0, size)
    yy, xx = np.meshgrid(lin, lin, indexing="ij")
    image = 0.25 + rng.normal(0.0, 0.06, (size, size, channels))
    sigma = 0.5 / max(k_all, 4) ** 0.5
    for k in np.flatnonzero(positives):
        angle = 2 * np.pi * k / k_all
        blob = np.exp(-((yy - 0.55 * np.sin(angle)) ** 2 + (xx - 0.55 * np.cos(angle)) ** 2) / (2 * sigma**2))
        colour = _HUES[k % len(_HUES)] if channels == 3 else np.ones(1)
        image += 0.6 * blob[..., None] * colour
    pixels = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    return pixels[..., 0] if channels == 1 else pixels


def medmnist_arrays(flag: str, size: int = 28, counts: dict[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """The six arrays of a set's file."""
    classes, channels = FIXTURE_SETS[flag]
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for split, n in (counts or COUNTS).items():
        labels = file_labels(flag, n, rng)
        positives = labels if flag == "chestmnist" else np.eye(classes, dtype=np.uint8)[labels[:, 0]]
        images = [render(row, size, channels, rng) for row in positives]
        shape = (0, size, size) if channels == 1 else (0, size, size, 3)
        arrays[f"{split}_images"] = np.stack(images) if images else np.zeros(shape, np.uint8)
        arrays[f"{split}_labels"] = labels
    return arrays


def write_medmnist(folder: Path, flag: str, size: int = 28, counts: dict[str, int] | None = None, seed: int = 0,
                   compressed: bool = True, **replace: Any) -> Path:
    """Writes ``folder/<flag>[_<size>].npz`` (compressed, as published) and returns its path.

    ``replace`` swaps arrays for others (``train_labels=...``), or leaves one out (``val_images=None``).
    """
    arrays = medmnist_arrays(flag, size, counts, seed)
    for key, value in replace.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / npz_name(flag, size)
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path
