"""Sink: Parquet files of embeddings and of failures, with the model and preprocessing in the metadata.

    OUT_DIR/embeddings-SSSSS-of-NNNNN.parquet   id string not null, uri string, sha256 string
                                                (of the encoded bytes), embedding fixed_size_list<float32>[dim]
    OUT_DIR/errors-SSSSS-of-NNNNN.parquet       id, uri, stage, error (all strings)

    OUT_DIR/_pipeline_done.json                 written by the pipeline itself once both sinks finished: the
                                                counts and file names (a launcher that died meanwhile is not needed)

Rows are converted to Arrow in batches (one numpy concatenate per batch, no per-float Python work)
and written with Beam's file sink, which writes temporary files and renames them only when the
whole write has succeeded.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import shutil
from typing import Mapping, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from transforms import crashpoints
from transforms.embed import Embedding
from transforms.records import Failure
from transforms.row_checks import writable

EMBEDDINGS_PREFIX = "embeddings"
ERRORS_PREFIX = "errors"
PARQUET_SUFFIX = ".parquet"
METADATA_PREFIX = "embedding."
PARTIAL_PREFIX = "beam-temp-"  # Beam's file sinks write here first and rename on success
PIPELINE_DONE = "_pipeline_done.json"
_ROWS_PER_TABLE = 1024


def output_files_pattern(output_dir: str, prefix: str) -> str:
    """The glob of one kind of output file, e.g. OUT_DIR/embeddings-*.parquet."""
    return FileSystems.join(output_dir, f"{prefix}-*{PARQUET_SUFFIX}")


def embeddings_schema(dim: int, metadata: Mapping[str, str]) -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("uri", pa.string()),
            pa.field("sha256", pa.string()),
            pa.field("embedding", pa.list_(pa.float32(), dim)),
        ],
        metadata={f"{METADATA_PREFIX}{key}": str(value) for key, value in metadata.items()},
    )


ERRORS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("uri", pa.string()),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("error", pa.string(), nullable=False),
        pa.field("bytes_version", pa.string()),
    ]
)


def embeddings_table(rows: Sequence[Embedding], schema: pa.Schema) -> pa.Table:
    dim = schema.field("embedding").type.list_size
    flat = np.concatenate([np.asarray(row.vector, np.float32).reshape(-1) for row in rows])
    if flat.size != dim * len(rows):
        raise ValueError(f"Embeddings do not all have {dim} values.")
    return pa.Table.from_arrays(
        [
            pa.array([row.id for row in rows], pa.string()),
            pa.array([row.uri for row in rows], pa.string()),
            pa.array([row.sha256 for row in rows], pa.string()),
            pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim),
        ],
        schema=schema,
    )


def errors_table(rows: Sequence[Failure], schema: pa.Schema) -> pa.Table:
    """Every failure row can be written: text that is not valid UTF-8 (lone surrogates) is escaped."""
    return pa.Table.from_pylist([{k: writable(v) if isinstance(v, str) else v for k, v in row._asdict().items()}
                                 for row in rows], schema=schema)


class _WriteParquet(beam.PTransform):
    def __init__(self, path_prefix: str, schema: pa.Schema, to_table):
        super().__init__()
        self._path_prefix = path_prefix
        self._schema = schema
        self._to_table = to_table

    def expand(self, rows):
        schema, to_table = self._schema, self._to_table
        return (
            rows
            | "Batch" >> beam.BatchElements(min_batch_size=_ROWS_PER_TABLE, max_batch_size=_ROWS_PER_TABLE)
            | "ToArrow" >> beam.Map(lambda batch: to_table(batch, schema))
            | "Write"
            >> beam.io.WriteToParquetBatched(
                self._path_prefix, schema, codec="snappy", file_name_suffix=PARQUET_SUFFIX
            )
        )


class WriteEmbeddings(_WriteParquet):
    """PCollection[Embedding] -> OUT_DIR/embeddings-*.parquet."""

    def __init__(self, output_dir: str, dim: int, metadata: Mapping[str, str]):
        super().__init__(
            FileSystems.join(output_dir, EMBEDDINGS_PREFIX), embeddings_schema(dim, metadata), embeddings_table
        )


class WriteErrors(_WriteParquet):
    """PCollection[Failure] -> OUT_DIR/errors-*.parquet."""

    def __init__(self, output_dir: str):
        super().__init__(FileSystems.join(output_dir, ERRORS_PREFIX), ERRORS_SCHEMA, errors_table)


class MarkFinished(beam.PTransform):
    """Writes OUT_DIR/_pipeline_done.json as the job's last step, after both sinks renamed their files.

    A long job on a remote runner outlives its launcher when a laptop sleeps or a Cloud Shell drops; the launcher's
    run report is then never written, but this marker is, so the finished output still counts as a finished run.
    Input: {"files": the sinks' outputs (final paths), NAME: a PCollection to count, ...}; one shuffle counts them all.
    """

    def __init__(self, output_dir: str):
        super().__init__()
        self._output_dir = output_dir

    def expand(self, parts):
        counted = [pcoll | f"Name_{name}" >> beam.Map(lambda _, name=name: name)
                   for name, pcoll in sorted(parts.items()) if name != "files"]
        counts = counted | "Kinds" >> beam.Flatten() | "Count" >> beam.combiners.Count.PerElement()
        names = sorted(name for name in parts if name != "files")
        return (
            parts["files"]
            | "FileNames" >> beam.combiners.ToList()
            | "Write" >> beam.Map(_write_marker, self._output_dir, names, beam.pvalue.AsDict(counts))
        )


def _write_marker(files, output_dir, names, counts) -> str:
    crashpoints.reach("run.finishing")
    remove_partial_outputs(output_dir)  # a runner's failed attempts (restarts) leave their temporary folders
    path = FileSystems.join(output_dir, PIPELINE_DONE)
    marker = {
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "counts": {name: counts.get(name, 0) for name in names},
        "files": sorted(name.rsplit("/", 1)[-1] for name in files),
    }
    with FileSystems.create(path) as f:
        f.write(json.dumps(marker, indent=2).encode())
    return path


def remove_partial_outputs(folder: str) -> list[str]:
    """Deletes the beam-temp-* folders stopped sinks left in `folder`; returns what it removed.

    After Ctrl-C, and after a runner retried a write: a restarted job makes new temporary folders, and Beam's
    finalization removes only those of the attempt that succeeded.
    """
    if "://" not in folder:  # local: empty temporary folders too, which no file pattern matches
        found = sorted(glob.glob(os.path.join(glob.escape(folder), PARTIAL_PREFIX + "*")))
        for path in found:
            shutil.rmtree(path, ignore_errors=True)
        return found
    pattern = FileSystems.join(folder, PARTIAL_PREFIX + "*", "*")
    try:
        files = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    except Exception:  # nothing there, or nothing readable: nothing to remove
        return []
    if files:
        FileSystems.delete(files)
    folders = sorted({path.rsplit("/", 1)[0] for path in files})
    for path in folders:
        if FileSystems.exists(path):
            FileSystems.delete([path])
    return folders
