"""The decode-once cache: decoded, resized uint8 arrays stored once and memory-mapped after.

An entry is keyed by a content hash of everything that determines its bytes (dataset, options,
image size, file list with sizes and mtimes), so every trial on a node, and later searches,
reuse it, and a changed input file makes a new entry instead of a stale read.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medpeft_ray.data.base import DatasetSplits, LabeledImages

# 2: subgroup attributes per image; 3: captions per image (image-text data), so an entry written
# before captions existed is not read back as a dataset without them; 4: RGB images where the
# data has colour (an entry decoded to grey before is not read back for a colour dataset)
_FORMAT_VERSION = 4


def cache_root() -> Path:
    """``$MEDPEFT_CACHE``, else ``~/.cache/medpeft_ray``."""
    return Path(os.environ.get("MEDPEFT_CACHE", Path.home() / ".cache" / "medpeft_ray"))


def content_key(parts: dict[str, Any]) -> str:
    blob = json.dumps({"format": _FORMAT_VERSION, **parts}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def cached_splits(key_parts: dict[str, Any], build: Callable[[], DatasetSplits]) -> DatasetSplits:
    """Returns the cached splits for ``key_parts``, building and storing them on a miss.

    The entry is written to a temporary directory and renamed into place, so concurrent trials
    on one node never read a half-written entry; the loser of a race simply discards its copy.
    """
    entry = cache_root() / content_key(key_parts)
    if (entry / "meta.json").is_file():
        return _load(entry)
    splits = build()
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
    try:
        for name in ("train", "val", "test"):
            split: LabeledImages = getattr(splits, name)
            np.save(tmp / f"{name}_images.npy", split.images)
            np.save(tmp / f"{name}_labels.npy", split.labels)
            np.save(tmp / f"{name}_groups.npy", split.groups)
            for i, values in enumerate(split.subgroups.values()):
                np.save(tmp / f"{name}_subgroup_{i}.npy", np.asarray(values, dtype=str))
            if split.captions is not None:
                # JSON, not a unicode .npy: that pads every caption to the longest (reports run long)
                (tmp / f"{name}_captions.json").write_text(json.dumps([str(c) for c in split.captions]))
        for i, index in enumerate(splits.ratio_subsets.values()):
            np.save(tmp / f"ratio_{i}.npy", np.asarray(index, dtype=np.int64))
        meta = {
            "class_names": list(splits.class_names),
            "task": splits.task,
            "skipped": list(splits.skipped),
            "missing_summary": splits.missing_summary,
            "ratio_subsets": list(splits.ratio_subsets),
            "subgroups": {name: list(getattr(splits, name).subgroups) for name in ("train", "val", "test")},
            "captions": [name for name in ("train", "val", "test") if getattr(splits, name).captions is not None],
            "key": key_parts,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, default=str))
        os.rename(tmp, entry)
    except OSError:
        # Another process won the race (entry exists) or the disk is full: the in-memory copy
        # is still good for this run.
        for f in tmp.glob("*"):
            f.unlink()
        tmp.rmdir()
    return splits


def _load(entry: Path) -> DatasetSplits:
    meta = json.loads((entry / "meta.json").read_text())

    def captions(name: str) -> np.ndarray | None:
        if name not in meta.get("captions", []):
            return None
        values = json.loads((entry / f"{name}_captions.json").read_text())
        out = np.empty(len(values), dtype=object)  # np.asarray would make a padded unicode array
        out[:] = values
        return out

    def split(name: str) -> LabeledImages:
        return LabeledImages(
            np.load(entry / f"{name}_images.npy", mmap_mode="r"),
            np.load(entry / f"{name}_labels.npy"),
            np.load(entry / f"{name}_groups.npy", allow_pickle=False),
            {
                attribute: np.load(entry / f"{name}_subgroup_{i}.npy", allow_pickle=False)
                for i, attribute in enumerate(meta.get("subgroups", {}).get(name, []))
            },
            captions(name),
        )

    ratios = {float(r): np.load(entry / f"ratio_{i}.npy") for i, r in enumerate(meta.get("ratio_subsets", []))}
    return DatasetSplits(
        split("train"), split("val"), split("test"), tuple(meta["class_names"]), meta["task"],
        tuple(meta.get("skipped", [])), ratios, meta.get("missing_summary", ""),
    )
