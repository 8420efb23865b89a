"""The results storage, a local folder or a cloud URI, opened the way Ray Tune and Ray Train open theirs.

Ray resolves a ``storage_path`` with ``pyarrow.fs.FileSystem.from_uri``; the search manifest, the
warm executors' trial checkpoints and the adapter export go through the same call, so whatever
reaches Ray's storage (credentials, region, a custom endpoint such as MinIO's through
``AWS_ENDPOINT_URL``) reaches theirs too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medpeft_ray.errors import MedpeftError


def is_uri(location: str | Path) -> bool:
    """Whether ``location`` names cloud storage (``s3://``, ``gs://``, ...) rather than a local path."""
    return "://" in str(location)


def filesystem(location: str | Path) -> tuple[Any, str]:
    """``pyarrow.fs``'s file system and path for a local path (made absolute) or a storage URI.

    Raises:
        MedpeftError: pyarrow cannot open the URI (an unknown scheme, a bad bucket name).
    """
    import pyarrow.fs

    if not is_uri(location):
        return pyarrow.fs.LocalFileSystem(), str(Path(location).absolute())
    try:
        return pyarrow.fs.FileSystem.from_uri(str(location))
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise MedpeftError(f"{location}: cannot open this storage ({exc})") from None


def download(uri: str, into: Path, names: list[str]) -> list[str]:
    """Copies the entries ``names`` (files or folders) of the storage folder ``uri`` into the local
    folder ``into``; returns those that exist there (the others are skipped)."""
    import pyarrow.fs

    fs, root = filesystem(uri)
    local = pyarrow.fs.LocalFileSystem()
    copied = []
    for name in names:
        source = f"{root.rstrip('/')}/{name}"
        kind = fs.get_file_info(source).type
        if kind not in (pyarrow.fs.FileType.File, pyarrow.fs.FileType.Directory):
            continue
        (into / name if kind == pyarrow.fs.FileType.Directory else into).mkdir(parents=True, exist_ok=True)
        pyarrow.fs.copy_files(source, str(into / name), source_filesystem=fs, destination_filesystem=local)
        copied.append(name)
    return copied
