"""The launcher's progress display: done / total, images/s and time left, summed over the local worker processes.

A bar redrawn in place on a terminal (rich), a plain line every `--progress_interval` seconds in logs.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Optional

_REFRESH_S = 0.5


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def progress_line(done: int, total: int, rate: Optional[float]) -> str:
    share = f" ({100 * done / total:.0f}%)" if total else ""
    text = f"progress: {done} / {total} inputs done{share}"
    if not done:
        return text + "; starting (workers load the model)"
    if rate:
        text += f", {rate:.1f} images/s"
        if total > done:
            text += f", about {_duration((total - done) / rate)} left"
    return text


class ProgressDisplay:
    """Shows the progress of one run while it executes; `directory` is where CountDone writes its counts."""

    def __init__(self, total: int, interval_s: float, stream=None):
        self.total = total
        self.directory = tempfile.mkdtemp(prefix="embeddings-progress-")
        self._interval_s = interval_s
        self._stream = stream or sys.stderr
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self._first_seen: Optional[tuple] = None
        self._final_rate: Optional[float] = None

    def done(self) -> int:
        total = 0
        for name in os.listdir(self.directory):
            if name.endswith(".tmp"):
                continue
            try:
                with open(os.path.join(self.directory, name)) as f:
                    total += int(f.read() or 0)
            except (OSError, ValueError):  # replaced while read: the next look sees it
                pass
        return total

    def _rate(self, done: int, now: float) -> Optional[float]:
        if self.total and done >= self.total and self._final_rate is not None:
            return self._final_rate  # finished: the sinks still write, the rate stays what it was
        if done and self._first_seen is None:
            self._first_seen = (now, done)
        if not self._first_seen or now - self._first_seen[0] < 1.0:
            return None
        first_time, first_done = self._first_seen
        self._final_rate = (done - first_done) / (now - first_time) or None
        return self._final_rate

    def __enter__(self) -> "ProgressDisplay":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _loop(self) -> None:
        if self._stream.isatty():
            self._bar()
        else:
            self._lines()

    @property
    def steady_rate(self) -> Optional[float]:
        """Images/s while embedding (from the first finished image on): the rate the progress showed."""
        return self._final_rate

    def _lines(self) -> None:
        last_line, printed = time.monotonic(), None
        while True:
            stopping = self._stop.wait(min(self._interval_s, _REFRESH_S))
            now = time.monotonic()
            done = self.done()
            line = progress_line(done, self.total, self._rate(done, now))
            due = (stopping and printed) or now - last_line >= self._interval_s  # a run shorter than one interval
            if due and line != printed:                                             # needs no progress line
                last_line, printed = now, line
                print(line, file=self._stream, flush=True)
            if stopping:
                return

    def _bar(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                   TimeRemainingColumn())
        with Progress(*columns, console=Console(file=self._stream), transient=False) as bar:
            task = bar.add_task("embedding", total=self.total or None, rate="")
            while True:
                stopping = self._stop.wait(_REFRESH_S)
                done = self.done()
                rate = self._rate(done, time.monotonic())
                bar.update(task, completed=done, rate=f"{rate:.1f} images/s" if rate else "")
                if stopping:
                    return


class JobServerStartup(logging.Filter):
    """While a runner's job server starts, says once what the launcher waits for, then how long, every interval.

    For Flink and Spark, Beam starts the runner's job server as a Java process on this machine and logs
    "Waiting for grpc channel to be ready at HOST:PORT." at WARNING every few seconds until it answers: six
    lines that name neither the server nor the runner. Installed on the root logger, which Beam logs them to.
    """

    BEAMS_MESSAGE = "Waiting for grpc channel to be ready at %s."

    def __init__(self, runner: str, interval_s: float, stream=None):
        super().__init__()
        self._runner = runner
        self._interval_s = interval_s or 30.0
        self._stream = stream or sys.stderr
        self._since: Optional[float] = None
        self._said = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != self.BEAMS_MESSAGE:
            return True
        endpoint = record.args[0] if record.args else "its port"
        now = time.monotonic()
        if self._since is None:
            self._since = self._said = now
            print(f"Starting {self._runner}'s job server: Beam runs it as a Java process on this machine and the job "
                  f"is submitted once it answers at {endpoint} (usually 10-60 s).", file=self._stream, flush=True)
        elif now - self._said >= self._interval_s:
            self._said = now
            print(f"still starting {self._runner}'s job server at {endpoint}: {_duration(now - self._since)}",
                  file=self._stream, flush=True)
        return False

    def __enter__(self) -> "JobServerStartup":
        logging.getLogger().addFilter(self)
        return self

    def __exit__(self, *exc_info) -> None:
        logging.getLogger().removeFilter(self)


class RemoteJobProgress:
    """A line every interval while a job runs where the launcher cannot count its workers' progress: the job's
    state as the runner reports it, how long it has run, and where the runner shows more."""

    def __init__(self, runner: str, where: str, interval_s: float, stream=None):
        self._runner = runner
        self._where = where
        self._interval_s = interval_s
        self._stream = stream or sys.stderr
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def watch(self, result) -> "RemoteJobProgress":
        self._thread = threading.Thread(target=self._loop, args=(result,), name="job-progress", daemon=True)
        self._thread.start()
        return self

    def _loop(self, result) -> None:
        started = time.monotonic()
        while not self._stop.wait(self._interval_s):
            try:
                state = result.state
            except Exception:  # the runner's service is going away: the job's end is reported by the launcher
                return
            print(f"progress: the job is {state} on {self._runner} for {_duration(time.monotonic() - started)}; "
                  f"{self._where}", file=self._stream, flush=True)

    def __enter__(self) -> "RemoteJobProgress":
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def where_progress_shows(runner: str, flink_master: Optional[str]) -> str:
    if runner == "FlinkRunner" and flink_master and not flink_master.startswith("["):
        return f"per-step progress in Flink's web UI, http://{flink_master}"
    if runner == "DataflowRunner":
        return "per-step progress in the Dataflow console (gcloud dataflow jobs list)"
    return "per-step progress in the runner's own UI; the workers' logs count inputs done"
