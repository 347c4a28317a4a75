"""The current view of an index: for every live (id, uri) of the last update, the latest committed vector for it.

`index_status` counts it from the id and uri columns (pyarrow joins, no vectors read); `WriteSnapshot` writes
it as one dataset with a Beam pipeline, so that it scales with the index.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.index.plan import read_pairs
from pipeline.index.store import IndexStore, LogEntry
from transforms.embed import Embedding
from transforms.sink import METADATA_PREFIX, WriteEmbeddings


def _pairs_table(files: Sequence[tuple]) -> pa.Table:
    """id, uri, seq of every row of the given (seq, path) Parquet files."""
    import pyarrow.parquet as pq

    tables = []
    for seq, path in files:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            table = pq.read_table(f, columns=["id", "uri"])
        tables.append(table.append_column("seq", pa.array(np.full(table.num_rows, seq, np.int64))))
    empty = pa.table({"id": pa.array([], pa.string()), "uri": pa.array([], pa.string()),
                      "seq": pa.array([], pa.int64())})
    return pa.concat_tables([t.cast(empty.schema) for t in tables]) if tables else empty


@dataclasses.dataclass(frozen=True)
class IndexStatus:
    runs: int
    updates: int
    live_ids: int  # ids in the input as of the last finished update
    embedded: int  # live ids with a vector: the current view
    failed: int  # live ids without a vector (their last attempt failed)
    superseded_vectors: int  # vectors of finished updates not in the current view
    removed_ids: int  # ids with vectors of finished updates that are no longer live
    pending_vectors: int  # vectors of committed runs of an update that did not finish (the next one uses them)
    last_update: Optional[str]
    unfinished_updates: tuple  # updates that began and did not finish
    running_update: Optional[str]  # the holder of the lease, if any
    leftovers: tuple  # folders the next update removes


def vector_files(store: IndexStore, entries: Sequence[LogEntry]) -> list[tuple]:
    """(seq, path) of every committed embeddings file, oldest run first."""
    return [(run.seq, path) for run in store.committed_runs(entries) for path in store.run_files(run)]


def _live_and_vectors(store: IndexStore, entries: Sequence[LogEntry]) -> tuple[pa.Table, pa.Table]:
    last = store.latest_update(entries)
    live = _pairs_table([(0, path) for path in store.live_files(last)]) if last else _pairs_table([])
    return live, _pairs_table(vector_files(store, entries))


def current_rows(store: IndexStore, entries: Sequence[LogEntry]) -> pa.Table:
    """(id, uri, seq) of the current view: each live (id, uri) with the run seq of its latest vector."""
    live, vectors = _live_and_vectors(store, entries)
    latest = vectors.group_by(["id", "uri"]).aggregate([("seq", "max")]).rename_columns(["id", "uri", "seq"])
    return live.select(["id", "uri"]).join(latest, ["id", "uri"], join_type="inner")


def index_status(store: IndexStore, running_update: Optional[str] = None) -> IndexStatus:
    """Counts of the committed state; what an update in progress (`running_update`) wrote is not counted."""
    entries = store.log()
    runs = store.committed_runs(entries)
    last = store.latest_update(entries)
    finished = {e.body["update"] for e in entries if e.kind == "update"}
    live, vectors = _live_and_vectors(store, entries)
    pending = _pairs_table(vector_files(store, [r for r in runs if r.body.get("update") not in finished]))
    settled = _pairs_table(vector_files(store, [r for r in runs if r.body.get("update") in finished]))
    current = live.select(["id", "uri"]).join(vectors.group_by(["id", "uri"]).aggregate([]), ["id", "uri"],
                                              join_type="inner")
    settled_current = live.select(["id", "uri"]).join(settled.group_by(["id", "uri"]).aggregate([]),
                                                      ["id", "uri"], join_type="inner")
    removed = settled.group_by(["id"]).aggregate([]).join(live.select(["id"]), "id", join_type="left anti")
    begun = [e.body["update"] for e in entries if e.kind == "begin"]
    return IndexStatus(
        runs=len(runs),
        updates=len(finished),
        live_ids=live.num_rows,
        embedded=current.num_rows,
        failed=live.num_rows - current.num_rows,
        superseded_vectors=settled.num_rows - settled_current.num_rows,
        removed_ids=removed.num_rows,
        pending_vectors=pending.num_rows,
        last_update=last.body["committed_at"] if last else None,
        unfinished_updates=tuple(u for u in begun if u not in finished and u != running_update),
        running_update=running_update,
        leftovers=tuple(store.leftovers(entries, keep_update=running_update)),
    )


def _read_vectors(task: tuple) -> Iterator[tuple]:
    """(seq, path) -> (id, (seq, uri, vector, sha256)) for every row of a committed embeddings file."""
    import pyarrow.parquet as pq

    seq, path = task
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        parquet = pq.ParquetFile(f)
        dim = parquet.schema_arrow.field("embedding").type.list_size
        for batch in parquet.iter_batches(batch_size=1024):
            matrix = batch.column("embedding").flatten().to_numpy().reshape(-1, dim)
            names = batch.schema.names
            digests = batch.column("sha256").to_pylist() if "sha256" in names else [None] * batch.num_rows
            for id_, uri, vector, digest in zip(batch.column("id").to_pylist(), batch.column("uri").to_pylist(),
                                                matrix, digests):
                yield id_, (seq, uri, vector.copy(), digest)


def _current(id_and_groups) -> list:
    """[the Embedding of a live id's latest vector for its live uri], or [] (removed, or never embedded)."""
    id_, groups = id_and_groups
    live = list(groups["live"])
    uri = live[0][1] if live else None
    matching = [(seq, vector, digest) for seq, vector_uri, vector, digest in groups["vectors"]
                if uri is not None and vector_uri == uri]
    if not matching:
        return []
    _, vector, digest = max(matching, key=lambda found: found[0])
    return [Embedding(id_, uri, vector, digest)]


def view_metadata(store: IndexStore, entries: Sequence[LogEntry]) -> dict[str, str]:
    """The embedding.* metadata (without the prefix) of the latest committed run's files; without runs, what
    index.json recorded at `create`, which is what every run's files carry."""
    import pyarrow.parquet as pq

    runs = store.committed_runs(entries)
    files = store.run_files(runs[-1]) if runs else []
    if not files:
        return {k: str(v) for k, v in store.identity().items() if k not in ("format", "created_at")}
    with FileSystems.open(files[0], compression_type=CompressionTypes.UNCOMPRESSED) as f:
        metadata = pq.ParquetFile(f).schema_arrow.metadata or {}
    return {k.decode()[len(METADATA_PREFIX):]: v.decode() for k, v in metadata.items()
            if k.decode().startswith(METADATA_PREFIX)}


class WriteSnapshot(beam.PTransform):
    """The current view -> OUTPUT/embeddings-*.parquet, with the schema and metadata of the index's runs."""

    def __init__(self, store: IndexStore, entries: Sequence[LogEntry], output_dir: str):
        super().__init__()
        last = store.latest_update(entries)
        self._live = [(0, path) for path in store.live_files(last)] if last else []
        self._vectors = vector_files(store, entries)
        self._metadata = view_metadata(store, entries)
        self._output_dir = output_dir

    def expand(self, pbegin):
        keyed = {
            "live": pbegin | "LiveFiles" >> beam.Create(self._live) | "ReadLive" >> beam.FlatMap(read_pairs),
            "vectors": (pbegin | "VectorFiles" >> beam.Create(self._vectors) | "Spread" >> beam.Reshuffle()
                        | "ReadVectors" >> beam.FlatMap(_read_vectors)),
        }
        dim = int(self._metadata["dim"])
        return (keyed | "GroupById" >> beam.CoGroupByKey() | "Latest" >> beam.FlatMap(_current)
                | "Write" >> WriteEmbeddings(self._output_dir, dim, self._metadata))
