"""A generic image folder: ``root/<class name>/*.png|jpg|jpeg`` (one class per image).

When ``root/train``, ``root/val`` and ``root/test`` exist, each holds class folders and gives the
split; otherwise the split is drawn per image from a seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import Field

from medpeft_ray.data.base import DatasetSplits, LabeledImages
from medpeft_ray.data.registry import DatasetOptions, register_dataset
from medpeft_ray.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class FolderOptions(DatasetOptions):
    val_fraction: float = Field(0.15, ge=0, lt=1)
    test_fraction: float = Field(0.15, ge=0, lt=1)
    skip_unreadable: bool = Field(False, description="skip (and count) unreadable images instead of failing")


def decode_image(path: Path, size: int) -> np.ndarray:
    """A file decoded to grey uint8 and resized to ``size`` x ``size``; DataError names a bad file."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("L").resize((size, size), Image.BILINEAR), dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001  (PIL raises several types for corrupt files)
        raise DataError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from exc


def _class_files(root: Path) -> dict[str, list[Path]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    return {c: sorted(p for p in (root / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) for c in classes}


def list_folder(root: Path) -> dict[str, dict[str, list[Path]]]:
    """Files per class per split (``all`` when the folder has no split sub-folders)."""
    if not root.is_dir():
        raise DataError(f"{root}: dataset root is not a directory")
    if all((root / s).is_dir() for s in ("train", "val", "test")):
        layout = {s: _class_files(root / s) for s in ("train", "val", "test")}
    else:
        layout = {"all": _class_files(root)}
    for split, classes in layout.items():
        if not classes or not any(classes.values()):
            raise DataError(f"{root}: no class folders with {'/'.join(IMAGE_SUFFIXES)} images found ({split})")
    return layout


def _decode_all(
    files: list[Path], labels: list[int], size: int, skip_unreadable: bool
) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """Decoded images, their labels and files; unreadable files raise, or are dropped when skipping."""
    images, kept_labels, kept_files = [], [], []
    for path, label in zip(files, labels):
        try:
            images.append(decode_image(path, size))
        except DataError:
            if not skip_unreadable:
                raise
            continue
        kept_labels.append(label)
        kept_files.append(path)
    stacked = np.stack(images) if images else np.zeros((0, size, size), np.uint8)
    return stacked, np.asarray(kept_labels, dtype=np.int64), kept_files


@register_dataset("folder", options=FolderOptions, needs_root=True, task="multiclass")
def load_folder(root: Path, image_size: int, options: FolderOptions, seed: int) -> DatasetSplits:
    layout = list_folder(root)
    class_names = sorted({c for classes in layout.values() for c in classes})
    one_hot = np.eye(len(class_names), dtype=np.float32)

    def split_from(classes: dict[str, list[Path]], ids: np.ndarray | None = None) -> LabeledImages:
        files = [f for c in class_names for f in classes.get(c, [])]
        labels = [class_names.index(c) for c in class_names for _ in classes.get(c, [])]
        if ids is not None:
            files, labels = [files[i] for i in ids], [labels[i] for i in ids]
        images, kept, kept_files = _decode_all(files, labels, image_size, options.skip_unreadable)
        # every image is its own group: a plain folder carries no patient ids
        groups = np.asarray([f"{f.parent.name}/{f.name}" for f in kept_files], dtype=str)
        return LabeledImages(images, one_hot[kept].reshape(len(kept), len(class_names)), groups)

    if "all" not in layout:
        return DatasetSplits(*(split_from(layout[s]) for s in ("train", "val", "test")), tuple(class_names), "multiclass")
    n = sum(len(v) for v in layout["all"].values())
    order = np.random.default_rng(seed).permutation(n)
    n_val, n_test = int(round(options.val_fraction * n)), int(round(options.test_fraction * n))
    val, test, train = order[:n_val], order[n_val : n_val + n_test], order[n_val + n_test :]
    return DatasetSplits(
        split_from(layout["all"], np.sort(train)),
        split_from(layout["all"], np.sort(val)),
        split_from(layout["all"], np.sort(test)),
        tuple(class_names),
        "multiclass",
    )
