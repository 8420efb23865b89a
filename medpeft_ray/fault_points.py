"""Named points where a process can be held, so that a fault test kills it exactly there.

A process whose environment has ``MEDPEFT_FAULT_POINT=<point>`` (or ``<point>@<epoch>``) stops at
that point the first time any process passes it: it writes ``<point>.reached`` (its PID and the epoch) into
``MEDPEFT_FAULT_DIR`` and waits there until it is killed, or for ``MEDPEFT_FAULT_HOLD_S`` seconds
(default 600) so that a forgotten process ends by itself. Outside a fault test the variable is
unset and each point costs one dictionary lookup.

The points, in the order a trial passes them:

- ``before_checkpoint``: an executor trained and validated the epoch, and wrote nothing of it yet
  (the epoch's work is lost with the process).
- ``after_record``: the epoch's checkpoint and its metrics are in the trial record; its driver has
  not been told.
- ``before_done``: every epoch was told to the driver; the trial's end was not.
- ``before_row``: the search driver knows the trial ended and has not written its leaderboard row.
- ``dispatcher_post``: an epoch's report reached the search's dispatcher, which has not passed it on.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

POINT_ENV = "MEDPEFT_FAULT_POINT"
DIR_ENV = "MEDPEFT_FAULT_DIR"
HOLD_ENV = "MEDPEFT_FAULT_HOLD_S"

_held: set[str] = set()


def fault_point(name: str, epoch: int | None = None) -> None:
    """Holds this process at ``name`` when the environment asks for it (see the module's doc)."""
    wanted = os.environ.get(POINT_ENV)
    if not wanted:
        return
    point, _, at_epoch = wanted.partition("@")
    if point != name or name in _held or (at_epoch and epoch != int(at_epoch)):
        return
    _held.add(name)
    folder = Path(os.environ.get(DIR_ENV, "."))
    marker = folder / f"{name}.reached"
    if marker.exists():  # held once per test: a restarted worker (same environment) passes freely
        return
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{name}.partial"
    partial.write_text(json.dumps({"pid": os.getpid(), "epoch": epoch}))
    partial.replace(marker)  # whole or absent: the test reads it as soon as it appears
    deadline = time.time() + float(os.environ.get(HOLD_ENV, "600"))
    while time.time() < deadline:
        time.sleep(0.2)
