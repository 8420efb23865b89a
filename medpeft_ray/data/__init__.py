"""Datasets: each format decodes once into :class:`DatasetSplits`; label-ratio subsets; the cache.

The formats' registry is read at the CLI's start (the config validates dataset options), so the
readers that only decoding needs (pandas, Pillow, pydicom) are imported where the files are read.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

from medpeft_ray.data import csv_table, folder, splitfile, synthetic  # noqa: F401  (registers the formats)
from medpeft_ray.data.base import DatasetSplits, LabeledImages
from medpeft_ray.data.cache import cache_root, cached_splits
from medpeft_ray.data.layout import walk
from medpeft_ray.data.registry import DatasetOptions, get_dataset, list_datasets, register_dataset
from medpeft_ray.data.splits import label_ratio_index, train_subset_index
from medpeft_ray.schema import parse_section

__all__ = [
    "DatasetOptions", "DatasetSplits", "LabeledImages", "get_dataset", "label_ratio_index", "list_datasets",
    "dataset_key", "load_splits", "register_dataset", "train_subset_index",
]


def dataset_key(name: str, root: str | Path | None, image_size: int, options: dict[str, Any], seed: int) -> dict[str, Any]:
    """What determines a dataset's decoded bytes: the cache key (walks the dataset's files once).

    ``root`` may be the dataset folder or a download folder holding it; the key names the
    dataset folder.

    Raises:
        ConfigError: an unknown or invalid option (named ``dataset.options.<key>``).
        DataError: no dataset folder of this format under ``root`` (or several).
    """
    spec = get_dataset(name)
    parsed = parse_section(spec.options, options, "dataset.options")
    key: dict[str, Any] = {"dataset": name, "image_size": image_size, "options": parsed.model_dump(), "seed": seed}
    if root is not None:
        # the download folder or the dataset folder inside it: both key (and cache) the dataset folder
        root_path = spec.dataset_folder(Path(root).expanduser().resolve(), parsed)
        key["root"] = str(root_path)
        key["files"] = _fingerprint(root_path, None if spec.inputs is None else spec.inputs(root_path, parsed))
    if os.environ.get("MEDPEFT_CACHE"):
        # a folder the user named (shared storage, a node's fast disk): every worker, on every node,
        # reads and builds the entry there, not in its own home folder
        key["cache_dir"] = str(Path(os.environ["MEDPEFT_CACHE"]).expanduser().resolve())
    return key


def load_splits(
    name: str,
    root: str | Path | None,
    image_size: int,
    options: dict[str, Any],
    seed: int,
    key: dict[str, Any] | None = None,
) -> DatasetSplits:
    """The decoded splits of a dataset, through the decode-once cache.

    ``key`` is :func:`dataset_key` computed earlier (the search driver does it once, so trial
    workers do not walk a 100k-image tree again); without it the key is computed here.

    Raises:
        ConfigError: an unknown or invalid option (named ``dataset.options.<key>``).
        DataError: a file that is missing or cannot be read (named).
    """
    key = key or dataset_key(name, root, image_size, options, seed)
    spec = get_dataset(name)
    parsed = spec.options.model_validate(key["options"])
    root_path = Path(key["root"]) if "root" in key else None
    return cached_splits(key, lambda: spec.load(root_path, image_size, parsed, seed))


def _fingerprint(root: Path, files: Sequence[Path] | None = None) -> str:
    """A content fingerprint of a tree: paths, sizes and mtimes of its files (not the cache's).

    Linked folders and files count with their targets, so a changed image behind a link
    changes the key. ``files``: only these (the format's ``inputs``; a missing one counts as such,
    and its loader names it).
    """
    digest = hashlib.sha256()
    if files is not None:
        for path in files:
            try:
                stat = os.stat(path)
                digest.update(f"{os.path.relpath(path, root)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{os.path.relpath(path, root)}|missing\n".encode())
        return digest.hexdigest()
    cache = str(cache_root().resolve())
    for directory, dirs, files in walk(root):
        if directory == cache or directory.startswith(cache + os.sep):
            dirs[:] = []  # the cache may live inside the dataset folder: its entries must not change the key
            continue
        for name in files:
            path = os.path.join(directory, name)
            try:
                stat = os.stat(path)
            except OSError:
                stat = os.lstat(path)  # a broken link: decoding names it as missing
            digest.update(f"{os.path.relpath(path, root)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


from medpeft_ray.data import busi, ham10000, rsna  # noqa: F401,E402
from medpeft_ray.data import chexpert, nih  # noqa: F401,E402
from medpeft_ray.data import fitzpatrick17k, smdg  # noqa: F401,E402
from medpeft_ray.data import medmnist  # noqa: F401,E402
from medpeft_ray.data import captions, mimic_cxr  # noqa: F401,E402  (image-text data)
