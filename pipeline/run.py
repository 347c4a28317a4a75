"""Entry point: python -m pipeline.run --input MANIFEST_FOLDER_OR_GLOB --output OUT_DIR [options] [Beam options].

Everything that can be checked before workers start is checked first (options, input, earlier outputs,
model handle); only then is the output folder created or an earlier run's files replaced.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the seconds of imports below
    from pipeline.interrupt import while_starting

    while_starting()

import contextlib
import dataclasses
import datetime
import json
import sys
from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions
from apache_beam.runners.runner import PipelineState

from pipeline.embed_pipeline import build_pipeline
from pipeline.engine import (
    EngineError,
    default_cache,
    planned_engine,
    refuse_incompatible,
    resolve_engine,
    verified_artifact,
)
from pipeline.fingerprint import model_fingerprint
from pipeline.interrupt import INTERRUPTED, exit_with, run_interruptibly, run_to_end, started
from pipeline.metrics import CommandMetrics, add_metrics_options
from pipeline.models import MODELS
from pipeline.options import DEFAULT_BATCH, JobConfig, build_parser, config_from_args, parse_known
from pipeline.outputs import RUN_REPORT, OutputDirError, earlier_results, prepare_output_dir, summarize_outputs
from pipeline.preflight import (
    IncrementalRunError,
    ModelCheckError,
    WorkerStorageError,
    check_compiled,
    check_handle,
    check_model,
    check_previous_outputs,
    check_worker_storage,
    expand_previous_outputs,
    output_metadata,
)
from pipeline.progress import ProgressDisplay
from pipeline.report import beam_metrics, error_rate_exceeded, print_summary, software_versions
from pipeline.runtime import (
    collector_frozen,
    configure_logging,
    describe_execution,
    is_local_runner,
    runner_name,
    with_direct_defaults,
    with_thread_defaults,
    workers_on_this_machine,
)
from pipeline.storage import write_bytes
from transforms.embed import EmbedConfig
from transforms.records import Stage
from transforms.sink import remove_partial_outputs
from transforms.source import SKIPPED_COUNTER, ManifestError, plan_input


class JobFailed(RuntimeError):
    """A remote runner reported the job failed (after its own retries)."""


# Errors that refuse a run before any work: exit code 2.
PREFLIGHT_ERRORS = (ManifestError, OutputDirError, ModelCheckError, IncrementalRunError, EngineError,
                    WorkerStorageError)


def choose_engine(config: JobConfig, options: PipelineOptions, registry) -> EmbedConfig:
    """Checks the model and settles its engine and batch size. A model compiled and verified by an earlier job
    needs no TensorFlow in the launcher: only its file fingerprint and one LiteRT probe batch."""
    embed = _settle_engine(config, options, registry)
    return dataclasses.replace(embed, batch_size=config.batch_size or DEFAULT_BATCH[embed.engine])


def _settle_engine(config: JobConfig, options: PipelineOptions, registry) -> EmbedConfig:
    refuse_incompatible(config.engine, config.embed.bfloat16)
    check_handle(config.model.handle)
    fingerprint = model_fingerprint(config.model.handle)
    cache = config.compiled_cache or default_cache(options.view_as(GoogleCloudOptions).temp_location)
    if planned_engine(config.engine, config.model.name, config.embed.bfloat16) == "litert":
        ready = verified_artifact(config.embed, fingerprint, cache)
        if ready is not None:
            check_compiled(ready)
            return ready
    resizable = registry is None or registry.resizable
    check_model(config.embed, resizable)
    embed, note = resolve_engine(config.embed, config.engine, config.model.name, fingerprint, cache,
                                 reference=lambda: check_model(config.embed, resizable))
    if note:
        print(note, file=sys.stderr, flush=True)
    return embed


def check_workers_reach(config: JobConfig, beam_args: Sequence[str]) -> None:
    """On a remote runner: refuses a compiled cache no worker reads, warns about local paths (WorkerStorageError)."""
    options = PipelineOptions(beam_args)
    if not is_local_runner(options):
        warning = check_worker_storage(config, runner_name(options), config.compiled_cache,
                                       options.view_as(GoogleCloudOptions).temp_location)
        if warning:
            print(warning, file=sys.stderr, flush=True)


def run(config: JobConfig, beam_args: Sequence[str], announce: bool = True) -> dict:
    """Checks, runs and reports one job; raises on anything that makes the run unusable.

    `announce` prints what --input holds before the work starts (an index's runs say it their own way).
    """
    args = with_direct_defaults(beam_args)
    options = PipelineOptions(args)
    config = with_thread_defaults(config, options)
    plan = plan_input(config.input)
    config = dataclasses.replace(config, skip_existing=tuple(expand_previous_outputs(config.skip_existing)))
    replaced = earlier_results(config.output_dir, config.overwrite)
    registry = MODELS.get(config.model.name)
    config = dataclasses.replace(config, embed=choose_engine(config, options, registry))
    execution = describe_execution(config, options, auto=len(args) > len(beam_args))
    metadata = output_metadata(config)
    check_previous_outputs(config, metadata)
    prepare_output_dir(config.output_dir, replaced)  # last: a refused run changes nothing
    if announce:
        print(plan.describe(config.input), flush=True)

    started = datetime.datetime.now(datetime.timezone.utc)
    show_progress = config.progress_interval_s > 0 and workers_on_this_machine(options)
    display = ProgressDisplay(plan.inputs, config.progress_interval_s) if show_progress else None
    p = beam.Pipeline(options=options)
    build_pipeline(p, config, metadata, display.directory if display else None)
    with display or contextlib.nullcontext(), collector_frozen():
        try:
            result, state = run_interruptibly(
                lambda: run_to_end(p, config.progress_interval_s, progress_shown=show_progress),
                local_workers=is_local_runner(options))
        except RuntimeError as exc:
            if is_local_runner(options):  # raised in this process: its traceback points at the cause
                raise
            raise JobFailed(f"The job failed on {runner_name(options)}: {' '.join(str(exc).split())[:1500]}") from None
    if state not in (PipelineState.DONE, None):
        raise JobFailed(f"The job ended in state {state} on {runner_name(options)}.")
    finished = datetime.datetime.now(datetime.timezone.utc)

    summary = summarize_outputs(config.output_dir)
    metrics = beam_metrics(result)
    skipped = metrics["counters"].get(SKIPPED_COUNTER, 0)
    seconds = (finished - started).total_seconds()
    report = {
        "started_at": started.isoformat(),
        "finished_at": finished.isoformat(),
        "seconds": round(seconds, 2),
        "runner": runner_name(options),
        "execution": execution,
        "input": config.input,
        "input_found": {"kind": plan.kind, "count": plan.inputs, "unit": plan.unit,
                        "left_out_by_extension": plan.left_out},
        "output": config.output_dir,
        "skip_existing": list(config.skip_existing),
        "model": config.model.name,
        "handle": config.model.handle,
        "image_size": config.model.input_size,
        "dim": config.model.dim,
        "weights": metadata["weights"],
        "precision": metadata["precision"],
        "engine": metadata["engine"],
        "tf_threads_per_process": {"intra_op": config.embed.intra_op_threads, "inter_op": config.embed.inter_op_threads},
        "counts": {
            "inputs": summary.embedded + summary.errors + skipped,
            "embedded": summary.embedded,
            "skipped_existing": skipped,
            "errors": summary.errors,
            "errors_by_stage": summary.errors_by_stage,
        },
        "images_per_second": round(summary.embedded / seconds, 2) if seconds else None,
        "images_per_second_embedding": round(display.steady_rate, 2) if display and display.steady_rate else None,
        "model_loads": metrics["distributions"].get("load_model_latency_milli_secs", {}).get("count", 0),
        "metrics": metrics,
        "versions": software_versions(),
    }
    write_bytes(FileSystems.join(config.output_dir, RUN_REPORT), json.dumps(report, indent=2).encode())
    return report


def run_metrics(report: dict, metrics: CommandMetrics) -> None:
    counts = report["counts"]
    metrics.set("inputs", "Inputs of the last run (rows or files, after refusals).", counts["inputs"])
    metrics.set("embedded", "Images embedded by the last run.", counts["embedded"])
    metrics.set("skipped_existing", "Inputs the last run found already embedded (--skip_existing).",
                counts["skipped_existing"])
    for stage in (Stage.MANIFEST, Stage.READ, Stage.DECODE, Stage.EMBED):
        metrics.set("failed", "Inputs of the last run not embedded, by the stage that failed.",
                    counts["errors_by_stage"].get(stage, 0), stage=stage)
    metrics.set("images_per_second", "Images embedded a second over the last run, start-up included.",
                report["images_per_second"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    add_metrics_options(parser)
    args, beam_args = parse_known(parser, argv)
    config = config_from_args(parser, args)
    configure_logging(config.verbose)
    metrics = CommandMetrics("run", args.metrics_file, args.pushgateway)
    code = _main(config, beam_args, metrics)
    metrics.finish(code)
    return code


def _main(config: JobConfig, beam_args: list, metrics: CommandMetrics) -> int:
    try:
        check_workers_reach(config, beam_args)
        report = run(config, beam_args)
    except PREFLIGHT_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except JobFailed as exc:
        remove_partial_outputs(config.output_dir)
        print(f"error: {exc}\nNo finished marker was written and partial files were removed; run the same command "
              f"with --overwrite to start again.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        runner = PipelineOptions(beam_args)
        if not is_local_runner(runner):  # Ctrl-C stops this launcher; the job goes on (Beam's remote runners)
            print(f"Interrupted: this launcher stopped, but the job may still be running on {runner_name(runner)}: "
                  f"cancel it there to stop it. If it finishes, {config.output_dir} is a finished run (its "
                  f"_pipeline_done.json); if not, run the same command with --overwrite.", file=sys.stderr)
            return INTERRUPTED
        remove_partial_outputs(config.output_dir)
        print(f"Interrupted: the run into {config.output_dir} stopped before it finished (no {RUN_REPORT}); its "
              f"partial files were removed. Run the same command with --overwrite to start again.", file=sys.stderr)
        return INTERRUPTED
    print_summary(report)
    run_metrics(report, metrics)
    if error_rate_exceeded(report, config.max_error_rate):
        counts = report["counts"]
        print(f"error: {counts['errors']} of {counts['inputs']} inputs failed, more than --max_error_rate "
              f"{config.max_error_rate}.", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    started()
    exit_with(main())
