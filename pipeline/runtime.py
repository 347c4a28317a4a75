"""How a run executes on this machine: the DirectRunner setting picked by default, TensorFlow threads, quiet logs."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import re
from typing import Sequence

from apache_beam.options.pipeline_options import (
    DirectOptions,
    FlinkRunnerOptions,
    PipelineOptions,
    PortableOptions,
    StandardOptions,
)

from pipeline.options import JobConfig
from transforms.embed import VERBOSE_ENV

LOCAL_RUNNERS = (None, "DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner")
# Each DirectRunner worker process holds TensorFlow and a model: about 2 GB measured, 3 GB allowed.
_MEMORY_PER_WORKER = 3 * 1024**3


@contextlib.contextmanager
def collector_frozen():
    """Keeps Python's cyclic collector off what is already loaded while the pipeline runs.

    Full collections otherwise re-scan every module, proto and model object on each pass; the launcher
    runs DirectRunner's runner, so its pauses hold up the workers too. Freezing here and in each
    worker after its model loads (transforms/embed.py) made a LiteRT run 7% faster end to end
    (18.3 against 19.6 s for 3200 images, three alternating pairs). Unfrozen afterwards, so a
    process that runs several pipelines (tests, notebooks) collects as usual between them.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def runner_name(options: PipelineOptions) -> str:
    return options.view_as(StandardOptions).runner or "DirectRunner"


def is_local_runner(options: PipelineOptions) -> bool:
    return options.view_as(StandardOptions).runner in LOCAL_RUNNERS


_THIS_MACHINE = ("localhost", "127.0.0.1", "[::1]", "::1")


def _host(address: str) -> str:
    return address.rsplit(":", 1)[0] if address.count(":") == 1 or address.startswith("[") else address


def workers_on_this_machine(options: PipelineOptions) -> bool:
    """Whether the Python stages run where the launcher can read their files: DirectRunner; LOOPBACK workers (in
    this process); or a Flink cluster on this machine whose SDK worker pool is here too (pipeline.flink up)."""
    if is_local_runner(options):
        return True
    portable = options.view_as(PortableOptions)
    environment = (portable.environment_type or "").upper()
    if environment == "LOOPBACK":
        return True
    flink_master = options.view_as(FlinkRunnerOptions).flink_master or "[auto]"  # [auto], [local]: embedded here
    return (runner_name(options) == "FlinkRunner" and (_host(flink_master) in _THIS_MACHINE or flink_master in
                                                       ("[auto]", "[local]"))
            and environment == "EXTERNAL" and _host(portable.environment_config or "") in _THIS_MACHINE)


def with_direct_defaults(beam_args: Sequence[str]) -> list[str]:
    """On DirectRunner, one worker process per core (memory permitting) unless the user chose the mode or count.

    Measured on 2 cores: 2 processes x 1 TensorFlow thread embed faster than 1 process x 2 threads.
    """
    args = list(beam_args)
    options = PipelineOptions(args)
    if options.view_as(StandardOptions).runner not in (None, "DirectRunner"):
        return args
    if any(arg.startswith(("--direct_running_mode", "--direct_num_workers")) for arg in args):
        return args
    cores = os.cpu_count() or 1
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 0
    workers = max(1, min(cores, memory // _MEMORY_PER_WORKER)) if memory else cores
    if workers < 2:
        return args
    return [*args, "--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]


def with_thread_defaults(config: JobConfig, options: PipelineOptions) -> JobConfig:
    """Splits this machine's cores between DirectRunner worker processes unless threads were set explicitly.

    Several processes each using every core oversubscribe the CPU.
    """
    direct = options.view_as(DirectOptions)
    workers = direct.direct_num_workers or 1
    if config.embed.intra_op_threads or direct.direct_running_mode != "multi_processing" or workers < 2:
        return config
    threads = max(1, (os.cpu_count() or 1) // workers)
    embed = dataclasses.replace(config.embed, intra_op_threads=threads, inter_op_threads=1)
    return dataclasses.replace(config, embed=embed)


def describe_execution(config: JobConfig, options: PipelineOptions, auto: bool) -> str:
    """E.g. "DirectRunner, 2 worker processes x 1 litert thread (picked for this machine; ...)"."""
    runner = runner_name(options)
    if runner not in ("DirectRunner", "BundleBasedDirectRunner"):
        return f"{runner}, {config.embed.engine}"
    direct = options.view_as(DirectOptions)
    processes = direct.direct_num_workers if direct.direct_running_mode == "multi_processing" else 1
    threads = config.embed.intra_op_threads or "all cores'"
    text = f"{runner}, {processes} worker process{'es' if processes != 1 else ''} x {threads} {config.embed.engine} " \
           f"thread{'s' if threads != 1 else ''}"
    return text + (" (picked for this machine; set --direct_num_workers to change)" if auto else "")


# Warnings that say nothing about the run, as Beam 2.77's launcher and workers log them.
_NOISE = re.compile(
    "|".join([
        r"Resource module is not available",
        r"No semi_persistent_directory",
        r"Discarding unparseable args",  # Beam's workers, about Beam's own internal flags
        r"Really (starting|destroying) service at",  # the FlinkRunner's job server, started and stopped per job
    ])
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _NOISE.search(record.getMessage())


def configure_logging(verbose: bool) -> None:
    """Warnings and errors that matter, without the known noise; everything with --verbose.

    Worker processes of the local runners inherit the setting through the environment.
    """
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
        return
    os.environ.pop(VERBOSE_ENV, None)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropNoise())
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").addFilter(_DropNoise())
