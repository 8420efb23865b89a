"""A generic image folder: ``root/<class name>/*.png|jpg|jpeg|dcm`` (one class per image).

When ``root/train``, ``root/val`` and ``root/test`` exist, each holds class folders and gives the
split; otherwise the split is drawn per image from a seed. Hidden and tool folders
(``.ipynb_checkpoints``, ``__MACOSX``) and class folders without images are not classes. The root
may also be a download folder holding such a folder (up to two levels above it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medpeft_ray.data.base import DatasetSplits
from medpeft_ray.data.layout import is_tool_folder
from medpeft_ray.data.records import ImageRecord, SplitOptions, build_splits, one_hot
from medpeft_ray.data.registry import register_dataset
from medpeft_ray.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")
SPLIT_FOLDERS = ("train", "val", "test")


def image_files(folder: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)


def class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not is_tool_folder(p.name))


@dataclass(frozen=True)
class ClassFolders:
    """The dataset folder of this format: class folders of images, or ``train/``, ``val/``, ``test/``."""

    def complete_in(self, folder: Path) -> bool:
        if all((folder / s).is_dir() for s in SPLIT_FOLDERS):
            return True
        return any(
            p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() for c in class_folders(folder) for p in c.iterdir()
        )

    def partly_in(self, folder: Path) -> bool:
        # one split folder is a sign of the split layout: list_folder then says what is wrong
        return self.complete_in(folder) or any((folder / s).is_dir() for s in SPLIT_FOLDERS)

    def __str__(self) -> str:
        return f"class folders of {'/'.join(IMAGE_SUFFIXES)} images (or train/, val/, test/ folders of them)"


def list_folder(root: Path) -> dict[str, dict[str, list[Path]]]:
    """Files per class per split (``all`` when the folder has no split sub-folders)."""
    if not root.is_dir():
        raise DataError(f"{root}: dataset root is not a directory")
    if all((root / s).is_dir() for s in SPLIT_FOLDERS):
        layout = {s: {c.name: image_files(c) for c in class_folders(root / s)} for s in SPLIT_FOLDERS}
    else:
        layout = {"all": {c.name: image_files(c) for c in class_folders(root)}}
    if not any(files for classes in layout.values() for files in classes.values()):
        raise DataError(f"{root}: no class folders with {'/'.join(IMAGE_SUFFIXES)} images found")
    return layout


@register_dataset("folder", options=SplitOptions, needs_root=True, marker=lambda _: ClassFolders())
def load_folder(root: Path, image_size: int, options: SplitOptions, seed: int) -> DatasetSplits:
    layout = list_folder(root)
    class_names = sorted({c for classes in layout.values() for c, files in classes.items() if files})
    records = [
        # a plain folder carries no patient ids: every image is its own group
        ImageRecord(path, one_hot(class_names.index(c), len(class_names)), f"{c}/{path.name}", None if s == "all" else s)
        for s, classes in layout.items()
        for c, files in classes.items()
        for path in files
    ]
    return build_splits(
        records, class_names, "multiclass", image_size, seed, root=root, val_fraction=options.val_fraction,
        test_fraction=options.test_fraction, skip_unreadable=options.skip_unreadable, colour=options.colour, source=str(root),
    )
