"""Planning an update, as one Beam pipeline: which ids are live, which (id, uri) to embed, what changed.

Joins the input (read with the pipeline's own source, duplicate rule included) with the last update's live
set and the (id, uri) of every committed vector. An input is embedded when no committed vector has its
(id, uri): new ids, ids whose uri changed, inputs that failed before, and inputs whose run was interrupted.
Vectors are never read here, only their id and uri columns. An input whose bytes did not decode before is not
read again while its object's version (size and modification time, uri_reader.settled_version) stays the one
that failed: stat'ed here, it costs a metadata request, not a download and a decode, every night. Inputs
that failed to be read (a 404, a timeout) are transient and read again.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.index.spill import concat, read_pair_tables, split, total_rows
from pipeline.index.store import IndexStore, LogEntry
from pipeline.interrupt import run_interruptibly, run_to_end
from pipeline.options import JobConfig
from pipeline.runtime import is_local_runner
from transforms.records import FAILED, Failure
from transforms.sink import WriteErrors
from transforms.source import ReadImageRefs
from transforms.uri_reader import settled_version

NAMESPACE = "index"
KINDS = ("new", "updated", "unchanged", "retried", "removed", "to_embed", "unchanged_failures")
PAIRS_SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False), pa.field("uri", pa.string())])
FAILED_SCHEMA = pa.schema([*PAIRS_SCHEMA, pa.field("stage", pa.string()), pa.field("error", pa.string()),
                           pa.field("bytes_version", pa.string())])
STAT_THREADS = 16
BUCKET_ROWS = 500_000  # rows of all sides a bucket of the planning join holds, about


@dataclasses.dataclass(frozen=True)
class PlanCounts:
    new: int = 0  # ids not live after the last update
    updated: int = 0  # live ids whose uri changed
    unchanged: int = 0  # live ids with the same uri and a vector
    retried: int = 0  # live ids with the same uri and no vector yet (failed or interrupted before)
    removed: int = 0  # live ids no longer in the input
    to_embed: int = 0  # inputs without a committed vector for their (id, uri)
    unchanged_failures: int = 0  # inputs whose unchanged bytes did not decode before: not read again
    refused: int = 0  # manifest rows that are no input (bad rows, repeated ids)


class ToBuckets(beam.DoFn):
    """Tables with an id column -> (bucket, (side, the table's rows in that bucket))."""

    def __init__(self, side: str, buckets: int):
        self._side, self._buckets = side, buckets

    def process(self, table):
        for bucket, part in split(table, self._buckets):
            yield bucket, (self._side, part)


def bucket_count(paths: Sequence[str]) -> int:
    """Buckets for a join over the rows of `paths` (and as many inputs): about BUCKET_ROWS rows each."""
    return max(1, -(-2 * total_rows(paths) // BUCKET_ROWS))


def _pairs_of(refs: list) -> pa.Table:
    return pa.table({"id": [ref[0] for ref in refs], "uri": [ref[1] for ref in refs]}, schema=PAIRS_SCHEMA)


class _Classify(beam.DoFn):
    """Per bucket of ids: which are live, what kind of change each is, and which must be embedded."""

    def __init__(self):
        self._counters = {kind: Metrics.counter(NAMESPACE, kind) for kind in KINDS}

    def process(self, bucket_and_parts):
        import pyarrow.compute as pc

        _, parts = bucket_and_parts
        sides = {"input": [], "previous_live": [], "vectors": [], "failed": []}
        for side, table in parts:
            sides[side].append(table)
        inputs, previous, vectors = (concat(sides[side], PAIRS_SCHEMA) for side in ("input", "previous_live",
                                                                                     "vectors"))
        failed = concat(sides["failed"], FAILED_SCHEMA)
        embedded = vectors.group_by(["id", "uri"]).aggregate([])
        embedded = embedded.append_column("embedded", pa.array(np.ones(embedded.num_rows, bool)))
        rows = inputs.join(embedded, ["id", "uri"], join_type="left outer").join(
            previous.rename_columns(["id", "previous_uri"]), "id", join_type="left outer")
        done = pc.fill_null(rows.column("embedded"), False)
        known = pc.is_valid(rows.column("previous_uri"))
        same = pc.fill_null(pc.equal(rows.column("previous_uri"), rows.column("uri")), False)
        counts = {
            "new": rows.num_rows - pc.sum(known).as_py() if rows.num_rows else 0,
            "updated": pc.sum(pc.and_(known, pc.invert(same))).as_py() or 0,
            "unchanged": pc.sum(pc.and_(same, done)).as_py() or 0,
            "retried": pc.sum(pc.and_(same, pc.invert(done))).as_py() or 0,
            "removed": previous.join(inputs.select(["id"]), "id", join_type="left anti").num_rows,
        }
        todo = rows.filter(pc.invert(done)).select(["id", "uri"])
        recheck = todo.join(failed, ["id", "uri"], join_type="inner")  # each version that failed before
        todo = todo.join(recheck.select(["id", "uri"]), ["id", "uri"], join_type="left anti")
        counts["to_embed"] = todo.num_rows
        for kind, count in counts.items():
            if count:
                self._counters[kind].inc(count)
        if inputs.num_rows:
            yield beam.pvalue.TaggedOutput("live", inputs.cast(PAIRS_SCHEMA))
        if recheck.num_rows:
            yield beam.pvalue.TaggedOutput("recheck", recheck.cast(FAILED_SCHEMA))
        if todo.num_rows:
            yield todo.cast(PAIRS_SCHEMA)


class _ChangedSinceFailing(beam.DoFn):
    """Rows of earlier failures (id, uri, a version that failed) -> the (id, uri) whose object is no longer at
    any version that failed: to embed. The others are not read: their failure is this update's again (output
    "unchanged"), with the reason it failed first."""

    def __init__(self):
        self._counters = {kind: Metrics.counter(NAMESPACE, kind) for kind in ("to_embed", "unchanged_failures")}

    def setup(self):
        import concurrent.futures

        self._pool = concurrent.futures.ThreadPoolExecutor(STAT_THREADS, thread_name_prefix="stat")

    def teardown(self):
        self._pool.shutdown(wait=False, cancel_futures=True)

    def process(self, table):
        failed_versions: dict = {}
        for row in table.to_pylist():
            failed_versions.setdefault((row["id"], row["uri"]), {})[row["bytes_version"]] = row
        pairs = list(failed_versions)
        changed = []
        for pair, version in zip(pairs, self._pool.map(lambda pair: settled_version(pair[1]), pairs)):
            before = failed_versions[pair].get(version)
            if before is None:
                changed.append(pair)
            else:
                self._counters["unchanged_failures"].inc()
                yield beam.pvalue.TaggedOutput("unchanged", Failure(
                    *pair, before["stage"], f"Unchanged since it failed, not read again: {before['error']}", version))
        if changed:
            self._counters["to_embed"].inc(len(changed))
            yield _pairs_of(changed)


def read_failed_versions(path: str):
    """Rows (FAILED_SCHEMA) of the failures in an errors file that carry a version (errors files written before
    versions were recorded have none)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        errors = pq.ParquetFile(f, pre_buffer=False)
        if "bytes_version" not in errors.schema_arrow.names:
            return
        for batch in errors.iter_batches(columns=list(FAILED_SCHEMA.names), batch_size=65536):
            table = pa.Table.from_batches([batch])
            table = table.filter(pc.is_valid(table.column("bytes_version")))
            if table.num_rows:
                yield table.cast(FAILED_SCHEMA)


def failed_for_good(paths: Sequence[str]) -> int:
    """How many failures in these errors files carry a version: not read again while it stays the same."""
    return sum(table.num_rows for path in paths for table in read_failed_versions(path))


def _write_pairs(prefix: str) -> beam.PTransform:
    return beam.io.WriteToParquetBatched(prefix, PAIRS_SCHEMA, file_name_suffix=".parquet")


def plan_update(
    store: IndexStore, update: str, config: JobConfig, beam_args: Sequence[str], entries: Sequence[LogEntry]
) -> PlanCounts:
    """Writes updates/UPDATE/{live,todo,errors}-*.parquet and returns the counts.

    The join moves Arrow tables split into buckets of ids (spill.py), not one element per id: its memory and
    time on DirectRunner grow with the index by about 70 bytes and a few microseconds an id.
    """
    folder = store.update_dir(update)
    last = store.latest_update(entries)
    live_files = store.live_files(last) if last else []
    vector_files = [path for run in store.committed_runs(entries) for path in store.run_files(run)]
    error_files = [path for run in store.committed_runs(entries) for path in store.run_files(run, "errors")]
    buckets = bucket_count(live_files + vector_files)
    options = PipelineOptions(list(beam_args))
    p = beam.Pipeline(options=options)
    inputs = p | "ReadInputs" >> ReadImageRefs(config.input, (), config.tfrecord_features)
    parts = (
        inputs["refs"] | "KeyInputs" >> beam.Map(lambda ref: (ref.id, ref.uri))
        | "BatchInputs" >> beam.BatchElements(min_batch_size=1024, max_batch_size=65536)
        | "InputTables" >> beam.Map(_pairs_of) | "BucketInputs" >> beam.ParDo(ToBuckets("input", buckets)),
        p | "LiveFiles" >> beam.Create(live_files) | "ReadLive" >> beam.FlatMap(read_pair_tables)
        | "BucketLive" >> beam.ParDo(ToBuckets("previous_live", buckets)),
        p | "VectorFiles" >> beam.Create(vector_files) | "Spread" >> beam.Reshuffle()
        | "ReadVectorIds" >> beam.FlatMap(read_pair_tables) | "BucketVectors" >> beam.ParDo(ToBuckets("vectors", buckets)),
        p | "ErrorFiles" >> beam.Create(error_files) | "ReadFailedVersions" >> beam.FlatMap(read_failed_versions)
        | "BucketFailed" >> beam.ParDo(ToBuckets("failed", buckets)),
    )
    plan = (parts | "AllSides" >> beam.Flatten() | "GroupByBucket" >> beam.GroupByKey()
            | "Classify" >> beam.ParDo(_Classify()).with_outputs("live", "recheck", main="todo"))
    rechecked = plan.recheck | "StatFailedBefore" >> beam.ParDo(_ChangedSinceFailing()).with_outputs(
        "unchanged", main="changed")
    _ = plan.live | "WriteLive" >> _write_pairs(FileSystems.join(folder, "live"))
    _ = ((plan.todo, rechecked.changed) | "AllTodo" >> beam.Flatten()
         | "WriteTodo" >> _write_pairs(FileSystems.join(folder, "todo")))
    refused = inputs[FAILED] | "CountRefused" >> beam.Map(_count_refused)
    _ = (refused, rechecked.unchanged) | "AllFailures" >> beam.Flatten() | "WriteErrors" >> WriteErrors(folder)
    result, _ = run_interruptibly(lambda: run_to_end(p), local_workers=is_local_runner(options))
    found = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    totals = {kind: 0 for kind in (*KINDS, "refused")}
    for metric in found:
        totals[metric.key.metric.name] += metric.committed if metric.committed is not None else metric.attempted
    return PlanCounts(**totals)


def _count_refused(failure):
    Metrics.counter(NAMESPACE, "refused").inc()
    return failure


def write_chunks(store: IndexStore, update: str, run_size: int) -> list[str]:
    """Splits the update's todo list into Parquet manifests of at most `run_size` rows, streaming."""
    import pyarrow.parquet as pq

    folder = store.update_dir(update)
    todo = store.parquet_files(folder, "todo")
    chunks, pending, pending_rows = [], [], 0

    def flush():
        nonlocal pending, pending_rows
        path = FileSystems.join(folder, "chunks", f"{len(chunks) + 1:05d}.parquet")
        with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            pq.write_table(pa.concat_tables(pending).combine_chunks(), f)
        chunks.append(path)
        pending, pending_rows = [], 0

    for path in todo:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=min(run_size, 65536)):
                table = pa.Table.from_batches([batch])
                while table.num_rows:
                    take = min(run_size - pending_rows, table.num_rows)
                    pending.append(table.slice(0, take))
                    pending_rows += take
                    table = table.slice(take)
                    if pending_rows == run_size:
                        flush()
    if pending_rows:
        flush()
    return chunks
