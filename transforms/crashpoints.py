"""Named crash points: where the kill tests stop an update or a publish, and the proof that they got there.

Each point is a window the recovery code must handle: `reach(NAME)` marks it. With BEAM_EMBEDDINGS_CRASH_AT=NAME
in the environment the process kills itself there with SIGKILL (nothing runs after it: no `finally`, no lease
release), exactly as the OOM killer or a preempted VM would; with BEAM_EMBEDDINGS_CRASH_LOG=PATH every point
reached is appended to PATH, so a test can check that its kill hit the window it named. Tests in one process arm
a point with `arm` instead. Without either variable a point costs two environment lookups.

    update.begun            after the `begin` entry, before leftovers are removed
    run.finishing           inside a run's Beam job: its files are in place, its done marker is not
    update.run_written      a run returned, its log entry is not written
    update.run_committed    after a run's log entry, before the next run or the `update` entry
    update.before_commit    every run committed and the valve passed, the `update` entry not written
    publish.lancedb.pending     the publish's `pending` recorded, no row written
    publish.lancedb.upserted    the first upsert committed
    publish.lancedb.deleted     the upserts and deletes committed, the final state not recorded
    publish.postgres.copied     the rows copied into the session's temporary table, the transaction open
    search.update.written   a search update's new files are written, search.json still names the old ones
    search.published        search.json names the new build, the files only the old one used are not deleted
"""

from __future__ import annotations

import os
import signal
from typing import Callable

CRASH_AT = "BEAM_EMBEDDINGS_CRASH_AT"
CRASH_LOG = "BEAM_EMBEDDINGS_CRASH_LOG"

_armed: dict[str, Callable[[], None]] = {}


def arm(name: str, action: Callable[[], None]) -> None:
    """Calls `action` the next time `name` is reached in this process (once)."""
    _armed[name] = action


def disarm_all() -> None:
    _armed.clear()


def reach(name: str) -> None:
    log = os.environ.get(CRASH_LOG)
    if log:
        with open(log, "a") as f:
            f.write(name + "\n")
    if name in _armed:
        _armed.pop(name)()
    if os.environ.get(CRASH_AT) == name:
        os.kill(os.getpid(), signal.SIGKILL)
