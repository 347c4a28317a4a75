"""python -m pipeline.flink fetch | up [--folder DIR] [--taskmanagers N] [--slots N]

fetch  downloads Flink and builds Beam's Flink job server into the cache (once), and prints their paths.
up     starts a JobManager, N TaskManagers and an SDK worker pool on 127.0.0.1, prints the flags that send
       `pipeline.run` / `pipeline.index update` to it, and stops everything on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
import tempfile

from pipeline.flink.dist import DEFAULT_CACHE, FlinkSetupError, flink_home, job_server_jar

OPTIONS_FILE = "beam-options"  # the options printed, for $(cat FOLDER/beam-options)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.flink", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("fetch", "up"))
    parser.add_argument("--cache", default=DEFAULT_CACHE, help="Where Flink and the job-server jar are kept.")
    parser.add_argument("--folder", help="The cluster's configuration, logs and temporary files (default: a new "
                                         "temporary folder).")
    parser.add_argument("--taskmanagers", type=int, default=2)
    parser.add_argument("--slots", type=int, default=2, help="Task slots per TaskManager.")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            print(f"FLINK_HOME={flink_home(args.cache)}")
            print(f"--flink_job_server_jar={job_server_jar(args.cache)}")
            return 0
        from pipeline.flink.cluster import LocalFlink

        made = args.folder is None  # a folder of its own is removed when the cluster stops
        folder = args.folder or tempfile.mkdtemp(prefix="local-flink-")
        cluster = LocalFlink(folder, args.taskmanagers, args.slots, args.cache)
    except FlinkSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    code = 0
    signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's stop while starting: stop what started, as Ctrl-C
    try:
        cluster.start()
        print(f"Flink {os.path.basename(cluster.home)}: JobManager and {args.taskmanagers} TaskManagers running; "
              f"web UI http://{cluster.master}; logs in {folder}/log.")
        options = " ".join(shlex.quote(arg) for arg in cluster.beam_args(parallelism=args.slots))
        with open(os.path.join(folder, OPTIONS_FILE), "w") as f:
            f.write(options + "\n")
        print("Send jobs to it with these Beam options (Ctrl-C here stops the cluster):")
        print("  " + options, flush=True)
        print(f"They are also in {os.path.join(folder, OPTIONS_FILE)}: add $(cat {os.path.join(folder, OPTIONS_FILE)}) "
              f"to a command.", flush=True)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM while it was starting
        pass
    except (FlinkSetupError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    finally:
        cluster.stop()  # whatever had started
        if made:
            shutil.rmtree(folder, ignore_errors=True)
        print("Flink stopped.")
    return code


if __name__ == "__main__":
    sys.exit(main())
