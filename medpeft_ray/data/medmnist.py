"""MedMNIST v2 and MedMNIST+ (Yang et al. 2023), the 2D sets, as published: one ``.npz`` per set and size.

The files are ``<flag>.npz`` (28 px) and ``<flag>_<size>.npz`` (64, 128, 224 px: MedMNIST+), as
the ``medmnist`` package names and downloads them; ``dataset.root`` is the folder that holds them
(the package's default is ``~/.medmnist``), or a folder up to two levels above it. Each holds six arrays: ``train_images``,
``train_labels``, ``val_images``, ``val_labels``, ``test_images``, ``test_labels``; images uint8
``(N, size, size)`` (grey) or ``(N, size, size, 3)`` (colour), labels ``(N, 1)`` class indices,
or ``(N, 14)`` 0/1 for multi-label ChestMNIST.

The official splits are kept as given. Multi-class and binary sets are one-hot over their classes
(named as the package's ``INFO`` names them); ordinal RetinaMNIST (grades 0-4) is treated as
multi-class. MedMNIST has no patient ids and no metadata: each image is its own group (its index
within its split), and there are no subgroup attributes.

Memory: an ``.npz`` cannot be memory-mapped (its arrays are zip members, compressed), so each
split's images are streamed out of the file into a scratch file in the decode-once cache folder,
unlinked at once and mapped (:func:`scratch_array`): decoding ChestMNIST at 224 px (5.6 GB of
pixels) does not hold them in process memory, and the cache then maps its own copy. Images are
kept as the file's uint8 arrays; only a ``dataset.image_size`` other than ``size`` resizes them.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from pydantic import Field, field_validator

from medpeft_ray.data.base import DatasetSplits, LabeledImages
from medpeft_ray.data.cache import cache_root
from medpeft_ray.data.layout import MarkerPaths
from medpeft_ray.data.registry import DatasetOptions, register_dataset
from medpeft_ray.errors import DataError
from medpeft_ray.schema import did_you_mean

log = logging.getLogger(__name__)

#: where MedMNIST publishes its files (v3.0: every set at every size)
ZENODO = "https://zenodo.org/records/10519652"
SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")
#: an image array at least this large is streamed into a scratch file instead of process memory
SCRATCH_BYTES = 64 << 20
#: bytes read from the zip member at a time while streaming
CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class MedmnistSet:
    """What the ``medmnist`` package's ``INFO`` says of one 2D set (``medmnist/info.py``, v3.0.2)."""

    python_class: str
    task: str  # INFO's words: multi-label, binary-class / multi-class / binary-class / ordinal-regression
    label: dict[str, str]  # INFO["label"]: class index (as text) -> name
    n_channels: int
    n_samples: dict[str, int]

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.label[str(k)] for k in range(len(self.label)))

    @property
    def multilabel(self) -> bool:
        return self.task.startswith("multi-label")


_ORGANS = {
    "0": "bladder", "1": "femur-left", "2": "femur-right", "3": "heart", "4": "kidney-left", "5": "kidney-right",
    "6": "liver", "7": "lung-left", "8": "lung-right", "9": "pancreas", "10": "spleen",
}

#: the 2D sets, by flag, with their INFO label dicts as published
SETS: dict[str, MedmnistSet] = {
    "pathmnist": MedmnistSet("PathMNIST", "multi-class", {
        "0": "adipose", "1": "background", "2": "debris", "3": "lymphocytes", "4": "mucus", "5": "smooth muscle",
        "6": "normal colon mucosa", "7": "cancer-associated stroma", "8": "colorectal adenocarcinoma epithelium",
    }, 3, {"train": 89996, "val": 10004, "test": 7180}),
    "chestmnist": MedmnistSet("ChestMNIST", "multi-label, binary-class", {
        "0": "atelectasis", "1": "cardiomegaly", "2": "effusion", "3": "infiltration", "4": "mass", "5": "nodule",
        "6": "pneumonia", "7": "pneumothorax", "8": "consolidation", "9": "edema", "10": "emphysema",
        "11": "fibrosis", "12": "pleural", "13": "hernia",
    }, 1, {"train": 78468, "val": 11219, "test": 22433}),
    "dermamnist": MedmnistSet("DermaMNIST", "multi-class", {
        "0": "actinic keratoses and intraepithelial carcinoma", "1": "basal cell carcinoma",
        "2": "benign keratosis-like lesions", "3": "dermatofibroma", "4": "melanoma", "5": "melanocytic nevi",
        "6": "vascular lesions",
    }, 3, {"train": 7007, "val": 1003, "test": 2005}),
    "octmnist": MedmnistSet("OCTMNIST", "multi-class", {
        "0": "choroidal neovascularization", "1": "diabetic macular edema", "2": "drusen", "3": "normal",
    }, 1, {"train": 97477, "val": 10832, "test": 1000}),
    "pneumoniamnist": MedmnistSet("PneumoniaMNIST", "binary-class", {"0": "normal", "1": "pneumonia"},
                                  1, {"train": 4708, "val": 524, "test": 624}),
    "retinamnist": MedmnistSet("RetinaMNIST", "ordinal-regression", {"0": "0", "1": "1", "2": "2", "3": "3", "4": "4"},
                               3, {"train": 1080, "val": 120, "test": 400}),
    "breastmnist": MedmnistSet("BreastMNIST", "binary-class", {"0": "malignant", "1": "normal, benign"},
                               1, {"train": 546, "val": 78, "test": 156}),
    "bloodmnist": MedmnistSet("BloodMNIST", "multi-class", {
        "0": "basophil", "1": "eosinophil", "2": "erythroblast",
        "3": "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "4": "lymphocyte",
        "5": "monocyte", "6": "neutrophil", "7": "platelet",
    }, 3, {"train": 11959, "val": 1712, "test": 3421}),
    "tissuemnist": MedmnistSet("TissueMNIST", "multi-class", {
        "0": "Collecting Duct, Connecting Tubule", "1": "Distal Convoluted Tubule",
        "2": "Glomerular endothelial cells", "3": "Interstitial endothelial cells", "4": "Leukocytes",
        "5": "Podocytes", "6": "Proximal Tubule Segments", "7": "Thick Ascending Limb",
    }, 1, {"train": 165466, "val": 23640, "test": 47280}),
    "organamnist": MedmnistSet("OrganAMNIST", "multi-class", _ORGANS, 1, {"train": 34561, "val": 6491, "test": 17778}),
    "organcmnist": MedmnistSet("OrganCMNIST", "multi-class", _ORGANS, 1, {"train": 12975, "val": 2392, "test": 8216}),
    "organsmnist": MedmnistSet("OrganSMNIST", "multi-class", _ORGANS, 1, {"train": 13932, "val": 2452, "test": 8827}),
}
#: the 3D sets, which this format refuses (volumes, not images)
SETS_3D = ("organmnist3d", "nodulemnist3d", "adrenalmnist3d", "fracturemnist3d", "vesselmnist3d", "synapsemnist3d")


def file_name(flag: str, size: int) -> str:
    """``dermamnist.npz`` at 28 px, ``dermamnist_224.npz`` at 224 px (the ``medmnist`` package's names)."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def pixel_bytes(flag: str, size: int) -> int:
    """The bytes of a set's images at ``size`` (all three splits): what the cache entry holds at that size."""
    info = SETS[flag]
    return sum(info.n_samples.values()) * size * size * info.n_channels


class MedmnistOptions(DatasetOptions):
    """MedMNIST: which 2D set, and which published size of it."""

    flag: str = Field(description="the 2D set, as MedMNIST names it: " + ", ".join(SETS))
    size: int = Field(28, description="the file's image side: 28 (<flag>.npz), 64, 128 or 224 (<flag>_<size>.npz)")

    @field_validator("flag")
    @classmethod
    def _flag(cls, flag: str) -> str:
        flag = flag.strip().lower()
        if flag in SETS_3D:
            raise ValueError(f"{flag!r} is a 3D MedMNIST set; the medmnist format reads the 2D sets only: {', '.join(SETS)}")
        if flag not in SETS:
            raise ValueError(f"unknown MedMNIST flag {flag!r}{did_you_mean(flag, list(SETS))}; the 2D sets: {', '.join(SETS)}")
        return flag

    @field_validator("size")
    @classmethod
    def _size(cls, size: int) -> int:
        if size not in SIZES:
            raise ValueError(f"must be one of {', '.join(map(str, SIZES))}, the sizes MedMNIST publishes (got {size})")
        return size


def download_advice(root: Path, flag: str, size: int) -> str:
    """Where to get a set's file into ``root`` (and which sizes of the set ``root`` does hold)."""
    name = file_name(flag, size)
    present = sorted(p.name for p in root.glob(f"{flag}*.npz")) if root.is_dir() else []
    here = f"{root} holds {', '.join(present)}: set dataset.options.size to match, or " if present else ""
    fetch = (f"python -c \"import medmnist; medmnist.{SETS[flag].python_class}(split='test', size={size}, "
             f"root='{root}', download=True)\"")
    return f"{here}download {ZENODO}/files/{name} into {root}, or run {fetch}"


@register_dataset(
    "medmnist", options=MedmnistOptions, needs_root=True,
    # the folder holding the file, or a folder up to two levels above it
    marker=lambda options: MarkerPaths((file_name(options.flag, options.size),),
                                       advice=lambda root: download_advice(root, options.flag, options.size)),
    classes=lambda options: SETS[options.flag].class_names,
    inputs=lambda root, options: (root / file_name(options.flag, options.size),),
    # one format, twelve sets at four sizes: each its own task in the leaderboard (dermamnist_224)
    row_name=lambda options: file_name(options.flag, options.size).removesuffix(".npz"),
)
def load_medmnist(root: Path, image_size: int, options: MedmnistOptions, seed: int) -> DatasetSplits:
    path = root / file_name(options.flag, options.size)
    if not path.is_file():
        raise DataError(f"{path}: file not found; {download_advice(root, options.flag, options.size)}")
    info = SETS[options.flag]
    with _open_npz(path) as archive:
        headers = {key: _header(archive, path, key) for key in _keys()}  # every shape checked before any pixel is read
        for split in SPLITS:
            _check_shapes(path, split, headers, info, options)
        splits = {split: _read_split(archive, path, split, info, options.size, image_size) for split in SPLITS}
    return DatasetSplits(splits["train"], splits["val"], splits["test"], info.class_names,
                         "multilabel" if info.multilabel else "multiclass")


def _keys() -> Iterator[str]:
    for split in SPLITS:
        yield f"{split}_images"
        yield f"{split}_labels"


def _open_npz(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc}); download the file again") from None


@dataclass(frozen=True)
class _Header:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool


def _header(archive: zipfile.ZipFile, path: Path, key: str) -> _Header:
    """The shape and dtype of one array of the file, from its .npy header (no data read)."""
    if f"{key}.npy" not in archive.namelist():
        held = ", ".join(sorted(n.removesuffix(".npy") for n in archive.namelist())) or "nothing"
        raise DataError(f"{path}: no {key!r} array (the file holds {held}); a MedMNIST .npz holds "
                        f"{', '.join(_keys())}")
    with _member(archive, path, key) as stream:
        return _read_header(stream, path, key)


def _member(archive: zipfile.ZipFile, path: Path, key: str) -> Any:
    try:
        return archive.open(f"{key}.npy")
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError) as exc:
        raise DataError(f"{path}: {key}: unreadable ({type(exc).__name__}: {exc}); download the file again") from None


def _read_header(stream: Any, path: Path, key: str) -> _Header:
    try:
        version = np.lib.format.read_magic(stream)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read(stream)
    except (ValueError, zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: {key}: not a readable array ({type(exc).__name__}: {exc}); download the file again") from None
    return _Header(tuple(shape), np.dtype(dtype), bool(fortran_order))


def _check_shapes(path: Path, split: str, headers: dict[str, _Header], info: MedmnistSet, options: MedmnistOptions) -> None:
    """Images of the set's channels at ``options.size``, uint8; labels of the set's task, one row per image."""
    images, labels = headers[f"{split}_images"], headers[f"{split}_labels"]
    n, size = images.shape[0] if images.shape else 0, options.size
    expected = (n, size, size) if info.n_channels == 1 else (n, size, size, 3)
    kind = "grey" if info.n_channels == 1 else "colour"
    if len(images.shape) != len(expected) or (len(images.shape) == 4 and images.shape[3] != 3):
        raise DataError(f"{path}: {split}_images has shape {images.shape}; {options.flag} is {kind}: "
                        f"(N, {', '.join(map(str, expected[1:]))})")
    if images.shape[1:3] != (size, size):
        raise DataError(f"{path}: {split}_images holds {images.shape[1]}x{images.shape[2]} images, not the "
                        f"{size}x{size} of dataset.options.size {size}")
    if images.dtype != np.uint8:
        raise DataError(f"{path}: {split}_images is {images.dtype}, not uint8 as MedMNIST publishes it")
    width = len(info.class_names) if info.multilabel else 1
    what = (f"{width} 0/1 labels per image" if info.multilabel else f"one class index per image (0-{len(info.label) - 1})")
    if labels.shape != (n, width):
        raise DataError(f"{path}: {split}_labels has shape {labels.shape}; {options.flag} is {info.task}: ({n}, {width}), "
                        f"{what}")
    if labels.dtype.kind not in "biu":
        raise DataError(f"{path}: {split}_labels is {labels.dtype}; MedMNIST labels are integers ({what})")


def _read_split(archive: zipfile.ZipFile, path: Path, split: str, info: MedmnistSet, size: int,
                image_size: int) -> LabeledImages:
    labels = _labels(_read_small(archive, path, f"{split}_labels"), path, f"{split}_labels", info)
    images = _read_images(archive, path, f"{split}_images")
    if image_size != size:
        images = _resized(images, image_size)
    # no patient ids: each image is its own group, so label-ratio subsets draw images
    return LabeledImages(images, labels, np.arange(len(labels), dtype=np.int64))


def _labels(raw: np.ndarray, path: Path, key: str, info: MedmnistSet) -> np.ndarray:
    """(N, K) float32 0/1: multi-label as given, class indices one-hot."""
    k = len(info.class_names)
    top = 1 if info.multilabel else k - 1
    bad = np.flatnonzero(((raw < 0) | (raw > top)).any(axis=1))
    if len(bad):
        row = int(bad[0])
        allowed = "0 or 1" if info.multilabel else f"a class index 0-{top}"
        raise DataError(f"{path}: {key} row {row} holds {raw[row].tolist()}, not {allowed} ({len(bad)} such row(s))")
    if info.multilabel:
        return raw.astype(np.float32)
    return np.eye(k, dtype=np.float32)[raw[:, 0].astype(np.int64)]


def _read_small(archive: zipfile.ZipFile, path: Path, key: str) -> np.ndarray:
    """A labels array, read whole (N x 14 bytes at most)."""
    with _member(archive, path, key) as stream:
        try:
            return np.lib.format.read_array(stream, allow_pickle=False)
        except (ValueError, zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: {key}: unreadable ({type(exc).__name__}: {exc}); download the file again") from None


def _read_images(archive: zipfile.ZipFile, path: Path, key: str) -> np.ndarray:
    """A uint8 image array streamed out of the zip member into :func:`scratch_array`, chunk by chunk."""
    with _member(archive, path, key) as stream:
        header = _read_header(stream, path, key)
        images = scratch_array(header.shape[::-1] if header.fortran_order else header.shape)
        flat = images.reshape(-1)
        done = 0
        try:
            while done < flat.size:
                chunk = stream.read(min(CHUNK_BYTES, flat.size - done))
                if not chunk:
                    raise EOFError(f"the array ends after {done:,} of {flat.size:,} bytes")
                flat[done:done + len(chunk)] = np.frombuffer(chunk, np.uint8)
                done += len(chunk)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: {key}: unreadable ({type(exc).__name__}: {exc}); download the file again") from None
    # a Fortran-ordered array was read as its transpose: the view puts the axes back
    return images.T if header.fortran_order else images


def scratch_array(shape: tuple[int, ...]) -> np.ndarray:
    """An empty uint8 array; a large one lives in a scratch file of the cache folder, mapped, not in process memory.

    The file is unlinked as soon as it is mapped: its space goes when the array does, and nothing
    is left behind if the process dies. Its blocks are allocated up front, so a full disk is an
    error here (then the array is made in memory) rather than a crash on a write into the map.
    """
    nbytes = math.prod(shape)
    if nbytes < SCRATCH_BYTES:
        return np.empty(shape, np.uint8)
    folder = cache_root()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".medmnist-", suffix=".scratch", dir=folder)
        try:
            os.posix_fallocate(fd, 0, nbytes)
            return np.memmap(name, dtype=np.uint8, mode="r+", shape=shape)
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as exc:
        log.warning("no scratch file for %.1f GB of MedMNIST images in %s (%s); holding them in memory",
                    nbytes / 1e9, folder, exc)
        return np.empty(shape, np.uint8)


def _resized(images: np.ndarray, image_size: int) -> np.ndarray:
    """Every image resized (bilinear, as the other formats decode) to ``image_size``, into a new array."""
    from PIL import Image  # Pillow: only a size other than the file's needs it

    out = scratch_array((len(images), image_size, image_size, *images.shape[3:]))
    for i, image in enumerate(images):
        out[i] = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((image_size, image_size), Image.BILINEAR))
    return out
