"""Datasets: each format decodes once into :class:`DatasetSplits`; label-ratio subsets; the cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medpeft_ray.data import csv_table, folder, splitfile, synthetic  # noqa: F401  (registers the formats)
from medpeft_ray.data.base import DatasetSplits, LabeledImages
from medpeft_ray.data.cache import cached_splits
from medpeft_ray.data.registry import DatasetOptions, get_dataset, list_datasets, register_dataset
from medpeft_ray.data.splits import label_ratio_index, train_subset_index

__all__ = [
    "DatasetOptions", "DatasetSplits", "LabeledImages", "get_dataset", "label_ratio_index", "list_datasets",
    "load_splits", "register_dataset", "train_subset_index",
]


def load_splits(name: str, root: str | Path | None, image_size: int, options: dict[str, Any], seed: int) -> DatasetSplits:
    """The decoded splits of a dataset, through the decode-once cache."""
    spec = get_dataset(name)
    parsed = spec.options.model_validate(options)
    root_path = Path(root).resolve() if root is not None else None
    key: dict[str, Any] = {"dataset": name, "image_size": image_size, "options": parsed.model_dump(), "seed": seed}
    if root_path is not None:
        key["root"] = str(root_path)
        key["files"] = _fingerprint(root_path)
    return cached_splits(key, lambda: spec.load(root_path, image_size, parsed, seed))


def _fingerprint(root: Path) -> str:
    """A cheap content fingerprint of a tree: paths, sizes and mtimes of its files."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
from medpeft_ray.data import busi, ham10000, rsna  # noqa: F401,E402
from medpeft_ray.data import chexpert, nih  # noqa: F401,E402
