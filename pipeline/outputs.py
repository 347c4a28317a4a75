"""The output directory: checked before a run, described after it."""

from __future__ import annotations

import collections
import dataclasses
import uuid

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.embeddings_io import embedding_metadata, open_parquet
from transforms.sink import EMBEDDINGS_PREFIX, ERRORS_PREFIX, PIPELINE_DONE, output_files_pattern

# Written last by the launcher. The leading underscore makes dataset readers (pyarrow, pandas, Spark, DuckDB's hive
# reader) skip it, so that a reader of the folder sees only Parquet.
RUN_REPORT = "_run_report.json"
LEGACY_RUN_REPORT = "run_report.json"  # the name before: runs written then are finished runs too
# Any of these marks a finished run: the pipeline's own marker is there even when the launcher died before the end.
FINISHED_MARKERS = (RUN_REPORT, PIPELINE_DONE, LEGACY_RUN_REPORT)


class OutputDirError(ValueError):
    """The output directory cannot take this run's results."""


def _output_files(output_dir: str, prefix: str) -> list[str]:
    pattern = output_files_pattern(output_dir, prefix)
    try:
        return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    except Exception:  # a missing directory matches nothing
        return []


def earlier_results(output_dir: str, overwrite: bool) -> list[str]:
    """The files of an earlier run in `output_dir`; refused unless `overwrite`. Touches nothing.

    Mixing two runs' shards in one directory would silently double or lose rows for every reader.
    """
    previous = _output_files(output_dir, EMBEDDINGS_PREFIX) + _output_files(output_dir, ERRORS_PREFIX)
    for name in FINISHED_MARKERS:
        report = FileSystems.join(output_dir, name)
        if FileSystems.exists(report):
            previous.append(report)
    if previous and not overwrite:
        raise OutputDirError(
            f"{output_dir} already holds the results of an earlier run ({len(previous)} files); "
            f"choose a new --output or pass --overwrite to replace them."
        )
    return previous


def prepare_output_dir(output_dir: str, replaced: list[str]) -> None:
    """Creates `output_dir`, proves it writable, then removes the `replaced` files of an earlier run.

    Called last, after every other check passed: a refused run leaves the directory as it was.
    """
    probe = FileSystems.join(output_dir, f".write-probe-{uuid.uuid4().hex}")
    try:
        if not FileSystems.exists(output_dir):
            FileSystems.mkdirs(output_dir)
        with FileSystems.create(probe, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            f.write(b"ok")
        FileSystems.delete([probe])
    except Exception as exc:
        raise OutputDirError(f"Cannot write to --output {output_dir}: {' '.join(str(exc).split())}") from None
    if replaced:
        FileSystems.delete(replaced)


def is_finished_run(output_dir: str) -> bool:
    """Only a run with a finished marker (written after both sinks finished) is a complete result."""
    return any(FileSystems.exists(FileSystems.join(output_dir, name)) for name in FINISHED_MARKERS)


@dataclasses.dataclass
class OutputSummary:
    embedded: int
    errors_by_stage: dict
    metadata: dict
    embedding_files: list

    @property
    def errors(self) -> int:
        return sum(self.errors_by_stage.values())


def summarize_outputs(output_dir: str) -> OutputSummary:
    """Reads back what a run wrote: row counts, failures by stage and the model metadata."""
    embedded, metadata = 0, {}
    embedding_files = _output_files(output_dir, EMBEDDINGS_PREFIX)
    for path in embedding_files:
        with open_parquet(path) as parquet:
            embedded += parquet.metadata.num_rows
            metadata = embedding_metadata(parquet.schema_arrow)
    stages = collections.Counter()
    for path in _output_files(output_dir, ERRORS_PREFIX):
        with open_parquet(path) as parquet:
            stages.update(parquet.read(columns=["stage"]).column("stage").to_pylist())
    return OutputSummary(embedded, dict(stages), metadata, embedding_files)
