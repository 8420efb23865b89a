"""The results storage, a local folder or a cloud URI: where it is, whether it can be written, and
how it is opened (the way Ray Tune and Ray Train open theirs); the leaderboard database it implies.

A search's results location is ``--results``, else ``$MEDPEFT_RESULTS``, else ``./medpeft-results``;
its leaderboard is ``--db``, else ``$MEDPEFT_DB``, else ``leaderboard.db`` in a local results folder.

Ray resolves a ``storage_path`` with ``pyarrow.fs.FileSystem.from_uri``; the search manifest, the
warm executors' trial checkpoints and the adapter export go through the same call, so whatever
reaches Ray's storage (credentials, region, a custom endpoint such as MinIO's through
``AWS_ENDPOINT_URL``) reaches theirs too.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs

from medpeft_ray.errors import MedpeftError, UsageError

#: the results folder when neither ``--results`` nor ``$MEDPEFT_RESULTS`` names one
DEFAULT_RESULTS_DIR = "medpeft-results"
#: what a local results folder must take before Ray starts: a search's manifest, Tune's state, first checkpoints
RESULTS_PROBE_BYTES = 1 << 20

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/+(.*)$")


def cache_root(named: str | None = None) -> Path:
    """This machine's cache folder (decoded datasets, built pipelines, computed intervals): ``named``
    (a folder the search driver passed on), else ``$MEDPEFT_CACHE``, else ``~/.cache/medpeft_ray``."""
    return Path(named or os.environ.get("MEDPEFT_CACHE", Path.home() / ".cache" / "medpeft_ray"))


def results_dir(path: str | Path | None = None) -> Path:
    """The results store folder: ``path``, else ``$MEDPEFT_RESULTS``, else ``./medpeft-results``."""
    return Path(path or os.environ.get("MEDPEFT_RESULTS") or DEFAULT_RESULTS_DIR).expanduser().resolve()


def default_db_url(results: str | Path | None = None) -> str:
    """``$MEDPEFT_DB`` if set, else the SQLite file ``leaderboard.db`` in the results folder."""
    return os.environ.get("MEDPEFT_DB") or f"sqlite:///{results_dir(results) / 'leaderboard.db'}"


def is_uri(location: str | Path) -> bool:
    """Whether ``location`` names cloud storage (``s3://``, ``gs://``, ...) rather than a local path."""
    return "://" in str(location)


def filesystem(location: str | Path) -> tuple[Any, str]:
    """``pyarrow.fs``'s file system and path for a local path (made absolute) or a storage URI.

    Raises:
        MedpeftError: pyarrow cannot open the URI (an unknown scheme, a bad bucket name).
    """
    if not is_uri(location):
        return pyarrow.fs.LocalFileSystem(), str(Path(location).absolute())
    try:
        return pyarrow.fs.FileSystem.from_uri(str(location))
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise MedpeftError(f"{location}: cannot open this storage ({exc})") from None


def download(uri: str, into: Path, names: list[str]) -> list[str]:
    """Copies the entries ``names`` (files or folders) of the storage folder ``uri`` into the local
    folder ``into``; returns those that exist there (the others are skipped)."""
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


def results_location(results: str | Path | None = None) -> tuple[str, Path | None]:
    """Where a search writes trial checkpoints and Tune state: (location, local folder or None).

    A cloud storage URI (``s3://bucket/prefix``, ``gs://...``), given or in ``$MEDPEFT_RESULTS``,
    is used as is, so that every node of a cluster reads and writes the same checkpoints;
    anything else is a local (or shared file system) folder.

    Raises:
        UsageError: a URI with query parameters (``?endpoint_override=...``).
    """
    raw = results if results is not None else os.environ.get("MEDPEFT_RESULTS")
    # str(Path("s3://b/x")) is "s3:/b/x": the scheme survives a trip through Path, the slashes do not
    match = _URI.match(str(raw)) if raw is not None else None
    if match and match.group(1).lower() != "file":
        if "?" in match.group(2):
            # The search appends folders to the location (f"{storage}/tune", ".../train/<trial>"),
            # which would land inside the query, and the leaderboard's checkpoint URIs would lose it;
            # pyarrow, and so Ray, read the same settings from the environment instead.
            raise UsageError(
                f"{raw}: a results URI takes no query parameters; give the storage's settings in the environment "
                "of every node, where Ray's storage reads them too (for S3 and S3-compatible servers: "
                "AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
            )
        return f"{match.group(1).lower()}://{match.group(2).rstrip('/')}", None
    if match:  # file:///path
        raw = "/" + match.group(2)
    path = results_dir(raw)
    return str(path), path


def check_results_folder(path: Path | None) -> None:
    """Refuses, before Ray starts, a local results folder that a search could not write to.

    A search's first write to its results folder (the manifest) comes after Ray has started, and
    with the leaderboard in another database nothing before it writes there: a read-only folder or
    a full disk would show only then. A probe file of ``RESULTS_PROBE_BYTES``, written, synced and
    removed, finds both now. ``path`` None (cloud storage) is not probed.

    Raises:
        UsageError: the path is a file, not a folder (exit code 2).
        MedpeftError: the folder cannot be created or written (read-only, full, no permission).
    """
    if path is None:
        return
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path}: not a folder; --results (or MEDPEFT_RESULTS) names the folder a search writes to")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".medpeft-write-probe-") as probe:
            probe.write(bytes(RESULTS_PROBE_BYTES))
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise MedpeftError(f"{path}: the results folder cannot be written ({exc.strerror or exc})") from None


def search_db_url(storage: str, results_path: Path | None, db_url: str | None) -> str:
    """The leaderboard database of a search writing to ``storage``: ``db_url``, else ``$MEDPEFT_DB``,
    else SQLite in the local results folder ``results_path``.

    Raises:
        MedpeftError: the results are on cloud storage (``results_path`` None) and no database is given.
    """
    if results_path is None and not (db_url or os.environ.get("MEDPEFT_DB")):
        raise MedpeftError(
            f"{storage}: with results on cloud storage, give a leaderboard database that the machine running "
            "the search can reach: --db postgresql://user@host/db (or MEDPEFT_DB)"
        )
    return db_url or default_db_url(results_path)
