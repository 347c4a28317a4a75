"""An index's files: plain Parquet runs plus a write-once commit log, on a local folder or gs://.

    ROOT/index.json                 the model and preprocessing every vector of the index is made with, and a
                                    random index_id that copies of the index keep (`create`)
    ROOT/log/000000001.json ...     the commit log, entries numbered 1, 2, 3, ... without gaps, each created once
                                    by a conditional create (pipeline/storage.py), so two writers never both commit N:
                                    {"kind": "begin", "update": NAME}: an update started (and fenced off any
                                        older holder of the lease: its next commit would need this number)
                                    {"kind": "run", "run": NAME, ...}: runs/NAME finished and counts
                                    {"kind": "update", "update": NAME, ...}: updates/NAME/live-*.parquet is the
                                        input's (id, uri) listing as of that update: the live ids
    ROOT/runs/NAME/                 an ordinary `pipeline.run` output (embeddings-*, errors-*, _run_report.json)
    ROOT/updates/NAME/              an update's plan: live-*, todo-* (to embed), errors-* (manifest rows), chunks/
    ROOT/locks/update.json          the lease of the update in progress (lease.py)

Only what the log names counts: a run folder without its entry (killed, even in the middle of its final
renames) is an unfinished leftover, ignored by every reader and removed by the next update that holds the
lease. Listings are honest: only "not found" reads as empty; any other error stops the command.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import uuid
from typing import Optional, Sequence

from pipeline.storage import Conflict, objects_for

IDENTITY = "index.json"
FORMAT_VERSION = 1
ENTRY_DIGITS = 9


class IndexRefused(ValueError):
    """The index cannot be used as asked (not an index, another model, busy, unsafe input); exit code 2."""


class CommitRefused(RuntimeError):
    """Another writer committed the log entry this update was about to write; it stopped there."""


class IndexCorrupt(RuntimeError):
    """The commit log or identity cannot be read as written by this project; nothing is changed."""


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


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

    @property
    def objects(self):
        return objects_for(self.root)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def run_dir(self, name: str) -> str:
        return self.path("runs", name)

    def update_dir(self, name: str) -> str:
        return self.path("updates", name)

    # --- identity -------------------------------------------------------------------------------------------

    def identity(self) -> Optional[dict]:
        found = self.objects.read(self.path(IDENTITY))
        return None if found is None else _parse(found.data, self.path(IDENTITY))

    def create_identity(self, metadata: dict) -> dict:
        identity = {"format": FORMAT_VERSION, "index_id": uuid.uuid4().hex, "created_at": now_iso(), **metadata}
        try:
            self.objects.create(self.path(IDENTITY), json.dumps(identity, indent=2).encode())
        except Conflict:
            raise IndexRefused(f"{self.root} is already an index (another create won the race); run update.") \
                from None
        return identity

    def is_empty(self) -> bool:
        return self.objects.is_empty(self.root)

    # --- the commit log -------------------------------------------------------------------------------------

    def log(self) -> list[LogEntry]:
        """Every entry, in order. A listing or read that fails raises; a gap or a foreign file is corruption."""
        folder = self.path("log")
        entries = []
        for name in self.objects.files(folder):
            stem = name[: -len(".json")] if name.endswith(".json") else ""
            if not (stem.isdigit() and len(stem) == ENTRY_DIGITS):
                raise IndexCorrupt(f"{folder}/{name} is not a log entry; the log holds only NNNNNNNNN.json files.")
            found = self.objects.read(f"{folder}/{name}")
            if found is None:
                raise IndexCorrupt(f"{folder}/{name} was listed but cannot be found; log entries are never deleted.")
            entries.append(LogEntry(int(stem), _parse(found.data, f"{folder}/{name}")))
        entries.sort(key=lambda e: e.seq)
        if [e.seq for e in entries] != list(range(1, len(entries) + 1)):
            missing = sorted(set(range(1, (entries[-1].seq if entries else 0) + 1)) - {e.seq for e in entries})
            raise IndexCorrupt(f"The log of {self.root} misses entries {missing[:5]}; entries are never deleted, so "
                               f"the index was changed by hand. Restore them before updating.")
        return entries

    def append(self, seq: int, body: dict) -> LogEntry:
        """Commits entry `seq`: created only if nobody has; otherwise CommitRefused and nothing written."""
        body = {**body, "committed_at": now_iso()}
        path = self.path("log", f"{seq:0{ENTRY_DIGITS}d}.json")
        try:
            self.objects.create(path, json.dumps(body, indent=2).encode())
        except Conflict:
            raise CommitRefused(
                f"Another update committed log entry {seq} of {self.root} first; this update stopped without "
                f"committing. Run it again once the other has finished."
            ) from None
        return LogEntry(seq, body)

    @staticmethod
    def committed_runs(entries: Sequence[LogEntry]) -> list[LogEntry]:
        return [e for e in entries if e.kind == "run"]

    @staticmethod
    def latest_update(entries: Sequence[LogEntry]) -> Optional[LogEntry]:
        updates = [e for e in entries if e.kind == "update"]
        return updates[-1] if updates else None

    def parquet_files(self, folder: str, prefix: str) -> list[str]:
        """FOLDER/PREFIX-*.parquet, listed honestly."""
        return [f"{folder}/{name}" for name in self.objects.files(folder)
                if name.startswith(prefix + "-") and name.endswith(".parquet")]

    def live_files(self, update: LogEntry) -> list[str]:
        return self.parquet_files(self.update_dir(update.body["update"]), "live")

    def run_files(self, run: LogEntry, prefix: str = "embeddings") -> list[str]:
        return self.parquet_files(self.run_dir(run.body["run"]), prefix)

    def leftovers(self, entries: Sequence[LogEntry], keep_update: Optional[str] = None) -> list[str]:
        """Run and update folders that no committed entry names, except those of `keep_update` (running)."""
        runs = {e.body["run"] for e in entries if e.kind == "run"}
        updates = {e.body["update"] for e in entries if e.kind == "update"}
        found = []
        for kind, known in (("runs", runs), ("updates", updates)):
            for name in self.objects.children(self.path(kind)):
                mine = keep_update is not None and (name == keep_update or name.startswith(keep_update + "-"))
                if name not in known and not mine:
                    found.append(f"{kind}/{name}")
        return found

    def remove(self, relative: str) -> None:
        self.objects.delete_tree(self.path(relative))


def _parse(data: bytes, path: str) -> dict:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise IndexCorrupt(f"{path} is not valid JSON; it was changed by something other than this project.") \
            from None
    if not isinstance(value, dict):
        raise IndexCorrupt(f"{path} does not hold a JSON object.")
    return value
