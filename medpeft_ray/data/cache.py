"""The decode-once cache: decoded, resized uint8 arrays stored once and memory-mapped after.

An entry is keyed by a content hash of everything that determines its bytes (dataset, options,
image size, file list with sizes and mtimes), so every trial on a node, and later searches,
reuse it, and a changed input file makes a new entry instead of a stale read.

The cache folder is per machine (``~/.cache/medpeft_ray``) unless the user names one
(``MEDPEFT_CACHE``): the search driver passes the name on to every worker, so a folder on shared
storage is decoded once for the whole cluster, and a node-local one once per node.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medpeft_ray.data.base import DatasetSplits, LabeledImages
from medpeft_ray.storage import cache_root

log = logging.getLogger(__name__)

# 2: subgroup attributes per image; 3: captions per image (image-text data), so an entry written
# before captions existed is not read back as a dataset without them; 4: RGB images where the
# data has colour (an entry decoded to grey before is not read back for a colour dataset)
_FORMAT_VERSION = 4



#: key parts that say where an entry lives, not what it holds (left out of the entry's name)
_PLACE_PARTS = ("cache_dir",)


def content_key(parts: dict[str, Any]) -> str:
    what = {name: value for name, value in parts.items() if name not in _PLACE_PARTS}
    blob = json.dumps({"format": _FORMAT_VERSION, **what}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def cached_splits(key_parts: dict[str, Any], build: Callable[[], DatasetSplits]) -> DatasetSplits:
    """Returns the cached splits for ``key_parts``, building and storing them on a miss.

    One process per cache folder builds an entry: the others (every worker of a node, trials of
    later searches) wait on the entry's lock and then read what it wrote. Every reader gets the
    images as a read-only memory map of the entry, so the workers of a node share one copy of the
    decoded dataset through the OS page cache instead of each holding its own. The entry is
    written to a temporary folder and renamed into place, so a reader that does not take the lock
    (an older process) never sees a half-written entry.
    """
    root = cache_root(key_parts.get("cache_dir"))
    entry = root / content_key(key_parts)
    if (entry / "meta.json").is_file():
        return _load(entry)
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / f"{entry.name}.lock", "a+b")  # noqa: SIM115  (held until the entry exists)
    except OSError as exc:  # a read-only or full cache folder: decode for this process alone
        log.warning("decode-once cache %s is not writable (%s); decoding without it", root, exc)
        return build()
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if (entry / "meta.json").is_file():  # another process built it while this one waited
            return _load(entry)
        splits = build()
        try:
            _write(entry, splits, key_parts)
        except OSError as exc:
            # the disk is full (say): the decoded copy in this process's memory is still good for this run
            log.warning("could not write the decode-once cache entry %s (%s); using this process's copy", entry, exc)
            return splits
    del splits  # the private copy goes: the map is what this process keeps, like every other reader
    return _load(entry)


def _write(entry: Path, splits: DatasetSplits, key_parts: dict[str, Any]) -> None:
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
            "key": {name: value for name, value in key_parts.items() if name not in _PLACE_PARTS},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, default=str))
        os.rename(tmp, entry)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (entry / "meta.json").is_file():
            raise


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
