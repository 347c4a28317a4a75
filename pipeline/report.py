"""The run report (_run_report.json, written last: it marks a finished run) and the summary printed after a run."""

from __future__ import annotations

import collections
import platform
from typing import Optional

from apache_beam.metrics.metric import MetricsFilter

from pipeline.outputs import RUN_REPORT
from pipeline.standin_models import STANDIN_WARNING
from transforms.records import plural


def software_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in ("apache-beam", "tensorflow", "tensorflow-hub", "tfx-bsl", "pyarrow", "pillow", "numpy"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def beam_metrics(result) -> dict:
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


def print_summary(report: dict) -> None:
    counts, output = report["counts"], report["output"]
    if counts["inputs"] == 0:
        print(f"No inputs: --input {report['input']} has no rows or matches no files; the outputs are empty.")
    steady = report.get("images_per_second_embedding")
    rates = f"{report['images_per_second']} images/s overall, worker start-up included" + (
        f"; {steady} images/s while embedding, as the progress showed" if steady else "")
    print(f"Embedded {plural(counts['embedded'], 'image')} ({report['model']}, dim {report['dim']}) into "
          f"{output}/embeddings-*.parquet in {report['seconds']} s ({rates}).")
    if counts["skipped_existing"]:
        print(f"Skipped {plural(counts['skipped_existing'], 'input')} already embedded in {', '.join(report['skip_existing'])}.")
    if counts["errors"]:
        stages = ", ".join(f"{stage} {count}" for stage, count in sorted(counts["errors_by_stage"].items()))
        verb = "was" if counts["errors"] == 1 else "were"
        print(f"{plural(counts['errors'], 'input')} {verb} not embedded ({stages}): see {output}/errors-*.parquet")
    else:
        print("No errors.")
    print(f"Ran on {report['execution']}.")
    print(f"Run report: {output}/{RUN_REPORT}")
    if report["weights"].startswith("STAND-IN"):
        print(f"WARNING: {STANDIN_WARNING}.")


def error_rate_exceeded(report: dict, max_error_rate: Optional[float]) -> bool:
    counts = report["counts"]
    return max_error_rate is not None and counts["inputs"] > 0 and counts["errors"] / counts["inputs"] > max_error_rate
