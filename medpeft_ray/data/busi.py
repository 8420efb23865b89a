"""BUSI: Breast Ultrasound Images (Al-Dhabyani et al. 2020, 780 images), as published.

The dataset folder (``Dataset_BUSI_with_GT/`` in the release; the root may also be the download
folder that holds it) holds ``benign/``, ``malignant/`` and ``normal/``; each image, e.g.
``benign (1).png``, lies beside its tumour masks ``benign (1)_mask.png``, ``benign (1)_mask_1.png``,
..., which are not images of the dataset and are ignored. Multi-class, three classes in that
order. BUSI gives no patient ids and no split: every image is its own group and the split is
drawn per image.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field

from medpeft_ray.data.base import DatasetSplits
from medpeft_ray.data.layout import MarkerPaths
from medpeft_ray.data.records import Colour, SplitOptions
from medpeft_ray.data.records import ImageRecord, build_splits, one_hot
from medpeft_ray.data.registry import register_dataset
from medpeft_ray.errors import DataError

CLASS_NAMES = ("benign", "malignant", "normal")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MASK = re.compile(r"_mask(_\d+)?$", re.IGNORECASE)


class BusiOptions(SplitOptions):
    """BUSI: split fractions counted in images (BUSI has no patient ids)."""

    colour: Colour = Field("grey", description="grey (one channel), rgb (three) or auto (ultrasound: grey by default)")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of images drawn for validation")
    test_fraction: float = Field(0.2, ge=0, lt=1, description="share of images drawn for testing")


def is_mask(path: Path) -> bool:
    """``benign (1)_mask.png`` and ``benign (1)_mask_1.png`` are masks; ``benign (1).png`` is not."""
    return MASK.search(path.stem) is not None


def class_images(folder: Path) -> list[Path]:
    """The images (not masks, not hidden files) of one class folder, sorted."""
    if not folder.is_dir():
        raise DataError(f"{folder}: class folder not found (BUSI needs {', '.join(c + '/' for c in CLASS_NAMES)})")
    images = sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and not is_mask(p)
    )
    if not images:
        raise DataError(f"{folder}: no {'/'.join(IMAGE_SUFFIXES)} images besides masks")
    return images


@register_dataset(
    "busi", options=BusiOptions, needs_root=True,
    marker=lambda _: MarkerPaths(tuple(f"{name}/" for name in CLASS_NAMES)), classes=lambda _: CLASS_NAMES,
)
def load_busi(root: Path, image_size: int, options: BusiOptions, seed: int) -> DatasetSplits:
    records = [
        ImageRecord(path, one_hot(k, len(CLASS_NAMES)), f"{name}/{path.name}")
        for k, name in enumerate(CLASS_NAMES)
        for path in class_images(root / name)
    ]
    return build_splits(
        records, CLASS_NAMES, "multiclass", image_size, seed, root=root, val_fraction=options.val_fraction,
        test_fraction=options.test_fraction, skip_unreadable=options.skip_unreadable, colour=options.colour, source=str(root),
    )
