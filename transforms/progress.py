"""Progress lines for long runs: images embedded so far by this worker process, and its rate."""

from __future__ import annotations

import collections
import sys
import threading
import time
import uuid

import apache_beam as beam

_lock = threading.Lock()
# Per process and per run, shared by every DoFn instance of that run in the process.
_runs = collections.defaultdict(lambda: {"done": 0, "started": None, "last_line": 0.0})


class ReportProgress(beam.DoFn):
    """Passes elements through; every `interval_s` seconds prints one line to stderr (0 disables)."""

    def __init__(self, interval_s: float):
        self._interval_s = interval_s
        self._run = uuid.uuid4().hex  # fixed when the pipeline is built, so every worker shares it

    def process(self, element):
        if self._interval_s > 0:
            now = time.monotonic()
            with _lock:
                state = _runs[self._run]
                state["done"] += 1
                state["started"] = state["started"] or now
                due = now - state["last_line"] >= self._interval_s
                if due:
                    state["last_line"] = now
                    done, elapsed = state["done"], now - state["started"]
            if due and elapsed > 0:
                print(f"progress: {done} images embedded by this worker, {done / elapsed:.1f} images/s",
                      file=sys.stderr, flush=True)
        yield element
