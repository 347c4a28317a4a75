"""A LanceDB table (a local folder, or gs:// and other object stores Lance supports).

    TABLE: id string (not null), uri string, sha256 string, embedding fixed_size_list<float32>[DIM]
    the `embedding` field's metadata, key beam_image_embeddings.published: the PublishState (JSON)

Lance commits each operation as a new table version, so a publish is several commits: the state with
`pending` set, the upserts (merge_insert on id, MERGE_ROWS rows a commit), the deletes, the final state. Each is
atomic and repeating any of them changes nothing, so a publish killed between two of them is finished by the
next one (sync.py). The first publish, and --full, write the whole view as one new version. LanceDB indexes
vectors itself once the table reaches --ann_min_rows (IVF-PQ, cosine); later publishes add new rows to it.
"""

from __future__ import annotations

import functools
import os
import re
import time
from typing import Iterator, Optional

import pyarrow as pa

from pipeline.publish.state import PublishFailed, PublishRefused, PublishState
from pipeline.search.collection import Batch
from transforms import crashpoints

STATE_KEY = "beam_image_embeddings.published"
MERGE_ROWS = 16384  # rows per merge_insert commit: bounds the memory of an upsert of millions of rows
DELETE_IDS = 4096  # ids per delete predicate
TABLE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")  # what LanceDB accepts


def table_schema(dim: int, state: PublishState) -> pa.Schema:
    return pa.schema([pa.field("id", pa.string(), nullable=False), ("uri", pa.string()), ("sha256", pa.string()),
                      pa.field("embedding", pa.list_(pa.float32(), dim), metadata={STATE_KEY: state.to_json()})])


def _record_batches(batches: Iterator[Batch], schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    dim = schema.field("embedding").type.list_size
    for batch in batches:
        yield pa.RecordBatch.from_arrays(
            [pa.array(batch.ids, pa.string()), pa.array(batch.uris, pa.string()), pa.array(batch.sha256, pa.string()),
             pa.FixedSizeListArray.from_arrays(pa.array(batch.vectors.reshape(-1)), dim)], schema=schema)


def _chunks(batches: Iterator[pa.RecordBatch], schema: pa.Schema, rows: int) -> Iterator[pa.Table]:
    pending, count = [], 0
    for batch in batches:
        pending.append(batch)
        count += batch.num_rows
        if count >= rows:
            yield pa.Table.from_batches(pending, schema)
            pending, count = [], 0
    if pending:
        yield pa.Table.from_batches(pending, schema)


def _quoted(ids: list) -> str:
    return ", ".join("'" + i.replace("'", "''") + "'" for i in ids)


def sub_vectors(dim: int) -> int:
    """IVF-PQ sub-vectors of 16 (else 8, 4, 2, 1) dimensions each: LanceDB's recommended widths."""
    return next(dim // width for width in (16, 8, 4, 2, 1) if dim % width == 0)


def _failures_reported(method):
    """LanceDB's I/O and commit errors as PublishFailed: what was committed stays, and the next publish goes on."""
    @functools.wraps(method)
    def reported(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except PublishFailed:
            raise
        except (OSError, RuntimeError) as exc:
            raise PublishFailed(f"{self.described}: {exc}. Run publish again; it continues from what was "
                                f"committed.") from None
    return reported


class LanceTable:
    def __init__(self, uri: str, table: str, ann_min_rows: int):
        os.environ.setdefault("LANCEDB_LOG", "error")  # not a warning on stderr for every table it creates
        import lancedb

        if not TABLE_NAME.match(table):
            raise PublishRefused(f"--table {table!r}: LanceDB table names are letters, digits, _, - and .")
        self.described = f"LanceDB {uri} table {table}"
        self._name = table
        self._ann_min_rows = ann_min_rows
        try:
            self._db = lancedb.connect(uri)
        except Exception as exc:
            raise PublishFailed(f"Cannot open the LanceDB database {uri} (on gs://, LanceDB uses "
                                f"GOOGLE_APPLICATION_CREDENTIALS or the metadata server's account): {exc}") from None

    def close(self) -> None:
        pass

    def _open(self):
        try:
            return self._db.open_table(self._name)
        except ValueError:  # "Table '...' was not found"
            return None

    @_failures_reported
    def state(self) -> Optional[PublishState]:
        table = self._open()
        if table is None:
            return None
        schema = table.schema
        recorded = (schema.field("embedding").metadata or {}).get(STATE_KEY.encode()) \
            if "embedding" in schema.names else None
        if recorded is None:
            raise PublishRefused(f"{self.described} exists and was not written by publish (no {STATE_KEY} "
                                 f"on its embedding column); publish to another --table.")
        return PublishState.from_json(recorded.decode(), self.described)

    @_failures_reported
    def rows(self) -> int:
        return self._open().count_rows()

    def _record(self, table, state: PublishState) -> None:
        table.update_field_metadata({"path": "embedding", "metadata": {STATE_KEY: state.to_json()}})

    @_failures_reported
    def write(self, batches: Iterator[Batch], removed: pa.Array, dim: int, before: Optional[PublishState],
              after: PublishState, replace: bool) -> None:
        schema = table_schema(dim, after)
        rows = _record_batches(batches, schema)
        if replace:  # one new version holding the whole view; readers keep the old one until it commits
            self._db.create_table(self._name, data=pa.RecordBatchReader.from_batches(schema, rows), schema=schema,
                                  mode="overwrite")
            return
        table = self._open()
        self._record(table, before.begun(after.seq))
        crashpoints.reach("publish.lancedb.pending")
        for chunk in _chunks(rows, schema, MERGE_ROWS):
            table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(chunk)
            crashpoints.reach("publish.lancedb.upserted")
        ids = removed.to_pylist()
        for start in range(0, len(ids), DELETE_IDS):
            table.delete(f"id IN ({_quoted(ids[start:start + DELETE_IDS])})")
        crashpoints.reach("publish.lancedb.deleted")
        found = table.count_rows()
        if found != after.rows:
            raise PublishFailed(f"{self.described} holds {found:,} rows after the publish, not the view's "
                                 f"{after.rows:,}: it was changed by something else. Run again with --full to "
                                 f"rewrite it from the index.")
        self._record(table, after)

    @_failures_reported
    def ensure_ann_index(self, rows_written: bool) -> Optional[str]:
        table = self._open()
        indexed = any("embedding" in index.columns for index in table.list_indices())
        if rows_written:
            started = time.monotonic()
            table.optimize()  # compacts the small files merge_insert wrote, indexes the new rows
            if indexed:
                return f"ANN index updated with the new rows in {time.monotonic() - started:.1f} s"
        if indexed:
            return None
        rows = table.count_rows()
        if rows < self._ann_min_rows:
            return (f"no ANN index below --ann_min_rows {self._ann_min_rows:,} rows ({rows:,} now): queries scan "
                    f"the table")
        from lancedb.index import IvfPq

        started = time.monotonic()
        table.create_index("embedding", config=IvfPq(distance_type="cosine",
                                                     num_sub_vectors=sub_vectors(table.schema.field("embedding")
                                                                                 .type.list_size)))
        return f"ANN index (IVF-PQ, cosine) built in {time.monotonic() - started:.1f} s"
