"""The current view of an index: for every live (id, uri) of the last update, the latest committed vector for it.

`index_status` counts it and `current_selection` finds its rows from the id and uri columns alone (pyarrow
joins, bucket by bucket through local files: spill.py); `WriteSnapshot` writes it as one dataset with a Beam
pipeline, so that it scales with the index.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa

from pipeline.embeddings_io import file_metadata, open_parquet, row_count, vectors
from pipeline.index.plan import ToBuckets, bucket_count
from pipeline.index.spill import Buckets, concat, read_pair_tables, read_pairs, total_rows
from pipeline.index.store import IndexStore, LogEntry
from transforms.embed import Embedding
from transforms.sink import WriteEmbeddings


@dataclasses.dataclass(frozen=True)
class IndexStatus:
    runs: int
    updates: int
    live_ids: int  # ids in the input as of the last finished update
    embedded: int  # live ids with a vector: the current view
    failed: int  # live ids without a vector (their last attempt failed)
    failed_for_good: int  # of `failed`, those whose bytes do not decode: not read again until they change
    superseded_vectors: int  # vectors of finished updates not in the current view
    removed_ids: int  # ids with vectors of finished updates that are no longer live
    pending_vectors: int  # vectors of committed runs of an update that did not finish (the next one uses them)
    last_update: Optional[str]
    unfinished_updates: tuple  # updates that began and did not finish
    running_update: Optional[str]  # the holder of the lease, if any
    leftovers: tuple  # folders the next update removes
    engines: tuple = ()  # the engines the committed runs used (run log entries), oldest first, each once


def vector_files(store: IndexStore, entries: Sequence[LogEntry]) -> list[tuple]:
    """(seq, path) of every committed embeddings file, oldest run first."""
    return [(run.seq, path) for run in store.committed_runs(entries) for path in store.run_files(run)]


LIVE_SCHEMA = pa.schema([("id", pa.string()), ("uri", pa.string())])
VECTOR_SCHEMA = pa.schema([("id", pa.string()), ("uri", pa.string()), ("seq", pa.int64()), ("file", pa.int64()),
                           ("row", pa.int64())])


def _joined(store: IndexStore, entries: Sequence[LogEntry], files: Sequence[tuple],
            earlier: Sequence[int] = ()) -> Buckets:
    """The last update's live (id, uri) and the (id, uri, seq, file, row) of every row of `files`, bucketed by id;
    for each log length `n` of `earlier`, side `live@n` is the live (id, uri) of the last update among the first
    n entries (the view as it was then)."""
    lives = {"live": store.latest_update(entries)}
    lives.update({f"live@{n}": store.latest_update(entries[:n]) for n in earlier})
    paths = {side: store.live_files(update) if update else [] for side, update in lives.items()}
    buckets = Buckets(sum(map(total_rows, paths.values())) + total_rows([path for _, path in files]))
    for side, live in paths.items():
        buckets.add(side, (t for path in live for t in read_pairs(path, {})), LIVE_SCHEMA)
    buckets.add("vectors", (t for number, (seq, path) in enumerate(files)
                            for t in read_pairs(path, {"seq": seq, "file": number})), VECTOR_SCHEMA)
    return buckets


def _distinct_pairs(table: pa.Table) -> pa.Table:
    return table.group_by(["id", "uri"]).aggregate([])


def latest_rows(live: pa.Table, vectors: pa.Table) -> pa.Table:
    """(id, file, row) of the latest vector (highest seq) of each live (id, uri) among `vectors` (VECTOR_SCHEMA)."""
    latest = vectors.group_by(["id", "uri"]).aggregate([("seq", "max")]).rename_columns(["id", "uri", "seq"])
    return live.join(latest, ["id", "uri"], join_type="inner").join(
        vectors, ["id", "uri", "seq"], join_type="inner").select(["id", "file", "row"])


def rows_by_file(rows: pa.Table) -> Iterator[tuple]:
    """(file number, its row numbers) for each file that `rows` (with file and row columns) reaches."""
    numbers, row_numbers = rows.column("file").to_numpy(), rows.column("row").to_numpy()
    for number in np.unique(numbers):
        yield int(number), row_numbers[numbers == number]


@dataclasses.dataclass(frozen=True)
class ViewChanges:
    """How the current view differs from earlier views of the same index (see `changes_since`)."""

    files: list  # (seq, path) of every committed embeddings file, oldest run first
    entered: list  # per file, a mask of its rows in the view now and not in every earlier view
    entered_count: int
    removed: pa.Array  # ids in an earlier view and not in the view now
    count: int  # rows in the view now
    earlier_counts: tuple = ()  # rows in each earlier view
    removed_live: int = 0  # of `removed`, ids still live: their uri changed (or they were retried) and failed


def changes_since(store: IndexStore, entries: Sequence[LogEntry], earlier: Sequence[int] = ()) -> ViewChanges:
    """The current view against the views after the first n log entries, for each n of `earlier` (none: every
    row of the view entered). A copy that may hold any mix of those views becomes the current view by writing
    the rows that entered and deleting the removed ids. Computed bucket by bucket, no id list held whole."""
    import pyarrow.compute as pc

    files = vector_files(store, entries)
    masks = [np.zeros(row_count(path), bool) for _, path in files]
    entered, count, removed, then_counts, removed_live = 0, 0, [], [0] * len(earlier), 0
    with _joined(store, entries, files, earlier) as buckets:
        for bucket in buckets:
            vectors = bucket["vectors"]
            now = latest_rows(bucket["live"], vectors)
            count += now.num_rows
            differing = [now] if not earlier else []
            gone_here = []
            for position, n in enumerate(earlier):
                then = latest_rows(bucket[f"live@{n}"], vectors.filter(pc.less_equal(vectors.column("seq"), n)))
                then_counts[position] += then.num_rows
                differing.append(now.join(then, ["id", "file", "row"], join_type="left anti"))
                gone_here.append(then.select(["id"]).join(now.select(["id"]), "id", join_type="left anti"))
            if gone_here:
                gone = pa.concat_tables(gone_here).group_by(["id"]).aggregate([])
                removed.append(gone)
                removed_live += gone.join(bucket["live"].select(["id"]), "id", join_type="inner").num_rows
            rows = pa.concat_tables(differing).group_by(["file", "row"]).aggregate([])
            for number, row_numbers in rows_by_file(rows):
                masks[number][row_numbers] = True
            entered += rows.num_rows
    gone = pa.concat_tables(removed).column("id").combine_chunks() if removed else pa.array([], pa.string())
    return ViewChanges(files, masks, entered, gone, count, tuple(then_counts), removed_live)


def current_selection(store: IndexStore, entries: Sequence[LogEntry]) -> tuple[list, list, int]:
    """The current view as ((seq, path) of each committed embeddings file, a mask of its rows in the view, rows).

    Each live (id, uri) keeps the row of its latest vector.
    """
    view = changes_since(store, entries)
    return view.files, view.entered, view.count


def index_status(store: IndexStore, running_update: Optional[str] = None) -> IndexStatus:
    """Counts of the committed state; what an update in progress (`running_update`) wrote is not counted."""
    import pyarrow.compute as pc

    entries = store.log()
    runs = store.committed_runs(entries)
    last = store.latest_update(entries)
    finished = {e.body["update"] for e in entries if e.kind == "update"}
    pending_runs = pa.array([r.seq for r in runs if r.body.get("update") not in finished], pa.int64())
    totals = dict.fromkeys(("live", "current", "settled", "settled_current", "removed", "pending"), 0)
    with _joined(store, entries, vector_files(store, entries)) as buckets:
        for bucket in buckets:
            live, vectors = bucket["live"], bucket["vectors"]
            pending = pc.is_in(vectors.column("seq"), value_set=pending_runs)
            settled = vectors.filter(pc.invert(pending))
            totals["live"] += live.num_rows
            totals["current"] += live.join(_distinct_pairs(vectors), ["id", "uri"], join_type="inner").num_rows
            totals["settled"] += settled.num_rows
            totals["settled_current"] += live.join(_distinct_pairs(settled), ["id", "uri"], join_type="inner").num_rows
            totals["removed"] += settled.group_by(["id"]).aggregate([]).join(live.select(["id"]), "id",
                                                                              join_type="left anti").num_rows
            totals["pending"] += vectors.num_rows - settled.num_rows
    # Begun after the last finished update and not finished: a later update that finished took over its runs.
    begun = [e.body["update"] for e in entries if e.kind == "begin" and (last is None or e.seq > last.seq)]
    return IndexStatus(
        runs=len(runs),
        updates=len(finished),
        live_ids=totals["live"],
        embedded=totals["current"],
        failed=totals["live"] - totals["current"],
        failed_for_good=last.body.get("counts", {}).get("failed_for_good", 0) if last else 0,
        superseded_vectors=totals["settled"] - totals["settled_current"],
        removed_ids=totals["removed"],
        pending_vectors=totals["pending"],
        last_update=last.body["committed_at"] if last else None,
        unfinished_updates=tuple(u for u in begun if u not in finished and u != running_update),
        running_update=running_update,
        leftovers=tuple(store.leftovers(entries, keep_update=running_update)),
        engines=tuple(dict.fromkeys(run.body["engine"] for run in runs if run.body.get("engine"))),
    )


def _selected_rows(bucket_and_parts) -> Iterator[tuple]:
    """A bucket of ids -> (file number, rows of that file in the current view)."""
    _, parts = bucket_and_parts
    sides = {"live": [], "vectors": []}
    for side, table in parts:
        sides[side].append(table)
    yield from rows_by_file(latest_rows(concat(sides["live"], LIVE_SCHEMA), concat(sides["vectors"], VECTOR_SCHEMA)))


def _read_rows(number_and_rows: tuple, files: Sequence[str]) -> Iterator[Embedding]:
    """(file number, arrays of row numbers) -> the Embedding of each of those rows, read in file order."""
    number, parts = number_and_rows
    wanted = np.sort(np.concatenate(list(parts)))
    with open_parquet(files[number], pre_buffer=False) as parquet:
        dim = parquet.schema_arrow.field("embedding").type.list_size
        start = 0
        for batch in parquet.iter_batches(batch_size=4096):
            lo, hi = np.searchsorted(wanted, [start, start + batch.num_rows])
            start += batch.num_rows
            if hi == lo:
                continue
            batch = batch.take(pa.array(wanted[lo:hi] - (start - batch.num_rows)))
            matrix = vectors(batch, dim)
            digests = batch.column("sha256").to_pylist() if "sha256" in batch.schema.names else [None] * batch.num_rows
            for id_, uri, vector, digest in zip(batch.column("id").to_pylist(), batch.column("uri").to_pylist(),
                                                matrix, digests):
                yield Embedding(id_, uri, vector.copy(), digest)


def view_metadata(store: IndexStore, entries: Sequence[LogEntry]) -> dict[str, str]:
    """The embedding.* metadata (without the prefix) of the latest committed run's files; without runs, what
    index.json recorded at `create`, which is what every run's files carry."""
    runs = store.committed_runs(entries)
    files = store.run_files(runs[-1]) if runs else []
    if not files:
        return {k: str(v) for k, v in store.identity().items() if k not in ("format", "index_id", "created_at")}
    return file_metadata(files[0])


class WriteSnapshot(beam.PTransform):
    """The current view -> OUTPUT/embeddings-*.parquet, with the schema and metadata of the index's runs.

    Only ids, uris and row numbers go through the join (in buckets of ids, as Arrow tables); each embeddings file
    is then read once for the rows it gives the view, so that the vectors are never shuffled.
    """

    def __init__(self, store: IndexStore, entries: Sequence[LogEntry], output_dir: str):
        super().__init__()
        last = store.latest_update(entries)
        self._live = store.live_files(last) if last else []
        self._vectors = [path for _, path in vector_files(store, entries)]
        self._seqs = [seq for seq, _ in vector_files(store, entries)]
        self._buckets = bucket_count(self._live + self._vectors)
        self._metadata = view_metadata(store, entries)
        self._output_dir = output_dir

    def expand(self, pbegin):
        files, seqs = self._vectors, self._seqs
        parts = (
            pbegin | "LiveFiles" >> beam.Create(self._live) | "ReadLive" >> beam.FlatMap(read_pair_tables)
            | "BucketLive" >> beam.ParDo(ToBuckets("live", self._buckets)),
            pbegin | "VectorFiles" >> beam.Create(list(range(len(files)))) | "Spread" >> beam.Reshuffle()
            | "ReadVectorIds" >> beam.FlatMap(lambda n: read_pairs(files[n], {"seq": seqs[n], "file": n}))
            | "BucketVectors" >> beam.ParDo(ToBuckets("vectors", self._buckets)),
        )
        dim = int(self._metadata["dim"])
        return (parts | "AllSides" >> beam.Flatten() | "GroupByBucket" >> beam.GroupByKey()
                | "SelectRows" >> beam.FlatMap(_selected_rows) | "GroupByFile" >> beam.GroupByKey()
                | "ReadRows" >> beam.FlatMap(_read_rows, files)
                | "Write" >> WriteEmbeddings(self._output_dir, dim, self._metadata))
