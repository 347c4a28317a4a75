"""The manifest stage alone: rows/s reading a 1M-row CSV manifest, split by byte range, with 1 and 2 workers.

    .venv/bin/python benchmarks/manifest_read.py [--rows 1000000]

Reads the manifest with the pipeline's own `ReadManifest` (parse included) and counts the rows, on
DirectRunner multi_processing with 1 and 2 worker processes, and the same parse read by a single
worker from one unsplit file (how manifests were read before). Each run's fixed start-up is measured
on a 10-row manifest and reported apart. Writes benchmarks/results/manifest_read.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import apache_beam as beam  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402

from transforms.manifest import ReadManifest, _all_lines, check_manifest, parse_line  # noqa: E402


def write_manifest(path: str, rows: int) -> None:
    with open(path, "w") as f:
        f.write("id,uri\n")
        for i in range(rows):
            f.write(f"img-{i:08d},gs://bucket/corpus/{i % 977:03d}/img-{i:08d}.jpg\n")


class _Unsplit(beam.PTransform):
    """The manifest read whole by one worker: Create([path]) | FlatMap(read every line)."""

    def __init__(self, path, columns):
        super().__init__()
        self._path, self._columns = path, columns

    def expand(self, pbegin):
        return (pbegin | beam.Create([self._path]) | beam.FlatMap(_all_lines)
                | beam.FlatMap(parse_line, self._path, self._columns))


def timed_count(path: str, workers: int, split: bool) -> float:
    options = PipelineOptions(["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"])
    columns = check_manifest(path)
    read = ReadManifest(path, columns) if split else _Unsplit(path, columns)
    started = time.perf_counter()
    with beam.Pipeline(options=options) as p:
        _ = p | read | beam.combiners.Count.Globally()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="manifest-bench-")
    big, tiny = os.path.join(folder, "big.csv"), os.path.join(folder, "tiny.csv")
    write_manifest(big, args.rows)
    write_manifest(tiny, 10)
    results = {"rows": args.rows, "bytes": os.path.getsize(big), "cpus": os.cpu_count(), "runs": []}
    for label, workers, split in (("split, 1 worker", 1, True), ("split, 2 workers", 2, True),
                                  ("unsplit (one reader), 2 workers", 2, False)):
        startup = timed_count(tiny, workers, split)
        total = timed_count(big, workers, split)
        rate = args.rows / max(total - startup, 1e-9)
        results["runs"].append({"run": label, "seconds": round(total, 2), "startup_seconds": round(startup, 2),
                                "rows_per_second": round(rate)})
        print(f"{label:34s} {total:7.1f} s total, {startup:5.1f} s start-up, {rate:10,.0f} rows/s", flush=True)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "manifest_read.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
