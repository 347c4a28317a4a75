"""Joins by id over more rows than memory should hold: rows split into buckets by a stable hash of their id.

Status and the current view compare the ids and uris of every live row and every committed vector. At
corpus scale (10M ids and more) these do not belong in the launcher's memory at once, so each table is
read a row group at a time, split into buckets by a stable hash of the id, and written to local Arrow
files; each bucket, a slice of the ids with all their rows, is then joined on its own. Memory holds one
bucket (ROWS_PER_BUCKET rows) and one row group, whatever the size of the index. The Beam pipelines that plan
an update and write a snapshot split their tables with the same `split` and group them by bucket, so that their
join moves Arrow tables, not one element per id.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zlib
from typing import Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa

from pipeline.embeddings_io import open_parquet, row_count

ROWS_PER_BUCKET = 1_000_000
READ_ROWS = 65536


def bucket_of(ids: list, buckets: int) -> np.ndarray:
    """A stable bucket for each id (the same in every process and run)."""
    return np.fromiter((zlib.crc32(i.encode()) % buckets for i in ids), np.int64, len(ids))


def split(table: pa.Table, buckets: int) -> Iterator[tuple]:
    """(bucket, the rows of `table` in it) for each bucket its `id` column reaches."""
    if buckets == 1:
        yield 0, table
        return
    where = bucket_of(table.column("id").to_pylist(), buckets)
    order = np.argsort(where, kind="stable")
    bounds = np.searchsorted(where[order], np.arange(buckets + 1))
    for bucket in np.flatnonzero(np.diff(bounds)):  # take, not slice: a pickled slice carries all its parent's rows
        yield int(bucket), table.take(order[bounds[bucket]:bounds[bucket + 1]])


def concat(tables: list, schema: pa.Schema) -> pa.Table:
    return pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()


def read_pairs(path: str, extra: dict) -> Iterator[pa.Table]:
    """id and uri of the Parquet file at `path`, READ_ROWS at a time, with the constant columns `extra`
    (name -> int) and `row`, the row number in the file."""
    with open_parquet(path, pre_buffer=False) as parquet:
        start = 0
        for batch in parquet.iter_batches(columns=["id", "uri"], batch_size=READ_ROWS):
            n = batch.num_rows
            columns = {"id": batch.column("id").cast(pa.string()), "uri": batch.column("uri").cast(pa.string()),
                       **{name: pa.array(np.full(n, value, np.int64)) for name, value in extra.items()},
                       "row": pa.array(np.arange(start, start + n, dtype=np.int64))}
            start += n
            yield pa.table(columns)


def read_pair_tables(path: str) -> Iterator[pa.Table]:
    """The (id, uri) columns of a Parquet file, READ_ROWS at a time."""
    for table in read_pairs(path, {}):
        yield table.select(["id", "uri"])


class Buckets:
    """Named sides of a join, each a stream of tables with an `id` column, split into buckets on local disk."""

    def __init__(self, rows: int, folder: Optional[str] = None):
        self.count = max(1, -(-rows // ROWS_PER_BUCKET))
        self._folder = tempfile.mkdtemp(prefix="index-join-", dir=folder)
        self._writers: dict = {}
        self._schemas: dict = {}

    def __enter__(self) -> "Buckets":
        return self

    def __exit__(self, *exc) -> None:
        for writer in self._writers.values():
            writer.close()
        shutil.rmtree(self._folder, ignore_errors=True)

    def _path(self, side: str, bucket: int) -> str:
        return os.path.join(self._folder, f"{side}-{bucket:05d}.arrow")

    def add(self, side: str, tables: Iterator[pa.Table], schema: pa.Schema) -> None:
        self._schemas[side] = schema
        for table in tables:
            for bucket, part in split(table.select(schema.names).cast(schema), self.count):
                self._write(side, bucket, part)

    def _write(self, side: str, bucket: int, table: pa.Table) -> None:
        key = (side, bucket)
        if key not in self._writers:
            self._writers[key] = pa.ipc.new_file(self._path(side, bucket), table.schema)
        self._writers[key].write_table(table)

    def __iter__(self) -> Iterator[dict]:
        """Each bucket as {side: table}; a side with no rows in a bucket is an empty table."""
        for writer in self._writers.values():
            writer.close()
        self._writers = {}
        for bucket in range(self.count):
            found = {}
            for side, schema in self._schemas.items():
                path = self._path(side, bucket)
                found[side] = (pa.ipc.open_file(pa.memory_map(path)).read_all() if os.path.exists(path)
                               else schema.empty_table())
            yield found


def total_rows(paths: Sequence[str]) -> int:
    return sum(row_count(path) for path in paths)
