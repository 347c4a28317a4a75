"""A Flink session cluster on 127.0.0.1: one JobManager and N TaskManagers as separate JVM processes, plus one
Beam SDK worker pool (the EXTERNAL environment every TaskManager's Python stages run in).

Tuned for a job to survive a lost TaskManager: heartbeats time out after 8 s, a failed job restarts (up to 5 times
in a row, backing off from 1 to 10 s), and each TaskManager has slots for the whole job, so one can carry it alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from pipeline.flink.dist import DEFAULT_CACHE, FLINK_MINOR, FlinkSetupError, flink_home, job_server_jar

_STARTUP_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _java_options(home: str) -> str:
    """The --add-opens list Flink's own config.yaml carries for Java 17."""
    with open(os.path.join(home, "conf", "config.yaml")) as f:
        found = re.search(r"^\s*all:\s*(--add-\S.*)$", f.read(), re.MULTILINE)
    return found.group(1).strip() if found else ""


class LocalFlink:
    """Start with `start()` (or `with LocalFlink(folder) as flink:`); `beam_args()` are the flags a job needs."""

    def __init__(self, folder: str, taskmanagers: int = 2, slots: int = 2, cache: str = DEFAULT_CACHE,
                 taskmanager_memory: str = "2560m"):
        self.folder = os.path.abspath(folder)
        self.slots = slots
        self.home = flink_home(cache)
        self.jar = job_server_jar(cache)
        self.rest_port, self.rpc_port, self.worker_port = free_port(), free_port(), free_port()
        self._wanted_taskmanagers = taskmanagers
        self._taskmanager_memory = taskmanager_memory
        self.jobmanager: subprocess.Popen | None = None
        self.taskmanagers: list[subprocess.Popen] = []
        self.worker_pool: subprocess.Popen | None = None
        self._killed: list[subprocess.Popen] = []

    @property
    def master(self) -> str:
        return f"localhost:{self.rest_port}"

    def beam_args(self, parallelism: int = 2) -> list[str]:
        return ["--runner=FlinkRunner", f"--flink_master={self.master}", f"--flink_version={FLINK_MINOR}",
                f"--flink_job_server_jar={self.jar}", f"--parallelism={parallelism}",
                "--environment_type=EXTERNAL", f"--environment_config=localhost:{self.worker_port}"]

    def _write_config(self) -> None:
        conf = os.path.join(self.folder, "conf")
        os.makedirs(conf, exist_ok=True)
        for name in os.listdir(os.path.join(self.home, "conf")):
            if name.startswith(("log4j", "logback")):
                shutil.copy(os.path.join(self.home, "conf", name), conf)
        tmp = os.path.join(self.folder, "tmp")
        os.makedirs(tmp, exist_ok=True)
        settings = {
            "env.java.opts.all": _java_options(self.home),
            "jobmanager.rpc.address": "localhost",
            "jobmanager.rpc.port": self.rpc_port,
            "jobmanager.bind-host": "localhost",
            "taskmanager.bind-host": "localhost",
            "taskmanager.host": "localhost",
            "rest.address": "localhost",
            "rest.bind-address": "localhost",
            "rest.port": self.rest_port,
            "jobmanager.memory.process.size": "1024m",
            "taskmanager.memory.process.size": self._taskmanager_memory,
            # Beam's batch translation opens many shuffles at once: Flink's default network memory is too little.
            "taskmanager.memory.network.min": "512mb",
            "taskmanager.memory.network.max": "512mb",
            "taskmanager.numberOfTaskSlots": self.slots,
            "parallelism.default": self.slots,
            "heartbeat.interval": 1000,
            "heartbeat.timeout": 8000,
            # One lost TaskManager fails several tasks at once: fixed-delay counts each as an attempt (4 of them
            # exhausted 3 attempts in 0.07 s here); exponential-delay counts failures of one moment once (FLIP-364).
            "restart-strategy.type": "exponential-delay",
            "restart-strategy.exponential-delay.initial-backoff": "1 s",
            "restart-strategy.exponential-delay.max-backoff": "10 s",
            "restart-strategy.exponential-delay.attempts-before-reset-backoff": 5,
            "io.tmp.dirs": tmp,
        }
        with open(os.path.join(conf, "config.yaml"), "w") as f:
            f.writelines(f"{key}: {value}\n" for key, value in settings.items())

    def _env(self) -> dict:
        return {**os.environ, "FLINK_CONF_DIR": os.path.join(self.folder, "conf"),
                "FLINK_LOG_DIR": os.path.join(self.folder, "log"), "FLINK_PID_DIR": os.path.join(self.folder, "tmp")}

    def _launch(self, command: list[str], log_name: str, env: dict) -> subprocess.Popen:
        log_dir = os.path.join(self.folder, "log")
        os.makedirs(log_dir, exist_ok=True)
        with open(os.path.join(log_dir, log_name), "ab") as log:
            # Its own session: Ctrl-C in the launching terminal is for the launcher, and a kill reaches the JVM.
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def overview(self) -> dict:
        with urllib.request.urlopen(f"http://{self.master}/overview", timeout=5) as answer:
            return json.load(answer)

    def _processes(self) -> list[subprocess.Popen]:
        return [p for p in [self.jobmanager, *self.taskmanagers, self.worker_pool] if p is not None]

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            for process in self._processes():
                if process.poll() is not None and process not in self._killed:
                    raise RuntimeError(f"Flink {what}: {process.args[0]} exited; see the logs in {self.folder}/log.")
            try:
                if ready():
                    return
            except OSError:  # the REST endpoint is not up yet
                pass
            time.sleep(0.5)
        raise RuntimeError(f"Flink {what} not ready after {_STARTUP_TIMEOUT_S} s; see the logs in {self.folder}/log.")

    def start(self) -> "LocalFlink":
        if not (shutil.which("java") or os.environ.get("JAVA_HOME")):
            raise FlinkSetupError("Flink needs Java (17): install it (Debian: apt-get install openjdk-17-jre-headless) "
                                  "or set JAVA_HOME.")
        self._write_config()
        env = self._env()
        self.jobmanager = self._launch([os.path.join(self.home, "bin", "jobmanager.sh"), "start-foreground"],
                                       "jobmanager.log", env)
        for _ in range(self._wanted_taskmanagers):
            self.start_taskmanager(wait=False)
        python_bin = os.path.dirname(sys.executable)
        self.worker_pool = self._launch(
            [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main", "--service_port",
             str(self.worker_port)], "worker-pool.log", {**os.environ, "PATH": f"{python_bin}:{os.environ['PATH']}"})
        self._wait(lambda: self.overview()["taskmanagers"] == self.live_taskmanagers(), "cluster")
        return self

    def live_taskmanagers(self) -> int:
        return sum(1 for p in self.taskmanagers if p.poll() is None)

    def start_taskmanager(self, wait: bool = True) -> None:
        index = len(self.taskmanagers)
        self.taskmanagers.append(self._launch([os.path.join(self.home, "bin", "taskmanager.sh"), "start-foreground"],
                                              f"taskmanager-{index}.log", self._env()))
        if wait:
            self._wait(lambda: self.overview()["taskmanagers"] == self.live_taskmanagers(), "TaskManager")

    def busy_taskmanager(self) -> int:
        """The index of a live TaskManager running tasks now (Flink may place a whole job on one of them)."""
        with urllib.request.urlopen(f"http://{self.master}/taskmanagers", timeout=5) as answer:
            busy = {tm["id"] for tm in json.load(answer)["taskmanagers"] if tm["freeSlots"] < tm["slotsNumber"]}
        for index, process in enumerate(self.taskmanagers):
            if process.poll() is None:
                with open(os.path.join(self.folder, "log", f"taskmanager-{index}.log"), errors="replace") as f:
                    found = re.search(r"Starting TaskManager with ResourceID: (\S+)", f.read())
                if found and found.group(1) in busy:
                    return index
        raise RuntimeError("No TaskManager is running a task.")

    def kill_taskmanager(self, index: int) -> None:
        """SIGKILL to a TaskManager's JVM, as a machine loss would do: no shutdown hook runs."""
        process = self.taskmanagers[index]
        self._killed.append(process)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def running_jobs(self) -> int:
        return self.overview()["jobs-running"]

    def stop(self) -> None:
        for process in self._processes():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self._processes():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def __enter__(self) -> "LocalFlink":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
