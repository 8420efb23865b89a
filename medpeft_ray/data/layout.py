"""Dataset folders as users lay them out: symbolic links, and the dataset folder inside a download.

On shared clusters image folders are often symbolic links to a common copy, and a download
(``archive/``, the folder an archive unpacked into) often holds the publisher's dataset folder
(``CheXpert-v1.0-small/``, ``Dataset_BUSI_with_GT/``) rather than being it. Every format finds
its files through :func:`walk` and its folder through :func:`find_dataset_root`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from medpeft_ray.errors import DataError

#: How many folder levels below the given root the dataset folder is looked for.
SEARCH_DEPTH = 2
#: A level with more folders than this is an image tree (patients, studies), not a download: not searched.
SEARCH_WIDTH = 1000


def is_tool_folder(name: str) -> bool:
    """Hidden and tool folders (``.git``, ``.ipynb_checkpoints``, ``__MACOSX``) hold no dataset."""
    return name.startswith((".", "__"))


def walk(root: Path) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk(root, followlinks=True)`` in sorted order, safe against link cycles.

    Yields ``(folder, sub-folder names, file names)`` top-down; the caller may prune the
    sub-folder list in place. A link that points back at a folder above it (a cycle) is not
    entered; a folder reached twice through different links is walked under both paths, because
    the formats that find images by folder name (NIH's ``images*``) depend on the path.
    Unreadable folders are passed over, as ``os.walk`` does. File names include links to files,
    broken ones too (decoding them names the missing target).
    """
    stack: list[tuple[str, tuple[str, ...]]] = [(str(root), (os.path.realpath(root),))]
    while stack:
        folder, above = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        dirs: list[str] = []
        files: list[str] = []
        links: set[str] = set()
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows links
            except OSError:
                is_dir = False
            (dirs if is_dir else files).append(entry.name)
            if is_dir and entry.is_symlink():
                links.add(entry.name)
        dirs.sort()
        files.sort()
        yield folder, dirs, files
        for name in reversed(dirs):  # popped in sorted order
            path = os.path.join(folder, name)
            # a plain sub-folder's real path follows from its parent's; only links need resolving
            real = os.path.realpath(path) if name in links else os.path.join(above[-1], name)
            if real not in above:
                stack.append((path, above + (real,)))


class RootMarker(Protocol):
    """What tells a format's dataset folder: :meth:`complete_in` all of it, :meth:`partly_in` a sign of it."""

    def complete_in(self, folder: Path) -> bool: ...

    def partly_in(self, folder: Path) -> bool: ...

    def __str__(self) -> str: ...


@dataclass(frozen=True)
class MarkerPaths:
    """A dataset folder holds these files (or, ending in ``/``, folders), relative to it.

    ``advice``, given the root searched, says what to do when no folder holds them (where the
    publisher's file is downloaded from): the end of :func:`find_dataset_root`'s error.
    """

    paths: tuple[str, ...]
    advice: Callable[[Path], str] | None = None

    def _present(self, folder: Path) -> list[bool]:
        return [(folder / p).is_dir() if p.endswith("/") else (folder / p).is_file() for p in self.paths]

    def complete_in(self, folder: Path) -> bool:
        return all(self._present(folder))

    def partly_in(self, folder: Path) -> bool:
        return any(self._present(folder))

    def __str__(self) -> str:
        return ", ".join(self.paths)


def find_dataset_root(root: Path, marker: RootMarker, dataset: str) -> Path:
    """The dataset folder: ``root`` itself, or the one folder below it that holds the dataset.

    Level by level (``root``, its sub-folders, theirs; :data:`SEARCH_DEPTH` levels down), the
    first level where one folder shows the marker wins: a folder with all of it before one with
    a part of it, so that a dataset folder missing a file stays the root and its loader names
    the file. Hidden and tool folders (``__MACOSX``) are not searched, nor a level wider than
    :data:`SEARCH_WIDTH` folders; a folder reached through two links counts once. A root that is
    no directory is returned as is (the loader names it).

    Raises:
        DataError: one line naming ``root`` and what was looked for, when no folder shows the
            marker, or when two folders of the first level that does show it both do.
    """
    if not root.is_dir():
        return root
    level = [root]
    for depth in range(SEARCH_DEPTH + 1):
        for matches in (marker.complete_in, marker.partly_in):
            found = [folder for folder in level if matches(folder)]
            if len(found) == 1:
                return found[0]
            if found:
                names = ", ".join(str(f.relative_to(root)) + "/" for f in found)
                raise DataError(
                    f"{root}: {len(found)} folders hold a {dataset} dataset ({names}); give one of them as dataset.root"
                )
        if depth < SEARCH_DEPTH:
            level = _sub_folders(level)
            if len(level) > SEARCH_WIDTH:
                break
    advice = getattr(marker, "advice", None)  # a marker may say how to get the dataset (MarkerPaths.advice)
    raise DataError(
        f"{root}: no {dataset} dataset found: looked for {marker} in it and in its sub-folders "
        f"({SEARCH_DEPTH} levels down)" + (f"; {advice(root)}" if advice is not None else "")
    )


def _sub_folders(folders: list[Path]) -> list[Path]:
    """The sub-folders of ``folders`` (sorted, tool folders left out), each real folder once.

    Stops past :data:`SEARCH_WIDTH` of them (the caller then searches no further).
    """
    seen: set[str] = set()
    out: list[Path] = []
    for folder in folders:
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and not is_tool_folder(p.name))
        except OSError:
            continue
        for child in children:
            real = os.path.realpath(child)
            if real not in seen:
                seen.add(real)
                out.append(child)
        if len(out) > SEARCH_WIDTH:
            break
    return out
