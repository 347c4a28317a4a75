"""A PostgreSQL table with pgvector, written in one transaction per publish.

    TABLE (id text PRIMARY KEY, uri text NOT NULL, sha256 text, embedding vector(DIM) NOT NULL)
    beam_image_embeddings_published (table_name text PRIMARY KEY, state jsonb NOT NULL)   what each table holds

The rows that entered the view are COPYed (binary) into a temporary table, then upserted (the first publish
COPYs straight into the new table); removed ids are deleted, the row count is checked against the view and
the state recorded, all in one transaction: readers see the old view or the new one, and a publish killed at
any point changes nothing. An advisory lock per table serialises publishers, and the state read before the
diff must still be the state at commit.
"""

from __future__ import annotations

import re
import struct
import time
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa

from pipeline.publish.state import PublishFailed, PublishRefused, PublishState
from pipeline.search.collection import Batch
from transforms import crashpoints

STATE_TABLE = "beam_image_embeddings_published"
# Lower case: PostgreSQL folds unquoted names, so the name people type in queries is the name of the table.
TABLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,50}(\.[a-z_][a-z0-9_]{0,50})?$")
# pgvector's HNSW and IVFFlat index `vector` columns of at most this many dimensions.
MAX_INDEXED_DIM = 2000


def _masked(url: str) -> str:
    """The URL without its password, wherever libpq takes one: `user:pw@`, or a `password=` parameter."""
    import urllib.parse

    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # a URL that does not parse shows nothing that could be a secret
        return f"{url.split('://', 1)[0]}://***"
    masked = url
    if parts.password is not None:
        masked = masked.replace(f":{parts.password}@", ":***@", 1)
    if parts.query:
        fields = ["password=***" if field.split("=", 1)[0].lower() == "password" else field
                  for field in parts.query.split("&")]
        masked = masked.replace(f"?{parts.query}", "?" + "&".join(fields), 1)
    return masked


def vector_bytes(vectors: np.ndarray) -> list:
    """pgvector's binary form of each row: dimensions and a zero (uint16, big-endian), then big-endian float32."""
    header = struct.pack(">HH", vectors.shape[1], 0)
    big_endian = np.ascontiguousarray(vectors, dtype=">f4")
    return [header + row.tobytes() for row in big_endian]


class PostgresTable:
    def __init__(self, url: str, table: str):
        import psycopg
        from psycopg import sql

        if not TABLE_NAME.match(table):
            raise PublishRefused(f"--table {table!r}: use a plain name or schema.name (lower-case letters, digits, _).")
        self.described = f"{_masked(url)} table {table}"
        self._key = table
        self._table = sql.Identifier(*table.split("."))
        self._index_name = table.split(".")[-1] + "_embedding_hnsw"  # made in the table's schema
        self._index = sql.Identifier(self._index_name)
        try:
            self._conn = psycopg.connect(url, connect_timeout=30, autocommit=True)  # transactions are explicit
        except psycopg.Error as exc:
            raise PublishFailed(f"Cannot connect to {_masked(url)}: {str(exc).strip()}") from None

    def close(self) -> None:
        self._conn.close()

    def _run(self, query: str, params=(), **parts):
        """Executes `query` with {table}, {index} and {state} (and `parts`) filled in as SQL identifiers."""
        from psycopg import sql

        return self._conn.execute(sql.SQL(query).format(table=self._table, index=self._index,
                                                        state=sql.Identifier(STATE_TABLE), **parts), params)

    def _read_state(self) -> tuple[bool, Optional[PublishState]]:
        exists = self._run("SELECT to_regclass(%s) IS NOT NULL", [self._key]).fetchone()[0]
        if not self._run("SELECT to_regclass(%s) IS NOT NULL", [STATE_TABLE]).fetchone()[0]:
            return exists, None
        row = self._run("SELECT state::text FROM {state} WHERE table_name = %s", [self._key]).fetchone()
        return exists, PublishState.from_json(row[0], f"{STATE_TABLE} ({self._key})") if row else None

    def state(self) -> Optional[PublishState]:
        with self._conn.transaction():
            exists, state = self._read_state()
        if exists and state is None:
            raise PublishRefused(f"{self.described} exists and was not written by publish (no row in "
                                 f"{STATE_TABLE}); publish to another --table, or drop it first.")
        return state if exists else None

    def rows(self) -> int:
        with self._conn.transaction():
            return self._run("SELECT count(*) FROM {table}").fetchone()[0]

    def _ensure_vector_extension(self) -> None:
        if self._run("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone():
            return
        try:
            with self._conn.transaction():
                self._run("CREATE EXTENSION IF NOT EXISTS vector")
        except Exception as exc:
            raise PublishFailed(f"{self.described}: the database lacks the pgvector extension and this role cannot "
                                f"create it ({str(exc).strip()}). Ask its owner to run CREATE EXTENSION vector.") \
                from None

    def write(self, batches: Iterator[Batch], removed: pa.Array, dim: int, before: Optional[PublishState],
              after: PublishState, replace: bool) -> None:
        import psycopg
        from psycopg import sql

        self._ensure_vector_extension()
        try:
            with self._conn.transaction():
                self._run("SELECT pg_advisory_xact_lock(hashtext(%s))", ["beam_image_embeddings:" + self._key])
                exists, state = self._read_state()
                if (state if exists else None) != before:
                    raise PublishFailed(f"Another publish changed {self.described} while this one prepared; "
                                        f"nothing was changed by this one. Run it again.")
                self._run("CREATE TABLE IF NOT EXISTS {state} (table_name text PRIMARY KEY, state jsonb NOT NULL)")
                if not exists:  # a new table takes the rows directly
                    self._run("CREATE TABLE {table} (id text PRIMARY KEY, uri text NOT NULL, sha256 text, "
                              "embedding vector({dim}) NOT NULL)", dim=sql.Literal(int(dim)))
                    self._copy_rows(batches, self._table)
                else:
                    self._run("CREATE TEMPORARY TABLE publish_rows (LIKE {table}) ON COMMIT DROP")
                    self._copy_rows(batches, sql.Identifier("publish_rows"))
                    crashpoints.reach("publish.postgres.copied")
                    if replace:
                        self._run("DELETE FROM {table} t WHERE NOT EXISTS (SELECT 1 FROM publish_rows r WHERE "
                                  "r.id = t.id)")
                    self._run("INSERT INTO {table} (id, uri, sha256, embedding) SELECT id, uri, sha256, embedding "
                              "FROM publish_rows ON CONFLICT (id) DO UPDATE SET uri = EXCLUDED.uri, sha256 = "
                              "EXCLUDED.sha256, embedding = EXCLUDED.embedding")
                if len(removed):
                    self._run("DELETE FROM {table} WHERE id = ANY(%s)", [removed.to_pylist()])
                found = self._run("SELECT count(*) FROM {table}").fetchone()[0]
                if found != after.rows:
                    raise PublishRefused(
                        f"{self.described} would hold {found:,} rows, not the view's {after.rows:,}: it was changed "
                        f"by something else. Nothing was changed; run again with --full to rewrite it.")
                self._run("INSERT INTO {state} VALUES (%s, %s::jsonb) ON CONFLICT (table_name) DO UPDATE SET "
                          "state = EXCLUDED.state", [self._key, after.to_json()])
                standin = "STAND-IN VECTORS of random weights, NOT meaningful: " \
                    if str(after.metadata.get("weights", "")).startswith("STAND-IN") else ""
                self._run("COMMENT ON TABLE {table} IS {comment}", comment=sql.Literal(
                    f"{standin}Image embeddings of {after.metadata.get('model')} ({after.metadata.get('fingerprint')}), "
                    f"the view of an index after {after.seq} log entries, written by python -m pipeline.index "
                    f"publish."))
        except psycopg.Error as exc:
            raise PublishFailed(f"{self.described}: {str(exc).strip()}; nothing was changed.") from None

    def _copy_rows(self, batches: Iterator[Batch], into) -> None:
        from psycopg import sql

        with self._conn.cursor().copy(sql.SQL("COPY {} (id, uri, sha256, embedding) FROM STDIN (FORMAT BINARY)")
                                      .format(into)) as copy:
            copy.set_types(["text", "text", "text", "bytea"])  # the vector's bytes go as they are (vector_bytes)
            for batch in batches:
                for row in zip(batch.ids, batch.uris, batch.sha256, vector_bytes(batch.vectors)):
                    copy.write_row(row)

    def ensure_ann_index(self, rows_written: bool) -> Optional[str]:
        """HNSW (cosine) after the first load, then kept current by PostgreSQL itself."""
        import psycopg

        dim = self._run("SELECT atttypmod FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = "
                        "'embedding'", [self._key]).fetchone()[0]
        if dim > MAX_INDEXED_DIM:
            return (f"no HNSW index: pgvector indexes vectors of at most {MAX_INDEXED_DIM:,} dimensions, these have "
                    f"{dim:,}; queries scan the table")
        schema = self._key.split(".")[0] if "." in self._key else None
        found = self._run("SELECT 1 FROM pg_indexes WHERE indexname = %s AND schemaname = coalesce(%s, "
                          "current_schema())", [self._index_name, schema]).fetchone()
        if found:
            return None
        started = time.monotonic()
        try:
            with self._conn.transaction():
                self._run("CREATE INDEX IF NOT EXISTS {index} ON {table} USING hnsw (embedding vector_cosine_ops)")
        except psycopg.Error as exc:
            raise PublishFailed(f"{self.described}: the rows are published, but the HNSW index failed: "
                                f"{str(exc).strip()}. Publish again to retry it.") from None
        return f"HNSW index (cosine) built in {time.monotonic() - started:.1f} s"

