"""What a command did, for dashboards and alerts: `--metrics_file PATH` and `--pushgateway URL`.

The file is Prometheus's text format, the one node_exporter's textfile collector reads, replaced in one rename
(a collector never reads half a file). Every outcome writes it, failures included, with the exit code; the
time of the last success is carried over from the file a failure replaces, so "no success for 26 hours" is an
alert on one series. With `--pushgateway`, the same metrics go to a Prometheus Pushgateway (grouped by job
`image_embeddings_<command>`); a push that fails is reported and does not change the exit status.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

PREFIX = "image_embeddings"


def add_metrics_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("metrics")
    group.add_argument("--metrics_file", metavar="PATH",
                       help="Write this command's metrics (Prometheus text format, for node_exporter's textfile "
                            "collector: inputs, embedded, failed by stage, images/s, duration, exit code, last "
                            "success time) to PATH, a local file replaced in one step, whatever the outcome.")
    group.add_argument("--pushgateway", metavar="URL",
                       help="Also push them to a Prometheus Pushgateway at URL (http://host:9091).")


class CommandMetrics:
    """The samples of one command's run; `finish(code)` writes and pushes them."""

    def __init__(self, command: str, metrics_file: Optional[str], pushgateway: Optional[str]):
        self.command, self.metrics_file, self.pushgateway = command, metrics_file, pushgateway
        self.started = time.time()
        self.samples: list = []  # (name, help, value, labels)

    def set(self, name: str, help_text: str, value: float, **labels: str) -> None:
        self.samples.append((name, help_text, float(value), labels))

    def finish(self, code: int) -> None:
        if not (self.metrics_file or self.pushgateway):
            return
        from prometheus_client import CollectorRegistry, Gauge

        now = time.time()
        registry = CollectorRegistry()
        command = {"command": self.command}
        last_success = now if code == 0 else _previous_success(self.metrics_file, self.command)
        samples = [*self.samples,
                   ("exit_code", "Exit status of the last run (0 done, 1 failed, 2 refused, 3 too many failed "
                                 "inputs, 130 interrupted).", code, {}),
                   ("duration_seconds", "Wall time of the last run.", round(now - self.started, 3), {}),
                   ("last_run_timestamp_seconds", "When the last run ended (Unix time).", now, {})]
        if last_success is not None:
            samples.append(("last_success_timestamp_seconds", "When a run last ended with exit status 0.",
                            last_success, {}))
        gauges: dict = {}
        for name, help_text, value, labels in samples:
            if name not in gauges:
                names = sorted({k for n, _, _, l in samples if n == name for k in l})
                gauges[name] = Gauge(f"{PREFIX}_{name}", help_text, ["command", *names], registry=registry)
            gauges[name].labels(**command, **labels).set(value)
        if self.metrics_file:
            from prometheus_client import write_to_textfile

            folder = os.path.dirname(os.path.abspath(self.metrics_file))
            os.makedirs(folder, exist_ok=True)
            write_to_textfile(self.metrics_file, registry, tmpdir=folder)
        if self.pushgateway:
            from prometheus_client import push_to_gateway

            try:
                push_to_gateway(self.pushgateway, job=f"{PREFIX}_{self.command}", registry=registry, timeout=10)
            except OSError as exc:
                print(f"WARNING: metrics not pushed to --pushgateway {self.pushgateway}: {exc}", file=sys.stderr)


def _previous_success(path: Optional[str], command: str) -> Optional[float]:
    """The last success time a metrics file recorded for `command`, if any."""
    if not path or not os.path.exists(path):
        return None
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with open(path) as f:
            for family in text_string_to_metric_families(f.read()):
                for sample in family.samples:
                    if sample.name == f"{PREFIX}_last_success_timestamp_seconds" and \
                            sample.labels.get("command") == command:
                        return sample.value
    except (OSError, ValueError):
        return None
    return None
