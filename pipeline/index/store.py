"""An index's files: plain Parquet runs plus write-once bookkeeping, on any filesystem Beam writes (local, gs://).

    ROOT/index.json                 the model and preprocessing every vector of the index was made with
    ROOT/log/000000001.json ...     the commit log, write-once entries numbered in order:
                                    {"kind": "run", "run": NAME, ...}: runs/NAME finished and counts
                                    {"kind": "update", "update": NAME, ...}: updates/NAME/live-*.parquet is
                                    the input's (id, uri) listing as of that update: the live ids
    ROOT/runs/NAME/                 an ordinary `pipeline.run` output (embeddings-*, errors-*, run_report.json)
    ROOT/updates/NAME/              an update's plan: live-*, todo-* (to embed), errors-* (manifest rows), chunks/
    ROOT/locks/TOKEN.json           the lease of the update in progress

Only what the log names counts: a run folder without its entry (killed, even in the middle of its final
renames) is an unfinished leftover, ignored by every reader and removed by the next update. Nothing is
renamed or overwritten in place, so the layout needs no atomic directory rename (object stores have none).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import socket
import threading
import time
import uuid
from typing import Iterator, Optional

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

IDENTITY = "index.json"
FORMAT_VERSION = 1
LEASE_S = 120.0
HEARTBEAT_S = 30.0


class IndexRefused(ValueError):
    """The index cannot be used as asked (another model, not an index, busy); exit code 2."""


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def new_name() -> str:
    """A sortable, unique name for an update or a run."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def _read_json(path: str) -> dict:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return json.loads(f.read().decode("utf-8"))


def _write_json_once(path: str, value: dict) -> None:
    """Writes to a temporary name, then renames: a reader never sees half a file."""
    folder = path.rsplit("/", 1)[0]
    temporary = FileSystems.join(folder, f".tmp-{uuid.uuid4().hex}")
    with FileSystems.create(temporary, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(json.dumps(value, indent=2).encode("utf-8"))
    FileSystems.rename([temporary], [path])


def _matches(pattern: str) -> list[str]:
    try:
        return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    except Exception:  # a folder that does not exist yet matches nothing
        return []


@dataclasses.dataclass(frozen=True)
class LogEntry:
    seq: int
    body: dict

    @property
    def kind(self) -> str:
        return self.body["kind"]


@dataclasses.dataclass(frozen=True)
class IndexStore:
    root: str

    def path(self, *parts: str) -> str:
        return FileSystems.join(self.root, *parts)

    def run_dir(self, name: str) -> str:
        return self.path("runs", name)

    def update_dir(self, name: str) -> str:
        return self.path("updates", name)

    # --- identity -------------------------------------------------------------------------------------------

    def identity(self) -> Optional[dict]:
        path = self.path(IDENTITY)
        return _read_json(path) if FileSystems.exists(path) else None

    def create_identity(self, metadata: dict) -> dict:
        if not FileSystems.exists(self.root):
            FileSystems.mkdirs(self.root)
        identity = {"format": FORMAT_VERSION, "created_at": now_iso(), **metadata}
        _write_json_once(self.path(IDENTITY), identity)
        return identity

    # --- the commit log -------------------------------------------------------------------------------------

    def log(self) -> list[LogEntry]:
        entries = []
        for path in _matches(self.path("log", "*.json")):
            entries.append(LogEntry(int(os.path.basename(path)[: -len(".json")]), _read_json(path)))
        return sorted(entries, key=lambda e: e.seq)

    def append(self, body: dict) -> LogEntry:
        """Adds an entry after the last one. Only the holder of the update lock appends."""
        entries = self.log()
        seq = (entries[-1].seq if entries else 0) + 1
        body = {**body, "committed_at": now_iso()}
        if not FileSystems.exists(self.path("log")):
            FileSystems.mkdirs(self.path("log"))
        _write_json_once(self.path("log", f"{seq:09d}.json"), body)
        return LogEntry(seq, body)

    def committed_runs(self, entries: Optional[list] = None) -> list[LogEntry]:
        return [e for e in (self.log() if entries is None else entries) if e.kind == "run"]

    def latest_update(self, entries: Optional[list] = None) -> Optional[LogEntry]:
        updates = [e for e in (self.log() if entries is None else entries) if e.kind == "update"]
        return updates[-1] if updates else None

    def live_files(self, update: LogEntry) -> list[str]:
        return _matches(self.path("updates", update.body["update"], "live-*.parquet"))

    def run_files(self, run: LogEntry, prefix: str = "embeddings") -> list[str]:
        return _matches(self.path("runs", run.body["run"], f"{prefix}-*.parquet"))

    def leftovers(self, entries: Optional[list] = None) -> list[str]:
        """Run and update folders that no log entry names: work of an update that did not finish."""
        entries = self.log() if entries is None else entries
        runs = {e.body["run"] for e in entries if e.kind == "run"}
        updates = {e.body["update"] for e in entries if e.kind == "update"}
        found = []
        for kind, known in (("runs", runs), ("updates", updates)):
            for name in _child_folders(self.path(kind)):
                if name not in known:
                    found.append(f"{kind}/{name}")
        return found

    def remove(self, relative: str) -> None:
        files = _matches(self.path(relative, "**"))
        if files:
            FileSystems.delete(files)
        if FileSystems.exists(self.path(relative)):
            with contextlib.suppress(Exception):
                FileSystems.delete([self.path(relative)])

    # --- the update lock ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def update_lock(self) -> Iterator[None]:
        """A lease that only one update holds: refused with a clear message while another one runs.

        Works without atomic create-if-absent: each contender writes its own lock file, then the oldest
        live lock wins and the others withdraw. A lock is dead when its process is gone (same host) or
        its heartbeat is older than LEASE_S, so a crashed update never blocks the next one for long.
        """
        folder = self.path("locks")
        if not FileSystems.exists(folder):
            FileSystems.mkdirs(folder)
        token = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        mine = FileSystems.join(folder, f"{token}.json")
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": now_iso()}
        _write_lock(mine, holder)
        try:
            winner = None
            for path in _matches(FileSystems.join(folder, "*.json")):
                if path == mine:
                    winner = winner or mine
                    continue
                other = _read_lock(path)
                if other is None or _lock_is_dead(other):
                    with contextlib.suppress(Exception):
                        FileSystems.delete([path])
                elif winner is None:
                    winner = path
                    busy = other
            if winner != mine:
                raise IndexRefused(
                    f"Another update of {self.root} is running (since {busy['started_at']} on {busy['host']}, pid "
                    f"{busy['pid']}). Try again when it has finished; a crashed update's lock expires "
                    f"{LEASE_S:.0f} s after its last heartbeat."
                )
        except BaseException:
            with contextlib.suppress(Exception):
                FileSystems.delete([mine])
            raise
        stop = threading.Event()
        heartbeat = threading.Thread(target=_beat, args=(mine, holder, stop), daemon=True)
        heartbeat.start()
        try:
            yield
        finally:
            stop.set()
            heartbeat.join()
            with contextlib.suppress(Exception):
                FileSystems.delete([mine])


def _write_lock(path: str, holder: dict) -> None:
    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(json.dumps({**holder, "heartbeat": time.time()}).encode("utf-8"))


def _read_lock(path: str) -> Optional[dict]:
    try:
        return _read_json(path)
    except Exception:  # deleted or half-written meanwhile
        return None


def _lock_is_dead(holder: dict) -> bool:
    if time.time() - holder.get("heartbeat", 0) > LEASE_S:
        return True
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


def _beat(path: str, holder: dict, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        with contextlib.suppress(Exception):
            _write_lock(path, holder)


def _child_folders(folder: str) -> list[str]:
    """Names of the folders directly under `folder` (works where folders are only name prefixes, as on gs://)."""
    prefix = folder.rstrip("/") + "/"
    names = {path[len(prefix):].split("/", 1)[0] for path in _matches(FileSystems.join(folder, "**"))
             if path.startswith(prefix) and "/" in path[len(prefix):]}
    return sorted(names)
