"""Counting finished inputs for progress: in each worker process, reported to the launcher or to the worker's log.

On local runners each worker process replaces a small file, `PROGRESS_DIR/<host>-<pid>`, with its count
at most twice a second, and the launcher sums the files for its display. On remote runners, whose
disks the launcher cannot see, each worker process prints a plain line every `interval_s` instead.
"""

from __future__ import annotations

import collections
import os
import socket
import sys
import threading
import time
from typing import Optional

import apache_beam as beam

_FLUSH_EVERY_S = 0.5
_lock = threading.Lock()
# Per process and per run, shared by every DoFn instance of that run in the process.
_runs = collections.defaultdict(lambda: {"done": 0, "started": None, "flushed": 0.0, "printed": 0.0})


class CountDone(beam.DoFn):
    """Passes elements through and counts them (an embedded image, a failure, or a skipped input)."""

    def __init__(self, run_id: str, progress_dir: Optional[str], interval_s: float):
        self._run_id = run_id
        self._dir = progress_dir
        self._interval_s = interval_s

    def process(self, element):
        now = time.monotonic()
        with _lock:
            state = _runs[self._run_id]
            state["done"] += 1
            state["started"] = state["started"] or now
            flush = self._dir and now - state["flushed"] >= _FLUSH_EVERY_S
            line = not self._dir and now - state["printed"] >= self._interval_s
            if flush:
                state["flushed"] = now
            if line:
                state["printed"] = now
            done, elapsed = state["done"], now - state["started"]
        if flush:
            self._write(done)
        if line:
            rate = f", {done / elapsed:.1f} images/s" if elapsed > 0 else ""
            print(f"progress: {done} inputs done by this worker process{rate}", file=sys.stderr, flush=True)
        yield element

    def finish_bundle(self):
        if self._dir:
            with _lock:
                done = _runs[self._run_id]["done"]
            self._write(done)

    def _write(self, done: int) -> None:
        name = os.path.join(self._dir, f"{socket.gethostname()}-{os.getpid()}")
        temporary = f"{name}.{threading.get_ident()}.tmp"
        try:
            with open(temporary, "w") as f:
                f.write(str(done))
            os.replace(temporary, name)
        except OSError:  # the launcher removed the folder: the run is over
            pass
