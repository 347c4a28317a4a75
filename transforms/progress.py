"""Progress lines for long runs: images embedded so far by this worker process, and its recent rate."""

from __future__ import annotations

import sys
import threading
import time

import apache_beam as beam

_lock = threading.Lock()
_state = {"done": 0, "started": None, "last_line": 0.0}  # per process: shared by every DoFn instance in it


class ReportProgress(beam.DoFn):
    """Passes elements through; every `interval_s` seconds prints one line to stderr (0 disables)."""

    def __init__(self, interval_s: float):
        self._interval_s = interval_s

    def process(self, element):
        if self._interval_s > 0:
            now = time.monotonic()
            with _lock:
                _state["done"] += 1
                _state["started"] = _state["started"] or now
                due = now - _state["last_line"] >= self._interval_s
                if due:
                    _state["last_line"] = now
                    done, elapsed = _state["done"], now - _state["started"]
            if due and elapsed > 0:
                print(f"progress: {done} images embedded by this worker, {done / elapsed:.1f} images/s",
                      file=sys.stderr, flush=True)
        yield element
