"""Entry point: python -m pipeline.run --input MANIFEST_OR_GLOB --output OUT_DIR [options] [Beam options].

Everything that can be checked before workers start is checked here (options, manifest header,
output directory, model handle and its output dim), so a mistake costs seconds, not a job.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import functools
import json
import logging
import os
import platform
import sys
from typing import Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineState

from pipeline.embed_pipeline import build_pipeline
from pipeline.models import handle_available
from pipeline.options import JobConfig, parse_args
from pipeline.outputs import (
    RUN_REPORT,
    OutputDirError,
    earlier_results,
    is_finished_run,
    prepare_output_dir,
    summarize_outputs,
)
from pipeline.standin_models import STANDIN_WARNING, standin_info
from transforms.embed import EmbedConfig, HubEmbedder
from transforms.source import SKIPPED_COUNTER, ManifestError, plan_input


class ModelCheckError(RuntimeError):
    """The model handle cannot be loaded, or its output does not match the declared dim."""


@functools.lru_cache(maxsize=2)
def check_model(config: EmbedConfig) -> None:
    """Loads the model once in the launcher and embeds one grey image: [1, dim] or a clear error."""
    handle = config.handle
    if not handle_available(handle):
        raise ModelCheckError(
            f"Cannot reach the host of model handle {handle} (and it is not in TFHUB_CACHE_DIR). "
            f"Use a reachable handle, a gs:// copy or a local SavedModel directory (--model_handle)."
        )
    try:
        embedder = HubEmbedder(config)
        embedder(np.full((1, config.image_size, config.image_size, 3), 128, np.uint8))
    except Exception as exc:
        message = " ".join(str(exc).split())[:500]
        raise ModelCheckError(f"Model handle {handle} is not a usable feature-vector model: {message}") from None


def output_metadata(config: JobConfig) -> dict[str, str]:
    """The Parquet key/value metadata: what produced these vectors, enough to refuse mixing runs."""
    standin = standin_info(config.model.handle)
    return {
        "model": config.model.name,
        "handle": config.model.handle,
        "image_size": str(config.model.input_size),
        "dim": str(config.model.dim),
        "preprocessing": config.preprocess.describe(),
        "precision": config.embed.precision(),
        "weights": f"STAND-IN: {STANDIN_WARNING}" if standin else "as published at the handle",
    }


class IncrementalRunError(ValueError):
    """--skip_existing names an output that cannot be extended by this run."""


# Metadata that must match for vectors of two runs to be comparable.
COMPARABLE_METADATA = ("model", "handle", "image_size", "dim", "preprocessing", "precision", "weights")


def check_previous_output(config: JobConfig, metadata: dict[str, str]) -> None:
    """Refuses to skip ids embedded by a run whose model or preprocessing differs from this one's."""
    if not config.skip_existing or config.force_full_run:
        return
    if config.skip_existing == config.output_dir:
        raise IncrementalRunError(
            f"--skip_existing and --output are the same folder ({config.output_dir}); write each run to a new --output."
        )
    previous = summarize_outputs(config.skip_existing)
    if not previous.embedding_files:
        raise IncrementalRunError(f"--skip_existing {config.skip_existing} holds no embeddings-*.parquet files.")
    if not is_finished_run(config.skip_existing):
        raise IncrementalRunError(
            f"--skip_existing {config.skip_existing} is not a finished run (no {RUN_REPORT}): its files may be "
            f"partial. Rerun it, or pass --force_full_run to embed everything."
        )
    differences = [
        f"{key}: {previous.metadata.get(key)!r} then, {metadata[key]!r} now"
        for key in COMPARABLE_METADATA
        if previous.metadata.get(key) != metadata[key]
    ]
    if differences:
        raise IncrementalRunError(
            f"--skip_existing {config.skip_existing} was made with another model or preprocessing "
            f"({'; '.join(differences)}); its vectors are not comparable. Pass --force_full_run to embed everything."
        )


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in ("apache-beam", "tensorflow", "tensorflow-hub", "tfx-bsl", "pyarrow", "pillow", "numpy"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _metrics(result) -> dict:
    """The job's Beam metrics in the "embeddings" namespace: counters summed, distributions summarised."""
    try:
        found = result.metrics().query(MetricsFilter().with_namespace("embeddings"))
    except Exception:  # a runner without metrics support
        return {"counters": {}, "distributions": {}}

    def value(metric):
        return metric.committed if metric.committed is not None else metric.attempted

    counters = collections.Counter()
    for metric in found["counters"]:
        counters[metric.key.metric.name] += value(metric) or 0
    distributions = {}
    for metric in found["distributions"]:
        data = value(metric)
        if data and data.count:
            name = metric.key.metric.name
            merged = distributions.setdefault(name, {"count": 0, "sum": 0, "min": data.min, "max": data.max})
            merged["count"] += data.count
            merged["sum"] += data.sum
            merged["min"], merged["max"] = min(merged["min"], data.min), max(merged["max"], data.max)
    for merged in distributions.values():
        merged["mean"] = round(merged.pop("sum") / merged["count"], 2)
    return {"counters": dict(counters), "distributions": distributions}


def with_thread_defaults(config: JobConfig, options: PipelineOptions) -> JobConfig:
    """Splits this machine's cores between DirectRunner worker processes unless threads were set explicitly.

    Measured here: 2 processes x 1 TensorFlow thread beat 1 process x 2 threads; several processes each
    using every core oversubscribe the CPU.
    """
    direct = options.view_as(DirectOptions)
    workers = direct.direct_num_workers or 1
    if config.embed.intra_op_threads or direct.direct_running_mode != "multi_processing" or workers < 2:
        return config
    threads = max(1, (os.cpu_count() or 1) // workers)
    embed = dataclasses.replace(config.embed, intra_op_threads=threads, inter_op_threads=1)
    return dataclasses.replace(config, embed=embed)


def run(config: JobConfig, beam_args: Sequence[str]) -> dict:
    """Checks, runs and reports one job; raises on anything that makes the run unusable."""
    options = PipelineOptions(list(beam_args))
    config = with_thread_defaults(config, options)
    plan = plan_input(config.input)
    metadata = output_metadata(config)
    check_previous_output(config, metadata)
    replaced = earlier_results(config.output_dir, config.overwrite)
    check_model(config.embed)
    prepare_output_dir(config.output_dir, replaced)  # last: a refused run changes nothing
    print(plan.describe(config.input), flush=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    p = beam.Pipeline(options=options)
    build_pipeline(p, config, metadata)
    result = p.run()
    state = result.wait_until_finish()
    if state not in (PipelineState.DONE, None):
        raise RuntimeError(f"The pipeline ended in state {state}.")
    finished = datetime.datetime.now(datetime.timezone.utc)
    summary = summarize_outputs(config.output_dir)
    metrics = _metrics(result)
    skipped = metrics["counters"].get(SKIPPED_COUNTER, 0)
    seconds = (finished - started).total_seconds()
    report = {
        "started_at": started.isoformat(),
        "finished_at": finished.isoformat(),
        "seconds": round(seconds, 2),
        "runner": options.view_as(StandardOptions).runner or "DirectRunner",
        "input": config.input,
        "input_found": {"kind": plan.kind, plan.unit.replace(" ", "_"): plan.inputs, "left_out_by_extension": plan.left_out},
        "output": config.output_dir,
        "skip_existing": config.skip_existing,
        "model": config.model.name,
        "handle": config.model.handle,
        "image_size": config.model.input_size,
        "dim": config.model.dim,
        "weights": metadata["weights"],
        "precision": metadata["precision"],
        "tf_threads_per_process": {"intra_op": config.embed.intra_op_threads, "inter_op": config.embed.inter_op_threads},
        "counts": {
            "inputs": summary.embedded + summary.errors + skipped,
            "embedded": summary.embedded,
            "skipped_existing": skipped,
            "errors": summary.errors,
            "errors_by_stage": summary.errors_by_stage,
        },
        "images_per_second": round(summary.embedded / seconds, 2) if seconds else None,
        "model_loads": metrics["distributions"].get("load_model_latency_milli_secs", {}).get("count", 0),
        "metrics": metrics,
        "versions": _versions(),
    }
    with FileSystems.create(FileSystems.join(config.output_dir, RUN_REPORT)) as f:
        f.write(json.dumps(report, indent=2).encode())
    return report


def print_summary(report: dict) -> None:
    counts, output = report["counts"], report["output"]
    if counts["inputs"] == 0:
        print(f"No inputs: --input {report['input']} has no rows or matches no files; the outputs are empty.")
    print(f"Embedded {counts['embedded']} images ({report['model']}, dim {report['dim']}) into "
          f"{output}/embeddings-*.parquet in {report['seconds']} s ({report['images_per_second']} images/s)")
    if counts["skipped_existing"]:
        print(f"Skipped {counts['skipped_existing']} inputs already embedded in {report['skip_existing']}")
    if counts["errors"]:
        stages = ", ".join(f"{stage} {count}" for stage, count in sorted(counts["errors_by_stage"].items()))
        print(f"{counts['errors']} inputs not embedded ({stages}): see {output}/errors-*.parquet")
    else:
        print("No errors.")
    print(f"Run report: {output}/{RUN_REPORT}")
    if report["weights"].startswith("STAND-IN"):
        print(f"WARNING: {STANDIN_WARNING}.")


def error_rate_exceeded(report: dict, max_error_rate: Optional[float]) -> bool:
    counts = report["counts"]
    return max_error_rate is not None and counts["inputs"] > 0 and counts["errors"] / counts["inputs"] > max_error_rate


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config, beam_args = parse_args(argv)
    try:
        report = run(config, beam_args)
    except (ManifestError, OutputDirError, ModelCheckError, IncrementalRunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_summary(report)
    if error_rate_exceeded(report, config.max_error_rate):
        counts = report["counts"]
        print(f"error: {counts['errors']} of {counts['inputs']} inputs failed, more than --max_error_rate "
              f"{config.max_error_rate}.", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
