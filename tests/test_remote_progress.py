"""What the launcher says while a remote runner's job server starts and while a remote job runs.

The job server is Beam's own SubprocessServer (what the FlinkRunner starts its Java job server with) around a
process that answers gRPC only after a few seconds, so the lines filtered are Beam's real ones.
"""

import io
import logging
import sys
import time

import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.utils.subprocess_server import SubprocessServer

from pipeline.progress import JobServerStartup, RemoteJobProgress
from pipeline.runtime import workers_on_this_machine

SLOW_GRPC_SERVER = ("import concurrent.futures, sys, time, grpc; time.sleep(float(sys.argv[1])); "
                    "server = grpc.server(concurrent.futures.ThreadPoolExecutor(1)); "
                    "server.add_insecure_port('localhost:' + sys.argv[2]); server.start(); time.sleep(120)")


def _start_slow_server(delay_s: float):
    server = SubprocessServer(lambda channel: channel, [sys.executable, "-c", SLOW_GRPC_SERVER, delay_s, "{{PORT}}"])
    server.start()
    return server


def test_beams_waiting_lines_become_one_sentence_then_a_line_per_interval(caplog):
    said = io.StringIO()
    caplog.set_level(logging.DEBUG)
    with JobServerStartup("FlinkRunner", interval_s=3, stream=said):
        started = time.monotonic()
        server = _start_slow_server(7)
        waited = time.monotonic() - started
    try:
        logging.warning("a warning of another kind")
    finally:
        server.stop()
    lines = said.getvalue().splitlines()
    assert waited > 6
    assert lines[0].startswith("Starting FlinkRunner's job server: Beam runs it as a Java process on this machine")
    assert "answers at localhost:" in lines[0]
    assert 1 <= len(lines[1:]) <= waited / 3 and all(line.startswith("still starting FlinkRunner's job server at "
                                                                       "localhost:") for line in lines[1:])
    assert not [r for r in caplog.records if "Waiting for grpc channel" in r.getMessage()]
    assert "a warning of another kind" in caplog.text  # only Beam's waiting lines are taken


class _Job:
    def __init__(self, states):
        self._states = iter(states)

    @property
    def state(self):
        return next(self._states)


def test_a_remote_job_gets_a_line_per_interval_with_its_state_and_where_to_look():
    said = io.StringIO()
    with RemoteJobProgress("DataflowRunner", "per-step progress in the Dataflow console", 0.2, said) as progress:
        progress.watch(_Job(["PENDING", "RUNNING", "RUNNING"] + ["DONE"] * 50))
        time.sleep(0.7)
    lines = said.getvalue().splitlines()
    assert 3 <= len(lines) <= 4
    assert [line.split(" for ")[0] for line in lines[:3]] == [f"progress: the job is {state} on DataflowRunner"
                                                              for state in ("PENDING", "RUNNING", "RUNNING")]
    assert all(line.endswith(" s; per-step progress in the Dataflow console") for line in lines)


@pytest.mark.parametrize("args, here", [
    ([], True),
    (["--runner=FlinkRunner", "--environment_type=LOOPBACK"], True),
    (["--runner=FlinkRunner", "--flink_master=localhost:8081", "--environment_type=EXTERNAL",
      "--environment_config=localhost:50000"], True),  # pipeline.flink up: the cluster and the worker pool here
    (["--runner=FlinkRunner", "--flink_master=flink.prod:8081", "--environment_type=EXTERNAL",
      "--environment_config=localhost:50000"], False),  # a worker pool beside each remote TaskManager
    (["--runner=FlinkRunner"], False),  # Docker containers: their files are not the launcher's
    (["--runner=DataflowRunner"], False),
])
def test_progress_files_are_used_only_where_the_workers_write_on_this_machine(args, here):
    assert workers_on_this_machine(PipelineOptions(args)) is here
