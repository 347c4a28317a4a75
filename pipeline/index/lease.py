"""The update lease: one object, ROOT/locks/update.json, that at most one update holds, judged by the store.

Taken with a conditional create; renewed every HEARTBEAT_S with a compare-and-swap on its generation, so a
holder knows the moment it has lost it; expired when the store's own clock says its last renewal is older than
LEASE_S (no contender's clock is ever compared with another's). A lease that cannot be read is never deleted.

The lease only keeps honest updates out of each other's way; what makes a lost race harmless is the commit log
(see store.py): every commit is a conditional create of the next entry, and an update begins by committing a
`begin` entry, so a holder that lost its lease while paused can never commit again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import threading
import time
import uuid
from typing import Optional

from pipeline.storage import Conflict, StoreError, Version

LEASE_S = 120.0
HEARTBEAT_S = 20.0


class LeaseBusy(ValueError):
    """Another update holds the lease, or the lease cannot be read; nothing was changed."""


class LeaseLost(RuntimeError):
    """This update's lease was taken over or could not be renewed; it stopped without committing more."""


def _machine() -> dict:
    """What identifies this process's machine and process table: host, boot and pid namespace."""
    def read(path):
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return None

    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = None
    return {"host": socket.gethostname(), "boot_id": read("/proc/sys/kernel/random/boot_id"), "pid_namespace": namespace}


def _process_gone(holder: dict) -> bool:
    """True only when the holder ran in this very process table and its pid no longer exists."""
    here = _machine()
    if any(holder.get(key) != here[key] or here[key] is None for key in here):
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError):
        return False
    return False


def _holder(current: Version) -> Optional[dict]:
    """The holder a lease object names, or None when it cannot be read as a lease."""
    try:
        holder = json.loads(current.data)
        holder["update"]
    except (ValueError, KeyError, TypeError):
        return None
    return holder


def _renewed_ago(objects, folder: str, current: Version, holder: dict, lease_s: float) -> Optional[float]:
    """Seconds since the lease's last renewal by the store's clock while it is alive; None once it is dead
    (older than `lease_s`, or held by a process of this machine that is gone)."""
    age = objects.store_time(folder) - current.written_at
    return age if age <= lease_s and not _process_gone(holder) else None


def live_holder(objects, folder: str, lease_s: float = LEASE_S) -> Optional[dict]:
    """The lease's holder if it is alive; None when there is no live holder. For status: what runs now."""
    current = objects.read(f"{folder.rstrip('/')}/update.json")
    if current is None:
        return None
    holder = _holder(current)
    if holder is None:
        return {"update": "(an unreadable lease)"}
    try:
        alive = _renewed_ago(objects, folder, current, holder, lease_s) is not None
    except StoreError:  # a reader without write access cannot probe the store's clock: assume it runs
        alive = True
    return holder if alive else None


@dataclasses.dataclass
class Holding:
    version: Version
    body: dict


class UpdateLease:
    """`with UpdateLease(objects, locks_folder, update_name):` holds the lease, renewing it in a thread.

    If renewal finds the lease taken, or cannot renew it for half a lease, the main thread is interrupted and
    the `with` block ends in LeaseLost.
    """

    def __init__(self, objects, folder: str, update: str, lease_s: float = LEASE_S, heartbeat_s: float = HEARTBEAT_S):
        self._objects = objects
        self.folder = folder.rstrip("/")
        self.path = f"{self.folder}/update.json"
        self.update = update
        self.lease_s = lease_s
        self.heartbeat_s = heartbeat_s
        self._holding: Optional[Holding] = None
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._ending = threading.Lock()
        self.lost: Optional[str] = None

    # --- taking ---------------------------------------------------------------------------------------------

    def _body(self, beat: int) -> bytes:
        return json.dumps({"update": self.update, "pid": os.getpid(), **_machine(), "beat": beat,
                           "token": self._token}).encode()

    def acquire(self) -> None:
        self._token = uuid.uuid4().hex
        try:
            self._holding = Holding(self._objects.create(self.path, self._body(0)), {})
            return
        except Conflict:
            pass
        current = self._objects.read(self.path)
        if current is None:  # released meanwhile: one more try, and a race lost there is a busy index
            try:
                self._holding = Holding(self._objects.create(self.path, self._body(0)), {})
                return
            except Conflict:
                raise LeaseBusy(f"Another update took the lease {self.path} just now; try again later.") from None
        holder = _holder(current)
        if holder is None:
            raise LeaseBusy(
                f"The update lease {self.path} cannot be read as one ({current.data[:80]!r}); it is never deleted "
                f"automatically. If no update of this index is running, delete that file and run again."
            )
        age = _renewed_ago(self._objects, self.folder, current, holder, self.lease_s)
        if age is not None:
            raise LeaseBusy(
                f"Another update ({holder['update']}, pid {holder.get('pid')} on {holder.get('host')}) holds the "
                f"lease of this index, renewed {max(age, 0):.0f} s ago by the store's clock. Try again when it has "
                f"finished; a crashed update's lease expires {self.lease_s:.0f} s after its last renewal."
            )
        try:
            self._holding = Holding(self._objects.replace(self.path, self._body(0), current.generation), holder)
        except Conflict:
            raise LeaseBusy(f"Another update took over the expired lease {self.path} just now; try again later.") \
                from None

    @property
    def taken_over(self) -> Optional[dict]:
        """The expired holder this lease replaced, if any."""
        return self._holding.body if self._holding and self._holding.body else None

    # --- holding --------------------------------------------------------------------------------------------

    def verify(self) -> None:
        """Renews the lease now; raises LeaseLost if another update has it. Called before every commit."""
        with self._guard:
            if self.lost:
                raise LeaseLost(self.lost)
            beat = json.loads(self._holding.version.data)["beat"] + 1
            try:
                self._holding.version = self._objects.replace(self.path, self._body(beat),
                                                              self._holding.version.generation)
            except Conflict:
                self.lost = (f"This update's lease {self.path} was taken over by another update; it stopped "
                             f"without committing more. The other update carries on from what is committed.")
                raise LeaseLost(self.lost) from None

    def _heartbeat(self) -> None:
        confirmed = time.monotonic()
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.verify()
                confirmed = time.monotonic()
            except LeaseLost:
                break
            except Exception as exc:  # the store did not answer: keep trying while the lease surely holds
                if time.monotonic() - confirmed > self.lease_s / 2:
                    self.lost = (f"This update could not renew its lease {self.path} for {self.lease_s / 2:.0f} s "
                                 f"({type(exc).__name__}: {exc}); it stopped, since another update may take over.")
                    break
        with self._ending:
            if self.lost and not self._stop.is_set():  # a real signal: it also ends a blocking wait
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    def release(self) -> None:
        if self._holding is None or self.lost:
            return
        try:
            self._objects.delete(self.path, self._holding.version.generation)
        except Conflict:
            pass
        except Exception:  # the lease then expires on its own; nothing else depends on its removal
            pass

    def __enter__(self) -> "UpdateLease":
        self.acquire()
        # A lost lease stops the main thread with SIGINT; a process started with SIGINT ignored (a script's
        # `update &`, nohup) would never see it, so while the lease is held SIGINT raises KeyboardInterrupt.
        self._ignored_sigint = None
        if threading.current_thread() is threading.main_thread() and not callable(signal.getsignal(signal.SIGINT)):
            self._ignored_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
        self._thread = threading.Thread(target=self._heartbeat, name="index-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        with self._ending:
            self._stop.set()
        self._thread.join()
        self.release()
        if self._ignored_sigint is not None:
            signal.signal(signal.SIGINT, self._ignored_sigint)
        if self.lost and exc_type is KeyboardInterrupt:
            raise LeaseLost(self.lost) from None
