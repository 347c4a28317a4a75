"""How a command's process ends: Ctrl-C taken by the launcher alone, and an exit that cannot abort.

Ctrl-C during a pipeline: the launcher takes it alone, stops the workers it started, and says one line.
A terminal sends SIGINT to every process of the foreground group, so DirectRunner's worker processes would
each die with their own traceback. DirectRunner starts them with the shell command `SYS.EXECUTABLE -m
apache_beam.runners.worker.sdk_worker_main`; while a pipeline runs here, that command begins with
`trap '' INT; exec`, and a signal ignored before exec stays ignored, so the workers never see Ctrl-C. The
pipeline runs in a thread; the main thread waits and takes the KeyboardInterrupt, kills the worker processes
started meanwhile, and re-raises, so the caller can remove partial outputs that nothing writes to any more
(transforms.sink.remove_partial_outputs).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import threading
import time
from typing import Callable, TypeVar

T = TypeVar("T")

INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C


def while_starting() -> None:
    """Ctrl-C while a command still imports Beam and TensorFlow (seconds) says one line, not an import traceback.

    Nothing has been read or written yet, so there is nothing to clean up; started() hands Ctrl-C back to
    the command's own handling (KeyboardInterrupt) once its imports are done.
    """
    def stop(signum, frame):
        sys.stderr.write("Interrupted while starting: nothing was read or written.\n")
        sys.stderr.flush()
        os._exit(INTERRUPTED)

    signal.signal(signal.SIGINT, stop)


def started() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _descendants() -> set[int]:
    """Pids of every process below this one (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(pid)
    found, todo = set(), [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _silent(args) -> None:
    """An exception of a thread left behind by an interrupted pipeline: expected, not worth a traceback."""


def run_interruptibly(work: Callable[[], T], local_workers: bool = False) -> T:
    """work(), run so that Ctrl-C reaches only this (main) thread; the worker processes are killed if it comes.

    `local_workers`: the pipeline runs on DirectRunner here, whose worker processes are then started with
    SIGINT ignored. Otherwise work() runs in this thread as it is: a remote runner's workers are not ours to
    stop, and the FlinkRunner's job-server launcher installs a SIGINT handler, which only the main thread may.
    """
    if threading.current_thread() is not threading.main_thread():
        return work()
    if not local_workers:
        return _run_remote(work)
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = work()
        except BaseException as exc:  # handed to the waiting thread as is
            outcome["error"] = exc

    before = _descendants()
    python = sys.executable
    sys.executable = f"trap '' INT; exec {shlex.quote(python)}"  # read by DirectRunner to start its workers
    try:
        thread = threading.Thread(target=target, name="pipeline", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.2)
    except KeyboardInterrupt:
        threading.excepthook = _silent  # Beam's threads that watched the killed workers fail now: expected
        for pid in _descendants() - before:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        raise
    finally:
        sys.executable = python
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _run_remote(work: Callable[[], T]) -> T:
    """work() as it is; Ctrl-C stops Beam's job-server client, whose message thread then fails: expected, silent.

    The SIGINT handler Beam installs for its job server is removed afterwards: it would outlive the job server
    (stopped by run_to_end), and a chain of them, one per run of an index update, swallowed the signal a lost
    lease sends.
    """
    previous = threading.excepthook
    sigint = signal.getsignal(signal.SIGINT)

    def quiet_reader(args):
        if args.thread is None or args.thread.name != "wait_until_finish_read":
            previous(args)

    threading.excepthook = quiet_reader
    try:
        return work()
    finally:
        threading.excepthook = previous
        signal.signal(signal.SIGINT, sigint)


def run_to_end(pipeline, progress_interval_s: float = 30.0, progress_shown: bool = False) -> tuple:
    """(result, final state) of a Beam pipeline run to its end; it leaves no process of its own behind.

    A remote runner's launcher-side service (the FlinkRunner's job-server JVM, about 400 MB) would otherwise live
    until interpreter exit, which these commands skip (exit_with), and pile up over an index update's runs. While
    that service starts, one line says what the launcher waits for; while a remote job runs, a line every
    `progress_interval_s` gives its state, unless the caller shows the workers' own progress (`progress_shown`).
    """
    import contextlib

    from apache_beam.options.pipeline_options import FlinkRunnerOptions

    from pipeline.progress import JobServerStartup, RemoteJobProgress, where_progress_shows
    from pipeline.runtime import is_local_runner, runner_name

    options = pipeline.options
    remote, runner = not is_local_runner(options), runner_name(options)
    before = _descendants()
    try:
        with JobServerStartup(runner, progress_interval_s) if remote else contextlib.nullcontext():
            result = pipeline.run()
        heartbeat = remote and progress_interval_s > 0 and not progress_shown
        where = where_progress_shows(runner, options.view_as(FlinkRunnerOptions).flink_master)
        with RemoteJobProgress(runner, where, progress_interval_s).watch(result) if heartbeat \
                else contextlib.nullcontext():
            state = result.wait_until_finish()
        try:
            result.metrics()  # fetched from that service now; kept by the result for later queries
        except Exception:  # a runner without metrics: the report says so
            pass
        return result, state
    finally:
        _stop(_descendants() - before)


def _stop(pids: set[int], grace_s: float = 10) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + grace_s
    while pids and time.monotonic() < deadline:
        pids = {pid for pid in pids if _alive(pid)}
        time.sleep(0.05)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    """Running, and not a zombie its parent has yet to reap."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def exit_with(code: int) -> None:
    """Ends the process with `code`, once every output is final, without running interpreter teardown.

    Teardown destroys native objects of TensorFlow, gRPC (the worker processes' channels) and LiteRT in an
    order they do not promise to survive: about one full run in five ended in `terminate called without an
    active exception` and SIGABRT after its summary, so a scheduler saw a failure for work that was done. After
    Ctrl-C, the stopped pipeline's threads are not waited for either. Python's own buffers are flushed first.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
