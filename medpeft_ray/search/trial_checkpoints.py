"""One trial's folder in the results storage: its checkpoints, its record of epochs, retention and resume.

Checkpoints are written per epoch by every rank of a warm executor (on a thread, while the next
epoch trains) straight to the trial's folder in the results storage (local, ``s3://``, ``gs://``,
through ``pyarrow.fs`` as Ray's own storage is), with a record that rank 0 writes last;
``train.checkpoints_to_keep`` best epochs (by ``search.metric``) and the latest one are kept
while the trial runs (:class:`~medpeft_ray.search.callbacks.CheckpointRetention` trims them once it ends).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs

from medpeft_ray.metrics import best_first_key
from medpeft_ray.storage import filesystem, is_uri

#: a trial's record, in its folder: its kept checkpoints, every epoch's metrics, and which run of
#: the search may write there (rank 0 replaces it whole, after every rank uploaded the epoch)
TRIAL_RECORD = "trial_record.json"


class FencedOut(Exception):
    """A newer run of the search (or a newer delivery of the trial) owns the trial's folder: this
    writer, left over from an older one, stops without writing anything more there."""


@dataclass
class RecordedTrial:
    """What :data:`TRIAL_RECORD` holds."""

    #: (attempt, generation, delivery) of the writer that owns the folder: the search's run (1, then
    #: +1 per resume), its dispatcher's start (a restarted one's is later) and the trial's delivery
    fence: tuple[int, ...] = (0, 0, 0)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)  # kept ones: {"epoch", "value"}, oldest first
    epochs: list[dict[str, Any]] = field(default_factory=list)  # every epoch's metrics, as reported, oldest first


class TrialCheckpoints:
    """One trial's folder in the results storage: checkpoints, the trial record, retention, resume.

    ``uri`` is a local path or a ``scheme://`` URI that ``pyarrow.fs`` opens (as Ray opens its
    storage). Every rank uploads its part of an epoch into the same ``checkpoint_<epoch>`` folder;
    rank 0 then records the epoch (its metrics and checkpoint) in :data:`TRIAL_RECORD`, which names
    complete checkpoints only. ``fence`` is this writer's (attempt, generation, delivery): a writer whose fence
    is older than the record's raises :class:`FencedOut` instead of writing.
    """

    def __init__(self, uri: str, keep: int, metric: str, mode: str, fence: tuple[int, ...] = (0, 0, 0)) -> None:
        self.fs, self.root = filesystem(uri)
        # the URI the leaderboard keeps (pyarrow's path of a bucket has no scheme)
        self.display_root = f"{uri.split('://', 1)[0]}://{self.root}" if is_uri(uri) else self.root
        self.keep, self.metric, self.mode = max(1, keep), metric, mode
        self.fence = tuple(int(part) for part in fence)
        self.history: list[dict[str, Any]] = []  # the epochs this writer recorded or took over

    def path(self, epoch: int) -> str:
        return f"{self.root}/checkpoint_{epoch:06d}"

    def uri(self, epoch: int) -> str:
        return f"{self.display_root}/checkpoint_{epoch:06d}"

    def upload(self, local: Path, epoch: int) -> None:
        """Copies this rank's part of epoch ``epoch`` (the files under ``local``) into the storage.

        Raises:
            FencedOut: a newer writer owns the folder (nothing is copied).
        """
        self.check()
        self.fs.create_dir(self.path(epoch), recursive=True)
        pyarrow.fs.copy_files(str(local), self.path(epoch), source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=self.fs)

    def read(self) -> RecordedTrial:
        """The trial record as stored (empty when the trial never recorded an epoch)."""
        target = f"{self.root}/{TRIAL_RECORD}"
        if self.fs.get_file_info(target).type != pyarrow.fs.FileType.File:
            return RecordedTrial()
        with self.fs.open_input_stream(target) as stream:
            raw = json.loads(stream.read().decode())
        return RecordedTrial(tuple(raw["fence"]), list(raw["checkpoints"]), list(raw["epochs"]))  # type: ignore[arg-type]

    def index(self) -> list[dict[str, Any]]:
        """The complete checkpoints, oldest first: ``{"epoch", "value"}`` each."""
        return self.read().checkpoints

    def claim(self) -> list[dict[str, Any]]:
        """Takes the folder for this writer; returns the epochs recorded so far (to report again).

        Raises:
            FencedOut: a newer writer owns the folder already.
        """
        record = self.read()
        self._check(record)
        self.history = record.epochs
        self._write(RecordedTrial(self.fence, record.checkpoints, record.epochs))
        return list(record.epochs)

    def check(self) -> None:
        """Raises :class:`FencedOut` when a newer writer owns the folder."""
        self._check(self.read())

    def _check(self, record: RecordedTrial) -> None:
        if tuple(record.fence) > self.fence:
            raise FencedOut(f"{self.display_root} belongs to a newer writer (run, dispatcher, delivery "
                            f"{tuple(record.fence)}; this one: {self.fence})")

    def record(self, epoch: int, value: float | None, metrics: dict[str, Any] | None = None) -> None:
        """Adds epoch ``epoch`` and its ``metrics`` to the record (rank 0, after every rank uploaded),
        then drops the checkpoints that are neither among the ``keep`` best (ties: the earlier) nor
        the latest.

        Raises:
            FencedOut: a newer writer owns the folder (nothing is written).
        """
        record = self.read()
        self._check(record)
        entries = sorted([e for e in record.checkpoints if e["epoch"] < epoch] + [{"epoch": epoch, "value": value}],
                         key=lambda e: e["epoch"])
        best = sorted(entries, key=lambda e: (best_first_key(e["value"], self.mode), e["epoch"]))[: self.keep]
        kept = {e["epoch"] for e in best} | {entries[-1]["epoch"]}
        # this writer's own view of the epochs, not the file's: a stale writer's write in between is replaced
        self.history = [m for m in self.history if int(m["epoch"]) < epoch] + [{**(metrics or {}), "epoch": epoch}]
        self._write(RecordedTrial(self.fence, [e for e in entries if e["epoch"] in kept], self.history))
        for entry in entries:
            if entry["epoch"] not in kept:
                try:
                    self.fs.delete_dir(self.path(entry["epoch"]))
                except OSError:  # already gone
                    pass

    def stored_epochs(self) -> list[int]:
        """The epochs whose checkpoint folders are in the storage (complete or not)."""
        try:
            infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self.root, allow_not_found=True))
        except OSError:
            return []
        names = (info.base_name for info in infos if info.type == pyarrow.fs.FileType.Directory)
        return sorted(int(name[len("checkpoint_"):]) for name in names
                      if name.startswith("checkpoint_") and name[len("checkpoint_"):].isdigit())

    def retain(self, epochs: set[int]) -> list[int]:
        """Deletes the checkpoints of an ended trial but those of ``epochs``; returns the epochs deleted.

        The record (its epochs' metrics and its writer's fence stay) stops naming them first, so
        nothing ever names a folder that is gone.
        """
        record = self.read()
        if any(entry["epoch"] not in epochs for entry in record.checkpoints):
            self._write(RecordedTrial(tuple(record.fence), [e for e in record.checkpoints if e["epoch"] in epochs],
                                      record.epochs))
        gone = [epoch for epoch in self.stored_epochs() if epoch not in epochs]
        for epoch in gone:
            try:
                self.fs.delete_dir(self.path(epoch))
            except OSError:  # already gone
                pass
        return gone

    def _write(self, record: RecordedTrial) -> None:
        """Replaces the record whole. An object store's PUT is already all or nothing; a local file
        is written beside it and moved over it, since a worker killed mid-write (a killed driver
        takes its Ray with it) would leave a truncated record that the resumed trial cannot read."""
        target = f"{self.root}/{TRIAL_RECORD}"
        local = isinstance(self.fs, pyarrow.fs.LocalFileSystem)
        written = f"{self.root}/.{TRIAL_RECORD}.{os.getpid()}.partial" if local else target
        self.fs.create_dir(self.root, recursive=True)
        with self.fs.open_output_stream(written) as stream:
            stream.write(json.dumps(dataclasses.asdict(record), default=str).encode())
        if local:
            self.fs.move(written, target)

    def download(self, epoch: int, into: Path) -> Path:
        """Epoch ``epoch``'s checkpoint (a kept one) copied into ``into``."""
        target = into / f"checkpoint_{epoch:06d}"
        target.mkdir(parents=True, exist_ok=True)
        pyarrow.fs.copy_files(self.path(epoch), str(target), source_filesystem=self.fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
        return target

    def download_latest(self, into: Path) -> Path | None:
        """The latest complete checkpoint copied into ``into`` (to resume from), or None."""
        entries = self.index()
        if not entries:
            return None
        return self.download(max(e["epoch"] for e in entries), into)

