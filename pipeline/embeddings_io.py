"""Reading the pipeline's Parquet files (`embeddings-*.parquet` above all): footers, `embedding.*` metadata, vectors.

One definition for run, index, search and publish, on every filesystem Beam reads; the schema itself is the
sink's (transforms/sink.py: embeddings_schema).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import pyarrow as pa
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.sink import METADATA_PREFIX


@contextlib.contextmanager
def open_parquet(path: str, pre_buffer: bool = True) -> Iterator:
    """The Parquet file at `path` (local, gs://, ...) as a pyarrow ParquetFile, open for the `with` block.

    `pre_buffer=False` for reading row group by row group: pre-buffering a row group doubled peak memory."""
    import pyarrow.parquet as pq

    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        yield pq.ParquetFile(f, pre_buffer=pre_buffer)


def embedding_metadata(schema: pa.Schema) -> dict[str, str]:
    """The `embedding.*` key/value metadata of an embeddings file's schema, without the prefix."""
    return {key.decode()[len(METADATA_PREFIX):]: value.decode() for key, value in (schema.metadata or {}).items()
            if key.decode().startswith(METADATA_PREFIX)}


def file_metadata(path: str) -> dict[str, str]:
    """embedding_metadata of the file at `path`, read from its footer alone."""
    with open_parquet(path) as parquet:
        return embedding_metadata(parquet.schema_arrow)


def row_count(path: str) -> int:
    """The rows of the Parquet file at `path`, from its footer."""
    with open_parquet(path) as parquet:
        return parquet.metadata.num_rows


def vectors(rows, dim: int) -> np.ndarray:
    """The `embedding` column of a table or record batch as float32 [rows, dim]."""
    column = rows.column("embedding")
    flat = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return flat.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)
